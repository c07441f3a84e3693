"""faiss index over unit-norm descriptors, keyed by catalog ids.

The index type is a faiss factory string. `choose_spec(n, dim)` picks one by collection size:
exact ``Flat`` search below `FLAT_LIMIT` images, else PCA (with a random rotation) to ≤ 256 dims,
an inverted file with ≈ 4√n lists and 4-bit "fast-scan" product-quantised codes of 4 dims per
sub-quantiser (32 bytes at 256 dims; about 40 bytes per image with the 8-byte id), trained on a
sample; a query visits 1/8 of the lists (`benchmarks/faiss_search.py` measures the trade-off). Types without native ids (Flat, HNSW) are wrapped in ``IDMap2`` so the
catalog id is the faiss id everywhere. Scores are cosine similarities in [−1, 1] whatever the
metric (for unit vectors, inner product = 1 − ‖a − b‖²/2).

On a machine with faiss-gpu and a GPU, training, adding and searching run on a GPU copy.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from netvlad.errors import IndexStoreError
from netvlad.storage import write_atomic

log = logging.getLogger(__name__)

#: Below this many images the exact Flat index is fast enough and uses the catalog's recall.
FLAT_LIMIT = 50_000
#: Dimension the IVF-PQ types reduce descriptors to before quantising.
PCA_DIM = 256
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
#: Query batches smaller than this are searched on one thread: threads gain little there, and
#: faiss's idle OpenMP threads would spin against torch's and BLAS's (10× slower searches on 2 cores).
SMALL_BATCH = 20


@dataclass(frozen=True)
class IndexSpec:
    """How to build an index: faiss factory string, metric (``ip`` or ``l2``) and search-time
    parameters in faiss ParameterSpace syntax (e.g. ``nprobe=32``)."""

    factory: str = "Flat"
    metric: str = "ip"
    params: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def quantised(self) -> bool:
        """Whether scores are approximate (compressed codes) rather than exact similarities."""
        return is_quantised(self.factory)

    @property
    def nlist(self) -> int:
        """Inverted lists of an IVF type, else 1."""
        ivf = re.search(r"IVF(\d+)", self.factory)
        return int(ivf.group(1)) if ivf else 1

    @classmethod
    def parse(cls, factory: str) -> "IndexSpec":
        """A user's factory string (``--index-type``) with the metric and parameters that suit it."""
        factory = factory.strip()
        if factory.startswith("IDMap"):
            factory = factory.split(",", 1)[1] if "," in factory else "Flat"
        ivf = re.search(r"IVF(\d+)", factory)
        params = f"nprobe={default_nprobe(int(ivf.group(1)))}" if ivf else ""
        if factory.startswith("HNSW") or ",HNSW" in factory:
            params = "efSearch=128"
        return cls(factory, "l2" if is_quantised(factory) else "ip", params)


def is_quantised(factory: str) -> bool:
    """Whether a factory string stores compressed codes (PQ, SQ, LSH, RaBitQ) instead of vectors."""
    return bool(re.search(r"(PQ|SQ|LSH|RaBitQ)", factory))


def default_nprobe(nlist: int) -> int:
    """Inverted lists visited per query: 1/8 of them, at least 8, at most 1024."""
    return int(min(nlist, 1024, max(8, nlist // 8)))


def choose_spec(n: int, dim: int) -> IndexSpec:
    """The automatic index type for `n` descriptors of `dim` dims."""
    if n < FLAT_LIMIT:
        return IndexSpec("Flat", "ip", "")
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    reduced = min(PCA_DIM, dim)
    pre = f"PCAR{reduced}," if reduced < dim else ""
    return IndexSpec.parse(f"{pre}IVF{nlist},PQ{reduced // 4}x4fs")


def training_size(spec: IndexSpec, n: int) -> int:
    """How many descriptors to train `spec` on: 64 per inverted list (≥ 10 000), ≤ 200 000."""
    return min(n, max(10_000, 64 * spec.nlist), 200_000)


def min_training_size(spec: IndexSpec) -> int:
    """Fewest descriptors worth training `spec` on: 39 per inverted list (faiss's own warning
    threshold), at least 256 (one 8-bit codebook)."""
    return max(39 * spec.nlist, 256)


def needs_training(spec: IndexSpec, dim: int) -> bool:
    """Whether an index of type `spec` must be trained on sample descriptors before use
    (raises `IndexStoreError` when faiss does not understand the type)."""
    try:
        return not faiss.index_factory(dim, spec.factory, METRICS[spec.metric]).is_trained
    except RuntimeError as exc:
        raise IndexStoreError(f"bad index type {spec.factory!r} for {dim} dims: {exc}") from None


def faiss_has_gpu() -> bool:
    """Whether faiss was built with GPU support (faiss-gpu, extra `gpu`) and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """A faiss index holding (id, descriptor) pairs; not thread-safe for writes (see `Index`)."""

    def __init__(self, index: faiss.Index, spec: IndexSpec):
        self.index = index
        self.spec = spec
        self._gpu_copy: faiss.Index | None = None
        if spec.params:
            faiss.ParameterSpace().set_index_parameters(index, spec.params)

    # ------------------------------------------------------------------------------ building

    @classmethod
    def create(cls, dim: int, spec: IndexSpec, training: np.ndarray | None = None) -> "VectorIndex":
        """An empty index of type `spec`, trained on `training` (m, dim) when the type needs it."""
        try:
            index = faiss.index_factory(dim, spec.factory, METRICS[spec.metric])
        except (RuntimeError, KeyError) as exc:
            raise IndexStoreError(f"bad index type {spec.factory!r} ({spec.metric}): {exc}") from None
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap2(index)
        if not index.is_trained:
            if training is None or len(training) == 0:
                raise IndexStoreError(f"index type {spec.factory!r} needs training descriptors")
            index = cls._train(index, np.ascontiguousarray(training, dtype=np.float32))
        return cls(index, spec)

    @staticmethod
    def _train(index: faiss.Index, training: np.ndarray) -> faiss.Index:
        if faiss_has_gpu():
            try:
                gpu = faiss.index_cpu_to_all_gpus(index)
                gpu.train(training)
                return faiss.index_gpu_to_cpu(gpu)
            except RuntimeError as exc:  # a type the GPU cannot hold: train on the CPU
                log.warning("faiss GPU training failed, training on the CPU: %s", exc)
        index.train(training)
        return index

    # ------------------------------------------------------------------------------ contents

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        """Ids held, ascending, int64."""
        if isinstance(self.index, faiss.IndexIDMap2):
            ids = faiss.vector_to_array(self.index.id_map)
        else:
            invlists = faiss.extract_index_ivf(self.index).invlists
            parts = [
                faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                for i in range(invlists.nlist)
                if invlists.list_size(i)
            ]
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return np.sort(ids.astype(np.int64))

    def add(self, ids: np.ndarray, descriptors: np.ndarray) -> None:
        """Add (n, dim) descriptors under catalog `ids` (n,)."""
        if len(ids) == 0:
            return
        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"descriptors must be (n, {self.dim}), got {x.shape}")
        self.index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
        self._gpu_copy = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids; returns how many were held. Raises RuntimeError for index types that
        cannot remove (HNSW): rebuild those instead."""
        if len(ids) == 0:
            return 0
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        removed = int(self.index.remove_ids(selector))
        self._gpu_copy = None
        return removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query (m, dim) → cosine similarities (m, k) float32 and ids (m, k) int64,
        best first; slots past the index size hold id −1 and similarity −inf."""
        x = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, int(k))
        if len(self) == 0:
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        searcher = self._searcher()
        if len(x) < SMALL_BATCH:
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
            try:
                distances, ids = searcher.search(x, k)
            finally:
                faiss.omp_set_num_threads(threads)
        else:
            distances, ids = searcher.search(x, k)
        scores = distances if self.spec.metric == "ip" else 1.0 - distances / 2.0
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

    def _searcher(self) -> faiss.Index:
        if not faiss_has_gpu():
            return self.index
        if self._gpu_copy is None:
            try:
                self._gpu_copy = faiss.index_cpu_to_all_gpus(self.index)
                if self.spec.params:
                    faiss.GpuParameterSpace().set_index_parameters(self._gpu_copy, self.spec.params)
            except RuntimeError as exc:  # a type the GPU cannot hold: search on the CPU
                log.warning("faiss GPU copy failed, searching on the CPU: %s", exc)
                return self.index
        return self._gpu_copy

    # ------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> int:
        """Write atomically (`netvlad.storage.write_atomic`); returns the file size in bytes."""
        data = faiss.serialize_index(self.index)
        write_atomic(path, memoryview(data))
        return int(data.size)

    @classmethod
    def load(cls, path: str | os.PathLike, spec: IndexSpec, mmap: bool = False) -> "VectorIndex":
        """Read a saved index; `mmap` maps it instead (`faiss.IO_FLAG_MMAP`: the OS pages in the
        inverted lists a search visits, so a large IVF index serves in little RAM; read-only)."""
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        except RuntimeError as exc:
            raise IndexStoreError(f"{path}: not a readable faiss index ({exc})") from None
        return cls(index, spec)
