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
corrupts (heap corruption, reproduced with faiss 1.15 on a 12-partial IVF256,PQ64x4fs build). So
the partials of a fast-scan IVF-PQ index are plain IVF-PQ indexes with the same coarse quantizer
and PQ codebooks (`partial_type`), whose lists merge exactly; the merged index is repacked once
into the fast-scan layout (`IndexIVFPQFastScan(ivfpq)`), which gives the codes, ids and results of
adding every shard to the fast-scan index directly. That conversion briefly holds both layouts, so
the driver's peak is about twice the final index. Other fast-scan types are built shard after
shard in one process.
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


def partial_type(index: faiss.Index) -> faiss.Index | None:
    """The trained empty index that partial builds of the trained empty `index` start from:
    `index` itself when mergeable; for fast-scan IVF-PQ, a copy whose IVF part is a plain IVF-PQ
    with the same quantizer and codebooks; None for types that cannot be built in parts."""
    if mergeable(index):
        return index
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if not isinstance(ivf, faiss.IndexIVFPQFastScan):
        return None
    quantizer = faiss.clone_index(ivf.quantizer)
    plain = faiss.IndexIVFPQ(quantizer, ivf.d, ivf.nlist, ivf.pq.M, ivf.pq.nbits, ivf.metric_type)
    quantizer.this.disown()
    plain.own_fields = True
    plain.pq = ivf.pq
    plain.by_residual = ivf.by_residual
    plain.is_trained = True
    return with_ivf(faiss.clone_index(index), plain)


def as_type_of(merged: faiss.Index, index: faiss.Index) -> faiss.Index:
    """`merged` (built from `partial_type(index)`) in the layout of `index`: its IVF-PQ lists
    repacked as fast-scan blocks when `index` is fast-scan, else `merged` itself."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if mergeable(index):
        return merged
    plain = faiss.downcast_index(faiss.extract_index_ivf(merged))
    packed = faiss.IndexIVFPQFastScan(plain, ivf.bbs)
    plain.own_fields, packed.own_fields = False, True  # the coarse quantizer now belongs to `packed`
    return with_ivf(merged, packed)


def with_ivf(index: faiss.Index, ivf: faiss.Index) -> faiss.Index:
    """`index` with its IVF part replaced by `ivf`: `ivf` itself when `index` is a bare IVF index;
    for transforms over an IVF index, `index` now owning `ivf` (its old inner index is freed)."""
    if not isinstance(index, faiss.IndexPreTransform):  # faiss hands out downcast, owning objects
        return ivf
    wrapper = index
    old = wrapper.index
    wrapper.index = ivf
    ivf.this.disown()
    if wrapper.own_fields:
        old.this.acquire()  # freed with this proxy
    wrapper.own_fields = True
    wrapper.ntotal = ivf.ntotal
    return wrapper


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
    partial = partial_type(vectors.index) if ray_session() else None
    if partial is None:
        for part in parts:
            add_rows(vectors.index, part)
        return vectors
    merged = add_on_ray(faiss.serialize_index(partial), parts, directory)
    return VectorIndex(as_type_of(merged, vectors.index), spec)


def add_on_ray(empty: np.ndarray, parts: list[ShardRows], directory: Path, task=add_partial) -> faiss.Index:
    """The serialised trained empty index `empty` with every shard of `parts` added by Ray tasks
    (`task(empty, part, out)` returns the partial's path), merged on the driver as they finish."""
    import ray

    index = faiss.deserialize_index(empty)
    folder = directory / f".build.tmp-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        empty = ray.put(empty)
        task = ray.remote(task)
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
    return index
