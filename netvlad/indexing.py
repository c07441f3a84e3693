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
3. *Checkpoint*: the faiss index is brought up to date and saved (also every `checkpoint_every`
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

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from netvlad.catalog import display_path
from netvlad.errors import ImageError
from netvlad.exif import read_photo_info
from netvlad.imageio import walk_photos
from netvlad.index import Index
from netvlad.transforms import Preprocess

#: Files hashed and recorded per catalog transaction during a scan.
SCAN_CHUNK = 256


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


class PhotoDataset(Dataset):
    """(id, path) items → (id, (3, H, W) float tensor or None, error or None), decoded with
    `load_image` (bomb limit `max_pixels`) and the model's `preprocess`."""

    def __init__(self, items: list[tuple[int, str]], preprocess: Preprocess, max_pixels: int):
        self.items = items
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        image_id, path = self.items[i]
        try:
            return image_id, self.preprocess.load(path, self.max_pixels), None
        except ImageError as exc:
            return image_id, None, exc.reason
        except Exception as exc:  # a decoder bug on one odd file must not stop a long run
            return image_id, None, f"{type(exc).__name__}: {exc}"


def collate_photos(samples: list) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[int, str]]]:
    """Samples → ([(ids (b,), images (b, 3, H, W)) per distinct shape], [(id, reason) failures])."""
    groups: dict[tuple[int, ...], list] = {}
    failures = []
    for image_id, tensor, error in samples:
        if tensor is None:
            failures.append((image_id, error))
        else:
            groups.setdefault(tuple(tensor.shape), []).append((image_id, tensor))
    batches = [
        (torch.tensor([i for i, _ in members]), torch.stack([t for _, t in members]))
        for members in groups.values()
    ]
    return batches, failures


def shape_batches(shapes: list[tuple[int, int] | None], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of ≤ `batch_size` photos with equal predicted input shape
    (None: unknown, batched together and regrouped after decoding), in order of first index."""
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    batches = [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda batch: batch[0])


def default_workers() -> int:
    """Decoding processes: one per spare core, at least one, at most eight."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def describe_pending(index: Index, report: IndexingReport, batch_size: int = 16, workers: int | None = None,
                     progress: bool = True, checkpoint_every: float = 600.0) -> None:
    """Describe every pending image of the catalog (step 2); fills `report`."""
    pending = index.catalog.pending()
    if not pending:
        return
    model = index.model
    preprocess = model.preprocess
    items = [(image_id, str(index.resolve(path, origin))) for image_id, path, origin, _, _ in pending]
    shapes = [preprocess.output_shape(w, h) if w and h else None for _, _, _, w, h in pending]
    device = model.device
    loader = DataLoader(
        PhotoDataset(items, preprocess, index.max_pixels),
        batch_sampler=shape_batches(shapes, batch_size),
        num_workers=default_workers() if workers is None else workers,
        collate_fn=collate_photos,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(total=len(items), desc="describe", unit="img", disable=not progress, smoothing=0.05)
    last_checkpoint = time.monotonic()
    for batches, failures in loader:
        bar.update(sum(len(ids) for ids, _ in batches) + len(failures))
        for ids, images in batches:
            try:
                descriptors = model.describe(images.to(device, non_blocking=True), batch_size=len(ids), amp=index.amp)
            except RuntimeError as exc:  # e.g. a photo too small for the network: fail the batch, go on
                failures = failures + [(int(i), f"the network failed on it ({exc})") for i in ids]
                continue
            index.store_descriptors(ids.tolist(), descriptors)
            report.described += len(ids)
        if failures:
            index.mark_failed(failures)
            report.failed += len(failures)
        if time.monotonic() - last_checkpoint > checkpoint_every:
            index.checkpoint()
            last_checkpoint = time.monotonic()
    bar.close()


def index_folder(index: Index, photos: str | os.PathLike, prune: bool = False, batch_size: int = 16,
                 workers: int | None = None, progress: bool = True, checkpoint_every: float = 600.0) -> IndexingReport:
    """Bring `index` up to date with photo folder `photos` (scan, describe, checkpoint)."""
    start = time.perf_counter()
    root = Path(photos)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such photo folder")
    root = index.set_root(root)
    report = IndexingReport()
    scan_folder(index, root, prune, report, progress)
    describe_pending(index, report, batch_size, workers, progress, checkpoint_every)
    index.checkpoint()
    report.seconds = time.perf_counter() - start
    report.images = len(index)
    report.index_type = index.spec.factory
    report.images_per_s = report.described / report.seconds if report.seconds > 0 else 0.0
    report.failures = [(display_path(path), reason) for path, reason in index.catalog.failures()]
    return report
