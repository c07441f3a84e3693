"""`IndexReader`: an index folder opened for search; `netvlad.index.Index` adds the writes.

It holds the parts of an index folder, each in its own module: the folder, its manifest and
writer lock (`netvlad.indexfolder`), the SQLite catalog (`netvlad.catalog`, the source of truth),
the descriptor shards it points to (`netvlad.descriptorstore`), the faiss index kept in step with it (`netvlad.vectorcache`), ranking (`netvlad.search.rank`) and
confined file access (`netvlad.photofile`), and the re-ranking evidence it keeps
(`netvlad.rerank.indexevidence`). Within a process a readers-writer lock lets many
threads search while one adds or removes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from netvlad.records import ImageRecord
from netvlad.descriptorstore import DESCRIPTORS, DescriptorStore
from netvlad.imageio import DEFAULT_MAX_PIXELS, load_image
from netvlad.legacyblobs import migrate
from netvlad.indexfolder import MODEL, UPLOADS, acquire_writer_lock, open_catalog, read_manifest
from netvlad.model import NetVLADModel
from netvlad.modelfile import load_model
from netvlad.photofile import open_indexed_photo
from netvlad.rerank.expansion import load_dba
from netvlad.rerank.indexevidence import IndexEvidence
from netvlad.rerank.shortlist import DEFAULT_RERANK_K, NEEDS_PICTURES, check_method, rerank_result
from netvlad.rwlock import ReadWriteLock
from netvlad.search import FUSION_ALPHA, SearchResult, rank
from netvlad.storage import disk_full_errors
from netvlad.vectorcache import VectorCache
from netvlad.vectorindex import IndexSpec

ModelArg = Union[NetVLADModel, str, os.PathLike, None]


class IndexReader:
    """An index folder opened for search; use as a context manager or call `close()`.
    Descriptors are unit-norm float32 of `model.dim` dims; scores are cosine similarities.
    `writable` (see `open`) is for the subclass `netvlad.index.Index`, which adds the writes.
    """

    def __init__(self, directory: Path, model: NetVLADModel, cache: VectorCache, evidence: IndexEvidence,
                 writable: bool, lock_handle, amp: bool | None):
        self.directory = directory
        self.model = model
        self.catalog = cache.catalog
        self.store = cache.store
        self.evidence = evidence
        self.dba = load_dba(directory)
        self.writable = writable
        self.amp = amp
        self.max_pixels = DEFAULT_MAX_PIXELS
        self._cache = cache
        self._lock = ReadWriteLock()
        self._lock_handle = lock_handle

    # ------------------------------------------------------------------------------ open

    @classmethod
    def open(cls, directory: str | os.PathLike, model: ModelArg = None, writable: bool = False,
             device: str | None = None, amp: bool | None = None, mmap: bool = False) -> "IndexReader":
        """Open an index folder. `model` None uses the folder's own model; any other model must be
        the one that built the index (else `IndexStoreError`). `writable` takes the folder's
        writer lock (sweeping temp files a killed writer left) and lets `add`, `remove` and `save`
        change it; a folder that cannot be written is an `IndexStoreError` then. A writer also
        deletes shard files a killed run left and migrates an older folder's descriptors
        (`netvlad.legacyblobs`). `mmap` maps a read-only index's faiss file (`VectorIndex.load`)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        lock_handle = acquire_writer_lock(directory) if writable else None
        catalog = evidence = None
        try:
            net = load_model(directory / MODEL if model is None else model, device)
            catalog = open_catalog(directory, manifest, net, writable)
            store = DescriptorStore(directory / DESCRIPTORS, catalog, net.dim)
            with disk_full_errors(directory):
                if writable:
                    store.recover()
                    migrate(store)
                cache = VectorCache(directory, store, manifest)
                cache.load(save_when_stale=writable, mmap=mmap and not writable)
                evidence = IndexEvidence.open(directory, writable)
                if writable:
                    evidence.prune(catalog.indexed_ids())
        except BaseException:
            for part in (catalog, evidence):
                if part is not None:
                    part.close()
            if lock_handle is not None:
                lock_handle.close()
            raise
        return cls(directory, net, cache, evidence, writable, lock_handle, amp)

    def close(self) -> None:
        """Release the catalog connections and the writer lock (does not save: see `save`)."""
        self.catalog.close()
        self.evidence.close()
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> "IndexReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ state

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def vectors(self):
        """The faiss index in use (`netvlad.vectorindex.VectorIndex`, ids = catalog ids)."""
        return self._cache.vectors

    @property
    def requested_type(self) -> str:
        """``auto`` or the faiss factory string asked for."""
        return self._cache.requested_type

    @property
    def spec(self) -> IndexSpec:
        """Type of the faiss index in use."""
        return self._cache.vectors.spec

    def __len__(self) -> int:
        with self._lock.read():
            return len(self._cache.vectors)

    def rerank_methods(self) -> list[str]:
        """The re-rankings this index can serve (``none``, ``aqe``, and ``geometric`` / ``patch``
        when it keeps their evidence)."""
        return self.evidence.methods()

    def counts(self) -> dict[str, int]:
        """Number of catalogued images in each status."""
        return self.catalog.counts()

    @property
    def root(self) -> Path | None:
        """The photo folder this index catalogues (None before the first `netvlad index`)."""
        return self.catalog.root

    def resolve(self, path: str, origin: str) -> Path:
        """Absolute path of a catalogued file."""
        if origin == "upload":
            return self.directory / path
        if origin == "folder":
            return (self.root or Path(".")) / path
        return Path(path)

    # ------------------------------------------------------------------------------ reads

    def get(self, image_id: int) -> ImageRecord | None:
        """The catalog record of an image, None when unknown or removed."""
        record = self.catalog.records([int(image_id)], self.resolve).get(int(image_id))
        return None if record is None or record.status == "removed" else record

    def open_photo(self, record: ImageRecord) -> BinaryIO:
        """The file of an indexed photo opened for reading, confined to the photo folder or the
        index folder's uploads (`netvlad.photofile`); `PhotoFileError` saying why not."""
        files = [(path.removeprefix(f"{UPLOADS}/") if origin == "upload" else path, origin)
                 for path, origin in self.catalog.files_of(record.id)]
        return open_indexed_photo(record, files, {"folder": self.root, "upload": self.directory / UPLOADS})

    def search(self, images: Sequence, k: int = 10, fusion: str = "softmedian", alpha: float = FUSION_ALPHA,
               rerank: str = "none", rerank_k: int = DEFAULT_RERANK_K) -> SearchResult:
        """Search with one or several photos (paths, bytes or PIL images) of the same place;
        `rerank` re-orders the top `rerank_k` with local evidence (`rerank_methods`)."""
        if len(images) == 0:
            raise ValueError("search needs at least one query photo")
        queries = self.model.describe(list(images), amp=self.amp)
        pictures = [load_image(image, self.max_pixels) for image in images] if rerank in NEEDS_PICTURES else None
        return self.search_descriptors(queries, k, fusion, alpha, rerank, rerank_k, pictures)

    def search_descriptors(self, queries: np.ndarray, k: int = 10, fusion: str = "softmedian",
                           alpha: float = FUSION_ALPHA, rerank: str = "none", rerank_k: int = DEFAULT_RERANK_K,
                           query_images: Sequence | None = None) -> SearchResult:
        """Search with (m, dim) query descriptors of one place (`netvlad.search.rank`), then
        re-rank the top max(k, `rerank_k`) by `rerank` (`netvlad.rerank.shortlist`), which for
        ``geometric`` and ``patch`` needs the query photos as searched (`query_images`: PIL images
        or (H, W, 3) uint8 arrays). `RerankUnavailableError` when the index lacks the evidence."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"query descriptors must have {self.dim} dims, got {q.shape[1]}")
        check_method(rerank)
        self.evidence.require(rerank)
        with self._lock.read():
            if rerank == "none":
                return rank(self._cache.vectors, self.store, self.resolve, q, k, fusion, alpha, self.dba)
            pool = rank(self._cache.vectors, self.store, self.resolve, q, max(k, rerank_k), fusion, alpha, self.dba)
            return rerank_result(pool, rerank, k, q, query_images, self.evidence, self.store, self.model)
