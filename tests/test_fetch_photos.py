"""The photo fetcher `make photos` runs (tools/fetch_photos.py) and the photos it fetched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.fetch_photos import MANIFEST, SKIMAGE_PHOTOS, SKLEARN_PHOTOS, fetch_photos

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fetch_photos.py"


def test_fetch_bundled_photos_is_idempotent(tmp_path: Path):
    dest = tmp_path / "photos"
    paths = fetch_photos(dest, debian=False, max_side=300)
    expected = sorted([f"skimage-{n}.jpg" for n in SKIMAGE_PHOTOS] + [f"sklearn-{Path(n).stem}.jpg" for n in SKLEARN_PHOTOS])
    assert [p.name for p in paths] == expected
    manifest = json.loads((dest / MANIFEST).read_text())
    assert [e["file"] for e in manifest["photos"]] == expected and manifest["max_side"] == 300
    from PIL import Image

    for path, entry in zip(paths, manifest["photos"]):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert max(image.size) <= 300 and list(image.size) == entry["size"]
            assert max(entry["original_size"]) >= 451  # all bundled photos are larger
    with Image.open(dest / "skimage-camera.jpg") as image:
        assert image.mode == "L"
    stamps = {p: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert fetch_photos(dest, debian=False, max_side=300) == paths
    assert {p: p.stat().st_mtime_ns for p in dest.iterdir()} == stamps
    (dest / "sklearn-china.jpg").unlink()
    assert fetch_photos(dest, debian=False, max_side=300) == paths
    assert (dest / "sklearn-china.jpg").is_file()


def test_fetch_warns_without_apt(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apt-get, as on a machine without it
    with pytest.warns(UserWarning, match="could not fetch the Debian wallpaper photos.*apt-get not found"):
        paths = fetch_photos(tmp_path / "photos", max_side=200)
    assert len(paths) == len(SKIMAGE_PHOTOS) + len(SKLEARN_PHOTOS)
    assert not any(p.name.startswith("debian-") for p in paths)


def test_photo_fixture_holds_real_photos(real_photos: list[Path]):
    names = {p.name for p in real_photos}
    assert {"sklearn-china.jpg", "skimage-astronaut.jpg"} <= names
    assert all(p.stat().st_size > 10_000 for p in real_photos)


def test_fetch_refuses_a_file_in_one_line(tmp_path: Path):
    target = tmp_path / "photos.txt"
    target.write_text("not a folder")
    result = subprocess.run([sys.executable, str(TOOL), str(target), "--no-debian"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "is a file" in result.stderr.strip().splitlines()[-1]
