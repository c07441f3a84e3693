"""Hard-negative mining from a descriptor cache (docs/design.md §4).

The cache holds database (Nd, D) and query (Nq, D) descriptors computed by the model at the last
`refresh` (the training loop refreshes it every `--cache-refresh` queries). For a query, the best
positive is its potential positive (within 10 m) nearest in descriptor space; the candidate
negatives are `num_random` random database images beyond the positive radius plus the query's
cached hard negatives from the last time it was mined; the hardest `max_negatives` of them (nearest
in descriptor space, via `select_violating_negatives`) become its new cached hard negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from netvlad.datasets.groundtruth import sample_negatives
from netvlad.losses import select_violating_negatives


@dataclass(frozen=True)
class MinedTuple:
    """One query's training tuple, as database indices (int64), hardest/nearest first.

    `positives`: the best potential positive first, then further positives (soft loss only);
    `negatives`: the mined negatives (triplet loss: only those violating the margin in the cache);
    `violating`: how many of the mined negatives violate the margin in the cache.
    """

    query: int
    positives: np.ndarray
    negatives: np.ndarray
    violating: int


class HardNegativeMiner:
    """Mines positives and hard negatives for queries from cached descriptors.

    Args:
        potential_positives: per query, database indices within 10 m (the triplet positives).
        positives: per query, database indices within the positive radius (25 m): never negatives.
        num_db: Nd, database size.
        num_random: random negatives drawn per query (fewer when fewer exist).
        max_negatives: negatives kept per query, and size of its hard-negative cache.
        margin: triplet margin m (squared descriptor units) deciding which negatives violate.
        max_positives: positives returned per query (1 for triplet/RSW; the soft loss uses more),
            the best potential positive first, then the other positives nearest in descriptor space.
        violating_only: return only margin-violating negatives (triplet loss).
    """

    def __init__(
        self,
        potential_positives: Sequence[np.ndarray],
        positives: Sequence[np.ndarray],
        num_db: int,
        num_random: int = 1000,
        max_negatives: int = 10,
        margin: float = 0.1,
        max_positives: int = 1,
        violating_only: bool = True,
    ):
        if len(potential_positives) != len(positives):
            raise ValueError(f"{len(potential_positives)} potential-positive sets but {len(positives)} positive sets")
        if num_random < 0 or max_negatives < 1 or max_positives < 1:
            raise ValueError("num_random must be >= 0, max_negatives and max_positives >= 1")
        self.potential_positives = [np.asarray(p, dtype=np.int64) for p in potential_positives]
        self.positives = [np.asarray(p, dtype=np.int64) for p in positives]
        self.num_db = int(num_db)
        self.num_random = int(num_random)
        self.max_negatives = int(max_negatives)
        self.margin = float(margin)
        self.max_positives = int(max_positives)
        self.violating_only = violating_only
        self.hard_negatives = np.full((len(positives), self.max_negatives), -1, dtype=np.int64)
        self.db_desc: torch.Tensor | None = None
        self.q_desc: torch.Tensor | None = None
        self.refreshes = 0
        self.queries_mined = 0

    def refresh(self, db_desc: np.ndarray, q_desc: np.ndarray, queries: Sequence[int] | None = None) -> None:
        """Replace the cache: all database descriptors (Nd, D) and the descriptors (len(queries), D)
        of `queries` (default: all Nq queries, in order)."""
        db = torch.as_tensor(np.asarray(db_desc, dtype=np.float32))
        if db.shape[0] != self.num_db:
            raise ValueError(f"expected {self.num_db} database descriptors, got {db.shape[0]}")
        rows = np.arange(len(self.positives)) if queries is None else np.asarray(queries, dtype=np.int64)
        q = torch.as_tensor(np.asarray(q_desc, dtype=np.float32))
        if q.shape != (len(rows), db.shape[1]):
            raise ValueError(f"expected query descriptors of shape {(len(rows), db.shape[1])}, got {tuple(q.shape)}")
        if self.q_desc is None or self.q_desc.shape[1] != db.shape[1]:
            self.q_desc = torch.full((len(self.positives), db.shape[1]), float("nan"))
        self.db_desc = db
        self.q_desc[torch.as_tensor(rows)] = q
        self.refreshes += 1

    def mine(self, query: int, rng: np.random.Generator) -> MinedTuple | None:
        """Mine one query's tuple from the cache; None when it has no potential positive, or (with
        `violating_only`) when no candidate negative violates the margin. Updates the query's
        hard-negative cache."""
        if self.db_desc is None or self.q_desc is None:
            raise RuntimeError("mine() before refresh(): the descriptor cache is empty")
        self.queries_mined += 1
        potential = self.potential_positives[query]
        if len(potential) == 0:
            return None
        q = self.q_desc[query]
        if torch.isnan(q).any():
            raise RuntimeError(f"query {query} is not in the descriptor cache (refresh with it first)")
        pos_d2 = self._dist2(q, potential)
        best = int(potential[int(pos_d2.argmin())])
        others = np.setdiff1d(self.positives[query], [best])
        if self.max_positives > 1 and len(others):
            others = others[torch.argsort(self._dist2(q, others), stable=True).numpy()]
        positives = np.concatenate([[best], others[: self.max_positives - 1]]).astype(np.int64)

        cached = self.hard_negatives[query]
        random = sample_negatives(rng, self.num_db, self.positives[query], self.num_random)
        candidates = np.concatenate([cached[cached >= 0], random])
        candidates = candidates[np.sort(np.unique(candidates, return_index=True)[1])]
        if len(candidates) == 0:
            return None
        neg_d2 = self._dist2(q, candidates)
        order, valid = select_violating_negatives(
            pos_d2.min().reshape(1), neg_d2.reshape(1, -1), self.margin, self.max_negatives
        )
        nearest = candidates[order[0].numpy()]
        valid = valid[0].numpy()
        self.hard_negatives[query] = -1
        self.hard_negatives[query, : len(nearest)] = nearest
        negatives = nearest[valid] if self.violating_only else nearest
        if len(negatives) == 0:
            return None
        return MinedTuple(query, positives, negatives.astype(np.int64), int(valid.sum()))

    def _dist2(self, q: torch.Tensor, db_indices: np.ndarray) -> torch.Tensor:
        """(len(db_indices),) squared Euclidean distances from cached query descriptor q (D,)."""
        return (self.db_desc[torch.as_tensor(db_indices)] - q).pow(2).sum(dim=1)

    def state_dict(self) -> dict:
        """What the run state needs to mine exactly as before: the hard-negative cache and counters."""
        return {
            "hard_negatives": torch.from_numpy(self.hard_negatives.copy()),
            "refreshes": self.refreshes,
            "queries_mined": self.queries_mined,
        }

    def load_state_dict(self, state: dict) -> None:
        hard = state["hard_negatives"].numpy()
        if hard.shape != self.hard_negatives.shape:
            raise ValueError(f"hard-negative cache {hard.shape} does not match {self.hard_negatives.shape}")
        self.hard_negatives = hard.astype(np.int64).copy()
        self.refreshes = int(state["refreshes"])
        self.queries_mined = int(state["queries_mined"])
