"""Sharded faiss build: on Ray (one local `ray.init(num_cpus=2)` for the module) it holds the same
ids as the single-process build and finds about the same neighbours; memory-mapped loading."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DescriptorStore
from netvlad.exif import PhotoInfo
from netvlad.shardbuild import add_rows, as_type_of, build_sharded, mergeable, partial_type, wants_sharded_build
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


@pytest.mark.parametrize("spec", [MERGEABLE, SPEC], ids=["ivfpq-merged-on-ray", "fast-scan-merged-as-ivfpq-on-ray"])
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
    assert partial_type(faiss.index_factory(DIM, "IVF16,RaBitQfs")) is None  # built in one process


@pytest.mark.parametrize("factory", ["IVF16,PQ8x4fs", "PCAR16,IVF16,PQ8x4fs"])
def test_fast_scan_built_in_plain_parts_equals_direct_adds(store, factory):
    """Partials as plain IVF-PQ (same quantizer and codebooks), merged, then repacked: the same
    ids, distances and neighbours as adding every shard to the fast-scan index itself."""
    store, x = store
    trained = VectorIndex.create(DIM, IndexSpec.parse(factory), x[:2000]).index
    direct = faiss.clone_index(trained)
    parts = store.live_rows()
    for part in parts:
        add_rows(direct, part)
    empty = faiss.serialize_index(partial_type(trained))
    partials = []
    for part in parts:
        partials.append(faiss.deserialize_index(empty))
        add_rows(partials[-1], part)
    for other in partials[1:]:
        faiss.extract_index_ivf(partials[0]).merge_from(faiss.extract_index_ivf(other), 0)
    built = as_type_of(partials[0], trained)
    del partials, trained  # the result owns everything it needs
    assert built.ntotal == direct.ntotal == N - 50
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(built)), faiss.IndexIVFPQFastScan)
    for index in (built, direct):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 4)
    d1, i1 = built.search(x[:200], 10)
    d2, i2 = direct.search(x[:200], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)


def test_memory_mapped_index_searches_like_the_loaded_one(store, tmp_path, monkeypatch):
    store, x = store
    monkeypatch.setattr("netvlad.shardbuild.ray_session", lambda: False)
    vectors = build_sharded(store, SPEC, tmp_path)  # shard after shard in this process
    vectors.save(tmp_path / "v.faiss")
    mapped = VectorIndex.load(tmp_path / "v.faiss", SPEC, mmap=True)
    assert len(mapped) == N - 50
    np.testing.assert_array_equal(mapped.search(x[:20], 5)[1], vectors.search(x[:20], 5)[1])
