"""α-query expansion and database-side augmentation: formulas against plain re-derivations, the
chunked DBA path, a descriptor store as input, and DBA storage."""

from __future__ import annotations

import numpy as np
import pytest

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DescriptorStore
from netvlad.exif import PhotoInfo
from netvlad.rerank.expansion import (
    alpha_qe, database_augment, expand_and_rescore, load_dba, remove_dba, save_dba,
)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_alpha_qe_formula():
    rng = np.random.default_rng(0)
    q, neighbours = unit(rng, 1, 16)[0], unit(rng, 4, 16)
    sims = np.array([0.9, 0.5, -0.2, 0.1], np.float32)
    expected = q.astype(np.float64).copy()
    for s, d in zip(sims, neighbours):
        expected += max(s, 0.0) ** 3 * d
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(alpha_qe(q, neighbours, sims, alpha=3.0), expected, atol=1e-6)
    # α = 0 weights every non-negative neighbour 1 (0⁰ = 1 for a clipped similarity too)
    plain = q + neighbours.sum(axis=0)
    np.testing.assert_allclose(alpha_qe(q, neighbours, np.ones(4), alpha=0.0), plain / np.linalg.norm(plain), atol=1e-6)
    with pytest.raises(ValueError, match="α-QE needs"):
        alpha_qe(q, neighbours, sims[:3])


def test_expansion_lifts_a_candidate_close_to_the_top_results():
    # the query sits between a cluster (its top results) and a lone vector; expansion moves it to
    # the cluster, so the cluster's far member overtakes the lone vector
    rng = np.random.default_rng(1)
    centre = unit(rng, 1, 32)[0]
    cluster = centre + 0.05 * rng.standard_normal((3, 32)).astype(np.float32)
    far_member = centre + 0.5 * rng.standard_normal(32).astype(np.float32)
    lone = unit(rng, 1, 32)[0]
    pool = np.vstack([cluster, lone, far_member])
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    query = pool[0] * 0.6 + pool[3] * 0.5
    query /= np.linalg.norm(query)
    before = np.argsort(-(pool @ query), kind="stable")
    order, scores = expand_and_rescore(query, pool[before], n=3, alpha=3.0)
    moved = before[order]
    assert list(moved).index(4) < list(moved).index(3)
    top = pool[before][:3]
    expanded = alpha_qe(query, top, top @ query)
    np.testing.assert_allclose(scores, np.sort(pool @ expanded)[::-1], atol=1e-6)


def dba_reference(x, k, alpha):
    x = x.astype(np.float64)
    sims = x @ x.T
    out = np.empty_like(x)
    for i in range(len(x)):
        top = np.argsort(-sims[i], kind="stable")[:k]
        v = (np.clip(sims[i, top], 0, None) ** alpha) @ x[top]
        out[i] = v / np.linalg.norm(v)
    return out


@pytest.mark.parametrize("chunk_rows", [1000, 13])  # 13: a last chunk of 1 row, fewer than k
def test_dba_matches_brute_force(chunk_rows):
    rng = np.random.default_rng(2)
    x = unit(rng, 40, 24)
    ids, out = database_augment((np.arange(100, 140), x.astype(np.float16)), k=4, alpha=3.0, chunk_rows=chunk_rows)
    assert out.dtype == np.float16 and out.shape == (40, 24)
    np.testing.assert_array_equal(ids, np.arange(100, 140))
    np.testing.assert_allclose(out, dba_reference(x.astype(np.float16).astype(np.float32), 4, 3.0), atol=2e-3)
    assert np.abs(out.astype(np.float32) - x).max() > 0.05  # it did change the vectors
    _, alone = database_augment(x, k=1)
    np.testing.assert_allclose(alone, x, atol=1e-3)  # k = 1: each vector is its own neighbour


def test_dba_reads_a_descriptor_store(tmp_path):
    rng = np.random.default_rng(3)
    catalog = Catalog(tmp_path / "catalog.sqlite")
    image_ids = [catalog.record_file(f"{i}.jpg", "folder", 1, 1, f"s{i}", PhotoInfo()) for i in range(30)]
    store = DescriptorStore(tmp_path / "descriptors", catalog, 16)
    x = unit(rng, 30, 16)
    store.append(image_ids[:20], x[:20])
    store.append(image_ids[20:], x[20:])
    ids, out = database_augment(store, k=3, alpha=3.0, chunk_rows=8)
    assert sorted(ids) == sorted(image_ids)
    stored = store.descriptors(ids)
    np.testing.assert_allclose(out, dba_reference(stored, 3, 3.0), atol=2e-3)
    catalog.close()


def test_dba_save_load_remove_and_missing_ids(tmp_path):
    rng = np.random.default_rng(4)
    x = unit(rng, 10, 8)
    ids = np.array([5, 3, 9, 1, 7, 2, 8, 4, 6, 0]) + 10
    assert load_dba(tmp_path) is None
    folder = save_dba(tmp_path, ids, x.astype(np.float16), k=3, alpha=3.0, revision=12)
    assert sorted(p.name for p in folder.iterdir()) == ["dba.json", "descriptors.npy", "ids.npy"]
    dba = load_dba(tmp_path)
    assert isinstance(dba.vectors, np.memmap) and (dba.k, dba.alpha, dba.revision) == (3, 3.0, 12)
    assert not dba.is_stale(12) and dba.is_stale(13)
    rows, found = dba.descriptors([19, 99, 15, 10, 3])
    np.testing.assert_array_equal(found, [True, False, True, True, False])
    np.testing.assert_allclose(rows[found], x[[2, 0, 9]], atol=1e-3)
    np.testing.assert_array_equal(rows[~found], 0)
    # an interrupted save (no dba.json yet) reads as no DBA; a complete one replaces the old
    (folder / "dba.json").unlink()
    assert load_dba(tmp_path) is None
    save_dba(tmp_path, ids[:4], x[:4], k=2, alpha=1.0)
    assert len(load_dba(tmp_path).ids) == 4 and load_dba(tmp_path).revision is None
    assert remove_dba(tmp_path) and not (tmp_path / "dba").exists()
    assert not remove_dba(tmp_path) and load_dba(tmp_path) is None
