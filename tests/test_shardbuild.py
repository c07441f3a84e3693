"""Sharded faiss build: on Ray (one local `ray.init(num_cpus=2)` for the module) it holds the same
ids as the single-process build and finds about the same neighbours; memory-mapped loading."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DescriptorStore
from netvlad.exif import PhotoInfo
from netvlad.shardbuild import build_sharded, mergeable, wants_sharded_build
from netvlad.vectorindex import IndexSpec, VectorIndex

N, DIM, SHARD = 3000, 32, 700
SPEC = IndexSpec.parse("IVF16,PQ8x4fs")
MERGEABLE = IndexSpec.parse("IVF16,PQ8")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    catalog = Catalog(folder / "catalog.sqlite")
    with catalog.transaction():
        ids = [catalog.record_file(f"{i}.jpg", "folder", 1, 1, f"s{i}", PhotoInfo()) for i in range(N)]
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((40, DIM)))
    x = unit(centres[rng.integers(0, 40, N)] + 0.5 * unit(rng.standard_normal((N, DIM))))
    for start in range(0, N, SHARD):
        DescriptorStore(folder / "descriptors", catalog, DIM).append(ids[start : start + SHARD], x[start : start + SHARD])
    catalog.remove(ids[:50])  # dead rows are left out
    yield DescriptorStore(folder / "descriptors", catalog, DIM), x
    catalog.close()


@pytest.mark.parametrize("spec", [MERGEABLE, SPEC], ids=["ivfpq-merged-on-ray", "fast-scan-added-in-order"])
def test_ray_build_equals_the_single_process_build(store, ray_session, tmp_path, spec):
    store, x = store
    assert wants_sharded_build(spec, N)  # a Ray session is up
    merged = build_sharded(store, spec, tmp_path)
    assert not list(tmp_path.iterdir())  # the partial indexes are gone
    ids = store.catalog.indexed_ids()
    single = VectorIndex.create(DIM, spec, store.descriptors(ids))
    single.add(ids, store.descriptors(ids))
    assert np.array_equal(merged.ids(), ids) and np.array_equal(single.ids(), ids)
    queries = x[100:300]
    _, a = merged.search(queries, 10)
    _, b = single.search(queries, 10)
    truth = np.argsort(-(queries @ x[50:].T), axis=1)[:, :10] + 51
    recall = [np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) for found in (a, b)]
    assert abs(recall[0] - recall[1]) < 0.1 and recall[0] > 0.3, recall


def test_fast_scan_lists_are_never_merged():
    """merge_from corrupts block-packed fast-scan lists; plain IVF-PQ lists merge exactly."""
    assert mergeable(faiss.index_factory(DIM, "IVF16,PQ8"))
    assert not mergeable(faiss.index_factory(DIM, "IVF16,PQ8x4fs"))
    assert not mergeable(faiss.index_factory(DIM, "PCAR16,IVF16,PQ8x4fs"))


def test_memory_mapped_index_searches_like_the_loaded_one(store, tmp_path, monkeypatch):
    store, x = store
    monkeypatch.setattr("netvlad.shardbuild.ray_session", lambda: False)
    vectors = build_sharded(store, SPEC, tmp_path)  # shard after shard in this process
    vectors.save(tmp_path / "v.faiss")
    mapped = VectorIndex.load(tmp_path / "v.faiss", SPEC, mmap=True)
    assert len(mapped) == N - 50
    np.testing.assert_array_equal(mapped.search(x[:20], 5)[1], vectors.search(x[:20], 5)[1])
