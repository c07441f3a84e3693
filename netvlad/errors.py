"""Error types. Every failure the library expects (bad input, bad file, mismatch) derives from
`NetVLADError`, so callers (CLI, service) can report it as one clear line instead of a traceback."""


class NetVLADError(Exception):
    """Base class of the library's expected errors."""


class ImageError(NetVLADError):
    """A file or upload could not be decoded as an image (corrupt, truncated, empty, not an image,
    or too many pixels)."""


class ModelFileError(NetVLADError):
    """A model file is missing, unreadable, of another version, or does not match its config."""


class DatasetError(NetVLADError):
    """A place dataset is malformed: missing file, wrong columns, missing image, no positives."""


class IndexStoreError(NetVLADError):
    """An index folder is missing, corrupt, or was built with another model."""
