"""Hard-negative mining (training.mining) against brute force, and the cache refresh schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netvlad.datasets.groundtruth import positives as geo_positives
from netvlad.datasets.groundtruth import sample_negatives
from training.mining import HardNegativeMiner

ND, NQ, DIM = 80, 12, 8


@pytest.fixture
def world():
    """Database and queries on a line every 7 m (positives within 25 m, potential ones within 10 m)
    and random unit descriptors."""
    rng = np.random.default_rng(0)
    db_utm = np.column_stack([np.arange(ND) * 7.0, np.zeros(ND)])
    q_utm = np.column_stack([rng.uniform(0, ND * 7.0, NQ), rng.uniform(-3, 3, NQ)])
    q_utm[-1] = (-500.0, 0.0)  # a query far from every database image
    db = rng.normal(size=(ND, DIM)).astype(np.float32)
    q = rng.normal(size=(NQ, DIM)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return {
        "potential": geo_positives(db_utm, q_utm, 10.0),
        "positives": geo_positives(db_utm, q_utm, 25.0),
        "db": db,
        "q": q,
    }


def brute_force(world, query, margin, k):
    """Best potential positive and the k nearest non-positives (all of them, and the violators)."""
    d2 = ((world["db"] - world["q"][query]) ** 2).sum(axis=1)
    potential = world["potential"][query]
    best = potential[np.argmin(d2[potential])]
    negatives = np.setdiff1d(np.arange(ND), world["positives"][query])
    nearest = negatives[np.argsort(d2[negatives], kind="stable")][:k]
    violating = nearest[d2[nearest] < d2[best] + margin]
    return best, nearest, violating


def make_miner(world, **kwargs) -> HardNegativeMiner:
    miner = HardNegativeMiner(world["potential"], world["positives"], ND, **kwargs)
    miner.refresh(world["db"], world["q"])
    return miner


@pytest.mark.parametrize("violating_only", [False, True])
def test_mined_negatives_are_the_nearest_non_positives(world, violating_only):
    margin, k = 0.6, 6
    miner = make_miner(world, num_random=ND, max_negatives=k, margin=margin, violating_only=violating_only)
    rng = np.random.default_rng(1)
    checked = 0
    for query in range(NQ - 1):
        best, nearest, violating = brute_force(world, query, margin, k)
        mined = miner.mine(query, rng)
        expected = violating if violating_only else nearest
        if len(expected) == 0:
            assert mined is None
            continue
        checked += 1
        assert mined.positives.tolist() == [best]
        assert mined.negatives.tolist() == expected.tolist()
        assert mined.violating == len(violating)
        assert miner.hard_negatives[query].tolist() == nearest.tolist()
        assert not np.isin(mined.negatives, world["positives"][query]).any()
    assert checked >= 5


def test_candidates_are_random_sample_plus_cached_hard_negatives(world):
    k, draws = 4, 10
    miner = make_miner(world, num_random=draws, max_negatives=k, violating_only=False)
    query = 3
    d2 = ((world["db"] - world["q"][query]) ** 2).sum(axis=1)
    first = miner.mine(query, np.random.default_rng(5))
    sample1 = sample_negatives(np.random.default_rng(5), ND, world["positives"][query], draws)
    assert first.negatives.tolist() == sample1[np.argsort(d2[sample1], kind="stable")][:k].tolist()

    second = miner.mine(query, np.random.default_rng(6))
    sample2 = sample_negatives(np.random.default_rng(6), ND, world["positives"][query], draws)
    pool = np.union1d(first.negatives, sample2)
    assert second.negatives.tolist() == pool[np.argsort(d2[pool], kind="stable")][:k].tolist()
    assert d2[second.negatives].max() <= d2[first.negatives].max()

    only_cache = make_miner(world, num_random=0, max_negatives=k, violating_only=False)
    only_cache.load_state_dict(miner.state_dict())
    assert only_cache.mine(query, np.random.default_rng(0)).negatives.tolist() == second.negatives.tolist()


def test_query_without_potential_positive_is_skipped(world):
    miner = make_miner(world)
    assert miner.mine(NQ - 1, np.random.default_rng(0)) is None


def test_soft_positives_best_first_then_nearest(world):
    miner = make_miner(world, num_random=ND, max_negatives=3, max_positives=3, violating_only=False)
    for query in range(NQ - 1):
        mined = miner.mine(query, np.random.default_rng(0))
        d2 = ((world["db"] - world["q"][query]) ** 2).sum(axis=1)
        best, _, _ = brute_force(world, query, 0.1, 3)
        others = np.setdiff1d(world["positives"][query], [best])
        expected = [best, *others[np.argsort(d2[others], kind="stable")][:2]]
        assert mined.positives.tolist() == expected


def test_refresh_replaces_only_the_given_queries(world):
    miner = make_miner(world)
    new_q = -world["q"][[2, 5]]
    miner.refresh(world["db"], new_q, queries=[2, 5])
    assert torch.equal(miner.q_desc[[2, 5]], torch.from_numpy(new_q))
    assert torch.equal(miner.q_desc[3], torch.from_numpy(world["q"][3]))
    assert miner.refreshes == 2
    with pytest.raises(ValueError, match="database descriptors"):
        miner.refresh(world["db"][:5], world["q"])


def test_mine_before_refresh_is_an_error(world):
    miner = HardNegativeMiner(world["potential"], world["positives"], ND)
    with pytest.raises(RuntimeError, match="refresh"):
        miner.mine(0, np.random.default_rng(0))
