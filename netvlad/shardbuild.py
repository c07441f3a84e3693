"""Building a large IVF faiss index from descriptor shards: train once, add shards in parallel, merge.

`build_sharded(store, spec, directory)` trains the empty index of type `spec` once, on a sample
of at most 200 000 descriptors (`training_size`); then each shard's live rows
(`DescriptorStore.live_rows`) are added to a copy of that trained, empty index
(`faiss.serialize_index` / `deserialize_index`): in Ray tasks when a Ray session is up
(`ray.init()` locally or with a cluster's address), else one shard after another in this process.
Each task writes its partial index to a temp folder inside the index folder (all nodes must see
the index folder: a shared file system) and the driver merges every partial into the final index
as it arrives (`IndexIVF.merge_from`, ids kept), with at most two tasks per cluster CPU in
flight. So the driver holds the final index plus one partial, a task one shard's partial index
and a memory-mapped shard: neither grows with the collection beyond the final index.
A killed build leaves only the temp folder, swept by the next writer.

Fast-scan types (`…x4fs`) keep their inverted lists packed in blocks, which `merge_from`
corrupts (heap corruption, reproduced with faiss 1.15 on a 12-partial IVF256,PQ64x4fs build): they
are always built shard after shard in one process (`mergeable`).
"""

from __future__ import annotations

import logging
import shutil
import sys
import uuid
from pathlib import Path

import faiss
import numpy as np

from netvlad.descriptorstore import DescriptorStore, ShardRows
from netvlad.vectorindex import IndexSpec, VectorIndex, training_size

log = logging.getLogger(__name__)

#: Collections from this size are rebuilt shard by shard (smaller ones too while Ray is up).
SHARDED_BUILD_MIN = 200_000
#: Descriptors converted to float32 and added per step.
ADD_CHUNK = 65_536


def ray_session() -> bool:
    """Whether this process has a Ray session (without importing Ray when it has none)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def mergeable(index: faiss.Index) -> bool:
    """Whether partial indexes of this type can be merged (`merge_from`): IVF types whose
    inverted lists are not block-packed fast-scan lists."""
    return not isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFastScan)


def wants_sharded_build(spec: IndexSpec, n: int) -> bool:
    """Whether `n` descriptors of IVF type `spec` are built shard by shard."""
    return "IVF" in spec.factory and n >= 1 and (n >= SHARDED_BUILD_MIN or ray_session())


def add_rows(index: faiss.Index, part: ShardRows) -> None:
    """Add the live rows of one shard to `index` (ADD_CHUNK float32 rows at a time)."""
    shard = np.load(part.path, mmap_mode="r")
    for start in range(0, len(part.rows), ADD_CHUNK):
        x = np.ascontiguousarray(shard[part.rows[start : start + ADD_CHUNK]], dtype=np.float32)
        index.add_with_ids(x, part.ids[start : start + ADD_CHUNK])


def add_partial(empty: np.ndarray, part: ShardRows, out: str) -> str:
    """Ray task: the trained empty index (serialised, uint8) plus one shard, written to `out`."""
    index = faiss.deserialize_index(empty)
    add_rows(index, part)
    faiss.write_index(index, out)
    return out


def merge_partial(index: faiss.Index, path: str) -> None:
    """Move the inverted lists of the partial index file `path` into `index`, then delete it."""
    part = faiss.read_index(path)
    target = faiss.extract_index_ivf(index)
    target.merge_from(faiss.extract_index_ivf(part), 0)
    index.ntotal = target.ntotal  # a wrapper (PCA, …) does not follow its inner index
    Path(path).unlink()


def sample_ids(parts: list[ShardRows], size: int) -> np.ndarray:
    """`size` ids drawn without replacement from the live rows, ascending (fixed seed)."""
    ids = np.concatenate([p.ids for p in parts])
    return np.sort(np.random.default_rng(0).choice(ids, min(size, len(ids)), replace=False))


def build_sharded(store: DescriptorStore, spec: IndexSpec, directory: Path) -> VectorIndex:
    """The IVF index `spec` of every live descriptor of `store` (see the module docstring);
    `directory` (the index folder) holds the partial indexes of Ray tasks meanwhile."""
    parts = store.live_rows()
    n = sum(len(p.ids) for p in parts)
    log.info("building a %s index of %d descriptors from %d shards%s", spec.factory, n, len(parts),
             " on Ray" if ray_session() else "")
    vectors = VectorIndex.create(store.dim, spec, store.descriptors(sample_ids(parts, training_size(spec, n))))
    if ray_session() and mergeable(vectors.index):
        _add_on_ray(vectors.index, parts, directory)
    else:
        for part in parts:
            add_rows(vectors.index, part)
    return vectors


def _add_on_ray(index: faiss.Index, parts: list[ShardRows], directory: Path) -> None:
    import ray

    folder = directory / f".build.tmp-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        empty = ray.put(faiss.serialize_index(index))
        task = ray.remote(add_partial)
        limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending = []
        for k, part in enumerate(parts):
            if len(pending) >= limit:
                done, pending = ray.wait(pending, num_returns=1)
                merge_partial(index, ray.get(done[0]))
            pending.append(task.remote(empty, part, str(folder / f"part-{k}.faiss")))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            merge_partial(index, ray.get(done[0]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
