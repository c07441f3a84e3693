"""Place dataset loading (CSV, .mat v5 and v7.3) and ground truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from netvlad.datasets import groundtruth
from netvlad.datasets.placeset import PlaceDataset, load_place_dataset, save_place_dataset
from netvlad.errors import DatasetError


# ---------------------------------------------------------------- ground truth


def brute_force_within(db: np.ndarray, q: np.ndarray, radius: float) -> list[np.ndarray]:
    """Reference: per query, indices of db points with distance ≤ radius, nearest first."""
    result = []
    for point in q:
        distances = np.sqrt(((db - point) ** 2).sum(axis=1))
        inside = np.flatnonzero(distances <= radius)
        result.append(inside[np.argsort(distances[inside], kind="stable")])
    return result


@pytest.fixture
def street_points() -> tuple[np.ndarray, np.ndarray]:
    """Database every ~5 m along a few noisy streets, queries scattered around them (metres)."""
    rng = np.random.default_rng(7)
    t = np.arange(0, 600, 5.0)
    db = np.concatenate([np.column_stack([t + 1000 * s, 40 * s + rng.normal(0, 2, len(t))]) for s in range(3)])
    q = db[rng.choice(len(db), 150)] + rng.normal(0, 15, (150, 2))
    q = np.concatenate([q, [[5e4, 5e4], [-3e4, 0.0]]])  # two queries far from everything
    return db + 3e5, q + 3e5  # UTM-sized coordinates


@pytest.mark.parametrize("radius", [10.0, 25.0, 60.0])
def test_positives_match_brute_force(street_points, radius):
    db, q = street_points
    got = groundtruth.positives(db, q, radius)
    expected = brute_force_within(db, q, radius)
    assert len(got) == len(q)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert sum(len(g) for g in got) > len(q)  # the data really has positives


def test_default_radii_and_empty_queries(street_points):
    db, q = street_points
    pos = groundtruth.positives(db, q)
    potential = groundtruth.potential_positives(db, q)
    for p, e in zip(pos, brute_force_within(db, q, 25.0)):
        np.testing.assert_array_equal(p, e)
    for p, e in zip(potential, brute_force_within(db, q, 10.0)):
        np.testing.assert_array_equal(p, e)
    assert all(set(pp) <= set(p) for pp, p in zip(potential, pos))
    empty = groundtruth.queries_without_positives(pos)
    np.testing.assert_array_equal(empty, [i for i, e in enumerate(brute_force_within(db, q, 25.0)) if len(e) == 0])
    assert {len(q) - 2, len(q) - 1} <= set(empty.tolist())


def test_positive_radius_is_inclusive():
    db = np.array([[0.0, 0.0], [25.0, 0.0], [0.0, 25.000001], [7.0, 24.0]])
    (pos,) = groundtruth.positives(db, np.zeros((1, 2)), 25.0)
    np.testing.assert_array_equal(pos, [0, 1, 3])


def test_positives_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        groundtruth.positives(np.zeros((3, 3)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="NaN"):
        groundtruth.positives(np.zeros((3, 2)), np.array([[np.nan, 0.0]]))


@pytest.mark.parametrize("num_db,excluded_count,count", [(100_000, 40, 1000), (50, 20, 25), (30, 25, 10)])
def test_sample_negatives(num_db, excluded_count, count):
    rng = np.random.default_rng(0)
    excluded = rng.choice(num_db, excluded_count, replace=False)
    negatives = groundtruth.sample_negatives(np.random.default_rng(1), num_db, excluded, count)
    assert len(negatives) == min(count, num_db - excluded_count)
    assert len(np.unique(negatives)) == len(negatives)
    assert not np.isin(negatives, excluded).any()
    assert negatives.min() >= 0 and negatives.max() < num_db
    again = groundtruth.sample_negatives(np.random.default_rng(1), num_db, excluded, count)
    np.testing.assert_array_equal(negatives, again)


def test_sample_negatives_is_uniform():
    counts = np.zeros(20)
    rng = np.random.default_rng(3)
    for _ in range(2000):
        counts[groundtruth.sample_negatives(rng, 20, np.array([0, 1]), 3)] += 1
    assert counts[:2].sum() == 0
    expected = 2000 * 3 / 18
    assert np.abs(counts[2:] - expected).max() < 0.2 * expected


# ---------------------------------------------------------------- CSV place datasets


@pytest.fixture
def csv_dataset(tmp_path: Path, real_photos: list[Path]) -> Path:
    """A CSV dataset whose images are real photos: 4 database images, 2 queries."""
    root = tmp_path / "places"
    (root / "db").mkdir(parents=True)
    (root / "q").mkdir()
    for i, photo in enumerate(real_photos[:4]):
        shutil.copyfile(photo, root / "db" / f"{i}.jpg")
    for i, photo in enumerate(real_photos[4:6]):
        shutil.copyfile(photo, root / "q" / f"{i}.jpg")
    (root / "database.csv").write_text(
        "image,easting,northing,place_id\n"
        "db/0.jpg,584000.0,4477000.0,0\n"
        "db/1.jpg,584010.0,4477000.0,0\n"
        "db/2.jpg,584100.0,4477000.0,1\n"
        "db/3.jpg,584200.5,4477300.25,2\n"
    )
    (root / "queries.csv").write_text("image,easting,northing,place_id\nq/0.jpg,584004,4477003,0\nq/1.jpg,584400,4477000,3\n")
    return root


def test_load_csv_dataset(csv_dataset: Path):
    ds = load_place_dataset(csv_dataset)
    assert ds.db_images == ["db/0.jpg", "db/1.jpg", "db/2.jpg", "db/3.jpg"]
    np.testing.assert_allclose(ds.db_utm[3], [584200.5, 4477300.25])
    assert ds.db_utm.dtype == np.float64 and ds.q_utm.shape == (2, 2)
    np.testing.assert_array_equal(ds.db_place_ids, [0, 0, 1, 2])
    np.testing.assert_array_equal(ds.q_place_ids, [0, 3])
    assert ds.db_paths()[0] == csv_dataset / "db/0.jpg" and all(p.is_file() for p in ds.q_paths())
    assert ds.crs is None and ds.pos_radius_m == 25.0
    positives = ds.positives()
    np.testing.assert_array_equal(positives[0], [0, 1])  # 5 m and ~6.7 m away
    assert len(positives[1]) == 0
    np.testing.assert_array_equal(ds.potential_positives()[0], [0, 1])


def test_radii_can_be_chosen_at_load_time(csv_dataset: Path):
    ds = load_place_dataset(csv_dataset, pos_radius_m=6.0, nontrivial_radius_m=5.5)
    np.testing.assert_array_equal(ds.positives()[0], [0])  # 5 m in, ~6.7 m out
    np.testing.assert_array_equal(ds.potential_positives()[0], [0])
    assert len(load_place_dataset(csv_dataset, pos_radius_m=500.0).positives()[1]) == 4  # db 3 is 360 m away
    with pytest.raises(DatasetError, match="at most the positive radius"):
        load_place_dataset(csv_dataset, pos_radius_m=5.0)  # below the 10 m training radius


def test_save_then_load_round_trip(csv_dataset: Path):
    ds = load_place_dataset(csv_dataset)
    (csv_dataset / "database.csv").unlink()
    save_place_dataset(ds)
    again = load_place_dataset(csv_dataset)
    assert again.db_images == ds.db_images and again.q_images == ds.q_images
    np.testing.assert_allclose(again.db_utm, ds.db_utm, atol=1e-3)
    np.testing.assert_array_equal(again.db_place_ids, ds.db_place_ids)


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance on a sphere of the mean Earth radius (independent of pyproj)."""
    lat1, lon1, lat2, lon2 = map(np.radians, (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6_371_008.8 * np.arcsin(np.sqrt(a))


@pytest.mark.parametrize(
    "lat,lon,crs",
    [(40.4406, -79.9959, "EPSG:32617"), (35.6812, 139.7671, "EPSG:32654"), (-33.9249, 18.4241, "EPSG:32734")],
)
def test_lat_lon_projected_to_utm(csv_dataset: Path, lat, lon, crs):
    rng = np.random.default_rng(0)
    db_ll = np.column_stack([lat + rng.uniform(-0.01, 0.01, 4), lon + rng.uniform(-0.01, 0.01, 4)])
    q_ll = np.column_stack([lat + rng.uniform(-0.01, 0.01, 2), lon + rng.uniform(-0.01, 0.01, 2)])
    for name, images, coords in (("database.csv", ["db/0.jpg", "db/1.jpg", "db/2.jpg", "db/3.jpg"], db_ll),
                                 ("queries.csv", ["q/0.jpg", "q/1.jpg"], q_ll)):
        rows = "".join(f"{im},{la:.8f},{lo:.8f}\n" for im, (la, lo) in zip(images, coords))
        (csv_dataset / name).write_text("image,lat,lon\n" + rows)
    ds = load_place_dataset(csv_dataset)
    assert ds.crs == crs
    assert ds.db_place_ids is None
    # Northing grows with latitude (~111 km per degree, false northing 10 000 km south).
    expected_northing = lat * 110_900 + (10_000_000 if lat < 0 else 0)
    assert abs(ds.db_utm[:, 1].mean() - expected_northing) < 30_000
    assert 160_000 < ds.db_utm[:, 0].mean() < 840_000
    # Distances in the projection match spherical great-circle distances to the sphere's error
    # against the ellipsoid plus UTM's scale error (< 0.5 %); swapped axes or degrees would not.
    points_ll = np.concatenate([db_ll, q_ll])
    points = np.concatenate([ds.db_utm, ds.q_utm])
    i, j = np.triu_indices(len(points), 1)
    projected = np.linalg.norm(points[i] - points[j], axis=1)
    great_circle = haversine_m(points_ll[i, 0], points_ll[i, 1], points_ll[j, 0], points_ll[j, 1])
    np.testing.assert_allclose(projected, great_circle, rtol=5e-3)


def _replace(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda root: (root / "queries.csv").unlink(), r"queries\.csv: missing"),
        (lambda root: _replace(root / "database.csv", "easting", "x"), r"database\.csv, line 1: expected columns"),
        (lambda root: _replace(root / "database.csv", "image,", "file,"), r"database\.csv, line 1: no 'image' column"),
        (lambda root: _replace(root / "database.csv", "584010.0", "12a"), r"database\.csv, line 3: easting '12a' is not a number"),
        (lambda root: _replace(root / "queries.csv", "4477003", "nan"), r"queries\.csv, line 2: northing 'nan' is not finite"),
        (lambda root: _replace(root / "database.csv", "db/2.jpg", "db/1.jpg"), r"database\.csv, line 4: duplicate image 'db/1\.jpg' \(first on line 3\)"),
        (lambda root: (root / "db" / "2.jpg").unlink(), r"database\.csv, line 4: image 'db/2\.jpg' not found .*\(1 of 4 missing\)"),
        (lambda root: _replace(root / "queries.csv", "q/1.jpg", "db/3.jpg"), r"queries\.csv, line 3: image 'db/3\.jpg' is also a database image"),
        (lambda root: _replace(root / "database.csv", ",1\n", ",one\n"), r"database\.csv, line 4: place_id 'one' is not an integer"),
        (lambda root: _replace(root / "database.csv", "db/0.jpg", "/etc/passwd"), r"line 2: image path '/etc/passwd' must be relative"),
        (lambda root: _replace(root / "database.csv", "db/0.jpg", "../db/0.jpg"), r"line 2: image path '\.\./db/0\.jpg' must be relative"),
        (lambda root: _replace(root / "queries.csv", "584004,4477003,0", "584004,4477003"), r"queries\.csv, line 2: 3 fields, header has 4"),
        (lambda root: (root / "queries.csv").write_text("image,lat,lon\nq/0.jpg,40.0,-80.0\n"), r"must use the same coordinate columns"),
        (lambda root: (root / "queries.csv").write_text("image,easting,northing\n"), r"queries\.csv: no rows"),
    ],
    ids=["missing-file", "wrong-columns", "no-image-column", "non-numeric", "nan", "duplicate", "missing-image",
         "query-in-db", "bad-place-id", "absolute", "escapes-root", "short-row", "mixed-coordinates", "empty"],
)
def test_csv_validation_errors(csv_dataset: Path, corrupt, message):
    corrupt(csv_dataset)
    with pytest.raises(DatasetError, match=message):
        load_place_dataset(csv_dataset)


def test_lat_lon_out_of_range(csv_dataset: Path):
    (csv_dataset / "database.csv").write_text("image,lat,lon\ndb/0.jpg,95.0,10.0\n")
    (csv_dataset / "queries.csv").write_text("image,lat,lon\nq/0.jpg,45.0,10.0\n")
    with pytest.raises(DatasetError, match=r"database\.csv, line 2: lat,lon \(95\.0, 10\.0\) out of range"):
        load_place_dataset(csv_dataset)


def test_missing_dataset_and_wrong_kind(tmp_path: Path):
    with pytest.raises(DatasetError, match="no such place dataset"):
        load_place_dataset(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="expected a folder"):
        load_place_dataset(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match=r"database\.csv: missing"):
        load_place_dataset(tmp_path)


def test_place_dataset_checks_lengths(tmp_path: Path):
    with pytest.raises(DatasetError, match="3 database images but 2 positions"):
        PlaceDataset(tmp_path, ["a", "b", "c"], np.zeros((2, 2)), [], np.zeros((0, 2)))
    with pytest.raises(DatasetError, match="shape"):
        PlaceDataset(tmp_path, ["a"], np.zeros((1, 3)), [], np.zeros((0, 2)))
    with pytest.raises(DatasetError, match="1 query images but 2 place ids"):
        PlaceDataset(tmp_path, [], np.zeros((0, 2)), ["q"], np.zeros((1, 2)), q_place_ids=np.array([1, 2]))


# ---------------------------------------------------------------- .mat dbStruct files

DB_IMAGES = ["000/000000_pitch1_yaw1.jpg", "000/000000_pitch1_yaw2.jpg", "000/000001_pitch1_yaw1.jpg"]
Q_IMAGES = ["000/000000_pitch1_yaw3.jpg", "001/000010_pitch2_yaw1.jpg"]
UTM_DB = np.array([[585001.5, 585001.5, 585050.25], [4477001.0, 4477001.0, 4477010.5]])  # 2 × N, as MATLAB
UTM_Q = np.array([[585005.0, 585300.0], [4477003.0, 4477200.0]])


@pytest.fixture
def pitts_root(tmp_path: Path, real_photos: list[Path]) -> Path:
    """Pittsburgh layout: database images under the root, queries under root/queries_real."""
    for i, name in enumerate(DB_IMAGES):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_photos[i], tmp_path / name)
    for i, name in enumerate(Q_IMAGES):
        (tmp_path / "queries_real" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_photos[i + 3], tmp_path / "queries_real" / name)
    return tmp_path


def write_v5(path: Path) -> None:
    cells = lambda names: np.array(names, dtype=object).reshape(-1, 1)  # noqa: E731
    struct = {
        "whichSet": "test", "dbImage": cells(DB_IMAGES), "utmDb": UTM_DB, "qImage": cells(Q_IMAGES),
        "utmQ": UTM_Q, "numImages": 3.0, "numQueries": 2.0, "posDistThr": 25.0, "posDistSqThr": 625.0,
        "nonTrivPosDistSqThr": 100.0,
    }
    scipy.io.savemat(path, {"dbStruct": struct})


def write_v73(path: Path) -> None:
    """A MATLAB v7.3 file as MATLAB writes it: HDF5 with a 512-byte user block carrying the MAT
    header, dimensions reversed (2 × N stored as N × 2), cell strings as references to uint16."""
    with h5py.File(path, "w", userblock_size=512) as file:
        refs = file.create_group("#refs#")
        group = file.create_group("dbStruct")
        group.attrs["MATLAB_class"] = np.bytes_("struct")

        def cell_of_strings(name: str, strings: list[str]) -> None:
            references = []
            for k, text in enumerate(strings):
                chars = refs.create_dataset(f"{name}{k}", data=np.frombuffer(text.encode("utf-16-le"), np.uint16).reshape(-1, 1))
                chars.attrs["MATLAB_class"] = np.bytes_("char")
                references.append(chars.ref)
            dataset = group.create_dataset(name, data=np.array(references, dtype=h5py.ref_dtype).reshape(1, -1))
            dataset.attrs["MATLAB_class"] = np.bytes_("cell")

        def double(name: str, value) -> None:
            group.create_dataset(name, data=np.asarray(value, dtype=np.float64).T).attrs["MATLAB_class"] = np.bytes_("double")

        chars = group.create_dataset("whichSet", data=np.frombuffer("test".encode("utf-16-le"), np.uint16).reshape(-1, 1))
        chars.attrs["MATLAB_class"] = np.bytes_("char")
        cell_of_strings("dbImage", DB_IMAGES)
        cell_of_strings("qImage", Q_IMAGES)
        double("utmDb", UTM_DB)
        double("utmQ", UTM_Q)
        for name, value in (("posDistThr", 25.0), ("posDistSqThr", 625.0), ("nonTrivPosDistSqThr", 100.0)):
            double(name, [[value]])
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as raw:
        raw.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")


@pytest.mark.parametrize("writer", [write_v5, write_v73], ids=["v5", "v7.3"])
def test_load_mat_dbstruct(pitts_root: Path, writer):
    mat = pitts_root / "datasets" / "pitts30k_test.mat"
    mat.parent.mkdir()
    writer(mat)
    assert scipy.io.matlab.matfile_version(str(mat))[0] == (2 if writer is write_v73 else 1)
    ds = load_place_dataset(mat, images_root=pitts_root, queries_root=pitts_root / "queries_real")
    assert ds.name == "pitts30k_test" and ds.root == pitts_root
    assert ds.db_images == DB_IMAGES
    assert ds.q_images == [f"queries_real/{name}" for name in Q_IMAGES]
    np.testing.assert_array_equal(ds.db_utm, UTM_DB.T)
    np.testing.assert_array_equal(ds.q_utm, UTM_Q.T)
    assert ds.pos_radius_m == 25.0 and ds.nontrivial_radius_m == 10.0
    assert all(p.is_file() for p in ds.db_paths() + ds.q_paths())
    positives = ds.positives()
    np.testing.assert_array_equal(positives[0], [0, 1])  # 3.5 m away; image 2 is 48 m away
    assert len(positives[1]) == 0


def test_mat_without_images_root_uses_file_folder(pitts_root: Path):
    write_v5(pitts_root / "pitts.mat")
    with pytest.raises(DatasetError, match=r"pitts\.mat, qImage 1: image '000/000000_pitch1_yaw3\.jpg' not found"):
        load_place_dataset(pitts_root / "pitts.mat")
    ds = load_place_dataset(pitts_root / "pitts.mat", check_images=False)
    assert ds.root == pitts_root and ds.q_images == Q_IMAGES


def test_mat_errors(tmp_path: Path):
    (tmp_path / "junk.mat").write_bytes(b"\x00" * 10)
    with pytest.raises(DatasetError, match=r"junk\.mat"):
        load_place_dataset(tmp_path / "junk.mat")
    scipy.io.savemat(tmp_path / "other.mat", {"x": np.eye(2)})
    with pytest.raises(DatasetError, match=r"no variable 'dbStruct' in the MATLAB file \(found: x\)"):
        load_place_dataset(tmp_path / "other.mat")
    scipy.io.savemat(tmp_path / "partial.mat", {"dbStruct": {"dbImage": np.array(["a.jpg"], dtype=object), "utmDb": np.zeros((2, 1))}})
    with pytest.raises(DatasetError, match="lacks field.*qImage, utmQ"):
        load_place_dataset(tmp_path / "partial.mat")
