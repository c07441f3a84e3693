"""Shared by tests and benchmarks: small copies of named real photos, and large synthetic PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def shrunk_copies(photos: list[Path], names: list[str], folder: Path, long_side: int) -> list[Path]:
    """JPEG copies in `folder` of the photos called `names`, shrunk to at most `long_side` pixels."""
    by_name = {p.name: p for p in photos}
    paths = []
    for name in names:
        with Image.open(by_name[name]) as image:
            image = image.convert("RGB")
            image.thumbnail((long_side, long_side))
            image.save(folder / name, quality=95)
        paths.append(folder / name)
    return paths


def large_png(side: int, seed: int = 0) -> bytes:
    """A `side`×`side` RGB PNG that compresses to a few hundred kB (flat colour, one noisy
    corner): small to send, large to decode, like a decompression bomb under the pixel limit."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.paste(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)), (0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
