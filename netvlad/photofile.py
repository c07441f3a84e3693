"""Opening the file of a catalogued photo for serving, confined to the collection.

A file is served only when, at the moment it is opened, its real path lies inside the folder it
belongs to (the photo folder, or the index folder's `uploads/`), every step is opened without
following links (`netvlad.storage.open_confined`), it is a regular file, and its size and
SHA-256 are those catalogued: a photo replaced by a link, or by other content, after indexing is
refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from netvlad.records import ImageRecord
from netvlad.errors import PhotoFileError
from netvlad.storage import confined_target, open_confined

CHUNK = 1 << 20


def open_photo_file(base: Path, path: str, size: int, sha256: str) -> BinaryIO:
    """`base/path` opened for reading at offset 0 when it passes the checks above, else
    `PhotoFileError` with the reason."""
    relative = confined_target(base, path)
    if relative is None:
        raise PhotoFileError("its file lies outside the collection")
    try:
        fd = open_confined(base, relative)
    except PermissionError:
        raise PhotoFileError("its file lies outside the collection") from None
    except FileNotFoundError:
        raise PhotoFileError("its file is no longer on the server") from None
    except OSError as exc:
        raise PhotoFileError(f"its file cannot be read ({exc.strerror})") from None
    handle = os.fdopen(fd, "rb")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PhotoFileError("its file is not a regular file")
        if info.st_size != size or hashlib.file_digest(handle, "sha256").hexdigest() != sha256:
            raise PhotoFileError("its file has changed since it was indexed (run `netvlad index` again)")
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return handle


def open_indexed_photo(record: ImageRecord, files: list[tuple[str, str]], bases: dict[str, Path | None]) -> BinaryIO:
    """The first of an indexed photo's `files` [(path, origin)] that passes the checks, opened;
    `bases` maps an origin to the folder its paths are relative to (origins not in it are never
    served). `PhotoFileError` saying why none can be served."""
    if record.status != "indexed":
        raise PhotoFileError(f"image {record.id} is {record.status}, not indexed")
    reason = "it has no file in the collection (added by a path outside it)"
    for path, origin in files:
        if bases.get(origin) is None:
            continue
        try:
            return open_photo_file(bases[origin], path, record.size, record.sha256)
        except PhotoFileError as exc:
            reason = str(exc)
    raise PhotoFileError(f"image {record.id}: {reason}")
