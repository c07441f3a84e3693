"""The index folder on disk: its layout, its manifest, its writer lock, and making a new one.

    DIR/manifest.json       format, version, model summary, dim, count, revision, index type, faiss file
    DIR/catalog.sqlite      the catalog (source of truth: photos, statuses, where their descriptors lie)
    DIR/descriptors/        descriptor shard files (`netvlad.descriptorstore`)
    DIR/model.pt            the model that built the index (queries must use the same one)
    DIR/vectors-*.faiss     the faiss index (ids = catalog ids), a cache of the catalog
    DIR/uploads/            photos added as bytes through the API
    DIR/.lock               the writer lock (one writing process at a time, advisory)

A new folder is built beside DIR (`.DIR.tmp-*`) and renamed into place; every file is written
with `netvlad.storage.write_atomic`, the manifest last (the commit point). A writer that opens
the folder sweeps the temp files an interrupted writer left.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO

from netvlad.catalog import Catalog
from netvlad.errors import IndexStoreError
from netvlad.model import NetVLADModel
from netvlad.modelfile import model_fingerprint, save_model
from netvlad.storage import disk_full_errors, fsync_dir, sweep_temp_files, write_atomic
from netvlad.vectorindex import IndexSpec

log = logging.getLogger(__name__)

FORMAT = "netvlad-index"
VERSION = 1
MANIFEST = "manifest.json"
CATALOG = "catalog.sqlite"
MODEL = "model.pt"
UPLOADS = "uploads"
LOCK = ".lock"


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


def write_manifest(directory: Path, manifest: dict) -> None:
    """Replace the manifest atomically (the commit point of every save)."""
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


def model_summary(model: NetVLADModel) -> dict:
    """What the manifest records of the model that built the index."""
    config = model.config
    return {"fingerprint": model_fingerprint(model), "backbone": config.backbone, "clusters": config.clusters,
            "dim": model.dim, "input_mode": config.input_mode, "max_side": config.max_side}


def describe_model(summary: dict) -> str:
    return (f"{summary.get('backbone')} K={summary.get('clusters')} dim={summary.get('dim')} "
            f"sha256 {str(summary.get('fingerprint'))[:12]}")


def open_catalog(directory: Path, manifest: dict, model: NetVLADModel, writable: bool) -> Catalog:
    """The folder's catalog, after checking that `model` is the one that built the index (else
    `IndexStoreError`: its descriptors would not be comparable)."""
    summary = model_summary(model)
    if summary["fingerprint"] != manifest["model"].get("fingerprint"):
        raise IndexStoreError(
            f"{directory} was built with model {describe_model(manifest['model'])}, not with "
            f"{describe_model(summary)}: search it with its own model (leave out --model) or "
            "index the photos into a new folder"
        )
    catalog = Catalog(directory / CATALOG, readonly=not writable)
    if catalog.get_meta("model") != summary["fingerprint"] or catalog.get_meta("dim") != str(model.dim):
        catalog.close()
        raise IndexStoreError(f"{directory / CATALOG}: catalog belongs to another model than the manifest")
    return catalog


def create_folder(directory: Path, model: NetVLADModel, index_type: str) -> None:
    """Make a new, empty index folder for `model` (built beside it, then renamed into place)."""
    if (directory / MANIFEST).exists():
        raise IndexStoreError(f"{directory}: already an index folder")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise IndexStoreError(f"{directory}: exists and is not an empty folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with disk_full_errors(directory.parent):
            tmp.mkdir()
            _write_new_files(tmp, model, index_type)
            if directory.exists():
                directory.rmdir()
            os.replace(tmp, directory)
            fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_new_files(folder: Path, model: NetVLADModel, index_type: str) -> None:
    """The files of an empty index for `model`: model, catalog, manifest."""
    save_model(model, folder / MODEL)
    summary = model_summary(model)
    catalog = Catalog(folder / CATALOG)
    catalog.set_meta("model", summary["fingerprint"])
    catalog.set_meta("dim", model.dim)
    catalog.close()
    write_manifest(folder, {
        "format": FORMAT, "version": VERSION, "model": summary, "dim": model.dim, "count": 0,
        "revision": 0, "index": {"requested": index_type, **IndexSpec().to_dict()},
        "vectors": None, "created_at": time.time(), "updated_at": time.time(),
    })


def acquire_writer_lock(directory: Path) -> IO:
    """Take the folder's writer lock (held until the returned handle is closed) and sweep the temp
    files an interrupted writer left; `IndexStoreError` when another process writes the folder or
    it cannot be written."""
    try:
        handle = open(directory / LOCK, "a+")
    except OSError as exc:  # read-only file system, no permission
        raise IndexStoreError(f"{directory}: cannot be written ({exc.strerror}); open it read-only") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IndexStoreError(f"{directory}: another process is writing this index") from None
    swept = sweep_temp_files([directory, *directory.glob(f"{UPLOADS}/*")])
    swept += sweep_temp_files([directory.parent], prefix=f".{directory.name}.tmp-")  # from `create_folder`
    for path in swept:
        log.info("removed %s, left by an interrupted writer", path)
    return handle
