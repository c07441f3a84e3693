"""Query expansion and database-side augmentation of global descriptors (docs/design.md §8).

- `alpha_qe` / `expand_and_rescore`: α-QE (Radenović et al.): ``q' = normalise(q + Σ_{i≤n} s_i^α d_i)``
  over the query's top n results, negative similarities clipped at 0; the shortlist re-scored
  with q'.
- `database_augment`: DBA, each database vector replaced by ``normalise(Σ_{i≤k} s_i^α d_i)`` over
  its k nearest database vectors (itself included, s = 1), by exact inner-product search in
  chunks (faiss), so memory stays at two chunks and their similarities whatever the size.
- `save_dba` / `load_dba` / `remove_dba`: the augmented vectors beside the originals, reversible:

      DIR/dba/ids.npy            int64 (N,) image ids
      DIR/dba/descriptors.npy    float16 (N, d), memory-mappable, rows in the order of ids
      DIR/dba/dba.json           {"version", "count", "dim", "k", "alpha", "revision"}

  `dba.json` is removed first and written last, so it exists only over a complete pair of files;
  `revision` (the catalog's, at computation time) lets the caller tell stale augmentation.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union

import faiss
import numpy as np

from netvlad.storage import atomic_path, write_atomic

log = logging.getLogger(__name__)

DBA = "dba"
META = "dba.json"
VERSION = 1
#: Rows compared at once by `database_augment` (a 16 384² block of similarities is 1 GiB; 4 096² 64 MiB).
CHUNK_ROWS = 4096


# ---------------------------------------------------------------------------------- α-QE

def _weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    return np.power(np.clip(sims, 0.0, None), alpha)


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def alpha_qe(query: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """q (d,), its n neighbours (n, d) and their similarities to q (n,) → normalise(q + Σ max(s_i,
    0)^α d_i), (d,) float32 unit norm."""
    query, neighbours = np.asarray(query, np.float32), np.asarray(neighbours, np.float32)
    if neighbours.ndim != 2 or neighbours.shape[1] != query.shape[-1] or len(sims) != len(neighbours):
        raise ValueError(f"α-QE needs q (d,), neighbours (n, d), sims (n,); got {query.shape}, "
                         f"{neighbours.shape}, {np.shape(sims)}")
    return _normalise(query + _weights(np.asarray(sims, np.float32), alpha) @ neighbours)


def expand_and_rescore(query: np.ndarray, pool: np.ndarray, n: int = 5, alpha: float = 3.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank a shortlist by α-QE: `pool` (P, d) holds the candidates in their global order; the
    first `n` expand q (their similarities s_i = q·d_i as weights) and every candidate is re-scored
    by inner product with q'. Returns (order (P,) positions in `pool`, best first; their scores)."""
    pool = np.asarray(pool, np.float32)
    top = pool[:n]
    expanded = alpha_qe(query, top, top @ np.asarray(query, np.float32), alpha)
    scores = pool @ expanded
    order = np.argsort(-scores, kind="stable")
    return order, scores[order]


# ---------------------------------------------------------------------------------- DBA

class RowStore(Protocol):
    """What `database_augment` reads of a `netvlad.descriptorstore.DescriptorStore`."""

    dim: int

    def live_rows(self) -> list: ...

    def descriptors(self, ids: Sequence[int], dtype=np.float32) -> np.ndarray: ...


Descriptors = Union[RowStore, tuple[np.ndarray, np.ndarray], np.ndarray]


def _chunks(source: Descriptors, chunk_rows: int
            ) -> tuple[np.ndarray, int, Callable[[], Iterator[tuple[int, np.ndarray]]]]:
    """(all ids, dim, a function giving a fresh iterator of (first position, float32 rows) chunks)."""
    if hasattr(source, "live_rows"):
        ids = np.concatenate([part.ids for part in source.live_rows()] or [np.zeros(0, np.int64)])
        read = lambda s: source.descriptors(ids[s : s + chunk_rows])  # noqa: E731
        dim = source.dim
    else:
        ids, rows = source if isinstance(source, tuple) else (np.arange(len(source)), source)
        ids = np.asarray(ids, np.int64)
        if rows.ndim != 2 or len(rows) != len(ids):
            raise ValueError(f"{len(ids)} ids need ({len(ids)}, d) descriptors, got {rows.shape}")
        read = lambda s: np.asarray(rows[s : s + chunk_rows], np.float32)  # noqa: E731
        dim = rows.shape[1]

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(ids), chunk_rows):
            yield start, np.ascontiguousarray(read(start))

    return ids, dim, chunks


def database_augment(source: Descriptors, k: int = 5, alpha: float = 3.0, chunk_rows: int = CHUNK_ROWS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """DBA of a `DescriptorStore` (its live rows), of (ids (N,), descriptors (N, d)) or of an (N, d)
    array (ids 0…N−1; float16 memory maps welcome) → (ids (N,), augmented (N, d) float16, unit
    norm): each vector → normalise(Σ_{i≤k} max(s_i, 0)^α d_i) over its k most similar database
    vectors (itself included). Exact search, `chunk_rows` × `chunk_rows` similarities at a time,
    the running top k kept in a faiss result heap."""
    if k < 1:
        raise ValueError(f"DBA needs k ≥ 1, got {k}")
    ids, dim, chunks = _chunks(source, chunk_rows)
    out = np.empty((len(ids), dim), np.float16)
    k = min(k, len(ids))
    for q_start, queries in chunks():
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for d_start, rows in chunks():
            sims, rows_hit = faiss.knn(queries, rows, min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(sims, rows_hit + d_start)
        heap.finalize()
        weights, mixed = _weights(heap.D, alpha), np.zeros_like(queries)
        for d_start, rows in chunks():  # gather the neighbours: k (≈ 5) vectorised steps a chunk
            hit = (heap.I >= d_start) & (heap.I < d_start + len(rows))
            for j in range(k):
                sel = hit[:, j]
                mixed[sel] += weights[sel, j, None] * rows[heap.I[sel, j] - d_start]
        out[q_start : q_start + len(queries)] = _normalise(mixed)
    return ids, out


# ---------------------------------------------------------------------------------- storage

@dataclass
class DbaDescriptors:
    """Stored DBA vectors: `ids` (N,) int64, `vectors` (N, d) float16 memory map, and what they were
    computed with (`k`, `alpha`) and at (`revision` of the catalog, None when not given)."""

    ids: np.ndarray
    vectors: np.ndarray
    k: int
    alpha: float
    revision: int | None

    def __post_init__(self) -> None:
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]

    def is_stale(self, revision: int) -> bool:
        """Whether the index changed (catalog `revision`) since DBA was computed."""
        return self.revision != revision

    def descriptors(self, ids: Sequence[int], dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(rows (n, d) in the order of `ids`, found (n,) bool): ids DBA never saw (photos added
        since) get zero rows and found = False; the caller uses its originals there."""
        ids = np.asarray(ids, np.int64)
        at = np.minimum(np.searchsorted(self._sorted, ids), max(len(self._sorted) - 1, 0))
        found = self._sorted[at] == ids if len(self._sorted) else np.zeros(len(ids), bool)
        out = np.zeros((len(ids), self.vectors.shape[1]), dtype)
        out[found] = self.vectors[self._order[at[found]]]
        return out, found


def save_dba(directory: str | Path, ids: np.ndarray, descriptors: np.ndarray, k: int, alpha: float,
             revision: int | None = None) -> Path:
    """Store DBA vectors (N, d) of image `ids` in `directory`/dba (replacing any), each file
    atomically, `dba.json` last; returns that folder."""
    ids, descriptors = np.asarray(ids, np.int64), np.asarray(descriptors)
    if descriptors.ndim != 2 or len(descriptors) != len(ids):
        raise ValueError(f"{len(ids)} ids need ({len(ids)}, d) descriptors, got {descriptors.shape}")
    folder = Path(directory) / DBA
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)
    with atomic_path(folder / "ids.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, ids)
    with atomic_path(folder / "descriptors.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=descriptors.shape)
        out[:] = descriptors
        out.flush()
        del out
    meta = {"version": VERSION, "count": len(ids), "dim": descriptors.shape[1], "k": k, "alpha": alpha,
            "revision": revision}
    write_atomic(folder / META, json.dumps(meta).encode())
    return folder


def load_dba(directory: str | Path) -> DbaDescriptors | None:
    """The DBA vectors stored in `directory`/dba, memory-mapped; None when there are none (or a
    save was interrupted). `ValueError` when the files disagree with `dba.json`."""
    folder = Path(directory) / DBA
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        return None
    if meta.get("version") != VERSION:
        raise ValueError(f"{folder}: DBA format version {meta.get('version')}, this netvlad reads {VERSION}")
    ids = np.load(folder / "ids.npy")
    vectors = np.load(folder / "descriptors.npy", mmap_mode="r")
    if ids.shape != (meta["count"],) or vectors.shape != (meta["count"], meta["dim"]):
        raise ValueError(f"{folder}: {ids.shape} ids and {vectors.shape} descriptors disagree with {META}; "
                         "compute DBA again")
    return DbaDescriptors(ids, vectors, int(meta["k"]), float(meta["alpha"]), meta["revision"])


def remove_dba(directory: str | Path) -> bool:
    """Delete `directory`/dba (its `dba.json` first); returns whether there was one."""
    folder = Path(directory) / DBA
    if not folder.exists():
        return False
    (folder / META).unlink(missing_ok=True)
    shutil.rmtree(folder)
    log.info("removed %s", folder)
    return True
