"""The one path from photos to descriptors in batches: decode, group by shape, stack, autocast,
normalise. `NetVLADModel.describe`, the indexer and the training loop all use it.

- `PhotoDataset`: (key, source) items → (key, (3, H, W) float32 tensor or None, `ImageError` or
  None); a decoding failure travels back as a value, so worker processes never stop a run.
- `shape_batches`: a batch sampler grouping items by their predicted input shape (from headers).
- `collate_by_shape`: a loader batch → one `ShapeBatch` per distinct shape, plus the failures.
- `forward_batch` / `describe_tensors`: the network on stacked images (autocast: `amp_dtype`,
  channels_last, non-blocking copies), unit-norm float32 descriptors; gradients flow.
- `describe_batches`: descriptors of every batch a loader yields, model in eval mode, no grad.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from netvlad.devices import amp_dtype
from netvlad.errors import ImageError
from netvlad.imageio import DEFAULT_MAX_PIXELS, ImageSource
from netvlad.transforms import Preprocess

if TYPE_CHECKING:
    from netvlad.model import NetVLADModel

#: A photo (path, bytes, file object, PIL image) or an already preprocessed (3, H, W) tensor.
Source = Union[ImageSource, torch.Tensor]
#: What `PhotoDataset` yields: (key, tensor, None) or (key, None, error).
Sample = tuple[Hashable, Union[torch.Tensor, None], Union[ImageError, None]]
#: A photo that could not be described, and why.
Failure = tuple[Hashable, ImageError]


class ShapeBatch(NamedTuple):
    """Photos of one input shape: their keys and images (b, 3, H, W)."""

    keys: list
    images: torch.Tensor


class PhotoDataset(Dataset):
    """(key, source) items → `Sample`s, decoded by `preprocess.load` (JPEGs at a reduced scale,
    refused above `max_pixels` = width × height), or with `pixels` by `preprocess.load_pixels`
    (uint8, not normalised); preprocessed tensors pass through unchanged.
    Any decoding failure, a decoder bug on one odd file included, comes back as an `ImageError`."""

    def __init__(self, items: Sequence[tuple[Hashable, Source]], preprocess: Preprocess,
                 max_pixels: int = DEFAULT_MAX_PIXELS, pixels: bool = False):
        self.items = items
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.decode = preprocess.load_pixels if pixels else preprocess.load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        key, source = self.items[i]
        if isinstance(source, torch.Tensor):
            return key, source, None
        try:
            return key, self.decode(source, self.max_pixels), None
        except ImageError as exc:
            return key, None, exc
        except Exception as exc:  # noqa: BLE001 - reported per photo, like any undecodable file
            name = os.fsdecode(source) if isinstance(source, (str, os.PathLike)) else "image"
            return key, None, ImageError(name, f"{type(exc).__name__}: {exc}")


def load_tensors(sources: Sequence[Source], preprocess: Preprocess, progress: bool = False) -> list[torch.Tensor]:
    """Photos or preprocessed tensors → list of (3, H, W) float32 tensors, decoded in this process;
    raises the `ImageError` of the first photo that fails."""
    dataset = PhotoDataset(list(enumerate(sources)), preprocess)
    tensors = []
    for i in tqdm(range(len(dataset)), desc="decode", disable=not progress, leave=False):
        _, tensor, error = dataset[i]
        if error is not None:
            raise error
        tensors.append(tensor)
    return tensors


def group_by_shape(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of `tensors` grouped by shape, groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(i)
    return list(groups.values())


def collate_by_shape(samples: list[Sample]) -> tuple[list[ShapeBatch], list[Failure]]:
    """A loader batch of samples → (one `ShapeBatch` per distinct shape, the failed samples)."""
    decoded = [(key, tensor) for key, tensor, _ in samples if tensor is not None]
    failures = [(key, error) for key, tensor, error in samples if tensor is None]
    tensors = [tensor for _, tensor in decoded]
    batches = [ShapeBatch([decoded[i][0] for i in group], torch.stack([tensors[i] for i in group]))
               for group in group_by_shape(tensors)]
    return batches, failures


def shape_batches(shapes: Sequence[tuple[int, int] | None], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of ≤ `batch_size` photos with equal predicted input shape
    (None: unknown, batched together and regrouped by `collate_by_shape`), in order of first index."""
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    batches = [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda batch: batch[0])


def default_workers() -> int:
    """Decoding processes: one per spare core, at least one, at most eight."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def forward_batch(model: NetVLADModel, images: torch.Tensor, amp: bool | None, channels_last: bool = False
                  ) -> torch.Tensor:
    """Images (b, 3, H, W) → descriptors (b, dim) float32, unit norm, on the model's device.

    The copy to the device does not block (pinned loader memory); `amp` (None: on CUDA) runs the
    network in autocast (bfloat16, or float16 on GPUs without it). Gradients flow when called
    outside `torch.no_grad()`."""
    device = model.device
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=device.type == "cuda" if amp is None else amp):
        descriptors = model(images)
    return F.normalize(descriptors.float(), dim=1)


def describe_tensors(model: NetVLADModel, tensors: Sequence[torch.Tensor], amp: bool | None,
                     channels_last: bool = False, batch_size: int | None = None, progress: bool = False
                     ) -> torch.Tensor:
    """Descriptors (N, dim) float32, unit norm, of preprocessed (3, H, W) tensors, in input order.

    Tensors of one shape go through the network together, `batch_size` at a time (None: all of
    them, so BatchNorm sees them as one batch). Gradients flow outside `torch.no_grad()`."""
    parts, order = [], []
    with tqdm(total=len(tensors), desc="describe", unit="img", disable=not progress) as bar:
        for group in group_by_shape(tensors):
            for start in range(0, len(group), batch_size or len(group)):
                chunk = group[start : start + (batch_size or len(group))]
                parts.append(forward_batch(model, torch.stack([tensors[i] for i in chunk]), amp, channels_last))
                order.extend(chunk)
                bar.update(len(chunk))
    if not parts:
        return torch.zeros((0, model.dim), device=model.device)
    out = torch.cat(parts)
    if order != sorted(order):
        out = out[torch.as_tensor(np.argsort(order), device=out.device)]
    return out


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, its training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def describe_batches(
    model: NetVLADModel,
    loader: Iterable[tuple[list[ShapeBatch], list[Failure]]],
    amp: bool | None,
    channels_last: bool = False,
    network_errors: bool = False,
) -> Iterator[tuple[list, np.ndarray, list[Failure]]]:
    """For each (batches, failures) a `collate_by_shape` loader yields: (keys described, their
    descriptors (len(keys), dim) float32 unit norm, failures), the model in eval mode.

    With `network_errors`, a shape batch the network fails on (a `RuntimeError`, e.g. photos too
    small for it) becomes failures ("the network failed on it (…)") instead of ending the run."""
    with evaluating(model):
        for batches, failures in loader:
            keys, parts = [], []
            for batch in batches:
                try:
                    parts.append(forward_batch(model, batch.images, amp, channels_last).cpu().numpy())
                except RuntimeError as exc:
                    if not network_errors:
                        raise
                    failures = failures + [(key, ImageError(str(key), f"the network failed on it ({exc})"))
                                           for key in batch.keys]
                    continue
                keys.extend(batch.keys)
            yield keys, np.concatenate(parts) if parts else np.zeros((0, model.dim), np.float32), failures
