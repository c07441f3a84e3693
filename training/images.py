"""A place dataset's photos as network input: `PlaceImages`, the photo dataset
(`netvlad.batching.PhotoDataset`) of its database or queries whose decoding errors name the
dataset file and row, and batched descriptor computation with `DataLoader` workers (used for the
mining cache and for validation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from netvlad.batching import PhotoDataset, Sample, collate_by_shape, describe_batches
from netvlad.datasets.placeset import DATABASE_CSV, QUERIES_CSV, PlaceDataset
from netvlad.errors import DatasetError, ImageError
from netvlad.model import NetVLADModel
from netvlad.transforms import Preprocess

KINDS = {"database": DATABASE_CSV, "queries": QUERIES_CSV}


class PlaceImages(PhotoDataset):
    """The database or query photos of `dataset`: item i → (i, (3, H, W) float32 tensor or None,
    `ImageError` or None). `where(i)` names the CSV file and data row of image i, so that a bad
    image is reported by the main process as a `DatasetError` instead of a worker traceback."""

    def __init__(self, dataset: PlaceDataset, kind: str, preprocess: Preprocess):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
        self.dataset, self.kind = dataset, kind
        self.paths: list[Path] = dataset.db_paths() if kind == "database" else dataset.q_paths()
        self.names: list[str] = dataset.db_images if kind == "database" else dataset.q_images
        super().__init__(list(enumerate(self.paths)), preprocess)

    def where(self, i: int) -> str:
        """Where image i is listed: "<folder>/database.csv, data row 5 ('a.jpg')" for CSV datasets."""
        table = self.dataset.root / KINDS[self.kind]
        if table.is_file():
            return f"{table}, data row {i + 1} ('{self.names[i]}')"
        label = "dbImage" if self.kind == "database" else "qImage"
        return f"{self.dataset.name or self.dataset.root}, {label} {i + 1} ('{self.names[i]}')"

    def failure(self, i: int, error: ImageError) -> DatasetError:
        """The error to raise for image i, naming its file and row."""
        return DatasetError(f"{self.where(i)}: {error}")

    def checked(self, item: Sample) -> torch.Tensor:
        """The tensor of a loaded item, or DatasetError naming the file and row of a bad image."""
        i, tensor, error = item
        if tensor is None:
            raise self.failure(i, error)
        return tensor


def collate_items(items: list) -> list:
    """Keep a batch as a list (images may differ in shape; failed ones carry None)."""
    return items


def describe_images(
    model: NetVLADModel,
    images: PlaceImages,
    indices: Sequence[int] | None = None,
    batch_size: int = 16,
    workers: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Descriptors (len(indices), dim) float32 of images[indices] (default: all), model in eval mode
    (restored afterwards). Raises DatasetError naming the file and row of an undecodable image."""
    indices = list(range(len(images))) if indices is None else [int(i) for i in indices]
    out = np.zeros((len(indices), model.dim), dtype=np.float32)
    if not indices:
        return out
    loader = DataLoader(  # keyed by position in `indices`
        PhotoDataset([(row, images.paths[i]) for row, i in enumerate(indices)], images.preprocess),
        batch_size=batch_size, num_workers=workers, collate_fn=collate_by_shape,
        pin_memory=model.device.type == "cuda",
    )
    with tqdm(total=len(indices), desc=f"describe {images.kind}", unit="img", disable=not progress, leave=False) as bar:
        for rows, descriptors, failures in describe_batches(model, loader, amp, channels_last):
            if failures:
                row, error = failures[0]
                raise images.failure(indices[row], error)
            out[rows] = descriptors
            bar.update(len(rows))
    return out
