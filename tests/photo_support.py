"""Shared by tests that build place sets: small copies of named real photos."""

from __future__ import annotations

from pathlib import Path

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
