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
