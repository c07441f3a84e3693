"""Index folder: folder runs (duplicates, links, hidden and bad files), incremental runs, manifest
validation and repair, the Python API the service uses, faiss index types, the CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import netvlad
from netvlad.cli import main
from netvlad.errors import ImageError, IndexStoreError
from netvlad.index import Index
from netvlad.indexfolder import MANIFEST, read_manifest
from netvlad.imageio import walk_photos
from netvlad.indexing import index_folder
from netvlad.vectorindex import FLAT_LIMIT, IndexSpec, VectorIndex, choose_spec

N_PHOTOS = 6


def shrink(source: Path, target: Path, side: int = 240) -> Path:
    """A smaller JPEG copy of a real photo (keeps the tests fast)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        image.save(target, quality=90)
    return target


def bomb_png() -> bytes:
    """A PNG whose header claims 30 000 × 30 000 pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", 30_000, 30_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="module")
def sources(real_photos, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sources")
    return [shrink(p, folder / f"{i}.jpg") for i, p in enumerate(real_photos[-N_PHOTOS - 2 :])]


@pytest.fixture(scope="module")
def photo_folder(sources, tmp_path_factory) -> Path:
    """N_PHOTOS photos plus a duplicate, links, hidden files, bad files and a non-photo."""
    root = tmp_path_factory.mktemp("folder") / "photos"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
    for i, src in enumerate(sources[:N_PHOTOS]):
        shutil.copy(src, root / ("a" if i % 2 else "b") / f"{i}.jpg")
    shutil.copy(sources[0], root / "a" / "copy of 0.jpg")
    (root / "link.jpg").symlink_to(root / "a" / "1.jpg")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "broken.jpg").symlink_to(root / "nowhere.jpg")
    shutil.copy(sources[N_PHOTOS], root / ".hidden.jpg")
    (root / ".cache").mkdir()
    shutil.copy(sources[N_PHOTOS], root / ".cache" / "thumb.jpg")
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    data = sources[N_PHOTOS + 1].read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "text.png").write_text("this is not a picture\n")
    (bad / "bomb.png").write_bytes(bomb_png())
    (root / "notes.txt").write_text("not a photo suffix")
    return root


@pytest.fixture(scope="module")
def indexed(photo_folder, model_path, tmp_path_factory):
    """(index folder, report of the first run)."""
    directory = tmp_path_factory.mktemp("idx") / "index"
    with Index.create(directory, model_path, device="cpu") as index:
        report = index_folder(index, photo_folder, batch_size=4, workers=1, progress=False)
    return directory, report


def test_walk_skips_hidden_files_and_cuts_link_loops(photo_folder, tmp_path):
    found = [rel for rel, _ in walk_photos(photo_folder)]
    assert set(found) == {
        "a/1.jpg", "a/3.jpg", "a/5.jpg", "a/copy of 0.jpg", "b/0.jpg", "b/2.jpg", "b/4.jpg",
        "bad/bomb.png", "bad/text.png", "bad/truncated.jpg", "bad/zero.jpg", "broken.jpg", "link.jpg",
    }
    assert not any(rel.startswith("a/loop") for rel in found)
    assert [rel for rel, _ in walk_photos(photo_folder, exclude=(photo_folder / "bad",))].count("bad/zero.jpg") == 0


def test_folder_run_indexes_each_content_once_and_reports_bad_files(indexed):
    directory, report = indexed
    assert (report.files, report.new, report.described, report.failed) == (13, 12, N_PHOTOS, 4)  # + 1 unreadable
    reasons = dict(report.failures)
    assert set(reasons) == {"bad/zero.jpg", "bad/truncated.jpg", "bad/text.png", "bad/bomb.png", "broken.jpg"}
    assert "empty" in reasons["bad/zero.jpg"] and "truncated" in reasons["bad/truncated.jpg"]
    assert "not an image" in reasons["bad/text.png"] and "too many pixels" in reasons["bad/bomb.png"]
    assert "unreadable" in reasons["broken.jpg"]
    with Index.open(directory) as index:
        ids = index.catalog.indexed_ids()
        assert len(index) == len(ids) == N_PHOTOS == report.images
        assert np.array_equal(index.vectors.ids(), ids)
        manifest = read_manifest(directory)
        assert manifest["count"] == N_PHOTOS and manifest["index"]["factory"] == "Flat"
        assert manifest["revision"] == index.catalog.revision
        itself = index.search([index.get(int(ids[0])).path], k=1)
        assert itself.hits[0].id == ids[0] and itself.hits[0].score == pytest.approx(1.0, abs=2e-3)
        by_path = {p: r.id for r in index.catalog.records(ids.tolist(), index.resolve).values() for p in r.paths}
        assert by_path["a/copy of 0.jpg"] == by_path["b/0.jpg"] and by_path["link.jpg"] == by_path["a/1.jpg"]


def test_second_run_on_an_unchanged_folder_describes_nothing(indexed, photo_folder):
    directory, _ = indexed
    saved = read_manifest(directory)
    with Index.open(directory, writable=True) as index:
        report = index_folder(index, photo_folder, workers=0, progress=False)
    assert read_manifest(directory) == saved  # nothing changed: the faiss file is not rewritten
    assert (report.described, report.failed, report.new, report.changed) == (0, 0, 0, 0)
    assert report.unchanged == 12 and report.images == N_PHOTOS  # the broken link is re-checked each run


def test_new_edited_and_deleted_photos(sources, model_path, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        shutil.copy(sources[i], root / f"{i}.jpg")
    with Index.create(tmp_path / "index", model_path, device="cpu") as index:
        index_folder(index, root, workers=0, progress=False)
        first = {r.paths[0]: r.id for r in index.catalog.records(index.catalog.indexed_ids().tolist(), index.resolve).values()}
        shutil.copy(sources[3], root / "3.jpg")  # new
        shutil.copy(sources[4], root / "1.jpg")  # edited: other content under the same name
        (root / "2.jpg").unlink()  # deleted
        report = index_folder(index, root, workers=0, progress=False)
        assert (report.new, report.changed, report.pruned, report.described) == (1, 1, 0, 2)
        assert len(index) == 4  # without --prune the deleted photo stays
        report = index_folder(index, root, prune=True, workers=0, progress=False)
        assert (report.pruned, report.described, len(index)) == (1, 0, 3)
        now = {r.paths[0]: r.id for r in index.catalog.records(index.catalog.indexed_ids().tolist(), index.resolve).values()}
        assert set(now) == {"0.jpg", "1.jpg", "3.jpg"}
        assert now["0.jpg"] == first["0.jpg"] and now["1.jpg"] != first["1.jpg"]
        assert np.array_equal(index.vectors.ids(), index.catalog.indexed_ids())
        with pytest.raises(IndexStoreError, match="catalogues the photos of"):
            index_folder(index, tmp_path, progress=False)


def test_another_model_is_refused(indexed, model_path, tmp_path, monkeypatch, capsys):
    directory, _ = indexed
    other = netvlad.load_model(model_path)
    with torch.no_grad():
        other.pool.centroids.add_(1e-3)
    with pytest.raises(IndexStoreError, match="was built with model resnet18-layer3 K=16"):
        Index.open(directory, other)
    netvlad.save_model(other, tmp_path / "other.pt")
    query = Index.open(directory).get(1).path
    monkeypatch.setattr(sys, "argv", ["netvlad", "search", query, "--index", str(directory), "--model", str(tmp_path / "other.pt")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "was built with model" in err and "\n" not in err


def test_damaged_manifest_missing_faiss_file_and_stale_faiss_file(indexed, sources, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(indexed[0], directory, ignore=shutil.ignore_patterns(".lock"))
    expected = Index.open(directory).catalog.indexed_ids()
    for name in directory.glob("vectors-*.faiss"):
        name.unlink()  # lost: rebuilt from the catalog on open
    with Index.open(directory, writable=True) as index:
        assert np.array_equal(index.vectors.ids(), expected)
        new_id = index.add([sources[N_PHOTOS]])[0]  # durable in the catalog, faiss file not saved
    with Index.open(directory) as index:  # stale faiss file: brought up to date from the catalog
        assert new_id in index.vectors.ids() and len(index) == len(expected) + 1
    (directory / MANIFEST).write_text("{ not json")
    with pytest.raises(IndexStoreError, match="unreadable manifest"):
        Index.open(directory)
    (directory / MANIFEST).write_text(json.dumps({"format": "netvlad-index", "version": 99}))
    with pytest.raises(IndexStoreError, match="newer"):
        Index.open(directory)
    with pytest.raises(IndexStoreError, match="no such index folder"):
        Index.open(tmp_path / "nothing")
    with pytest.raises(IndexStoreError, match="not an index folder"):
        Index.open(tmp_path)


def test_one_writer_process_at_a_time(indexed):
    with Index.open(indexed[0], writable=True):
        with pytest.raises(IndexStoreError, match="another process is writing"):
            Index.open(indexed[0], writable=True)
        with Index.open(indexed[0]) as reader:  # readers need no lock
            assert len(reader) == N_PHOTOS


def test_add_get_remove_and_search_through_the_api(sources, model_path, tmp_path):
    with Index.create(tmp_path / "index", model_path, device="cpu") as index:
        data = sources[0].read_bytes()
        ids = index.add([data, sources[1], data], [{"lat": 47.1, "lon": 8.2, "camera": "x"}, None, None])
        assert ids[0] == ids[2] != ids[1] and len(index) == 2
        record = index.get(ids[0])
        assert (record.lat, record.lon, record.metadata, record.status) == (47.1, 8.2, {"camera": "x"}, "indexed")
        assert Path(record.path).read_bytes() == data and record.path.startswith(str(tmp_path / "index" / "uploads"))
        assert index.get(ids[1]).paths == [str(sources[1].resolve())]
        result = index.search([sources[0]], k=2)
        assert [h.id for h in result.hits][0] == ids[0] and result.hits[0].score == pytest.approx(1.0, abs=2e-3)
        assert result.location is not None and result.location.lat == pytest.approx(47.1, abs=1e-6)
        with pytest.raises(ImageError):
            index.add([sources[2], b"garbage"])
        assert len(index) == 2  # nothing of a failed call is kept
        assert index.remove([ids[0], ids[1], 12345]) == [ids[0], ids[1]]
        assert index.get(ids[0]) is None and index.get(ids[1]) is None and len(index) == 0
        assert not Path(record.path).exists()  # the uploaded copy is deleted, the photo file is not
        assert sources[1].exists()
        assert index.add([data])[0] > ids[1]  # a removed upload comes back as a new image
        assert index.add([sources[1]])[0] == ids[1]  # a removed file's tombstone is revived
        assert len(index) == 2 and np.array_equal(index.vectors.ids(), index.catalog.indexed_ids())
    with Index.open(tmp_path / "index") as index:
        assert len(index) == 2
        with pytest.raises(IndexStoreError, match="read-only"):
            index.add([data])


def test_searches_run_while_photos_are_added(sources, model_path, tmp_path):
    with Index.create(tmp_path / "index", model_path, device="cpu") as index:
        index.add(sources[:2])
        query = index.model.describe([sources[0]])
        errors, counts = [], []

        def search_loop():
            try:
                for _ in range(30):
                    result = index.search_descriptors(np.repeat(query, 2, axis=0), k=3)
                    counts.append(len(result.hits))
            except Exception as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=search_loop) for _ in range(3)]
        for thread in threads:
            thread.start()
        for source in sources[2:5]:
            index.add([source])
        index.remove([1])
        for thread in threads:
            thread.join()
        assert not errors and len(counts) == 90 and min(counts) >= 1
        assert np.array_equal(index.vectors.ids(), index.catalog.indexed_ids())


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_automatic_index_types():
    assert choose_spec(FLAT_LIMIT - 1, 4096) == IndexSpec("Flat", "ip", "")
    big = choose_spec(1_000_000, 4096)
    assert big.factory == "PCAR256,IVF4096,PQ64x4fs" and big.metric == "l2" and big.params == "nprobe=512"
    assert choose_spec(100_000, 128).factory == "IVF1024,PQ32x4fs"
    assert IndexSpec.parse("IDMap2,HNSW32") == IndexSpec("HNSW32", "ip", "efSearch=128")


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "PCAR32,IVF16,PQ16x4fs", "HNSW16"])
def test_vector_index_types_keep_catalog_ids(factory, tmp_path):
    x, ids = unit(2000, 64, 0), np.arange(1000, 3000, dtype=np.int64)
    spec = IndexSpec.parse(factory)
    vectors = VectorIndex.create(64, spec, x)
    vectors.add(ids, x)
    assert np.array_equal(vectors.ids(), ids)
    scores, found = vectors.search(x[:50], 5)
    exact = (x[:50] @ x.T).max(axis=1)
    assert (found[:, 0] == ids[:50]).mean() >= 0.9  # each vector finds itself
    if not spec.quantised:
        np.testing.assert_allclose(scores[:, 0], exact, atol=1e-4)
    vectors.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss", spec)
    assert np.array_equal(loaded.search(x[:5], 5)[1], found[:5])
    if factory.startswith("HNSW"):
        with pytest.raises(RuntimeError):
            loaded.remove(ids[:3])
    else:
        assert loaded.remove(np.array([1000, 1001, 99])) == 2 and len(loaded) == 1998
        assert 1000 not in loaded.search(x[:1], 5)[1]


def test_requested_type_falls_back_to_exact_until_it_can_be_trained(sources, model_path, tmp_path):
    with Index.create(tmp_path / "index", model_path, index_type="IVF64,PQ16", device="cpu") as index:
        index.add(sources[:3])
        index.save()
        assert index.spec.factory == "Flat" and read_manifest(index.directory)["index"]["requested"] == "IVF64,PQ16"
    with pytest.raises(IndexStoreError, match="bad index type"):
        VectorIndex.create(8, IndexSpec("NoSuchIndex", "ip"))


def test_cli_index_and_search(photo_folder, model_path, tmp_path, monkeypatch, capsys):
    def run(*args) -> str:
        monkeypatch.setattr(sys, "argv", ["netvlad", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 0, capsys.readouterr().err
        return capsys.readouterr().out

    directory = tmp_path / "index"
    report = json.loads(run("index", photo_folder, "--index", directory, "--model", model_path, "--json", "-q",
                            "--workers", "0", "--index-type", "HNSW16"))
    assert report["images"] == N_PHOTOS and report["index_type"] == "HNSW16" and len(report["failures"]) == 5
    text = run("index", photo_folder, "--index", directory, "-q")
    assert "0 new" in text and "described 0" in text and "5 files skipped" in text and "bad/zero.jpg" in text
    query = photo_folder / "a" / "3.jpg"
    result = json.loads(run("search", query, photo_folder / "b" / "2.jpg", query, "--index", directory,
                            "--top-k", "3", "--json", "--thumbnails", tmp_path / "sheet.png"))
    assert result["queries"] == 3 and len(result["hits"]) == 3 and result["location"] is None
    assert result["hits"][0]["path"] == str(query) and len(result["hits"][0]["query_scores"]) == 3
    assert Image.open(tmp_path / "sheet.png").size[0] > 0
    lines = run("search", query, "--index", directory, "-k", "2").splitlines()
    assert len(lines) == 2 and lines[0].split()[-1] == str(query)
    with Index.open(directory, writable=True) as index:  # HNSW cannot remove ids: rebuilt instead
        assert index.remove([index.search([query], k=1).hits[0].id]) and len(index) == N_PHOTOS - 1
        assert np.array_equal(index.vectors.ids(), index.catalog.indexed_ids())
    assert os.path.exists(directory / "model.pt")
