"""Descriptor shards: append and read (memory-mapped, as the BLOBs read), crash consistency,
compaction, and the one-time migration of a folder whose catalog holds descriptor BLOBs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DTYPE, DescriptorStore
from netvlad.errors import IndexStoreError
from netvlad.exif import PhotoInfo
from netvlad.index import Index
from netvlad.indexfolder import CATALOG
from tests.service_support import small_index

INFO = PhotoInfo(width=640, height=480)


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def new_store(folder: Path, n: int, dim: int = 16) -> tuple[DescriptorStore, list[int]]:
    catalog = Catalog(folder / CATALOG)
    ids = [catalog.record_file(f"{i}.jpg", "folder", 1, 1, f"s{i}", INFO) for i in range(n)]
    return DescriptorStore(folder / "descriptors", catalog, dim), ids


def test_append_and_read_memory_mapped_in_float16_and_bump_the_revision(tmp_path):
    store, ids = new_store(tmp_path, 5, 64)
    x = unit_rows(5, 64)
    before = store.catalog.revision
    path = store.append(ids[:3], x[:3])
    assert store.catalog.revision == before + 1 and store.catalog.indexed_ids().tolist() == ids[:3]
    got = store.descriptors([ids[2], ids[0]])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x[[2, 0]].astype(DTYPE).astype(np.float32))  # what a BLOB held
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.dtype == DTYPE and mapped.shape == (3, 64)
    with pytest.raises(IndexStoreError, match="no descriptor"):
        store.descriptors([ids[4]])
    with pytest.raises(ValueError, match="descriptors"):
        store.append(ids[3:], x[3:, :8])
    store.catalog.close()


def test_compaction_merges_small_shards_and_drops_dead_rows(tmp_path):
    store, ids = new_store(tmp_path, 40)
    x = unit_rows(40, 16)
    for start in range(0, 40, 4):
        store.append(ids[start : start + 4], x[start : start + 4])
    store.catalog.remove(ids[:10])
    store.append(ids[20:22], x[:2])  # re-described: the old rows die
    assert len(list(store.folder.glob("shard-*.npy"))) == 11
    assert store.compact() == 11
    assert len(list(store.folder.glob("shard-*.npy"))) == 1 and store.compact() == 0
    live = store.catalog.indexed_ids()
    assert live.tolist() == ids[10:]
    expected = x[10:].copy()
    expected[10:12] = x[:2]
    np.testing.assert_allclose(store.descriptors(live), expected, atol=1e-3)
    assert sum(len(p.ids) for p in store.live_rows()) == 30
    store.catalog.close()


KILLED_APPEND = """
import os, signal, sys
import numpy as np
from pathlib import Path
from netvlad.catalog import Catalog
from netvlad.descriptorstore import DescriptorStore
folder = Path(sys.argv[1])
catalog = Catalog(folder / "catalog.sqlite")
store = DescriptorStore(folder / "descriptors", catalog, 16)
catalog.bump = lambda conn: os.kill(os.getpid(), signal.SIGKILL)  # dies inside the transaction
store.append([2], np.ones((1, 16), np.float32))
"""


def test_a_run_killed_between_shard_file_and_commit_loses_and_duplicates_nothing(tmp_path):
    store, ids = new_store(tmp_path, 2)
    store.append(ids[:1], unit_rows(1, 16))
    store.catalog.close()
    proc = subprocess.run([sys.executable, "-c", KILLED_APPEND, str(tmp_path)], cwd=Path(__file__).parents[1])
    assert proc.returncode == -signal.SIGKILL
    assert len(list(store.folder.glob("shard-*.npy"))) == 2  # written, never committed
    catalog = Catalog(tmp_path / CATALOG)
    store = DescriptorStore(tmp_path / "descriptors", catalog, 16)
    assert catalog.counts()["indexed"] == 1 and catalog.status(ids[1]) == "pending"
    assert len(store.recover()) == 1 and len(list(store.folder.glob("shard-*.npy"))) == 1
    store.append(ids[1:], unit_rows(1, 16, seed=1))  # the rerun
    assert catalog.indexed_ids().tolist() == ids and len(store.live_rows()) == 2
    catalog.close()


def make_blob_folder(index_dir: Path) -> dict[int, np.ndarray]:
    """Turn an index folder into the schema-1 layout (descriptors as float16 BLOBs in the catalog,
    no shard files), as netvlad wrote it before shards; returns id → stored descriptor."""
    with Index.open(index_dir) as index:
        ids = index.catalog.indexed_ids()
        stored = dict(zip(ids.tolist(), index.store.descriptors(ids, DTYPE)))
    catalog = Catalog(index_dir / CATALOG)
    with catalog.transaction() as conn:
        conn.execute("ALTER TABLE images ADD COLUMN descriptor BLOB")
        conn.executemany("UPDATE images SET descriptor=? WHERE id=?", ((x.tobytes(), i) for i, x in stored.items()))
        conn.execute("DELETE FROM shards")
        conn.execute("ALTER TABLE images DROP COLUMN shard")
        conn.execute("ALTER TABLE images DROP COLUMN row")
        conn.execute("DROP TABLE shards")
        conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    catalog.close()
    for path in (index_dir / "descriptors").iterdir():
        path.unlink()
    return stored


def test_an_old_folder_with_descriptor_blobs_migrates_once_losing_nothing(tmp_path_factory, real_photos, caplog):
    index_dir = small_index(tmp_path_factory, real_photos, "blobs")
    stored = make_blob_folder(index_dir)
    with pytest.raises(IndexStoreError, match="older netvlad.*migrate"):
        Index.open(index_dir)  # read-only cannot migrate
    with caplog.at_level(logging.WARNING, logger="netvlad.legacyblobs"), Index.open(index_dir, writable=True) as index:
        ids = list(stored)
        np.testing.assert_array_equal(index.store.descriptors(ids, DTYPE), np.stack(list(stored.values())))
        assert index.catalog.indexed_ids().tolist() == sorted(ids) and len(index) == len(ids)
        columns = {row[1] for row in index.catalog.connection.execute("PRAGMA table_info(images)")}
        assert "descriptor" not in columns and index.catalog.get_meta("schema_version") == "2"
    assert f"moved {len(ids)} descriptors" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="netvlad.legacyblobs"), Index.open(index_dir) as index:
        assert index.search_descriptors(np.stack(list(stored.values()))[:1].astype(np.float32), k=1).hits[0].id == ids[0]
    assert "moved" not in caplog.text and os.listdir(index_dir / "descriptors")
