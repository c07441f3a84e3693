"""Place datasets in the community's layouts (gmberton's VPR-datasets-downloader folders and
Mapillary SLS), generated small from the same real photos and positions as a CSV place dataset:
the same images, positions and ground truth as the CSV form."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from netvlad.datasets import community
from netvlad.datasets.placeset import load_place_dataset
from netvlad.errors import DatasetError

#: (easting, northing) of 5 database and 3 query photos, metres (zone 33U); query 2 has no positive.
DB = [(584000.0, 4477000.0), (584010.0, 4477000.0), (584100.0, 4477000.0), (584200.5, 4477300.25), (584020.0, 4477015.0)]
Q = [(584004.0, 4477003.0), (584105.0, 4477010.0), (590000.0, 4477000.0)]


def vpr_name(i: int, east: float, north: float) -> str:
    return f"@{east:.2f}@{north:.2f}@33@U@41.0@16.0@pano{i}@0@90@0@0@0@202001@@.jpg"


def write_csv_form(root: Path, photos: list[Path]) -> Path:
    (root / "db").mkdir(parents=True)
    (root / "q").mkdir()
    rows = {"database.csv": [], "queries.csv": []}
    for i, (e, n) in enumerate(DB):
        shutil.copyfile(photos[i], root / "db" / f"{i}.jpg")
        rows["database.csv"].append((f"db/{i}.jpg", e, n))
    for i, (e, n) in enumerate(Q):
        shutil.copyfile(photos[5 + i], root / "q" / f"{i}.jpg")
        rows["queries.csv"].append((f"q/{i}.jpg", e, n))
    for name, table in rows.items():
        with open(root / name, "w", newline="") as file:
            csv.writer(file).writerows([("image", "easting", "northing"), *table])
    return root


def write_vpr_root(root: Path, photos: list[Path]) -> Path:
    split = root / "images" / "test"
    for part, positions, first in (("database", DB, 0), ("queries", Q, 5)):
        (split / part / "sub").mkdir(parents=True)
        for i, (e, n) in enumerate(positions):
            sub = "sub/" if i % 2 else ""
            shutil.copyfile(photos[first + i], split / part / f"{sub}{vpr_name(i, e, n)}")
    return root


def write_msls_root(root: Path, photos: list[Path], city: str = "cph", offset: float = 0.0) -> Path:
    for part, positions, first in (("database", DB, 0), ("query", Q, 5)):
        folder = root / "train_val" / city / part
        (folder / "images").mkdir(parents=True)
        post, raw = [["", "key", "easting", "northing", "night", "view_direction"]], [["", "key", "lon", "lat", "ca", "captured_at", "pano"]]
        for i, (e, n) in enumerate(positions):
            key = f"{city}{part}{i}"
            shutil.copyfile(photos[first + i], folder / "images" / f"{key}.jpg")
            post.append([i, key, e + offset, n, False, "Forward"])
            raw.append([i, key, 16.0, 41.0, 0, 0, False])
        pano = len(positions)  # one panorama per part: left out, as the MSLS authors' loader does
        shutil.copyfile(photos[0], folder / "images" / f"{city}{part}pano.jpg")
        post.append([pano, f"{city}{part}pano", positions[0][0] + offset, positions[0][1], False, "Forward"])
        raw.append([pano, f"{city}{part}pano", 16.0, 41.0, 0, 0, True])
        for name, rows in (("postprocessed.csv", post), ("raw.csv", raw)):
            with open(folder / name, "w", newline="") as file:
                csv.writer(file).writerows(rows)
    return root


def ground_truth(dataset) -> dict:
    """Query position → (positive, potential positive) database positions: the ground truth,
    whatever order the layout lists its images in."""
    def at(utm, ids):
        return frozenset(tuple(np.round(utm[i], 1)) for i in ids)

    return {tuple(np.round(q, 1)): (at(dataset.db_utm, pos), at(dataset.db_utm, near))
            for q, pos, near in zip(dataset.q_utm, dataset.positives(), dataset.potential_positives())}


def test_vpr_downloader_layout_equals_the_csv_form(tmp_path, real_photos):
    expected = load_place_dataset(write_csv_form(tmp_path / "csv", real_photos))
    root = write_vpr_root(tmp_path / "pitts", real_photos)
    for dataset in (load_place_dataset(root), load_place_dataset(root / "images" / "test")):
        assert all(p.is_file() for p in dataset.db_paths() + dataset.q_paths())
        assert ground_truth(dataset) == ground_truth(expected) and dataset.pos_radius_m == 25.0
        assert sum(len(p) == 0 for p in dataset.positives()) == 1
    with pytest.raises(DatasetError, match="database.csv: missing .*VPR-datasets-downloader"):
        load_place_dataset(root, split="train")


def test_a_bad_vpr_image_name_is_named(tmp_path, real_photos):
    root = write_vpr_root(tmp_path / "pitts", real_photos)
    shutil.copyfile(real_photos[0], root / "images" / "test" / "queries" / "holiday.jpg")
    with pytest.raises(DatasetError, match="holiday.jpg: not a VPR-datasets-downloader image name"):
        load_place_dataset(root)


def test_msls_layout_equals_the_csv_form_and_keeps_cities_apart(tmp_path, real_photos):
    expected = load_place_dataset(write_csv_form(tmp_path / "csv", real_photos))
    root = write_msls_root(tmp_path / "msls", real_photos, "cph")
    dataset = load_place_dataset(root, cities=("cph",))
    assert not any("pano" in image for image in dataset.db_images + dataset.q_images)
    np.testing.assert_allclose(dataset.db_utm, expected.db_utm)
    np.testing.assert_allclose(dataset.q_utm, expected.q_utm)
    assert ground_truth(dataset) == ground_truth(expected) and dataset.pos_radius_m == 25.0
    # A second city in the same coordinates never matches the first one's photos.
    write_msls_root(root, real_photos, "sf")
    both = load_place_dataset(root)  # default: the validation cities, cph and sf
    assert len(both.db_images) == 2 * len(DB) and len(both.q_images) == 2 * len(Q)
    for q, positives in enumerate(both.positives()):
        assert all((i >= len(DB)) == (q >= len(Q)) for i in positives)
    with pytest.raises(DatasetError, match="no MSLS city 'oslo'.*cph, sf"):
        load_place_dataset(root, cities=("oslo",))


def test_split_folder_helpers(tmp_path, real_photos):
    root = write_vpr_root(tmp_path / "pitts", real_photos)
    assert community.vpr_split_folder(root, "test") == root / "images" / "test"
    assert community.vpr_split_folder(root, "val") is None
    with pytest.raises(DatasetError, match="split must be one of"):
        community.vpr_split_folder(root, "dev")
