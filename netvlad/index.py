"""`Index`: the object the CLI and the service open, search and update.

`IndexReader` (`netvlad.indexreader`) opens and searches an index folder; `Index` adds creating
one and changing it: adding photos (`netvlad.intake`), removing them, storing descriptors from
folder runs (`netvlad.indexing`) with the re-ranking evidence it keeps
(`netvlad.rerank.indexevidence`), and saving the faiss index (`netvlad.vectorcache`). One process
writes at a time (the folder's writer lock); every write is atomic, and a full disk is one
`DiskFullError` with nothing half-written.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DTYPE
from netvlad.errors import IndexStoreError
from netvlad.indexfolder import MANIFEST, create_folder
from netvlad.indexreader import IndexReader, ModelArg
from netvlad.intake import Photo, catalogue, describe_new, prepare_photos, remove_files
from netvlad.metadata import validate_metadata
from netvlad.modelfile import load_model
from netvlad.rerank.expansion import database_augment, load_dba, remove_dba, save_dba
from netvlad.rerank.indexevidence import MAX_KEYPOINTS, PCA_PHOTOS
from netvlad.storage import disk_full_errors
from netvlad.vectorcache import AUTO
from netvlad.vectorindex import IndexSpec, needs_training

def _modifies(method):
    """Index methods that change the folder: refused on a read-only index; a full disk is one
    `DiskFullError` (the catalog rolls back, temp files are removed)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._require_writable()
        with disk_full_errors(self.directory), self._lock.write():
            return method(self, *args, **kwargs)

    return wrapper


class Index(IndexReader):
    """An index folder opened for search and, when `writable`, for adding and removing.

    Build one with `Index.create` or `Index.open_or_create`, open one with `Index.open`.
    """

    # ------------------------------------------------------------------------------ open / create

    @classmethod
    def create(cls, directory: str | os.PathLike, model: ModelArg = "default", index_type: str = AUTO,
               device: str | None = None, amp: bool | None = None, local_features: str | None = None,
               max_keypoints: int = MAX_KEYPOINTS, patch_features: bool = False) -> "Index":
        """Create an empty index folder for `model` (a model, a model file or a built-in name) and
        open it for writing. `index_type`: ``auto`` or a faiss factory string. `local_features`
        (``sift`` or ``orb``, at most `max_keypoints` a photo) and `patch_features` keep the
        evidence of geometric and patch re-ranking."""
        net = load_model(model, device)
        if index_type != AUTO:
            needs_training(IndexSpec.parse(index_type), net.dim)  # refuses a type faiss cannot build
        create_folder(Path(directory), net, index_type)
        index = cls.open(directory, net, writable=True, amp=amp)
        index.keep_evidence(local_features, max_keypoints, patch_features)
        return index

    @classmethod
    def open_or_create(cls, directory: str | os.PathLike, model: ModelArg = None, index_type: str | None = None,
                       device: str | None = None, amp: bool | None = None, local_features: str | None = None,
                       max_keypoints: int = MAX_KEYPOINTS, patch_features: bool = False) -> "Index":
        """Open `directory` for writing, creating it (with `model`, default the built-in one) when it
        is not an index folder yet. A given `index_type` replaces the one requested before; asked
        evidence is kept from now on (`keep_evidence`)."""
        directory = Path(directory)
        if not (directory / MANIFEST).exists():
            return cls.create(directory, "default" if model is None else model, index_type or AUTO, device, amp,
                              local_features, max_keypoints, patch_features)
        index = cls.open(directory, model, writable=True, device=device, amp=amp)
        try:
            if index_type is not None and index_type != index.requested_type:
                index._cache.request_type(index_type)  # applied and saved by `save`
            index.keep_evidence(local_features, max_keypoints, patch_features)
        except (IndexStoreError, ValueError):
            index.close()
            raise
        return index

    def _require_writable(self) -> None:
        if not self.writable:
            raise IndexStoreError(f"{self.directory}: opened read-only")

    def set_root(self, root: str | os.PathLike) -> Path:
        """Bind the index to photo folder `root` (refused if it already catalogues another one)."""
        root = Path(root).resolve()
        current = self.root
        if current is not None and current != root:
            raise IndexStoreError(
                f"{self.directory} catalogues the photos of {current}, not {root}: use another --index folder"
            )
        if current is None:
            self.catalog.set_meta("root", root)
        return root

    # ------------------------------------------------------------------------------ writes

    @_modifies
    def save(self) -> None:
        """Bring the faiss index up to date (changing its type when the size calls for it) and
        save it with the manifest, unless the saved files are current already; compact the
        descriptor shards first (`DescriptorStore.compact`)."""
        self.store.compact()
        self._cache.save_if_changed()

    @_modifies
    def augment_database(self, k: int = 5, alpha: float = 3.0) -> None:
        """Compute database-side augmentation (DBA) of every indexed descriptor and keep it beside
        them (DIR/dba/); searches then score their shortlist with it. Reversible (`drop_augmentation`)."""
        self.store.compact()
        ids, augmented = database_augment(self.store, k, alpha)
        save_dba(self.directory, ids, augmented, k, alpha, self.catalog.revision)
        self.dba = load_dba(self.directory)

    @_modifies
    def drop_augmentation(self) -> bool:
        """Delete the DBA descriptors (searches use the originals again); whether there were any."""
        self.dba = None
        return remove_dba(self.directory)

    @_modifies
    def keep_evidence(self, local_features: str | None = None, max_keypoints: int = MAX_KEYPOINTS,
                      patch_features: bool = False) -> None:
        """Keep local features (``sift``/``orb``) and/or patch descriptors of every photo from now
        on; photos indexed before get theirs from `store_evidence` (`netvlad index` does it)."""
        self.evidence.enable(local_features, max_keypoints, patch_features)

    def _evidence_of_files(self, ids: Sequence[int]) -> dict[str, dict[int, bytes]]:
        if not self.evidence.kinds():
            return {}
        files = [(int(i), str(self.resolve(*found[0]))) for i in ids if (found := self.catalog.files_of(int(i)))]
        return self.evidence.extract_files(self.model, files, self.max_pixels, self.amp)

    def prepare_evidence(self, paths: Sequence[str]) -> None:
        """Before a folder run describes `paths`: learn the patch PCA (when patch descriptors are
        kept and it is not learned yet) on up to `PCA_PHOTOS` of them, spread over the run."""
        if self.evidence.patch is not None and self.evidence.pca(self.model) is None and paths:
            step = max(1, len(paths) // PCA_PHOTOS)
            self.evidence.learn_pca(self.model, list(paths)[::step][:PCA_PHOTOS])

    def store_evidence(self, ids: Sequence[int]) -> None:
        """Compute and store the kept evidence of indexed images `ids` (those lacking it)."""
        self._put_evidence(self._evidence_of_files(ids))

    @_modifies
    def _put_evidence(self, evidence: dict[str, dict[int, bytes]]) -> None:
        self.evidence.put(evidence)

    def store_descriptors(self, ids: Sequence[int], descriptors: np.ndarray) -> None:
        """Durably record (n, dim) descriptors of pending images and add them to the faiss index,
        their kept evidence first (computed from their files before the writer lock is taken)."""
        self._store_descriptors(ids, descriptors, self._evidence_of_files(ids))

    @_modifies
    def _store_descriptors(self, ids: Sequence[int], descriptors: np.ndarray, evidence: dict) -> None:
        self.evidence.put(evidence)
        stored = np.asarray(descriptors, dtype=DTYPE)
        self.store.append(ids, stored)
        stored = stored.astype(np.float32)
        self._cache.add(ids, stored)

    @_modifies
    def forget(self, paths: Sequence[str] = ()) -> list[int]:
        """Forget catalogued paths (e.g. deleted photos) and every image no file shows any more;
        returns the ids that left the index."""
        gone = self.catalog.delete_files(paths)
        self._cache.drop(gone)
        self.evidence.delete(gone)
        return gone

    @contextmanager
    def writing(self) -> Iterator[Catalog]:
        """Hold the writer lock while changing the catalog directly (folder scans)."""
        self._require_writable()
        with disk_full_errors(self.directory), self._lock.write():
            yield self.catalog

    @_modifies
    def mark_failed(self, failures: Sequence[tuple[int, str]]) -> None:
        """Record images that failed to decode, with their reasons."""
        self.catalog.mark_failed(failures)

    def add(self, items: Sequence[str | os.PathLike | bytes], metadata: Sequence[dict | None] | None = None) -> list[int]:
        """Add photos (paths or encoded bytes) with optional per-photo metadata (lat, lon,
        taken_at and free keys); returns their ids, durable on return. Content already indexed is
        not described again (its id is returned). Raises `ImageError` naming the first photo that
        does not decode and `MetadataError` for the first invalid metadata (`validate_metadata`);
        nothing is added or stored then."""
        self._require_writable()
        items = list(items)
        metadata = list(metadata) if metadata is not None else [None] * len(items)
        if len(metadata) != len(items):
            raise ValueError(f"{len(metadata)} metadata entries for {len(items)} photos")
        metadata = [validate_metadata(meta) for meta in metadata]
        photos = prepare_photos(items, self.root, self.max_pixels, self.model.preprocess.reduce_to)
        fresh = describe_new(self.model, photos, self.catalog, self.amp)
        pictures = {p.sha256: (p.image, (p.info.width, p.info.height)) for p in photos if p.sha256 in fresh}
        extracted = self.evidence.extract(self.model, list(pictures.values()), self.amp)
        return self._catalogue(photos, metadata, fresh, {kind: dict(zip(pictures, blobs)) for kind, blobs in extracted.items()})

    @_modifies
    def _catalogue(self, photos: list[Photo], metadata: list[dict], fresh: dict, evidence: dict) -> list[int]:
        def store_evidence(new: dict[int, str]) -> None:
            self.evidence.put({kind: {i: blobs[sha] for i, sha in new.items()} for kind, blobs in evidence.items()})

        ids, new = catalogue(self.store, self.directory, photos, metadata, fresh, store_evidence)
        if new:
            self._cache.add(list(new), np.stack(list(new.values())))
        return ids

    @_modifies
    def remove(self, ids: Sequence[int]) -> list[int]:
        """Take images out of the index (uploaded files are deleted; folder photos are kept on disk
        and not re-added by later folder runs); returns the ids that were indexed."""
        uploads = [path for i in ids for path, origin in self.catalog.files_of(int(i)) if origin == "upload"]
        removed = self.catalog.remove(ids)
        self._cache.drop(removed)
        self.evidence.delete(removed)
        remove_files([self.directory / path for path in uploads])
        return removed
