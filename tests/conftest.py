"""Shared fixtures: the project's collection of real photos.

`photos_dir` is `$NETVLAD_PHOTOS` when set (used as is), else `<repo>/data/photos` as `make photos`
fetches it; when that folder has no manifest yet, the same tool (`tools/fetch_photos.py`) fetches
it on first use (Debian wallpaper photos when the network allows, plus the scikit-image and
scikit-learn photos), so tests always run on real photographs.

Local Ray sessions of the tests talk over the loopback interface only (Ray otherwise binds its
processes to the machine's network address).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netvlad.imageio import PHOTO_SUFFIXES
from tools.fetch_photos import MANIFEST, fetch_photos

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray: 127.0.0.1 for a one-machine session


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """Folder of real photos."""
    if os.environ.get("NETVLAD_PHOTOS"):
        path = Path(os.environ["NETVLAD_PHOTOS"])
        if not path.is_dir():
            pytest.fail(f"NETVLAD_PHOTOS={path} is not a folder")
        return path
    path = REPO / "data" / "photos"
    if not (path / MANIFEST).is_file():
        fetch_photos(path)
    return path


@pytest.fixture(scope="session")
def real_photos(photos_dir: Path) -> list[Path]:
    """The photos in `photos_dir`, sorted by name."""
    photos = sorted(p for p in photos_dir.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        pytest.fail(f"no photos in {photos_dir}")
    return photos


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory, real_photos: list[Path]) -> Path:
    """The run's small place model file (`tests.service_support.small_model`), built on first use."""
    from tests.service_support import small_model

    return small_model(tmp_path_factory, real_photos)
