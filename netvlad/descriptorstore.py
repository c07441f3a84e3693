"""Descriptor shards: the indexed descriptors of an index folder, in append-only, memory-mappable files.

    DIR/descriptors/shard-<12 hex>.npy    float16 (rows, dim), one row per stored descriptor

The catalog says which rows are live: table ``shards`` (id, file name, rows) and, for each indexed
image, ``images.shard`` and ``images.row``. A batch is written as a new shard file first
(`netvlad.storage.atomic_path`), then its reference and the images' ``indexed`` status are
committed in one catalog transaction: a run killed in between leaves only an unreferenced file,
which the next writer deletes (`recover`), so nothing is lost and nothing counted twice. Reads
memory-map the shards (the OS pages in only the rows read); shard files never change once
written, so a reader's open map stays valid even after a writer deleted the file.

Removing or re-describing an image leaves a dead row. `compact` rewrites small and mostly-dead
shards into full ones of about `SHARD_BYTES` (new file first, then one transaction moving the
rows, then the old files go): small batches do not keep a file each, and dead rows are reclaimed.
A row is rewritten at most about `SHARD_BYTES` ÷ (bytes stored between two compactions) times.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netvlad.catalog import Catalog
from netvlad.errors import IndexStoreError
from netvlad.storage import atomic_path, sweep_temp_files

log = logging.getLogger(__name__)

DESCRIPTORS = "descriptors"
DTYPE = np.float16
#: Bytes of a full shard file (64 MiB: 131 072 rows at 256 dims, 4 096 at 8 192).
SHARD_BYTES = 64 << 20
#: Ids per SQL lookup (SQLite's bound-parameter limit is 999).
LOOKUP_CHUNK = 900


@dataclass
class ShardRows:
    """The live rows of one shard file: `rows` (n,) int64 positions in it, `ids` (n,) their image ids."""

    path: Path
    rows: np.ndarray
    ids: np.ndarray


class DescriptorStore:
    """The descriptor shards of one index folder (`folder` = DIR/descriptors), `dim` float16 dims
    each, indexed as `catalog` says. Writers are serialised by the caller (`Index`)."""

    def __init__(self, folder: Path, catalog: Catalog, dim: int):
        self.folder = folder
        self.catalog = catalog
        self.dim = dim
        self._maps: dict[int, np.ndarray] = {}

    @property
    def shard_rows(self) -> int:
        """Rows of a full shard."""
        return max(1, SHARD_BYTES // (np.dtype(DTYPE).itemsize * self.dim))

    # ------------------------------------------------------------------------------ writes

    def append(self, ids: Sequence[int], descriptors: np.ndarray) -> Path | None:
        """Store (n, dim) descriptors of images `ids` as a new shard and mark those images indexed,
        atomically (joining the caller's catalog transaction, if any). Returns the shard file, for
        a caller whose enclosing transaction fails to delete; None when n = 0."""
        ids = np.asarray(ids, dtype=np.int64)
        x = np.asarray(descriptors)
        if x.ndim != 2 or x.shape != (len(ids), self.dim):
            raise ValueError(f"{len(ids)} ids need ({len(ids)}, {self.dim}) descriptors, got {x.shape}")
        if len(ids) == 0:
            return None
        path = self._write(len(ids), lambda out: out.__setitem__(slice(None), x))
        try:
            with self.catalog.transaction() as conn:
                shard = conn.execute("INSERT INTO shards(name, rows) VALUES(?, ?)", (path.name, len(ids))).lastrowid
                conn.executemany(
                    "UPDATE images SET status='indexed', error=NULL, shard=?, row=? WHERE id=?",
                    ((shard, row, int(i)) for row, i in enumerate(ids)),
                )
                self.catalog.bump(conn)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _write(self, rows: int, fill) -> Path:
        """A new shard file of `rows` rows, written by `fill(memmap)`, atomically."""
        self.folder.mkdir(exist_ok=True)
        path = self.folder / f"shard-{uuid.uuid4().hex[:12]}.npy"
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=(rows, self.dim))
            fill(out)
            out.flush()
            del out
        return path

    def compact(self) -> int:
        """Rewrite small and mostly-dead shards into full ones; returns how many files went."""
        conn = self.catalog.connection
        live = dict(conn.execute("SELECT shard, COUNT(*) FROM images WHERE status='indexed'"
                                 " AND shard IS NOT NULL GROUP BY shard"))
        victims = {sid: (name, rows) for sid, name, rows in conn.execute("SELECT id, name, rows FROM shards")
                   if rows < self.shard_rows or 2 * live.get(sid, 0) < rows}
        if len(victims) < 2 and all(live.get(sid, 0) == rows for sid, (_, rows) in victims.items()):
            return 0
        moving = [part for part in self.live_rows() if part.path.name in {n for n, _ in victims.values()}]
        ids = np.concatenate([p.ids for p in moving]) if moving else np.zeros(0, np.int64)
        new = []
        try:
            for start in range(0, len(ids), self.shard_rows):
                chunk = ids[start : start + self.shard_rows]
                new.append((self._write(len(chunk), lambda out, c=chunk: out.__setitem__(slice(None), self.descriptors(c, DTYPE))), chunk))
            with self.catalog.transaction() as conn:
                for path, chunk in new:
                    shard = conn.execute("INSERT INTO shards(name, rows) VALUES(?, ?)", (path.name, len(chunk))).lastrowid
                    conn.executemany("UPDATE images SET shard=?, row=? WHERE id=?",
                                     ((shard, row, int(i)) for row, i in enumerate(chunk)))
                conn.executemany("DELETE FROM shards WHERE id=?", ((sid,) for sid in victims))
        except BaseException:
            for path, _ in new:
                path.unlink(missing_ok=True)
            raise
        for sid, (name, _) in victims.items():
            self._maps.pop(sid, None)
            (self.folder / name).unlink(missing_ok=True)
        log.info("compacted %d descriptor shards into %d", len(victims), len(new))
        return len(victims)

    def recover(self) -> list[Path]:
        """Writer start-up: delete the shard files (and temp files) that no committed transaction
        references, left by a killed run; returns them."""
        names = {name for (name,) in self.catalog.connection.execute("SELECT name FROM shards")}
        swept = sweep_temp_files([self.folder])
        swept += [path for path in self.folder.glob("shard-*.npy") if path.name not in names]
        for path in swept:
            path.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted writer", path)
        return swept

    # ------------------------------------------------------------------------------ reads

    def descriptors(self, ids: Sequence[int], dtype=np.float32) -> np.ndarray:
        """(len(ids), dim) descriptors of indexed images, in the order of `ids`."""
        ids = np.asarray(ids, dtype=np.int64)
        try:
            return self._gather(ids, dtype)
        except FileNotFoundError:  # another process compacted between lookup and read: look again
            return self._gather(ids, dtype)

    def _gather(self, ids: np.ndarray, dtype) -> np.ndarray:
        shards, rows = self._locate(ids)
        out = np.empty((len(ids), self.dim), dtype=dtype)
        for shard in np.unique(shards):
            sel = shards == shard
            out[sel] = self._map(int(shard))[rows[sel]]
        return out

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, rows) of indexed images `ids`; `IndexStoreError` naming the missing ones."""
        found: dict[int, tuple[int, int]] = {}
        for start in range(0, len(ids), LOOKUP_CHUNK):
            chunk = [int(i) for i in ids[start : start + LOOKUP_CHUNK]]
            found.update((i, (s, r)) for i, s, r in self.catalog.connection.execute(
                f"SELECT id, shard, row FROM images WHERE status='indexed' AND shard IS NOT NULL"
                f" AND id IN ({','.join('?' * len(chunk))})", chunk))
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise IndexStoreError(f"{self.catalog.path}: no descriptor for image ids {sorted(set(missing))[:10]}")
        where = np.array([found[int(i)] for i in ids], dtype=np.int64).reshape(-1, 2)
        return where[:, 0], where[:, 1]

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            row = self.catalog.connection.execute("SELECT name FROM shards WHERE id=?", (shard,)).fetchone()
            if row is None:
                raise FileNotFoundError(f"shard {shard}")
            self._maps[shard] = np.load(self.folder / row[0], mmap_mode="r")
        return self._maps[shard]

    def live_rows(self) -> list[ShardRows]:
        """Every shard's live rows (those of indexed images), by shard and row; 24 bytes an image
        while it runs."""
        conn = self.catalog.connection
        names = dict(conn.execute("SELECT id, name FROM shards"))
        cursor = conn.execute("SELECT shard, row, id FROM images WHERE status='indexed' AND shard IS NOT NULL"
                              " ORDER BY shard, row")
        table = np.fromiter((value for row in cursor for value in row), dtype=np.int64).reshape(-1, 3)
        shards, starts = np.unique(table[:, 0], return_index=True)
        ends = [*starts[1:], len(table)]
        return [ShardRows(self.folder / names[int(s)], table[a:b, 1].copy(), table[a:b, 2].copy())
                for s, a, b in zip(shards, starts, ends)]
