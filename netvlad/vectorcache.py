"""The faiss index of an index folder, kept in step with the catalog.

The catalog is the source of truth; the faiss index is a cache of its indexed descriptors. On
open it is loaded and checked against the catalog (revision, count) and brought up to date, or
rebuilt when missing or unreadable, so a process killed at any moment loses nothing. Rebuilds
read the descriptor shards (`netvlad.descriptorstore`); large ones, or any while a Ray session is
up, train once and add shard by shard (`netvlad.shardbuild`). Its type
follows the collection size (`choose_spec`) unless a factory string was requested. `save` writes
the faiss file and then the manifest (the commit point) and deletes older faiss files.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from netvlad.descriptorstore import DescriptorStore
from netvlad.errors import IndexStoreError
from netvlad.indexfolder import write_manifest
from netvlad.shardbuild import build_sharded, wants_sharded_build
from netvlad.storage import fsync_dir
from netvlad.vectorindex import (
    IndexSpec,
    VectorIndex,
    choose_spec,
    min_training_size,
    needs_training,
    training_size,
)

log = logging.getLogger(__name__)

AUTO = "auto"
#: Descriptors read from the catalog per step when filling a faiss index.
CHUNK = 10_000


class VectorCache:
    """The faiss index (`vectors`, ids = catalog ids) of folder `directory`, built from the
    descriptors of `store`, and the folder's manifest."""

    def __init__(self, directory: Path, store: DescriptorStore, manifest: dict):
        self.directory = directory
        self.store = store
        self.catalog = store.catalog
        self.manifest = manifest
        self.dim = store.dim
        self.vectors: VectorIndex | None = None
        self._persisted = json.dumps(manifest, sort_keys=True)  # the manifest as on disk

    @property
    def requested_type(self) -> str:
        """``auto`` or the faiss factory string asked for."""
        return self.manifest["index"]["requested"]

    def request_type(self, index_type: str) -> None:
        """Ask for another index type (``auto`` or a factory string), applied by the next `save`."""
        if index_type != AUTO:
            needs_training(IndexSpec.parse(index_type), self.dim)  # refuses a type faiss cannot build
        self.manifest["index"]["requested"] = index_type

    def desired_spec(self, n: int) -> IndexSpec:
        """The index type for `n` descriptors."""
        if self.requested_type == AUTO:
            return choose_spec(n, self.dim)
        spec = IndexSpec.parse(self.requested_type)
        if needs_training(spec, self.dim) and n < min_training_size(spec):
            return IndexSpec()  # too few descriptors to train it yet: exact search meanwhile
        return spec

    def load(self, save_when_stale: bool, mmap: bool = False) -> None:
        """Load the saved faiss index and bring it up to date with the catalog (saving it again
        when it was stale and `save_when_stale`). `mmap`: map a current index file rather than
        read it (`VectorIndex.load`); a stale one is read, since it must change."""
        info = self.manifest["index"]
        spec = IndexSpec(info["factory"], info["metric"], info["params"])
        name = self.manifest.get("vectors")
        if name:
            try:
                current = self.manifest["revision"] == self.catalog.revision
                self.vectors = VectorIndex.load(self.directory / name, spec, mmap=mmap and current)
            except IndexStoreError as exc:
                log.warning("rebuilding the faiss index: %s", exc)
        up_to_date = (
            self.vectors is not None
            and self.manifest["revision"] == self.catalog.revision
            and len(self.vectors) == self.manifest["count"]
        )
        if not up_to_date:
            self.sync(retype=False)
            if save_when_stale:
                self.save()

    def sync(self, retype: bool) -> bool:
        """Make the faiss index hold exactly the catalog's indexed descriptors; with `retype`,
        rebuild it first when the collection size calls for another index type. Returns whether
        the faiss index changed."""
        ids = self.catalog.indexed_ids()
        if self.vectors is None or (retype and self.vectors.spec != self.desired_spec(len(ids))):
            self._rebuild(ids, self.desired_spec(len(ids)))
            return True
        held = self.vectors.ids()
        extra = np.setdiff1d(held, ids, assume_unique=True)
        missing = np.setdiff1d(ids, held, assume_unique=True)
        self.drop(extra)
        self._fill(self.vectors, missing)
        return bool(len(extra) or len(missing))

    def add(self, ids: Sequence[int], descriptors: np.ndarray) -> None:
        """Add (n, dim) float32 descriptors already stored in the catalog."""
        self.vectors.add(np.asarray(ids, dtype=np.int64), np.asarray(descriptors, dtype=np.float32))

    def drop(self, ids: Sequence[int]) -> None:
        """Remove ids (rebuilding types that cannot remove)."""
        try:
            self.vectors.remove(np.asarray(ids, dtype=np.int64))
        except RuntimeError:
            self._rebuild(self.catalog.indexed_ids(), self.vectors.spec)

    def _fill(self, vectors: VectorIndex, ids: np.ndarray) -> None:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            vectors.add(chunk, self.store.descriptors(chunk))

    def _rebuild(self, ids: np.ndarray, spec: IndexSpec) -> None:
        if wants_sharded_build(spec, len(ids)):
            self.vectors = build_sharded(self.store, spec, self.directory)
            return
        training = None
        if needs_training(spec, self.dim):
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(ids, training_size(spec, len(ids)), replace=False))
            training = self.store.descriptors(sample)
        log.info("building a %s index of %d descriptors", spec.factory, len(ids))
        vectors = VectorIndex.create(self.dim, spec, training)
        self._fill(vectors, ids)
        self.vectors = vectors

    def save_if_changed(self) -> None:
        """Bring the index up to date (changing its type when the size calls for it) and save it,
        unless the saved files are current already."""
        changed = self.sync(retype=True)
        stale = self.manifest["revision"] != self.catalog.revision
        if changed or stale or json.dumps(self.manifest, sort_keys=True) != self._persisted:
            self.save()

    def save(self) -> None:
        """Write the faiss index and then the manifest (the commit point); drop older faiss files."""
        name = f"vectors-{uuid.uuid4().hex[:12]}.faiss"
        self.vectors.save(self.directory / name)
        self.manifest.update(
            count=len(self.vectors), revision=self.catalog.revision, vectors=name, updated_at=time.time(),
            faiss_version=faiss.__version__,
        )
        self.manifest["index"].update(self.vectors.spec.to_dict())
        write_manifest(self.directory, self.manifest)
        fsync_dir(self.directory)
        self._persisted = json.dumps(self.manifest, sort_keys=True)
        for old in self.directory.glob("vectors-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)
