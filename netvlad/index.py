"""The index folder and `Index`, the object the CLI and the service search and update.

    DIR/manifest.json       format, version, model fingerprint, dim, count, index type, files
    DIR/catalog.sqlite      the catalog (source of truth: photos, statuses, descriptors)
    DIR/model.pt            the model that built the index (queries must use the same one)
    DIR/vectors-*.faiss     the faiss index (ids = catalog ids), a derived artefact
    DIR/uploads/            photos added as bytes through the API

Writes are atomic: a new folder is built beside DIR and renamed into place; the faiss file and
the manifest are written to temp files, fsynced and renamed, the manifest last. The faiss index
is only ever a cache of the catalog: on open it is checked against the catalog (revision, ids)
and brought up to date, or rebuilt when missing or unreadable, so a process killed at any moment
loses nothing. One process writes at a time (an advisory lock on DIR/.lock); within a process a
readers-writer lock lets many threads search while one adds or removes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import faiss
import numpy as np
import torch
from PIL import Image

from netvlad.catalog import DESCRIPTOR_DTYPE, Catalog, ImageRecord
from netvlad.errors import ImageError, IndexStoreError, PhotoFileError
from netvlad.exif import PhotoInfo, read_photo_info
from netvlad.imageio import DEFAULT_MAX_PIXELS, load_image
from netvlad.metadata import validate_metadata
from netvlad.model import NetVLADModel
from netvlad.modelfile import load_model, model_fingerprint, save_model
from netvlad.photofile import open_photo_file
from netvlad.search import FUSION_ALPHA, FUSIONS, Hit, SearchResult, estimate_location, fuse_scores
from netvlad.storage import disk_full_errors, fsync_dir, sweep_temp_files, write_atomic
from netvlad.vectorindex import (
    IndexSpec,
    VectorIndex,
    choose_spec,
    min_training_size,
    needs_training,
    training_size,
)

log = logging.getLogger(__name__)

FORMAT = "netvlad-index"
VERSION = 1
MANIFEST = "manifest.json"
CATALOG = "catalog.sqlite"
MODEL = "model.pt"
UPLOADS = "uploads"
LOCK = ".lock"
AUTO = "auto"
#: Descriptors read from the catalog per step when filling a faiss index.
CHUNK = 10_000
#: Upload file suffix by Pillow format name.
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif"}

ModelArg = Union[NetVLADModel, str, os.PathLike, None]


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Photo:
    """A photo prepared for `Index.add`: decoded, hashed, with its catalog facts."""

    path: str
    origin: str
    size: int
    mtime_ns: int
    sha256: str
    info: PhotoInfo
    image: Image.Image
    data: bytes | None = None


def _modifies(method):
    """Index methods that change the folder: refused on a read-only index; a full disk is one
    `DiskFullError` (the catalog rolls back, temp files are removed)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._require_writable()
        with disk_full_errors(self.directory):
            return method(self, *args, **kwargs)

    return wrapper


def read_manifest(directory: Path) -> dict:
    """The validated manifest of index folder `directory`."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise IndexStoreError(f"{directory}: no such index folder (create one with `netvlad index PHOTOS --index {directory}`)")
    if not path.is_file():
        raise IndexStoreError(f"{directory}: not an index folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexStoreError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexStoreError(f"{path}: not a netvlad index manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise IndexStoreError(f"{path}: index version {manifest.get('version')} is newer than this netvlad reads ({VERSION})")
    for key, kind in (("model", dict), ("dim", int), ("count", int), ("index", dict), ("revision", int)):
        if not isinstance(manifest.get(key), kind):
            raise IndexStoreError(f"{path}: manifest has no valid '{key}'")
    return manifest


def _model_summary(model: NetVLADModel) -> dict:
    config = model.config
    return {"fingerprint": model_fingerprint(model), "backbone": config.backbone, "clusters": config.clusters,
            "dim": model.dim, "input_mode": config.input_mode, "max_side": config.max_side}


def _describe_model(summary: dict) -> str:
    return (f"{summary.get('backbone')} K={summary.get('clusters')} dim={summary.get('dim')} "
            f"sha256 {str(summary.get('fingerprint'))[:12]}")


class Index:
    """An index folder opened for search (and, when `writable`, for adding and removing).

    Build one with `Index.create` or `Index.open_or_create`, open one with `Index.open`; use as a
    context manager or call `close()`. Descriptors are unit-norm float32 of `model.dim` dims;
    scores are cosine similarities.
    """

    def __init__(self, directory: Path, model: NetVLADModel, manifest: dict, catalog: Catalog,
                 writable: bool, lock_handle, amp: bool | None):
        self.directory = directory
        self.model = model
        self.catalog = catalog
        self.writable = writable
        self.amp = amp
        self.max_pixels = DEFAULT_MAX_PIXELS
        self._manifest = manifest
        self._persisted = json.dumps(manifest, sort_keys=True)  # the manifest as on disk
        self._lock = _ReadWriteLock()
        self._lock_handle = lock_handle
        self.vectors: VectorIndex | None = None

    # ------------------------------------------------------------------------------ open / create

    @classmethod
    def create(cls, directory: str | os.PathLike, model: ModelArg = "default", index_type: str = AUTO,
               device: str | None = None, amp: bool | None = None) -> "Index":
        """Create an empty index folder for `model` (a model, a model file or a built-in name) and
        open it for writing. `index_type`: ``auto`` or a faiss factory string."""
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise IndexStoreError(f"{directory}: already an index folder")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise IndexStoreError(f"{directory}: exists and is not an empty folder")
        net = cls._load_model(model, device)
        if index_type != AUTO:
            needs_training(IndexSpec.parse(index_type), net.dim)  # refuses a type faiss cannot build
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with disk_full_errors(directory.parent):
                tmp.mkdir()
                cls._write_new_folder(tmp, net, index_type)
                if directory.exists():
                    directory.rmdir()
                os.replace(tmp, directory)
                fsync_dir(directory.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(directory, net, writable=True, amp=amp)

    @staticmethod
    def _write_new_folder(folder: Path, net: NetVLADModel, index_type: str) -> None:
        """The files of an empty index for `net`: model, catalog, manifest."""
        save_model(net, folder / MODEL)
        summary = _model_summary(net)
        catalog = Catalog(folder / CATALOG)
        catalog.set_meta("model", summary["fingerprint"])
        catalog.set_meta("dim", net.dim)
        catalog.close()
        manifest = {
            "format": FORMAT, "version": VERSION, "model": summary, "dim": net.dim, "count": 0,
            "revision": 0, "index": {"requested": index_type, **IndexSpec().to_dict()},
            "vectors": None, "created_at": time.time(), "updated_at": time.time(),
        }
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())

    @classmethod
    def open(cls, directory: str | os.PathLike, model: ModelArg = None, writable: bool = False,
             device: str | None = None, amp: bool | None = None) -> "Index":
        """Open an index folder. `model` None uses the folder's own model; any other model must be
        the one that built the index (else `IndexStoreError`). `writable` takes the folder's
        writer lock and lets `add`, `remove` and `checkpoint` change it; its temp files left by a
        killed writer are swept first. A folder that cannot be written (read-only file system, no
        permission) is an `IndexStoreError` when `writable`, and opens read-only otherwise."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        lock_handle = cls._acquire_lock(directory) if writable else None
        if writable:
            swept = sweep_temp_files([directory, *directory.glob(f"{UPLOADS}/*")])
            swept += sweep_temp_files([directory.parent], prefix=f".{directory.name}.tmp-")  # from `create`
            for path in swept:
                log.info("removed %s, left by an interrupted writer", path)
        catalog = None
        try:
            net = cls._load_model(directory / MODEL if model is None else model, device)
            summary = _model_summary(net)
            if summary["fingerprint"] != manifest["model"].get("fingerprint"):
                raise IndexStoreError(
                    f"{directory} was built with model {_describe_model(manifest['model'])}, not with "
                    f"{_describe_model(summary)}: search it with its own model (leave out --model) or "
                    "index the photos into a new folder"
                )
            catalog = Catalog(directory / CATALOG, readonly=not writable)
            if catalog.get_meta("model") != summary["fingerprint"] or catalog.get_meta("dim") != str(net.dim):
                raise IndexStoreError(f"{directory / CATALOG}: catalog belongs to another model than the manifest")
            index = cls(directory, net, manifest, catalog, writable, lock_handle, amp)
            with disk_full_errors(directory):
                index._load_vectors()
        except BaseException:
            if catalog is not None:
                catalog.close()
            if lock_handle is not None:
                lock_handle.close()
            raise
        return index

    @classmethod
    def open_or_create(cls, directory: str | os.PathLike, model: ModelArg = None, index_type: str | None = None,
                       device: str | None = None, amp: bool | None = None) -> "Index":
        """Open `directory` for writing, creating it (with `model`, default the built-in one) when it
        is not an index folder yet. A given `index_type` replaces the one requested before."""
        directory = Path(directory)
        if not (directory / MANIFEST).exists():
            return cls.create(directory, "default" if model is None else model, index_type or AUTO, device, amp)
        index = cls.open(directory, model, writable=True, device=device, amp=amp)
        if index_type is not None and index_type != index.requested_type:
            if index_type != AUTO:
                try:
                    needs_training(IndexSpec.parse(index_type), index.dim)
                except IndexStoreError:
                    index.close()
                    raise
            index._manifest["index"]["requested"] = index_type  # applied and saved by `checkpoint`
        return index

    @staticmethod
    def _load_model(model: ModelArg, device: str | None) -> NetVLADModel:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, NetVLADModel):
            return model.to(device).eval()
        return load_model(model, device=device)

    @staticmethod
    def _acquire_lock(directory: Path):
        try:
            handle = open(directory / LOCK, "a+")
        except OSError as exc:  # read-only file system, no permission
            raise IndexStoreError(f"{directory}: cannot be written ({exc.strerror}); open it read-only") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise IndexStoreError(f"{directory}: another process is writing this index") from None
        return handle

    def close(self) -> None:
        """Release the catalog connections and the writer lock (does not save: see `checkpoint`)."""
        self.catalog.close()
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ faiss state

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def requested_type(self) -> str:
        """``auto`` or the faiss factory string asked for."""
        return self._manifest["index"]["requested"]

    @property
    def spec(self) -> IndexSpec:
        """Type of the faiss index in use."""
        return self.vectors.spec

    def _desired_spec(self, n: int) -> IndexSpec:
        if self.requested_type == AUTO:
            return choose_spec(n, self.dim)
        spec = IndexSpec.parse(self.requested_type)
        if needs_training(spec, self.dim) and n < min_training_size(spec):
            return IndexSpec()  # too few descriptors to train it yet: exact search meanwhile
        return spec

    def _load_vectors(self) -> None:
        """Load the saved faiss index and bring it up to date with the catalog."""
        info = self._manifest["index"]
        spec = IndexSpec(info["factory"], info["metric"], info["params"])
        name = self._manifest.get("vectors")
        if name:
            try:
                self.vectors = VectorIndex.load(self.directory / name, spec)
            except IndexStoreError as exc:
                log.warning("rebuilding the faiss index: %s", exc)
        up_to_date = (
            self.vectors is not None
            and self._manifest["revision"] == self.catalog.revision
            and len(self.vectors) == self._manifest["count"]
        )
        if not up_to_date:
            self._sync(retype=False)
            if self.writable:
                self._save()

    def _sync(self, retype: bool) -> bool:
        """Make the faiss index hold exactly the catalog's indexed descriptors; with `retype`,
        rebuild it first when the collection size calls for another index type. Returns whether
        the faiss index changed."""
        ids = self.catalog.indexed_ids()
        if self.vectors is None or (retype and self.vectors.spec != self._desired_spec(len(ids))):
            self._rebuild(ids, self._desired_spec(len(ids)))
            return True
        held = self.vectors.ids()
        extra = np.setdiff1d(held, ids, assume_unique=True)
        missing = np.setdiff1d(ids, held, assume_unique=True)
        self._drop(extra)
        self._fill(self.vectors, missing)
        return bool(len(extra) or len(missing))

    def _fill(self, vectors: VectorIndex, ids: np.ndarray) -> None:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            vectors.add(chunk, self.catalog.descriptors(chunk, self.dim))

    def _rebuild(self, ids: np.ndarray, spec: IndexSpec) -> None:
        training = None
        if needs_training(spec, self.dim):
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(ids, training_size(spec, len(ids)), replace=False))
            training = self.catalog.descriptors(sample, self.dim)
        log.info("building a %s index of %d descriptors", spec.factory, len(ids))
        vectors = VectorIndex.create(self.dim, spec, training)
        self._fill(vectors, ids)
        self.vectors = vectors

    def _save(self) -> None:
        """Write the faiss index and then the manifest (the commit point); drop older faiss files."""
        name = f"vectors-{uuid.uuid4().hex[:12]}.faiss"
        self.vectors.save(self.directory / name)
        self._manifest.update(
            count=len(self.vectors), revision=self.catalog.revision, vectors=name, updated_at=time.time(),
            faiss_version=faiss.__version__,
        )
        self._manifest["index"].update(self.vectors.spec.to_dict())
        write_atomic(self.directory / MANIFEST, json.dumps(self._manifest, indent=1).encode())
        fsync_dir(self.directory)
        self._persisted = json.dumps(self._manifest, sort_keys=True)
        for old in self.directory.glob("vectors-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def _require_writable(self) -> None:
        if not self.writable:
            raise IndexStoreError(f"{self.directory}: opened read-only")

    @_modifies
    def checkpoint(self) -> None:
        """Bring the faiss index up to date (changing its type when the size calls for it) and
        save it with the manifest, unless the saved files are current already."""
        with self._lock.write():
            changed = self._sync(retype=True)
            stale = self._manifest["revision"] != self.catalog.revision
            if changed or stale or json.dumps(self._manifest, sort_keys=True) != self._persisted:
                self._save()

    # ------------------------------------------------------------------------------ catalog writes

    @property
    def root(self) -> Path | None:
        """The photo folder this index catalogues (None before the first `netvlad index`)."""
        value = self.catalog.get_meta("root")
        return Path(value) if value else None

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

    def resolve(self, path: str, origin: str) -> Path:
        """Absolute path of a catalogued file."""
        if origin == "upload":
            return self.directory / path
        if origin == "folder":
            return (self.root or Path(".")) / path
        return Path(path)

    @_modifies
    def store_descriptors(self, ids: Sequence[int], descriptors: np.ndarray) -> None:
        """Durably record (n, dim) descriptors of pending images and add them to the faiss index."""
        stored = np.asarray(descriptors, dtype=DESCRIPTOR_DTYPE).astype(np.float32)
        with self._lock.write():
            self.catalog.store_descriptors(ids, stored)
            self.vectors.add(np.asarray(ids, dtype=np.int64), stored)

    @_modifies
    def forget(self, paths: Sequence[str] = ()) -> list[int]:
        """Forget catalogued paths (e.g. deleted photos) and every image no file shows any more;
        returns the ids that left the index."""
        with self._lock.write():
            gone = self.catalog.delete_files(paths)
            self._drop(gone)
        return gone

    def _drop(self, ids: Sequence[int]) -> None:
        """Remove ids from the faiss index (rebuilding types that cannot remove)."""
        try:
            self.vectors.remove(np.asarray(ids, dtype=np.int64))
        except RuntimeError:
            self._rebuild(self.catalog.indexed_ids(), self.vectors.spec)

    @contextmanager
    def writing(self) -> Iterator[Catalog]:
        """Hold the writer lock while changing the catalog directly (folder scans)."""
        self._require_writable()
        with disk_full_errors(self.directory), self._lock.write():
            yield self.catalog

    @_modifies
    def mark_failed(self, failures: Sequence[tuple[int, str]]) -> None:
        """Record images that failed to decode, with their reasons."""
        with self._lock.write():
            self.catalog.mark_failed(failures)

    # ------------------------------------------------------------------------------ service API

    def __len__(self) -> int:
        with self._lock.read():
            return len(self.vectors)

    def get(self, image_id: int) -> ImageRecord | None:
        """The catalog record of an image, None when unknown or removed."""
        record = self.catalog.records([int(image_id)], self.resolve).get(int(image_id))
        return None if record is None or record.status == "removed" else record

    def open_photo(self, record: ImageRecord) -> BinaryIO:
        """The file of an indexed photo opened for reading, confined to the photo folder or the
        uploads (`netvlad.photofile`); `PhotoFileError` saying why it cannot be served."""
        if record.status != "indexed":
            raise PhotoFileError(f"image {record.id} is {record.status}, not indexed")
        reason = "it has no file in the collection (added by a path outside it)"
        for path, origin in self.catalog.files_of(record.id):
            base = {"folder": self.root, "upload": self.directory / UPLOADS}.get(origin)
            if base is None:
                continue
            relative = path.removeprefix(f"{UPLOADS}/") if origin == "upload" else path
            try:
                return open_photo_file(base, relative, record.size, record.sha256)
            except PhotoFileError as exc:
                reason = str(exc)
        raise PhotoFileError(f"image {record.id}: {reason}")

    def _prepare(self, item: str | os.PathLike | bytes) -> _Photo:
        if isinstance(item, (bytes, bytearray)):
            data = bytes(item)
            image = load_image(data, self.max_pixels, reduce_to=self.model.preprocess.reduce_to)
            info = read_photo_info(data)
            sha = hashlib.sha256(data).hexdigest()
            suffix = SUFFIXES.get(info.format or "", ".img")
            path = f"{UPLOADS}/{sha[:2]}/{sha}{suffix}"
            return _Photo(path, "upload", len(data), time.time_ns(), sha, info, image, data)
        source = Path(item).resolve()
        image = load_image(source, self.max_pixels, reduce_to=self.model.preprocess.reduce_to)
        stat = source.stat()
        with open(source, "rb") as handle:
            sha = hashlib.file_digest(handle, "sha256").hexdigest()
        root = self.root
        if root is not None and source.is_relative_to(root):
            path, origin = source.relative_to(root).as_posix(), "folder"
        else:
            path, origin = str(source), "file"
        return _Photo(path, origin, stat.st_size, stat.st_mtime_ns, sha, read_photo_info(source), image)

    @_modifies
    def add(self, items: Sequence[str | os.PathLike | bytes], metadata: Sequence[dict | None] | None = None) -> list[int]:
        """Add photos (paths or encoded bytes) with optional per-photo metadata (lat, lon,
        taken_at and free keys); returns their ids, durable on return. Content already indexed is
        not described again (its id is returned). Raises `ImageError` naming the first photo that
        does not decode and `MetadataError` for the first invalid metadata (`validate_metadata`);
        nothing is added or stored then."""
        items = list(items)
        metadata = list(metadata) if metadata is not None else [None] * len(items)
        if len(metadata) != len(items):
            raise ValueError(f"{len(metadata)} metadata entries for {len(items)} photos")
        metadata = [validate_metadata(meta) for meta in metadata]
        photos = []
        for position, item in enumerate(items):
            try:
                photos.append(self._prepare(item))
            except OSError as exc:
                raise ImageError(f"photo {position + 1}", exc.strerror or str(exc)) from None
        todo = {p.sha256: p.image for p in photos if self.catalog.find(p.sha256)[1] != "indexed"}
        descriptors = (
            self.model.describe(list(todo.values()), amp=self.amp) if todo else np.zeros((0, self.dim), np.float32)
        )
        fresh = dict(zip(todo, np.asarray(descriptors, dtype=DESCRIPTOR_DTYPE).astype(np.float32)))
        with self._lock.write():
            written = []
            try:
                for photo in photos:
                    target = self.directory / photo.path
                    if photo.data is not None and not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        write_atomic(target, photo.data)
                        written.append(target)
                ids, new = self._record_added(photos, metadata, fresh)
            except BaseException:
                for target in written:  # the catalog rolled back: nothing may point to them
                    target.unlink(missing_ok=True)
                raise
            if new:
                self.vectors.add(np.fromiter(new, dtype=np.int64), np.stack(list(new.values())))
        return ids

    def _record_added(self, photos: list[_Photo], metadata: list[dict], fresh: dict) -> tuple[list[int], dict]:
        """Catalog the photos of one `add` and their new descriptors in one transaction; returns
        (ids, {id: descriptor} of the images that became indexed)."""
        ids, new = [], {}
        with self.catalog.transaction():
            for photo, meta in zip(photos, metadata):
                image_id = self.catalog.record_file(
                    photo.path, photo.origin, photo.size, photo.mtime_ns, photo.sha256, photo.info, meta
                )
                ids.append(image_id)
                if photo.sha256 in fresh and self.catalog.status(image_id) != "indexed":
                    new[image_id] = fresh[photo.sha256]
            if new:
                self.catalog.store_descriptors(list(new), np.stack(list(new.values())))
        return ids, new

    @_modifies
    def remove(self, ids: Sequence[int]) -> list[int]:
        """Take images out of the index (uploaded files are deleted; folder photos are kept on disk
        and not re-added by later folder runs); returns the ids that were indexed."""
        with self._lock.write():
            uploads = [path for i in ids for path, origin in self.catalog.files_of(int(i)) if origin == "upload"]
            removed = self.catalog.remove(ids)
            self._drop(removed)
        for path in uploads:
            (self.directory / path).unlink(missing_ok=True)
        return removed

    def search(self, images: Sequence, k: int = 10, fusion: str = "softmedian", alpha: float = FUSION_ALPHA) -> SearchResult:
        """Search with one or several photos (paths, bytes or PIL images) of the same place."""
        if len(images) == 0:
            raise ValueError("search needs at least one query photo")
        queries = self.model.describe(list(images), amp=self.amp)
        return self.search_descriptors(queries, k, fusion, alpha)

    def search_descriptors(self, queries: np.ndarray, k: int = 10, fusion: str = "softmedian",
                           alpha: float = FUSION_ALPHA) -> SearchResult:
        """Search with (m, dim) query descriptors of one place: the m rankings are fused (`fuse_scores`)
        over a candidate pool of each query's top max(4k, 50), rescored exactly with the catalog's
        descriptors when there are several queries or the faiss scores are approximate."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"query descriptors must have {self.dim} dims, got {q.shape[1]}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")
        with self._lock.read():
            n = len(self.vectors)
            if n == 0 or k < 1:
                return SearchResult([], None, fusion, len(q))
            k = min(int(k), n)
            rescore = len(q) > 1 or self.vectors.spec.quantised
            scores, ids = self.vectors.search(q, min(n, max(4 * k, 50)) if rescore else k)
            if rescore:
                candidates = np.unique(ids[ids >= 0])
                # torch, not numpy: one thread pool for small products (see vectorindex.SMALL_BATCH)
                sims = (torch.from_numpy(self.catalog.descriptors(candidates, self.dim)) @ torch.from_numpy(q).T).numpy()
            else:
                keep = ids[0] >= 0
                candidates, sims = ids[0][keep], scores[0][keep, None]
            fused = fuse_scores(sims, fusion, alpha)
            order = np.argsort(-fused, kind="stable")[:k]
            records = self.catalog.records(candidates[order].tolist(), self.resolve)
        hits = []
        for i in order:
            record = records.get(int(candidates[i]))
            hits.append(Hit(
                id=int(candidates[i]), score=float(fused[i]), path=record.path if record else None,
                lat=record.lat if record else None, lon=record.lon if record else None,
                query_scores=[float(s) for s in sims[i]], record=record,
            ))
        coords = np.array([[np.nan if h.lat is None else h.lat, np.nan if h.lon is None else h.lon] for h in hits])
        location = estimate_location(coords[:, 0], coords[:, 1], fused[order]) if hits else None
        return SearchResult(hits, location, fusion, len(q))
