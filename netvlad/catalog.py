"""The SQLite catalog of an index folder: the source of truth for which photos are indexed.

Two tables. ``images`` holds one row per distinct content (sha256): its id (also its faiss id;
AUTOINCREMENT, so ids are never reused), header facts, optional metadata, a status and — once
indexed — where its descriptor lies: a row of a shard file (``shard``, ``row``; table ``shards``,
kept by `netvlad.descriptorstore`). ``files`` maps every path seen to its image, so identical
files share one image and are described once. A shard's reference and the ``indexed`` status of
its images are committed in one transaction, which makes a killed run resumable without loss or
duplicates. Schema 1 kept descriptors as float16 BLOBs in ``images``; a writer opening such a
catalog moves them into shards once (`netvlad.legacyblobs`).

Statuses: ``pending`` (known, not yet described), ``indexed``, ``failed`` (``error`` says why),
``removed`` (deleted through the API but its file is still in the photo folder: kept as a
tombstone so the next folder scan does not add it back).

File origins: ``folder`` (path relative to the indexed photo folder, ``meta.root``), ``file``
(an absolute path added through the API) and ``upload`` (bytes stored by the index, path relative
to the index folder).

Paths are Python file names (`os.fsdecode`): a name that is not valid UTF-8 carries surrogate
escapes and is stored losslessly as a BLOB of its bytes (`encode_path`/`decode_path`); show it
with `netvlad.records.display_path`. Values read back are cleaned (`netvlad.metadata`): a malformed coordinate,
time or metadata text in a row reads as absent and never fails a read.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from netvlad.errors import DiskFullError, IndexStoreError
from netvlad.exif import PhotoInfo
from netvlad.records import RECORD_COLUMNS, ImageRecord, decode_path, encode_path, record_from_row
from netvlad.sqlitedb import SQLiteDatabase
from netvlad.storage import is_disk_full

SCHEMA_VERSION = 2
#: Older schema versions a writer migrates on open (`netvlad.legacyblobs`).
MIGRATABLE = (1,)
STATUSES = ("pending", "indexed", "failed", "removed")
ORIGINS = ("folder", "file", "upload")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    width INTEGER, height INTEGER,
    taken_at TEXT, lat REAL, lon REAL,
    metadata TEXT,
    status TEXT NOT NULL CHECK (status IN {STATUSES}),
    error TEXT,
    shard INTEGER, row INTEGER,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    origin TEXT NOT NULL CHECK (origin IN {ORIGINS}),
    image_id INTEGER REFERENCES images(id) ON DELETE CASCADE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS files_image ON files(image_id);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
                                   rows INTEGER NOT NULL);
"""

#: Fields of a photo's metadata that have their own columns; other keys are kept as JSON.
METADATA_COLUMNS = ("lat", "lon", "taken_at")


class FileState(NamedTuple):
    """What the catalog remembers of a path: size and mtime (ns) when it was hashed."""

    size: int
    mtime_ns: int


class Catalog(SQLiteDatabase):
    """The catalog of one index folder (see the module docstring); writers are serialised by the
    caller (`Index`). `readonly`: see `SQLiteDatabase`."""

    def __init__(self, path: str | Path, readonly: bool = False):
        super().__init__(path, readonly)
        try:
            if readonly:
                self._open_readonly()
            else:
                conn = self.connection
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(SCHEMA)
            version = self.get_meta("schema_version")
            if version is None and not readonly:
                self.set_meta("schema_version", SCHEMA_VERSION)
                self.set_meta("revision", 0)
            elif int(version) in MIGRATABLE and readonly:
                raise IndexStoreError(f"{self.path}: written by an older netvlad; open the index once for "
                                      "writing (netvlad index, or the service with writes) to migrate it")
            elif int(version) != SCHEMA_VERSION and int(version) not in MIGRATABLE:
                raise IndexStoreError(
                    f"{self.path}: catalog schema version {version}, this netvlad reads {SCHEMA_VERSION}"
                )
        except sqlite3.DatabaseError as exc:
            self.close()
            if not readonly and is_disk_full(exc, self.path.parent):
                raise DiskFullError(f"disk full: {self.path.parent}: the catalog cannot be opened for writing; "
                                    "free some space and run it again") from None
            raise IndexStoreError(f"{self.path}: not a readable catalog ({exc})") from None
        except IndexStoreError:
            self.close()
            raise

    @property
    def revision(self) -> int:
        """Counter bumped in every transaction that changes the set of indexed descriptors."""
        return int(self.get_meta("revision") or 0)

    @property
    def root(self) -> Path | None:
        """The photo folder catalogued (None before the first `netvlad index`)."""
        value = self.get_meta("root")
        return Path(value) if value else None

    def bump(self, conn: sqlite3.Connection) -> None:
        """Bump `revision` inside transaction `conn`."""
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='revision'")

    # ------------------------------------------------------------------------------ files

    def files(self, origin: str = "folder") -> dict[str, FileState]:
        """Every catalogued path of `origin` → its remembered size and mtime."""
        rows = self.connection.execute("SELECT path, size, mtime_ns FROM files WHERE origin=?", (origin,))
        return {decode_path(path): FileState(size, mtime) for path, size, mtime in rows}

    def record_file(
        self,
        path: str,
        origin: str,
        size: int,
        mtime_ns: int,
        sha256: str,
        info: PhotoInfo,
        metadata: dict | None = None,
    ) -> int:
        """Record that `path` holds the content `sha256`; returns that content's image id.

        New content becomes a `pending` image with the header facts `info`; known content keeps
        its status (identical files are indexed once). `metadata` (lat, lon, taken_at and free
        keys) overrides the header facts.
        """
        extra = dict(metadata or {})
        given = {key: extra.pop(key) for key in METADATA_COLUMNS if key in extra}
        columns = {"taken_at": info.taken_at, "lat": info.lat, "lon": info.lon} | given
        with self.transaction() as conn:
            row = conn.execute("SELECT id FROM images WHERE sha256=?", (sha256,)).fetchone()
            if row is None:
                image_id = conn.execute(
                    "INSERT INTO images(sha256, size, width, height, taken_at, lat, lon, metadata, status, added_at)"
                    " VALUES(?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                    (sha256, size, info.width, info.height, columns["taken_at"], columns["lat"],
                     columns["lon"], json.dumps(extra) if extra else None, time.time()),
                ).lastrowid
            else:
                image_id = row[0]
                if metadata:
                    self._update_metadata(conn, image_id, given, extra)
            conn.execute(
                "INSERT INTO files(path, origin, image_id, size, mtime_ns, error) VALUES(?, ?, ?, ?, ?, NULL)"
                " ON CONFLICT(path) DO UPDATE SET origin=excluded.origin, image_id=excluded.image_id,"
                " size=excluded.size, mtime_ns=excluded.mtime_ns, error=NULL",
                (encode_path(path), origin, image_id, size, mtime_ns),
            )
        return int(image_id)

    def _update_metadata(self, conn: sqlite3.Connection, image_id: int, columns: dict, extra: dict) -> None:
        for key, value in columns.items():
            conn.execute(f"UPDATE images SET {key}=? WHERE id=?", (value, image_id))
        if extra:
            old = conn.execute("SELECT metadata FROM images WHERE id=?", (image_id,)).fetchone()[0]
            merged = {**(json.loads(old) if old else {}), **extra}
            conn.execute("UPDATE images SET metadata=? WHERE id=?", (json.dumps(merged), image_id))

    def record_unreadable(self, path: str, origin: str, size: int, mtime_ns: int, error: str) -> None:
        """Record a path that could not even be read (broken link, permission denied)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO files(path, origin, image_id, size, mtime_ns, error) VALUES(?, ?, NULL, ?, ?, ?)"
                " ON CONFLICT(path) DO UPDATE SET image_id=NULL, size=excluded.size,"
                " mtime_ns=excluded.mtime_ns, error=excluded.error",
                (encode_path(path), origin, size, mtime_ns, error),
            )

    def delete_files(self, paths: Iterable[str]) -> list[int]:
        """Forget these paths; images no file shows any more go too. Returns the ids of those
        images that were indexed."""
        with self.transaction() as conn:
            conn.executemany("DELETE FROM files WHERE path=?", ((encode_path(p),) for p in paths))
            return self.delete_orphans()

    def delete_orphans(self) -> list[int]:
        """Delete images no file shows any more (their content was replaced or deleted); returns
        the ids of those that were indexed."""
        with self.transaction() as conn:
            rows = conn.execute(
                "DELETE FROM images WHERE NOT EXISTS (SELECT 1 FROM files WHERE files.image_id = images.id)"
                " RETURNING id, status"
            ).fetchall()
            gone = [image_id for image_id, status in rows if status == "indexed"]
            if gone:
                self.bump(conn)
        return gone

    def files_of(self, image_id: int) -> list[tuple[str, str]]:
        """(path, origin) of every file showing image `image_id`, sorted by path."""
        rows = self.connection.execute(
            "SELECT path, origin FROM files WHERE image_id=? ORDER BY path", (image_id,)
        )
        return [(decode_path(path), origin) for path, origin in rows]

    # ------------------------------------------------------------------------------ images

    def find(self, sha256: str) -> tuple[int | None, str | None]:
        """(id, status) of the image with this content, (None, None) when unknown."""
        row = self.connection.execute("SELECT id, status FROM images WHERE sha256=?", (sha256,)).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def status(self, image_id: int) -> str | None:
        row = self.connection.execute("SELECT status FROM images WHERE id=?", (image_id,)).fetchone()
        return None if row is None else row[0]

    def pending(self) -> list[tuple[int, str, str, int | None, int | None]]:
        """(id, path, origin, width, height) of each pending image (one of its files), by id."""
        rows = self.connection.execute(
            "SELECT i.id, MIN(f.path), f.origin, i.width, i.height FROM images i"
            " JOIN files f ON f.image_id = i.id WHERE i.status='pending' GROUP BY i.id ORDER BY i.id"
        )
        return [(image_id, decode_path(path), origin, w, h) for image_id, path, origin, w, h in rows]

    def mark_failed(self, failures: Iterable[tuple[int, str]]) -> None:
        """Mark images failed with their reasons: [(id, reason), …]."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE images SET status='failed', error=? WHERE id=?",
                ((reason, int(i)) for i, reason in failures),
            )

    def remove(self, ids: Iterable[int]) -> list[int]:
        """Take images out of the index; returns the ids that were indexed. Images still shown by a
        folder or external file become `removed` tombstones; the others are deleted."""
        removed = []
        with self.transaction() as conn:
            for image_id in ids:
                image_id = int(image_id)
                status = self.status(image_id)
                if status is None:
                    continue
                conn.execute("DELETE FROM files WHERE image_id=? AND origin='upload'", (image_id,))
                conn.execute(
                    "UPDATE images SET status='removed', shard=NULL, row=NULL, error=NULL WHERE id=?", (image_id,)
                )
                if status == "indexed":
                    removed.append(image_id)
            self.delete_orphans()
            if removed:
                self.bump(conn)
        return removed

    def indexed_ids(self) -> np.ndarray:
        """Ids of every indexed image, ascending, int64."""
        rows = self.connection.execute("SELECT id FROM images WHERE status='indexed' ORDER BY id")
        return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Number of images in each status."""
        rows = self.connection.execute("SELECT status, COUNT(*) FROM images GROUP BY status")
        return {status: 0 for status in STATUSES} | dict(rows.fetchall())

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be read or decoded, sorted by path (each
        file with its own path, also when several identical files share one failed image)."""
        rows = self.connection.execute(
            "SELECT f.path, COALESCE(f.error, i.error) FROM files f LEFT JOIN images i ON i.id = f.image_id"
            " WHERE f.error IS NOT NULL OR i.status='failed' ORDER BY f.path"
        )
        return [(decode_path(path), reason) for path, reason in rows]

    def records(self, ids: Sequence[int], resolve) -> dict[int, ImageRecord]:
        """id → ImageRecord for the ids that exist; `resolve(path, origin)` gives absolute paths."""
        out: dict[int, ImageRecord] = {}
        for start in range(0, len(ids), 900):
            chunk = [int(i) for i in ids[start : start + 900]]
            marks = ",".join("?" * len(chunk))
            for row in self.connection.execute(f"SELECT {RECORD_COLUMNS} FROM images WHERE id IN ({marks})", chunk):
                out[row[0]] = record_from_row(row)
            for image_id, stored, origin in self.connection.execute(
                f"SELECT image_id, path, origin FROM files WHERE image_id IN ({marks}) ORDER BY path", chunk
            ):
                record, path = out[image_id], decode_path(stored)
                if record.path is None:
                    record.path, record.file, record.origin = str(resolve(path, origin)), path, origin
                record.paths.append(path)
        return out
