"""What the catalog holds of a photo, as callers see it: `ImageRecord`, built from a catalog row
with every value cleaned (`netvlad.metadata`: what a row holds can never fail a read), and how
file names are stored and shown.

File names are Python file names (`os.fsdecode`): a name that is not valid UTF-8 carries surrogate
escapes; it is stored losslessly as a BLOB of its bytes (`encode_path`/`decode_path`) and shown
with `\\xNN` escapes (`display_path`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from netvlad.metadata import clean_coordinate, clean_extra, clean_taken_at


def encode_path(path: str) -> str | bytes:
    """A file name as stored: the text itself, or its bytes when it is not valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def decode_path(stored: str | bytes) -> str:
    """A stored file name back as a Python file name (`encode_path`'s inverse)."""
    return os.fsdecode(stored) if isinstance(stored, bytes) else stored


def display_path(path: str) -> str:
    """A file name fit to print or send as JSON: bytes that are not UTF-8 shown as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class ImageRecord:
    """One catalogued photo. `path` is the absolute path of its first file (None if it has none);
    `file` and `origin` that file as catalogued (relative to the photo folder for ``folder``, to
    the index folder for ``upload``, absolute for ``file``); `paths` every catalogued path."""

    id: int
    sha256: str
    size: int
    status: str
    path: str | None = None
    file: str | None = None
    origin: str | None = None
    paths: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    taken_at: str | None = None
    lat: float | None = None
    lon: float | None = None
    metadata: dict = field(default_factory=dict)
    error: str | None = None
    added_at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def public_path(self) -> str | None:
        """The file's name as clients may see it: relative to the photo folder or the index folder,
        only the file name for a file added by absolute path; never the server's folder layout."""
        if self.file is None:
            return None
        name = os.path.basename(self.file) if self.origin == "file" else self.file
        return display_path(name)


RECORD_COLUMNS = "id, sha256, size, status, width, height, taken_at, lat, lon, metadata, error, added_at"


def record_from_row(row: tuple) -> ImageRecord:
    """An `ImageRecord` (no files yet) from a row of RECORD_COLUMNS, its values cleaned: what the
    catalog holds can never fail a read."""
    lat, lon = clean_coordinate("lat", row[7]), clean_coordinate("lon", row[8])
    return ImageRecord(
        id=row[0], sha256=row[1], size=row[2], status=row[3], width=row[4], height=row[5],
        taken_at=clean_taken_at(row[6]), lat=lat if lon is not None else None,
        lon=lon if lat is not None else None, metadata=clean_extra(row[9]), error=row[10], added_at=row[11],
    )
