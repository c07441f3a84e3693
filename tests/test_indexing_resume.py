"""kill -9 at random moments during `netvlad index`, then resume: every photo exactly once."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import netvlad
from netvlad.index import Index
from netvlad.indexfolder import CATALOG, read_manifest

CROPS_PER_PHOTO = 4
SOURCES = 10
CLI = [sys.executable, "-m", "netvlad"]


@pytest.fixture(scope="module")
def folder(real_photos, tmp_path_factory) -> tuple[Path, int, int]:
    """(folder, distinct good photos, bad files): quadrant crops of real photos (160×120), one
    duplicate and two bad files."""
    root = tmp_path_factory.mktemp("resume") / "photos"
    for i, source in enumerate(real_photos[:SOURCES]):
        with Image.open(source) as image:
            image = image.convert("RGB")
            image.thumbnail((480, 480))
        w, h = image.size
        for j, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            sub = root / f"set{i % 3}"
            sub.mkdir(parents=True, exist_ok=True)
            image.crop((x, y, x + w // 2, y + h // 2)).resize((160, 120)).save(sub / f"{i:02d}-{j}.jpg", quality=90)
    (root / "dup.jpg").write_bytes((root / "set0" / "00-0.jpg").read_bytes())
    (root / "empty.jpg").write_bytes(b"")
    (root / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root, SOURCES * CROPS_PER_PHOTO, 2


def indexed_count(index_dir: Path) -> int:
    """Indexed images in the catalog right now (0 while it does not exist yet)."""
    path = index_dir / CATALOG
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM images WHERE status='indexed'").fetchone()[0]
    except sqlite3.OperationalError:  # the folder is being renamed into place
        return 0


@pytest.mark.slow
def test_kill_at_random_points_then_resume(folder, model_path, tmp_path):
    root, distinct, bad = folder
    index_dir = tmp_path / "index"
    args = [*CLI, "index", str(root), "--index", str(index_dir), "--model", str(model_path), "--batch-size", "1",
            "--workers", "0", "--save-every", "1", "-q", "--json"]
    rng = random.Random(1234)
    kills = []  # indexed count when each kill landed
    for attempt in range(3):
        before = indexed_count(index_dir)
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:
            deadline = time.monotonic() + rng.uniform(0.5, 4.0)  # anywhere: start-up, creation, scan, extraction
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
        else:  # once this run has made progress, somewhere in its extraction or checkpoints
            while indexed_count(index_dir) <= before and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(indexed_count(index_dir))
    assert any(0 < count < distinct for count in kills), f"no kill landed mid-extraction: {kills}"

    final = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    report = json.loads(final.stdout)
    assert report["images"] == distinct and len(report["failures"]) == bad

    with Index.open(index_dir) as index:
        counts = index.catalog.counts()
        assert counts == {"pending": 0, "indexed": distinct, "failed": bad, "removed": 0}
        ids = index.catalog.indexed_ids()
        assert len(np.unique(ids)) == distinct and np.array_equal(index.vectors.ids(), ids)
        assert read_manifest(index_dir)["count"] == distinct
        files = index.catalog.files()
        assert len(files) == distinct + 1 + bad  # every path once, the duplicate included
        # descriptors written across the kills are those of their photos
        records = index.catalog.records(ids.tolist(), index.resolve)
        sample = [int(i) for i in ids[:: max(1, distinct // 6)]]
        expected = netvlad.load_model(model_path).describe([records[i].path for i in sample])
        np.testing.assert_allclose(index.store.descriptors(sample), expected, atol=3e-3)
    assert len(list(index_dir.glob("vectors-*.faiss"))) == 1 and not list(index_dir.glob(".*.tmp"))

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["described"] == 0
