"""Re-ranking the top of a global search with local evidence: which methods exist, and applying
one to a search result (`rerank_result`).

    geometric  local features (SIFT → RootSIFT, or ORB) of the query photos and of each
               candidate, mutual nearest neighbours, RANSAC (OpenCV USAC); inliers re-order
               the shortlist (`netvlad.rerank.geometric`)
    patch      NetVLAD vectors of square patches of the model's own feature map, mutual nearest
               neighbours and RANSAC on the patch centres (`netvlad.rerank.patch`)
    aqe        α-weighted query expansion over the shortlist (`netvlad.rerank.expansion`)

The first two need evidence stored at index time (`netvlad index --local-features sift|orb`,
``--patch-features``); ``aqe`` needs only the stored descriptors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from netvlad.rerank.expansion import alpha_qe
from netvlad.rerank.geometric import MIN_INLIERS, Verification, geometric_rerank, reorder
from netvlad.rerank.localfeatures import LocalFeatures
from netvlad.rerank.patch import GLOBAL_WEIGHT, PatchFeatures, PatchMatch, patch_rerank
from netvlad.search import Rerank, SearchResult, estimate_location, fuse_scores

if TYPE_CHECKING:
    from netvlad.descriptorstore import DescriptorStore
    from netvlad.rerank.indexevidence import IndexEvidence

RERANK_METHODS = ("none", "geometric", "patch", "aqe")
#: Candidates re-ranked by default (the top of the global ranking).
DEFAULT_RERANK_K = 50
#: Matched points kept per hit for display.
MAX_POINTS = 200
#: Candidates verified geometrically per query photo get this many seconds in all (then the rest
#: keep their global order among the unverified).
GEOMETRIC_BUDGET_S = 1.0
#: Lowe's ratio test on the mutual nearest neighbours: most wrong candidates keep too few matches
#: to need RANSAC at all (3–4 ms a pair instead of 5–20 on this project's 2-core CPU).
GEOMETRIC_RATIO = 0.85
#: α-QE: neighbours the query is expanded with, and the power of their similarities.
AQE_NEIGHBOURS = 5
AQE_ALPHA = 3.0
#: Methods that need the query photos themselves, not only their descriptors.
NEEDS_PICTURES = ("geometric", "patch")


def check_method(method: str) -> None:
    """`ValueError` for an unknown re-ranking method."""
    if method not in RERANK_METHODS:
        raise ValueError(f"rerank must be one of {RERANK_METHODS}, not {method!r}")


def _original_size(features: LocalFeatures) -> tuple[int, int]:
    """(w, h) of the picture `features` were found in, before their own shrinking."""
    return round(features.size[0] / features.scale), round(features.size[1] / features.scale)


def _points(points: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(points, np.float32)[:MAX_POINTS], 1).tolist()


def geometric_order(queries: Sequence[LocalFeatures], candidates: Sequence[tuple[int, LocalFeatures | None]],
                    min_inliers: int = MIN_INLIERS, budget_s: float | None = GEOMETRIC_BUDGET_S,
                    threads: int = 2, ratio: float | None = GEOMETRIC_RATIO) -> list[tuple[int, Rerank | None]]:
    """Candidates (id, features or None; global order) re-ordered by their best verification
    against any of the query photos' features (`netvlad.rerank.geometric.reorder`)."""
    best: list[tuple[int, Verification] | None] = [None] * len(candidates)
    position = {int(image_id): i for i, (image_id, _) in enumerate(candidates)}
    for q, features in enumerate(queries):
        for hit in geometric_rerank(features, candidates, min_inliers, threads, budget_s, ratio=ratio):
            i, found = position[hit.id], hit.verification
            if found is not None and (best[i] is None or found.strength(min_inliers) > best[i][1].strength(min_inliers)):
                best[i] = (q, found)
    order = reorder([None if b is None else b[1] for b in best], min_inliers)
    return [(int(candidates[i][0]), None if best[i] is None else Rerank(
        "geometric", float(best[i][1].inliers), best[i][1].passes(min_inliers), best[i][0], best[i][1].model,
        _original_size(queries[best[i][0]]), _points(best[i][1].points))) for i in order]


def patch_order(queries: Sequence[PatchFeatures], candidates: Sequence[tuple[int, PatchFeatures | None]],
                global_scores: Sequence[float] | None = None, global_weight: float = GLOBAL_WEIGHT
                ) -> list[tuple[int, Rerank | None]]:
    """Candidates (id, patch features or None; global order, with their global similarities
    `global_scores`) re-ordered by their best score against any query photo
    (`netvlad.rerank.patch.patch_rerank`); those without features keep their global order after
    the scored ones."""
    best: dict[int, tuple[int, PatchMatch]] = {}
    for q, features in enumerate(queries):
        ranking = patch_rerank(features, candidates, global_scores=global_scores, global_weight=global_weight)
        for image_id, match in zip(ranking.ids, ranking.matches):
            if match is not None and (image_id not in best or match.score > best[image_id][1].score):
                best[image_id] = (q, match)
    scored = sorted((i for i, (image_id, _) in enumerate(candidates) if image_id in best),
                    key=lambda i: -best[candidates[i][0]][1].score)
    rest = [i for i, (image_id, _) in enumerate(candidates) if image_id not in best]
    out = []
    for i in scored + rest:
        image_id = int(candidates[i][0])
        found = best.get(image_id)
        out.append((image_id, None if found is None else Rerank(
            "patch", float(found[1].score), True, found[0], None, queries[found[0]].image_size, _points(found[1].points))))
    return out


def aqe_order(queries: np.ndarray, ids: Sequence[int], descriptors: np.ndarray, fusion: str,
              neighbours: int = AQE_NEIGHBOURS, alpha: float = AQE_ALPHA) -> list[tuple[int, Rerank]]:
    """Candidates `ids` (global order, (c, dim) `descriptors`) re-scored by the α-expanded query
    photos (`netvlad.rerank.expansion.alpha_qe` over each photo's own top `neighbours`), fused
    over the photos as the search was (`fusion`)."""
    x = np.asarray(descriptors, np.float32)
    sims = x @ np.asarray(queries, np.float32).T  # (c, m)
    expanded = []
    for j, q in enumerate(queries):
        top = np.argsort(-sims[:, j], kind="stable")[:neighbours]
        expanded.append(alpha_qe(q, x[top], sims[top, j], alpha=alpha))
    scores = fuse_scores(x @ np.stack(expanded).T, fusion)
    order = np.argsort(-scores, kind="stable")
    return [(int(ids[i]), Rerank("aqe", float(scores[i]), True)) for i in order]


def rerank_result(pool: SearchResult, method: str, k: int, queries: np.ndarray, query_images: Sequence | None,
                  evidence: IndexEvidence, store: DescriptorStore, model) -> SearchResult:
    """The top `k` of `pool` (a search result of at least `k` hits) re-ranked by `method` with the
    index's `evidence` and descriptor `store`; `query_images` are the query photos as searched
    (PIL images or (H, W, 3) uint8), needed by ``geometric`` and ``patch``. Hits carry their
    `Rerank` evidence; the location is estimated again from the new top `k`. The caller has
    checked `method` (`check_method`, `IndexEvidence.require`) before searching."""
    start = time.perf_counter()
    ids = [hit.id for hit in pool.hits]
    if method in NEEDS_PICTURES and not query_images:
        raise ValueError(f"'{method}' re-ranking needs the query photos")
    if method == "geometric":
        features = [evidence.local_features(image) for image in query_images]
        found = evidence.local_of(ids)
        order = geometric_order(features, [(i, found.get(i)) for i in ids])
    elif method == "patch":
        features = evidence.patch_features(model, list(query_images), query=True)
        found = evidence.patches_of(ids)
        order = patch_order(features, [(i, found.get(i)) for i in ids], [hit.score for hit in pool.hits])
    elif method == "aqe":
        order = aqe_order(queries, ids, store.descriptors(ids), pool.fusion) if ids else []
    else:
        order = [(i, None) for i in ids]
    by_id = {hit.id: hit for hit in pool.hits}
    hits = []
    for image_id, evidence_of_hit in order[:k]:
        hit = by_id[image_id]
        hit.rerank = evidence_of_hit
        hits.append(hit)
    coords = np.array([[np.nan if h.lat is None else h.lat, np.nan if h.lon is None else h.lon] for h in hits])
    location = estimate_location(coords[:, 0], coords[:, 1], np.array([h.score for h in hits])) if hits else None
    return SearchResult(hits, location, pool.fusion, pool.queries, method, (time.perf_counter() - start) * 1000)
