"""The local evidence of an index folder's photos, for re-ranking: one SQLite file
``DIR/evidence.sqlite`` holding one BLOB per (image id, kind) — kinds such as "sift", "orb" (bytes
of `netvlad.rerank.localfeatures.LocalFeatures`) or "patch" — and, per kind, the settings it was
computed with (JSON in the ``meta`` table).

Consistency with the catalog (the rule the index follows): a photo's evidence is written, and
committed, *before* the catalog commits the photo as indexed, so every indexed photo has its
evidence. A writer killed in between leaves evidence of photos the catalog does not list as
indexed; the next writer to open the folder drops it (`prune_orphans` with the catalog's indexed
ids) before writing anything. `put` is an upsert, so a resumed run that writes a photo's evidence
again replaces it, never duplicates it. Removing photos: `delete` their ids.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from netvlad.errors import IndexStoreError
from netvlad.sqlitedb import SQLiteDatabase
from netvlad.storage import disk_full_errors

FILE_NAME = "evidence.sqlite"
SCHEMA_VERSION = 1
#: Ids per IN (…) query: below SQLite's historical limit of 999 bound parameters.
_CHUNK = 900

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (
    kind TEXT NOT NULL,
    image_id INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (kind, image_id)
);
CREATE INDEX IF NOT EXISTS evidence_image ON evidence(image_id);
"""


def _chunks(ids: Iterable[int]) -> Iterable[list[int]]:
    values = [int(i) for i in ids]
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


class EvidenceStore(SQLiteDatabase):
    """The evidence file of the index folder `folder` (module docstring). Writers are serialised by
    the caller (the index's one writer); readers may use it from any number of threads (one
    connection each). `readonly`: open an existing file for reading only (`IndexStoreError` if the
    folder has none: the index holds no local evidence)."""

    def __init__(self, folder: str | Path, readonly: bool = False):
        super().__init__(Path(folder) / FILE_NAME, readonly)
        if readonly and not self.path.is_file():
            raise IndexStoreError(f"{Path(folder)}: the index holds no local evidence ({FILE_NAME} is missing)")
        try:
            if readonly:
                self._open_readonly()
            else:
                with disk_full_errors(self.path.parent):
                    self.connection.execute("PRAGMA journal_mode=WAL")
                    self.connection.executescript(SCHEMA)
                    if self.get_meta("schema_version") is None:
                        self.set_meta("schema_version", SCHEMA_VERSION)
            version = self.get_meta("schema_version")
            if version is None or int(version) != SCHEMA_VERSION:
                raise IndexStoreError(f"{self.path}: evidence schema version {version}, "
                                      f"this netvlad reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise IndexStoreError(f"{self.path}: not a readable evidence file ({exc})") from None
        except BaseException:
            self.close()
            raise

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether the index folder `folder` has an evidence file."""
        return (Path(folder) / FILE_NAME).is_file()

    def put(self, kind: str, items: Mapping[int, bytes]) -> None:
        """Store (or replace) the evidence of kind `kind` of each image id → bytes, in one
        transaction: all of them or, on an error, none."""
        rows = [(kind, int(image_id), data) for image_id, data in items.items()]
        with disk_full_errors(self.path.parent), self.transaction() as conn:
            conn.executemany("INSERT INTO evidence(kind, image_id, data) VALUES(?, ?, ?) "
                             "ON CONFLICT(kind, image_id) DO UPDATE SET data=excluded.data", rows)

    def get(self, kind: str, ids: Iterable[int]) -> dict[int, bytes]:
        """The stored evidence of kind `kind` of those `ids` that have some: id → bytes."""
        found: dict[int, bytes] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            found.update(self.connection.execute(
                f"SELECT image_id, data FROM evidence WHERE kind=? AND image_id IN ({marks})", (kind, *chunk)))
        return found

    def delete(self, ids: Iterable[int]) -> int:
        """Drop all evidence (every kind) of `ids`, in one transaction; returns the rows removed."""
        removed = 0
        with disk_full_errors(self.path.parent), self.transaction() as conn:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                removed += conn.execute(f"DELETE FROM evidence WHERE image_id IN ({marks})", chunk).rowcount
        return removed

    def ids(self, kind: str | None = None) -> np.ndarray:
        """Sorted int64 ids of the images with evidence of kind `kind` (of any kind when None)."""
        if kind is None:
            rows = self.connection.execute("SELECT DISTINCT image_id FROM evidence ORDER BY image_id")
        else:
            rows = self.connection.execute("SELECT image_id FROM evidence WHERE kind=? ORDER BY image_id", (kind,))
        return np.fromiter((row[0] for row in rows), np.int64)

    def prune_orphans(self, indexed_ids: Iterable[int]) -> int:
        """Drop the evidence of every image not in `indexed_ids` (the catalog's indexed ids), in one
        transaction; returns the rows removed. Called by the writer that opens the folder."""
        keep = np.fromiter((int(i) for i in indexed_ids), np.int64)
        with self.transaction():
            return self.delete(np.setdiff1d(self.ids(), keep).tolist())

    def kinds(self) -> list[str]:
        """The kinds of evidence stored, sorted."""
        return [row[0] for row in self.connection.execute("SELECT DISTINCT kind FROM evidence ORDER BY kind")]

    def count(self, kind: str) -> int:
        """Images with evidence of kind `kind`."""
        return self.connection.execute("SELECT COUNT(*) FROM evidence WHERE kind=?", (kind,)).fetchone()[0]

    def bytes_per_photo(self, kind: str) -> float:
        """Mean size in bytes of one image's evidence of kind `kind` (0.0 when there is none)."""
        row = self.connection.execute("SELECT AVG(LENGTH(data)) FROM evidence WHERE kind=?", (kind,)).fetchone()
        return float(row[0] or 0.0)

    def settings(self, kind: str) -> dict | None:
        """The settings stored for kind `kind` (e.g. {"max_keypoints": 1000, "max_side": 640}), or None."""
        value = self.get_meta(f"settings:{kind}")
        return None if value is None else json.loads(value)

    def set_settings(self, kind: str, settings: Mapping[str, object]) -> None:
        """Store the settings of kind `kind` (JSON-serialisable values)."""
        self.set_meta(f"settings:{kind}", json.dumps(dict(settings), sort_keys=True))
