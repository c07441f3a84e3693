"""Error types. Every failure the library expects (bad input, bad file, mismatch) derives from
`NetVLADError`, so callers (CLI, service) can report it as one clear line instead of a traceback."""


class NetVLADError(Exception):
    """Base class of the library's expected errors."""


class ImageError(NetVLADError):
    """A file or upload could not be decoded as an image (corrupt, truncated, empty, not an image,
    or too many pixels). `source` names the file or upload, `reason` says what is wrong with it."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.source, self.reason)


class NotAnImageError(ImageError):
    """Bytes that are no image format the decoder reads."""


class TooManyPixelsError(ImageError):
    """An image over the pixel limit (refused from its header: decompression bombs)."""


class CorruptImageError(ImageError):
    """An image file that is empty, truncated or damaged."""


class ModelFileError(NetVLADError):
    """A model file is missing, unreadable, of another version, or does not match its config."""


class DatasetError(NetVLADError):
    """A place dataset is malformed: missing file, wrong columns, missing image, no positives."""


class IndexStoreError(NetVLADError):
    """An index folder is missing, corrupt, or was built with another model."""


class MetadataError(NetVLADError):
    """Photo metadata with a wrong type or value (e.g. a latitude that is not a number in [-90, 90])."""


class DiskFullError(NetVLADError):
    """A write failed because the disk (or quota) is full; the message starts with "disk full:"."""


class PhotoFileError(NetVLADError):
    """A catalogued photo's file cannot be served: not indexed, outside the collection, a link,
    gone, or changed since it was indexed. The message names no server path."""


class RerankUnavailableError(NetVLADError):
    """A re-ranking was asked of an index that holds no local evidence for it (e.g. geometric
    verification of an index built without ``--local-features``); the message says how to add it."""
