"""A place dataset's photos as network input: a torch `Dataset` whose decoding errors name the
dataset file and row, the shape-grouped forward pass, and batched descriptor computation with
`DataLoader` workers (used for the mining cache and for validation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from netvlad.datasets.placeset import DATABASE_CSV, QUERIES_CSV, PlaceDataset
from netvlad.errors import DatasetError, ImageError
from netvlad.model import NetVLADModel
from netvlad.transforms import Preprocess

KINDS = {"database": DATABASE_CSV, "queries": QUERIES_CSV}


class PlaceImages(Dataset):
    """The database or query photos of `dataset`: item i → (i, (3, H, W) float32 tensor or None,
    error text). Decoding errors travel back as text so that the main process reports them
    (`where(i)` names the CSV file and data row) instead of a worker traceback."""

    def __init__(self, dataset: PlaceDataset, kind: str, preprocess: Preprocess):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
        self.dataset, self.kind, self.preprocess = dataset, kind, preprocess
        self.paths: list[Path] = dataset.db_paths() if kind == "database" else dataset.q_paths()
        self.names: list[str] = dataset.db_images if kind == "database" else dataset.q_images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.preprocess.load(self.paths[i]), ""
        except ImageError as exc:
            return i, None, str(exc)

    def where(self, i: int) -> str:
        """Where image i is listed: "<folder>/database.csv, data row 5 ('a.jpg')" for CSV datasets."""
        table = self.dataset.root / KINDS[self.kind]
        if table.is_file():
            return f"{table}, data row {i + 1} ('{self.names[i]}')"
        label = "dbImage" if self.kind == "database" else "qImage"
        return f"{self.dataset.name or self.dataset.root}, {label} {i + 1} ('{self.names[i]}')"

    def checked(self, item: tuple[int, torch.Tensor | None, str]) -> torch.Tensor:
        """The tensor of a loaded item, or DatasetError naming the file and row of a bad image."""
        i, tensor, error = item
        if tensor is None:
            raise DatasetError(f"{self.where(i)}: {error}")
        return tensor


def collate_items(items: list) -> list:
    """Keep a batch as a list (images may differ in shape; failed ones carry None)."""
    return items


def forward_descriptors(
    model: NetVLADModel, tensors: Sequence[torch.Tensor], amp: bool, channels_last: bool
) -> torch.Tensor:
    """Descriptors (N, dim) float32, unit norm, of preprocessed (3, H, W) tensors, in input order.

    Same-shape tensors go through the network together (BatchNorm sees them as one batch); runs in
    bfloat16 autocast when `amp`. Gradients flow when called outside `torch.no_grad()`.
    """
    device = model.device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(i)
    parts, order = [], []
    for indices in groups.values():
        batch = torch.stack([tensors[i] for i in indices]).to(device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            parts.append(F.normalize(model(batch).float(), dim=1))
        order.extend(indices)
    out = torch.cat(parts)
    if order != sorted(order):
        out = out[torch.as_tensor(np.argsort(order), device=out.device)]
    return out


@torch.no_grad()
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
    was_training = model.training
    model.eval()
    loader = DataLoader(
        torch.utils.data.Subset(images, indices), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_items, pin_memory=model.device.type == "cuda",
    )
    row = 0
    with tqdm(total=len(indices), desc=f"describe {images.kind}", unit="img", disable=not progress, leave=False) as bar:
        for items in loader:
            tensors = [images.checked(item) for item in items]
            out[row : row + len(tensors)] = forward_descriptors(model, tensors, amp, channels_last).cpu().numpy()
            row += len(tensors)
            bar.update(len(tensors))
    model.train(was_training)
    return out
