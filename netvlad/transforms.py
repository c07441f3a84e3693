"""Photo → network input.

Resize policy: keep the aspect ratio and scale so the longer side is `max_side` pixels (up or down),
unless a fixed `size=(H, W)` is given (then the photo is resized to exactly that, aspect not kept).

Input modes (docs/design.md §5):
- ``"rgb"``: RGB scaled to [0, 1] then normalised with per-channel `mean`/`std` (ImageNet's by default),
  as torchvision's pretrained weights expect;
- ``"grey"``: luminance, standardised per image (zero mean, unit variance), copied to 3 channels —
  far better than RGB for a randomly initialised backbone on these machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from netvlad.imageio import DEFAULT_MAX_PIXELS, ImageSource, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
InputMode = Literal["rgb", "grey"]
INPUT_MODES: tuple[str, ...] = get_args(InputMode)


def resized_shape(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(H, W) after scaling so that the longer side is `max_side` pixels, aspect kept."""
    scale = max_side / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class Preprocess:
    """Callable turning an RGB `PIL.Image` into a float32 tensor (3, H, W)."""

    input_mode: str = "rgb"
    max_side: int = 640
    size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, not {self.input_mode!r}")

    def output_shape(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of the tensor produced for a photo of `width` × `height` pixels."""
        return tuple(self.size) if self.size else resized_shape(width, height, self.max_side)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(image))

    @property
    def reduce_to(self) -> int | None:
        """Long side photos can be decoded at (`load_image(reduce_to=...)`); None with a fixed `size`."""
        return None if self.size else self.max_side

    def load(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Decode a photo (JPEGs at a reduced scale when they are much larger) and preprocess it →
        float32 (3, H, W). Raises `ImageError`."""
        return self.normalize(self.load_pixels(source, max_pixels))

    def load_pixels(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Decode a photo as `load` does, without normalising → uint8 (3, H, W) at the network's
        input size (a quarter of the bytes: what distributed workers ship). Raises `ImageError`."""
        return self.resize(load_image(source, max_pixels, reduce_to=self.reduce_to))

    def resize(self, image: Image.Image) -> torch.Tensor:
        """RGB `PIL.Image` → uint8 (3, H, W) at the network's input size. Pillow does the work (no
        torch compute), so servers can run it on any thread and `normalize` on the inference one."""
        image = TF.resize(image, list(self.output_shape(image.width, image.height)), antialias=True)
        return TF.pil_to_tensor(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (…, 3, H, W) → normalised float32 (…, 3, H, W) according to the input mode."""
        x = pixels.float() / 255.0
        if self.input_mode == "grey":
            grey = TF.rgb_to_grayscale(x)
            mean = grey.mean(dim=(-1, -2), keepdim=True)
            std = grey.std(dim=(-1, -2), keepdim=True).clamp_min(1e-3)
            return ((grey - mean) / std).expand_as(x).contiguous()
        return TF.normalize(x, list(self.mean), list(self.std))
