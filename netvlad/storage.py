"""Durable, confined file access for index folders.

- `atomic_path` / `write_atomic`: every file the project writes goes to a temp file in the same
  folder, is fsynced and renamed over the target, and the folder fsynced; the temp file is removed
  when anything fails, so a crash or a full disk leaves the old file.
- `sweep_temp_files`: remove the temp files and folders a killed writer left (names `.*.tmp`,
  `.*.tmp-*`), called by the one writer of an index folder when it opens it.
- `disk_full_errors`: a full disk (or quota) as one `DiskFullError`, from the OS or from SQLite.
- `open_confined`: open a file below a folder without following any symbolic link that leads out
  of it, even when links are swapped in while it opens (each step is an `openat` with
  ``O_NOFOLLOW`` from the folder's real path).
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from netvlad.errors import DiskFullError

TEMP_SUFFIX = ".tmp"
_FULL = {errno.ENOSPC, errno.EDQUOT}
#: A file system with less free space than this (bytes) counts as full.
FULL_BELOW = 64 * 1024


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where `write_atomic` stages `path`: a hidden sibling that `sweep_temp_files` recognises."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` for the block to write; when the block succeeds the temp file is
    fsynced and renamed over `path` and the folder fsynced, when it fails the temp file is removed:
    readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace `path` with `data` atomically and durably (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _is_temp(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and (name.endswith(TEMP_SUFFIX) or f"{TEMP_SUFFIX}-" in name)


def sweep_temp_files(folders: list[Path], prefix: str = ".") -> list[Path]:
    """Delete the hidden temp files and folders (`.*.tmp`, `.*.tmp-*`) whose names start with
    `prefix`, directly inside `folders`, that an interrupted writer left; returns what went.
    Links are removed, never followed."""
    swept = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if _is_temp(entry.name, prefix):
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                swept.append(path)
    return swept


def space_left(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still write on the file system of `path`."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def is_disk_full(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether `exc` says the disk or the quota is full. SQLite reports a full disk met while
    creating its journal files as a plain I/O error: with `where`, such an error counts when
    the file system of `where` has less than a page left."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    if isinstance(exc, sqlite3.DatabaseError):
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
            return True
        return where is not None and "I/O error" in str(exc) and space_left(where) < FULL_BELOW
    return False


@contextmanager
def disk_full_errors(where: str | os.PathLike) -> Iterator[None]:
    """Raise a full disk inside the block as `DiskFullError("disk full: <where>: …")`."""
    try:
        yield
    except (OSError, sqlite3.DatabaseError) as exc:
        if not is_disk_full(exc, where):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DiskFullError(f"disk full: {os.fspath(where)}: {reason}; free some space and run it again") from None


def open_confined(base: str | os.PathLike, relative: str) -> int:
    """A read-only file descriptor of the regular file `base/relative`, or `PermissionError` when
    the path leaves `base` (``..``, an absolute path, or a symbolic link anywhere below `base`)
    and `FileNotFoundError` when it is missing. Symbolic links inside the path are refused, not
    followed: callers resolve a catalogued link once with `confined_target`."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or any(part in ("", ".", "..") for part in parts):
        raise PermissionError(errno.EACCES, "path leaves its folder", relative)
    fd = os.open(os.path.realpath(base), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = step
        leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PermissionError(errno.EACCES, "a symbolic link or a non-folder in the path", relative) from None
        raise
    finally:
        os.close(fd)
    return leaf


def confined_target(base: str | os.PathLike, relative: str) -> str | None:
    """`relative` with its symbolic links resolved, relative to the real `base`; None when the
    target lies outside `base`."""
    real_base = os.path.realpath(base)
    target = os.path.realpath(os.path.join(real_base, relative))
    if os.path.commonpath([real_base, target]) != real_base or target == real_base:
        return None
    return os.path.relpath(target, real_base)
