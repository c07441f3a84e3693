"""Offline indexing of a photo folder: walk, catalogue, describe in batches, resumable.

1. *Scan*: walk the folder (photo suffixes only; hidden files and folders skipped; symbolic links
   followed inside the folder, link loops cut, broken links recorded as unreadable, links to files
   or folders outside it recorded as skipped: the service serves nothing outside the folder, so
   index the real folder instead), hash every new or changed file
   and record it with its header facts. Unchanged files (same size and mtime) are not re-read;
   identical contents share one image. With `prune`, paths that vanished are forgotten.
2. *Describe*: a torch DataLoader decodes and preprocesses pending photos in worker processes
   (pinned memory on CUDA) in batches of equal shape; each batch's descriptors are stored in the
   catalog in one transaction, and photos that fail to decode are marked failed with the reason.
   When the index keeps re-ranking evidence (local features, patch descriptors), a batch's
   evidence is stored just before its descriptors.
3. *Evidence*: indexed photos still lacking the kept evidence (indexed before it was asked for)
   get it, `EVIDENCE_CHUNK` at a time.
4. *Save*: the faiss index is brought up to date and saved (also every `save_every`
   seconds during long runs).

A run killed at any moment is resumed by running it again: committed work is kept, the rest is
still pending, and nothing is indexed twice.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from netvlad.batching import PhotoDataset, collate_by_shape, default_workers, describe_batches, shape_batches
from netvlad.records import display_path
from netvlad.exif import read_photo_info
from netvlad.imageio import walk_photos
from netvlad.index import Index

if TYPE_CHECKING:
    from netvlad.indexing_ray import RayOptions

#: Files hashed and recorded per catalog transaction during a scan.
SCAN_CHUNK = 256
#: Photos whose missing evidence is computed and stored per transaction.
EVIDENCE_CHUNK = 32


@dataclass
class IndexingReport:
    """What one `index_folder` run did. `failures` lists every (path, reason) the catalog holds
    for unreadable or undecodable files, this run's and earlier ones'."""

    files: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    pruned: int = 0
    described: int = 0
    evidence_added: int = 0
    failed: int = 0
    images: int = 0
    index_type: str = ""
    seconds: float = 0.0
    images_per_s: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _probe(rel: str, path: Path, known: dict, report: IndexingReport) -> tuple | None:
    """What to record for one walked file: ("file", rel, stat, sha, info) when new or changed,
    ("unreadable", rel, reason) when it cannot be read, None when unchanged."""
    try:
        stat = path.stat()
        old = known.get(rel)
        if old is not None and (old.size, old.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            report.unchanged += 1
            return None
        sha = _sha256(path)
    except OSError as exc:
        return "unreadable", rel, f"unreadable ({exc.strerror or exc})"
    if rel in known:
        report.changed += 1
    else:
        report.new += 1
    return "file", rel, stat, sha, read_photo_info(path)


def scan_folder(index: Index, root: Path, prune: bool, report: IndexingReport, progress: bool) -> None:
    """Record new and changed photos of `root` in the catalog (step 1); fills `report`. Files are
    read outside the writer lock and recorded SCAN_CHUNK at a time, one transaction each."""
    known = index.catalog.files("folder")
    seen: set[str] = set()
    chunk: list[tuple] = []
    outside: list[tuple[str, str]] = []

    def flush() -> None:
        with index.writing() as catalog:
            for entry in chunk:
                if entry[0] == "unreadable":
                    catalog.record_unreadable(entry[1], "folder", 0, 0, entry[2])
                else:
                    _, rel, stat, sha, info = entry
                    catalog.record_file(rel, "folder", stat.st_size, stat.st_mtime_ns, sha, info)
        chunk.clear()

    for rel, path in tqdm(walk_photos(root, exclude=(index.directory,), outside=outside), desc="scan",
                          unit="file", disable=not progress, leave=False):
        seen.add(rel)
        entry = _probe(rel, path, known, report)
        if entry is not None:
            chunk.append(entry)
        if len(chunk) >= SCAN_CHUNK:
            flush()
    for rel, reason in outside:  # links leaving the folder: recorded, so an indexed one leaves the index
        seen.add(rel)
        chunk.append(("unreadable", rel, reason))
    flush()
    report.files = len(seen)
    gone = sorted(set(known) - seen) if prune else []
    index.forget(gone)
    report.pruned = len(gone)


def describe_pending(index: Index, report: IndexingReport, batch_size: int = 16, workers: int | None = None,
                     progress: bool = True, save_every: float = 600.0) -> None:
    """Describe every pending image of the catalog (step 2); fills `report`."""
    pending = index.catalog.pending()
    if not pending:
        return
    model = index.model
    preprocess = model.preprocess
    items = [(image_id, str(index.resolve(path, origin))) for image_id, path, origin, _, _ in pending]
    index.prepare_evidence([path for _, path in items])
    shapes = [preprocess.output_shape(w, h) if w and h else None for _, _, _, w, h in pending]
    loader = DataLoader(
        PhotoDataset(items, preprocess, index.max_pixels),
        batch_sampler=shape_batches(shapes, batch_size),
        num_workers=default_workers() if workers is None else workers,
        collate_fn=collate_by_shape,
        pin_memory=model.device.type == "cuda",
    )
    bar = tqdm(total=len(items), desc="describe", unit="img", disable=not progress, smoothing=0.05)
    last_save = time.monotonic()
    for ids, descriptors, failures in describe_batches(model, loader, index.amp, network_errors=True):
        bar.update(len(ids) + len(failures))
        if ids:
            index.store_descriptors(ids, descriptors)
            report.described += len(ids)
        if failures:
            index.mark_failed([(image_id, error.reason) for image_id, error in failures])
            report.failed += len(failures)
        if time.monotonic() - last_save > save_every:
            index.save()
            last_save = time.monotonic()
    bar.close()


def fill_evidence(index: Index, report: IndexingReport, progress: bool = True) -> None:
    """Store the kept evidence of indexed photos that lack it (step 3); fills `report`."""
    missing = index.evidence.missing(index.catalog.indexed_ids()) if index.evidence.kinds() else []
    if not len(missing):
        return
    records = index.catalog.records(missing.tolist(), index.resolve)
    index.prepare_evidence([records[i].path for i in missing.tolist() if i in records and records[i].path])
    bar = tqdm(total=len(missing), desc="evidence", unit="img", disable=not progress, smoothing=0.05)
    for start in range(0, len(missing), EVIDENCE_CHUNK):
        chunk = missing[start : start + EVIDENCE_CHUNK].tolist()
        index.store_evidence(chunk)
        bar.update(len(chunk))
        report.evidence_added += len(chunk)
    bar.close()


def index_folder(index: Index, photos: str | os.PathLike, prune: bool = False, batch_size: int = 16,
                 workers: int | None = None, progress: bool = True, save_every: float = 600.0,
                 ray: RayOptions | None = None) -> IndexingReport:
    """Bring `index` up to date with photo folder `photos` (scan, describe, save); with `ray`,
    the describe step runs on a Ray cluster (`netvlad.indexing_ray`)."""
    start = time.perf_counter()
    root = Path(photos)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such photo folder")
    root = index.set_root(root)
    report = IndexingReport()
    scan_folder(index, root, prune, report, progress)
    if ray is None:
        describe_pending(index, report, batch_size, workers, progress, save_every)
    else:
        from netvlad.indexing_ray import describe_pending_ray  # Ray is an optional extra

        describe_pending_ray(index, report, ray, progress, save_every)
    fill_evidence(index, report, progress)
    index.save()
    report.seconds = time.perf_counter() - start
    report.images = len(index)
    report.index_type = index.spec.factory
    report.images_per_s = report.described / report.seconds if report.seconds > 0 else 0.0
    report.failures = [(display_path(path), reason) for path, reason in index.catalog.failures()]
    return report
