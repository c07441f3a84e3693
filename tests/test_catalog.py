"""SQLite catalog: identical contents, statuses, tombstones, orphans; EXIF facts."""

from __future__ import annotations

import io
import sqlite3

import numpy as np
import pytest
from PIL import ExifTags, Image

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DescriptorStore
from netvlad.errors import IndexStoreError
from netvlad.exif import PhotoInfo, read_photo_info


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


INFO = PhotoInfo(width=640, height=480)


def store_descriptors(catalog: Catalog, ids: list[int], x: np.ndarray) -> None:
    DescriptorStore(catalog.path.parent / "descriptors", catalog, x.shape[1]).append(ids, x)


def test_identical_contents_share_one_image(catalog):
    a = catalog.record_file("a.jpg", "folder", 10, 1, "s1", INFO)
    b = catalog.record_file("sub/b.jpg", "folder", 10, 2, "s1", INFO)
    c = catalog.record_file("c.jpg", "folder", 12, 3, "s2", INFO)
    assert a == b != c
    assert catalog.counts()["pending"] == 2
    pending = catalog.pending()
    assert [(row[0], row[1]) for row in pending] == [(a, "a.jpg"), (c, "c.jpg")]  # first path of each image
    assert catalog.files() == {"a.jpg": (10, 1), "sub/b.jpg": (10, 2), "c.jpg": (12, 3)}
    records = catalog.records([a], resolve=lambda path, origin: f"/root/{path}")
    assert records[a].paths == ["a.jpg", "sub/b.jpg"] and records[a].path == "/root/a.jpg"


def test_metadata_overrides_header_facts_and_merges(catalog):
    info = PhotoInfo(width=10, height=20, taken_at="2020-01-01T00:00:00", lat=1.0, lon=2.0)
    image_id = catalog.record_file("u1", "upload", 5, 1, "s", info, {"lat": 47.5, "camera": "x"})
    catalog.record_file("u2", "upload", 5, 1, "s", info, {"lon": 8.25, "note": "y"})
    record = catalog.records([image_id], resolve=lambda p, o: p)[image_id]
    assert (record.lat, record.lon, record.taken_at) == (47.5, 8.25, "2020-01-01T00:00:00")
    assert record.metadata == {"camera": "x", "note": "y"}


def test_remove_keeps_tombstones_for_folder_photos_and_deletes_uploads(catalog):
    folder = catalog.record_file("a.jpg", "folder", 1, 1, "s1", INFO)
    upload = catalog.record_file("uploads/s2.jpg", "upload", 1, 1, "s2", INFO)
    store_descriptors(catalog, [folder, upload], unit_rows(2, 8))
    assert sorted(catalog.remove([folder, upload, 999])) == [folder, upload]
    assert catalog.status(folder) == "removed" and catalog.status(upload) is None
    assert catalog.indexed_ids().size == 0
    # the tombstone keeps a rescan of the same file from adding it back
    assert catalog.record_file("a.jpg", "folder", 1, 1, "s1", INFO) == folder
    assert catalog.status(folder) == "removed" and catalog.pending() == []


def test_replaced_and_deleted_files_leave_no_orphans(catalog):
    old = catalog.record_file("a.jpg", "folder", 1, 1, "old", INFO)
    kept = catalog.record_file("b.jpg", "folder", 1, 1, "kept", INFO)
    store_descriptors(catalog, [old, kept], unit_rows(2, 8))
    revision = catalog.revision
    new = catalog.record_file("a.jpg", "folder", 2, 2, "new", INFO)  # a.jpg was edited
    assert new != old
    assert catalog.delete_orphans() == [old]
    assert catalog.revision == revision + 1
    assert catalog.delete_files(["b.jpg"]) == [kept]
    assert catalog.indexed_ids().size == 0 and catalog.status(new) == "pending"


def test_unreadable_files_are_reported(catalog):
    catalog.record_unreadable("link.jpg", "folder", 0, 0, "link.jpg: unreadable (No such file or directory)")
    assert catalog.failures() == [("link.jpg", "link.jpg: unreadable (No such file or directory)")]
    image_id = catalog.record_file("link.jpg", "folder", 3, 4, "s", INFO)  # the link was repaired
    assert catalog.failures() == [] and catalog.pending()[0][0] == image_id


def test_a_failed_transaction_changes_nothing(catalog):
    with pytest.raises(RuntimeError):
        with catalog.transaction():
            catalog.record_file("a.jpg", "folder", 1, 1, "s1", INFO)
            with catalog.transaction():  # nested: joins the outer transaction
                catalog.record_file("b.jpg", "folder", 1, 1, "s2", INFO)
            raise RuntimeError("crash before commit")
    assert catalog.files() == {} and catalog.counts()["pending"] == 0


def test_foreign_or_newer_files_are_refused(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(IndexStoreError, match="not a readable catalog"):
        Catalog(junk)
    path = tmp_path / "newer.sqlite"
    Catalog(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(IndexStoreError, match="schema version 99"):
        Catalog(path)


def _rational(value: float) -> tuple:
    return (int(value), int(round((value % 1) * 60)), 0)


def jpeg_with_exif(lat: float, lon: float, orientation: int = 1, size=(64, 32)) -> bytes:
    image = Image.new("RGB", size, (120, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif.get_ifd(ExifTags.IFD.Exif)[0x9003] = "2021:06:01 12:30:05"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "S" if lat < 0 else "N"
    gps[ExifTags.GPS.GPSLatitude] = _rational(abs(lat))
    gps[ExifTags.GPS.GPSLongitudeRef] = "W" if lon < 0 else "E"
    gps[ExifTags.GPS.GPSLongitude] = _rational(abs(lon))
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    return out.getvalue()


def test_exif_time_gps_and_orientation(tmp_path):
    path = tmp_path / "gps.jpg"
    path.write_bytes(jpeg_with_exif(-33.5, 151.25, orientation=6))
    info = read_photo_info(path)
    assert (info.width, info.height) == (32, 64)  # rotated 90°: displayed size swaps
    assert info.taken_at == "2021-06-01T12:30:05" and info.format == "JPEG"
    assert info.lat == pytest.approx(-33.5) and info.lon == pytest.approx(151.25)
    plain = read_photo_info(jpeg_with_exif(47.0, -8.5))
    assert (plain.width, plain.height, plain.lon) == (64, 32, pytest.approx(-8.5))


def test_headers_that_do_not_parse_give_no_facts(tmp_path):
    assert read_photo_info(b"not an image") == PhotoInfo()
    assert read_photo_info(tmp_path / "missing.jpg") == PhotoInfo()
    out = io.BytesIO()
    Image.new("L", (5, 7)).save(out, format="PNG")
    assert read_photo_info(out.getvalue()) == PhotoInfo(width=5, height=7, format="PNG")
