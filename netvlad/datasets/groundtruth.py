"""Geographic ground truth of a place dataset.

A query's positives are the database images within `radius_m` metres (25 m by default), its
potential positives for triplet training those within 10 m, and its negatives the database
images beyond 25 m. Coordinates are (N, 2) arrays of easting, northing in metres. Negatives are
never materialised (Nq × Nd would not fit for Pittsburgh-sized sets): callers keep the
positives within 25 m as the query's excluded set and draw negatives with `sample_negatives`.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

POSITIVE_RADIUS_M = 25.0
POTENTIAL_POSITIVE_RADIUS_M = 10.0


def positives(db_utm: np.ndarray, q_utm: np.ndarray, radius_m: float = POSITIVE_RADIUS_M) -> list[np.ndarray]:
    """Per query, the indices (int64) of database points within `radius_m` metres (distance ≤
    radius), nearest first. db_utm: (Nd, 2), q_utm: (Nq, 2) metres; returns Nq arrays."""
    db_utm, q_utm = _points(db_utm, "db_utm"), _points(q_utm, "q_utm")
    if radius_m <= 0:
        raise ValueError(f"radius_m must be positive, got {radius_m}")
    if len(db_utm) == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(len(q_utm))]
    index = NearestNeighbors().fit(db_utm)
    _, neighbours = index.radius_neighbors(q_utm, radius=radius_m, sort_results=True)
    return [n.astype(np.int64, copy=False) for n in neighbours]


def potential_positives(
    db_utm: np.ndarray, q_utm: np.ndarray, radius_m: float = POTENTIAL_POSITIVE_RADIUS_M
) -> list[np.ndarray]:
    """The triplet loss's potential positives: database points within 10 m, nearest first."""
    return positives(db_utm, q_utm, radius_m)


def queries_without_positives(positive_sets: list[np.ndarray]) -> np.ndarray:
    """Indices of the queries whose positive set is empty (training skips and reports them)."""
    return np.flatnonzero([len(p) == 0 for p in positive_sets]).astype(np.int64)


def sample_negatives(
    rng: np.random.Generator, num_db: int, excluded: np.ndarray, count: int
) -> np.ndarray:
    """Draw up to `count` distinct database indices in [0, num_db) not in `excluded` (a query's
    positives within 25 m), by rejection: memory O(count), not O(num_db). Returns fewer only when
    fewer than `count` negatives exist."""
    excluded = np.unique(np.asarray(excluded, dtype=np.int64))
    available = num_db - len(excluded)
    count = min(count, available)
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    if count * 4 > available:  # dense request: rejection would spin, a permutation is cheap
        pool = np.setdiff1d(np.arange(num_db, dtype=np.int64), excluded, assume_unique=True)
        return rng.choice(pool, size=count, replace=False)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < count:
        draw = rng.integers(0, num_db, size=2 * (count - len(chosen)) + 8)
        draw = draw[~np.isin(draw, excluded)]
        chosen = np.concatenate([chosen, draw])
        _, first = np.unique(chosen, return_index=True)
        chosen = chosen[np.sort(first)]
    return chosen[:count]


def _points(array: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(array, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) (easting, northing), got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return points
