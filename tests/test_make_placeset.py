"""make-placeset: place datasets built from real photos (tiny crops to stay fast)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import netvlad.cli.data_commands  # noqa: F401  (registers the commands on the app)
from netvlad.cli import app, main
from netvlad.datasets.make_placeset import METADATA, PlacesetConfig, make_placeset
from netvlad.datasets.placeset import load_place_dataset
from netvlad.errors import DatasetError
from photo_support import shrunk_copies

SOURCES = ("sklearn-china.jpg", "sklearn-flower.jpg", "skimage-coffee.jpg", "skimage-astronaut.jpg")
TINY = PlacesetConfig(crop_size=48, stride=16, out_size=(48, 36), queries_per_photo=12, min_detail=0.0)


@pytest.fixture(scope="module")
def small_photos(real_photos: list[Path], tmp_path_factory) -> list[Path]:
    """Four real photos shrunk to a long side of 160 px."""
    return shrunk_copies(real_photos, SOURCES, tmp_path_factory.mktemp("sources"), 160)


@pytest.fixture(scope="module")
def built(small_photos: list[Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "placeset"
    make_placeset(small_photos, out, TINY, progress=False)
    return out


def source_of(image: str) -> str:
    """The source-photo folder of a written image path (database/<folder>/… or queries/<folder>/…)."""
    return image.split("/")[1]


def test_files_and_counts(built: Path, small_photos: list[Path]):
    ds = load_place_dataset(built)
    crop_w, crop_h = TINY.crop_shape
    expected_db = 0
    for photo in small_photos:
        with Image.open(photo) as image:
            width, height = image.size
        expected_db += ((width - crop_w) // TINY.stride + 1) * ((height - crop_h) // TINY.stride + 1)
    assert len(ds.db_images) == expected_db
    assert len(ds.q_images) == TINY.queries_per_photo * len(small_photos)
    written = sorted(str(p.relative_to(built)) for p in built.rglob("*.jpg"))
    assert written == sorted(ds.db_images + ds.q_images)
    for path in (ds.db_paths()[0], ds.q_paths()[-1]):
        with Image.open(path) as image:
            assert image.size == TINY.out_size and image.format == "JPEG"
    meta = json.loads((built / METADATA).read_text())
    assert meta["config"]["crop_size"] == 48 and meta["database"] == expected_db
    assert {Path(p["source"]).name for p in meta["photos"]} == set(SOURCES)


def test_coordinates_are_consistent(built: Path):
    ds = load_place_dataset(built)
    positives = ds.positives()
    assert min(len(p) for p in positives) >= 1
    for q, pos in enumerate(positives):
        assert {source_of(ds.db_images[i]) for i in pos} == {source_of(ds.q_images[q])}
    # Database positions follow the grid: neighbours one stride apart are stride·mpp metres apart.
    step = TINY.stride * TINY.mpp
    first = [i for i, image in enumerate(ds.db_images) if source_of(image) == source_of(ds.db_images[0])]
    np.testing.assert_allclose(ds.db_utm[first[1]] - ds.db_utm[first[0]], [step, 0.0], atol=1e-3)  # CSV keeps mm
    # Queries are re-photographed near, not at, grid points: many sit between them.
    nearest = np.array([np.linalg.norm(ds.db_utm[p[0]] - ds.q_utm[q]) for q, p in enumerate(positives)])
    assert nearest.max() <= TINY.max_query_offset_m + 1e-6
    assert np.mean(nearest > 1.0) > 0.5
    # Photos are laid out 10 km apart.
    origins = sorted({round(e / 10_000) for e in ds.db_utm[:, 0]})
    assert len(origins) == len(SOURCES) and np.all(np.diff(origins) == 1)


def test_queries_show_their_labelled_place(built: Path):
    """A query's content matches the database image at its labelled position: nearest neighbours
    by normalised cross-correlation of small grey thumbnails land within 25 m far above chance."""
    ds = load_place_dataset(built)

    def thumbnail(path: Path) -> np.ndarray:
        grey = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (16, 12), interpolation=cv2.INTER_AREA)
        v = grey.astype(np.float64).ravel() - grey.mean()
        return v / np.linalg.norm(v)

    db = np.stack([thumbnail(p) for p in ds.db_paths()])
    q = np.stack([thumbnail(p) for p in ds.q_paths()])
    top = np.argmax(q @ db.T, axis=1)
    hit = np.linalg.norm(ds.db_utm[top] - ds.q_utm, axis=1) <= 25.0
    chance = np.mean([len(p) for p in ds.positives()]) / len(ds.db_images)
    assert hit.mean() > 0.3 > 5 * chance


def test_place_ids(built: Path):
    ds = load_place_dataset(built)
    ids = ds.db_place_ids
    np.testing.assert_array_equal(np.unique(ids), np.arange(ids.max() + 1))
    assert set(ds.q_place_ids) <= set(ids)
    assert np.bincount(ids).max() > 1  # places group several grid points
    for place in np.unique(ids):
        members = ds.db_utm[ids == place]
        assert np.linalg.norm(members.max(0) - members.min(0)) <= 2 * TINY.pos_radius_m
    for q, place in enumerate(ds.q_place_ids):
        nearest = np.argmin(np.linalg.norm(ds.db_utm - ds.q_utm[q], axis=1))
        assert ids[nearest] == place


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != METADATA
    }


def test_deterministic_for_a_seed(built: Path, small_photos: list[Path], tmp_path: Path):
    make_placeset(list(reversed(small_photos)), tmp_path / "again", TINY, progress=False)
    assert tree_digest(tmp_path / "again") == tree_digest(built)
    other = PlacesetConfig(**{**TINY.__dict__, "seed": 1})
    make_placeset(small_photos, tmp_path / "other", other, progress=False)
    digest = tree_digest(tmp_path / "other")
    assert digest["database.csv"] == tree_digest(built)["database.csv"]
    assert digest["queries.csv"] != tree_digest(built)["queries.csv"]


def photos_of(folder: Path) -> set[str]:
    ds = load_place_dataset(folder)
    return {source_of(i) for i in ds.db_images + ds.q_images}


def test_holdout_splits_whole_photos(small_photos: list[Path], tmp_path: Path):
    """--holdout: train/ for training, val/ for choosing, test/ for figures; no source photo in two."""
    config = PlacesetConfig(**{**TINY.__dict__, "holdout": 0.5, "queries_per_photo": 3})
    summary = make_placeset(small_photos, tmp_path / "split", config, progress=False)
    assert set(summary.datasets) == {"train", "val", "test"}
    parts = {s: photos_of(summary.datasets[s]) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert {r.folder for r in summary.photos if r.split == "test"} == parts["test"]
    train, test = load_place_dataset(summary.datasets["train"]), load_place_dataset(summary.datasets["test"])
    assert len(test.q_images) == 3 and len(train.q_images) == 6
    assert test.db_place_ids.min() == 0  # place ids are numbered within each dataset
    meta = json.loads((tmp_path / "split" / METADATA).read_text())
    assert meta["config"]["test_fraction"] == 0.5 and set(meta["datasets"]) == {"train", "val", "test"}


def test_holdout_without_test_keeps_the_two_part_split(small_photos: list[Path], tmp_path: Path):
    """test_fraction 0 writes train/ and val/ only; with a test part the held-out photos are the
    same (test's photos come out of the two-part val), so older split folders stay reproducible."""
    two = PlacesetConfig(**{**TINY.__dict__, "holdout": 0.5, "test_fraction": 0.0, "queries_per_photo": 2})
    summary = make_placeset(small_photos, tmp_path / "two", two, progress=False)
    assert set(summary.datasets) == {"train", "val"}
    three = make_placeset(small_photos, tmp_path / "three", PlacesetConfig(**{**two.__dict__, "test_fraction": 0.5}),
                          progress=False)
    assert photos_of(three.datasets["train"]) == photos_of(summary.datasets["train"])
    assert photos_of(three.datasets["val"]) | photos_of(three.datasets["test"]) == photos_of(summary.datasets["val"])
    one = PlacesetConfig(**{**TINY.__dict__, "holdout": 0.25, "test_fraction": 0.0, "queries_per_photo": 2})
    datasets = make_placeset(small_photos, tmp_path / "one", one, progress=False).datasets
    assert [len(photos_of(datasets[s])) for s in ("train", "val")] == [3, 1]


def test_holdout_needs_enough_photos(small_photos: list[Path], tmp_path: Path):
    config = PlacesetConfig(**{**TINY.__dict__, "holdout": 0.3})
    with pytest.raises(DatasetError, match="at least 3 source photos"):
        make_placeset(small_photos[:2], tmp_path / "few", config, progress=False)
    with pytest.raises(DatasetError, match="test fraction"):
        make_placeset(small_photos, tmp_path / "bad", PlacesetConfig(**{**config.__dict__, "test_fraction": 1.0}), progress=False)
    # Two photos still make a train/val pair without a test part.
    summary = make_placeset(small_photos[:2], tmp_path / "pair", PlacesetConfig(**{**config.__dict__, "test_fraction": 0.0}),
                            progress=False)
    assert set(summary.datasets) == {"train", "val"}


def test_corrupt_and_flat_photos_are_skipped(small_photos: list[Path], tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.jpg").write_bytes(b"this is not a jpeg")
    data = small_photos[0].read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "copy.jpg").write_bytes(small_photos[1].read_bytes())
    Image.new("RGB", (160, 120), (120, 130, 140)).save(bad / "flat.png")
    Image.new("RGB", (30, 30), (0, 0, 0)).save(bad / "tiny.png")
    config = PlacesetConfig(**{**TINY.__dict__, "min_detail": 0.6, "queries_per_photo": 2})
    summary = make_placeset([*small_photos[:2], *sorted(bad.iterdir())], tmp_path / "out", config, progress=False)
    reasons = {Path(r.source).name: r.skipped for r in summary.skipped}
    # Of two photos with the same content the first by name is kept.
    assert set(reasons) == {"garbage.jpg", "truncated.jpg", small_photos[1].name, "flat.png", "tiny.png"}
    assert "not an image" in reasons["garbage.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert reasons[small_photos[1].name] == "same content as copy.jpg"
    assert reasons["flat.png"].startswith("no crop with detail") and reasons["tiny.png"].startswith("smaller")
    ds = load_place_dataset(tmp_path / "out")
    assert {source_of(i) for i in ds.db_images} == {r.folder for r in summary.photos if not r.skipped}
    assert len(ds.q_images) == 4


def test_output_folder_rules(small_photos: list[Path], tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="exists and is not empty"):
        make_placeset(small_photos[:1], out, TINY, progress=False)
    with pytest.raises(DatasetError, match="refusing to replace"):
        make_placeset(small_photos[:1], out, TINY, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    make_placeset(small_photos[:1], out, TINY, progress=False)
    make_placeset(small_photos[1:2], out, TINY, overwrite=True, progress=False)
    assert {source_of(i) for i in load_place_dataset(out).db_images} == {f"000_{small_photos[1].stem}"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind
    with pytest.raises(DatasetError, match="below the positive radius"):
        make_placeset(small_photos, tmp_path / "x", PlacesetConfig(max_query_offset_m=30.0), progress=False)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["netvlad", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli(small_photos: list[Path], tmp_path: Path, monkeypatch, capsys):
    folder = small_photos[0].parent
    code, out, err = run_cli(
        monkeypatch, capsys, "make-placeset", str(folder), "--out", str(tmp_path / "cli"), "--crop-size", "48",
        "--stride", "24", "--out-size", "48x36", "--queries-per-photo", "2", "--holdout", "0.5", "--no-progress", "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["queries"] == 2 * len(small_photos) and set(summary["datasets"]) == {"train", "val", "test"}
    assert [len(load_place_dataset(tmp_path / "cli" / s).q_images) for s in ("train", "val", "test")] == [4, 2, 2]
    code, out, err = run_cli(
        monkeypatch, capsys, "make-placeset", str(folder), "--out", str(tmp_path / "cli2"), "--crop-size", "48",
        "--stride", "24", "--out-size", "48x36", "--queries-per-photo", "2", "--holdout", "0.5", "--test-fraction", "0",
        "--no-progress",
    )
    assert code == 0, err
    assert sorted(line.split(":")[0] for line in out.splitlines()) == ["train", "val"]
    assert not (tmp_path / "cli2" / "test").exists()
    code, _, err = run_cli(monkeypatch, capsys, "make-placeset", str(folder), "--out", str(tmp_path / "cli"), "--no-progress")
    assert code == 1 and err.startswith("error: ") and "exists and is not empty" in err and err.count("\n") == 1
    result = CliRunner().invoke(app, ["make-placeset", str(folder), "--out", str(tmp_path / "y"), "--out-size", "48by36"])
    assert result.exit_code == 2 and "WIDTHxHEIGHT" in result.output and not (tmp_path / "y").exists()
