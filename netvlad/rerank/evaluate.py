"""Recall@N of re-ranked shortlists on a place dataset, with the time re-ranking takes.

The database's evidence is computed once, in memory, as an index keeps it (local features at the
index's settings; patch descriptors reduced by a PCA learned on the database's own patches, as an
index learns it on its photos); then for each query the top `k` of the exact global ranking
(`netvlad.evaluation`) are re-ranked with the same functions the search uses
(`netvlad.rerank.shortlist`) and the rest of the global ranking follows them. The time per query
counts what a search adds: the query's own evidence and the re-ranking, not the database's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from netvlad.datasets.placeset import PlaceDataset
from netvlad.evaluation import DEFAULT_NS, recall_of_rankings
from netvlad.imageio import load_image
from netvlad.rerank.indexevidence import MAX_KEYPOINTS, MAX_SIDE, PCA_PHOTOS, THREADS
from netvlad.rerank.localfeatures import extract_local_features
from netvlad.rerank.patch import (
    GLOBAL_WEIGHT, QUERY_STRIDE, PatchPCA, extract_patch_features, fit_patch_pca, training_patches,
)
from netvlad.rerank.shortlist import DEFAULT_RERANK_K, aqe_order, check_method, geometric_order, patch_order


def global_rankings(db_desc: np.ndarray, q_desc: np.ndarray, depth: int) -> np.ndarray:
    """(Nq, depth) database indices of each query's exact cosine ranking, best first."""
    db = np.ascontiguousarray(db_desc, dtype=np.float32)
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    return index.search(np.ascontiguousarray(q_desc, dtype=np.float32), min(depth, len(db)))[1]


def local_features_of(paths: Sequence[Path], kind: str = "sift", max_keypoints: int = MAX_KEYPOINTS,
                      progress: bool = False) -> list:
    """`LocalFeatures` of photos at the index's settings (points in their original pixels)."""
    def one(path):
        return extract_local_features(load_image(path), kind, max_keypoints, MAX_SIDE)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(tqdm(pool.map(one, paths), total=len(paths), desc=f"{kind} features", disable=not progress,
                         leave=False))


@dataclass
class DatabaseEvidence:
    """A database's evidence for one method, in memory: per photo (None for ``aqe``), the patch
    PCA, seconds to compute and mean stored bytes a photo."""

    method: str
    stored: list | None = None
    pca: PatchPCA | None = None
    seconds: float = 0.0
    bytes_per_photo: float = 0.0


def database_evidence(method: str, model, paths: Sequence[Path], local_kind: str = "sift",
                      progress: bool = False) -> DatabaseEvidence:
    """The evidence an index would keep of photos `paths` for `method`."""
    check_method(method)
    start = time.perf_counter()
    found = DatabaseEvidence(method)
    if method == "geometric":
        found.stored = local_features_of(paths, local_kind, progress=progress)
    elif method == "patch":
        sample = list(paths)[:: max(1, len(paths) // PCA_PHOTOS)][:PCA_PHOTOS]
        found.pca = fit_patch_pca(training_patches(model, sample))
        found.stored = extract_patch_features(model, list(paths), found.pca)
    found.seconds = time.perf_counter() - start
    found.bytes_per_photo = float(np.mean([len(x.to_bytes()) for x in found.stored])) if found.stored else 0.0
    return found


def rerank_rankings(evidence: DatabaseEvidence, model, q_paths: Sequence[Path], db_desc: np.ndarray,
                    q_desc: np.ndarray, k: int = DEFAULT_RERANK_K, depth: int = max(DEFAULT_NS),
                    local_kind: str = "sift", progress: bool = False, patch_global_weight: float = GLOBAL_WEIGHT
                    ) -> tuple[np.ndarray, float]:
    """Rankings (Nq, max(k, depth)) after re-ranking each query's top `k` of the exact global
    ranking by `evidence.method`, and the mean ms per query (query evidence + re-ranking).
    `patch_global_weight`: the global similarity's weight in patch scores (0: patches alone)."""
    method, stored = evidence.method, evidence.stored
    top = global_rankings(db_desc, q_desc, max(k, depth))
    reranked, seconds = np.array(top), 0.0
    for qi in tqdm(range(len(q_paths)), desc=f"{method} re-ranking", disable=not progress, leave=False):
        ids = top[qi, :k]
        start = time.perf_counter()
        if method == "geometric":
            query = extract_local_features(load_image(q_paths[qi]), local_kind, MAX_KEYPOINTS, MAX_SIDE)
            order = geometric_order([query], [(int(i), stored[i]) for i in ids], budget_s=None)
        elif method == "patch":
            query = extract_patch_features(model, [q_paths[qi]], evidence.pca, max_patches=None, stride=QUERY_STRIDE)
            order = patch_order(query, [(int(i), stored[i]) for i in ids], db_desc[ids] @ q_desc[qi],
                                patch_global_weight)
        elif method == "aqe":
            order = aqe_order(q_desc[qi : qi + 1], ids, db_desc[ids], "mean")
        else:
            order = [(int(i), None) for i in ids]
        seconds += time.perf_counter() - start
        reranked[qi, : len(ids)] = [image_id for image_id, _ in order]
    return reranked, 1000 * seconds / max(1, len(q_paths))


def evaluate_rerank(method: str, model, dataset: PlaceDataset, db_desc: np.ndarray, q_desc: np.ndarray,
                    k: int = DEFAULT_RERANK_K, ns: Sequence[int] = DEFAULT_NS, queries: str = "all",
                    per_query: bool = False, local_kind: str = "sift", progress: bool = False,
                    patch_global_weight: float = GLOBAL_WEIGHT) -> dict:
    """`recall_of_rankings` of the re-ranked rankings (`rerank_rankings`), with "evidence_s",
    "evidence_bytes_per_photo", "ms_per_query", "rerank", "rerank_k" and, for ``patch``,
    "patch_global_weight"."""
    evidence = database_evidence(method, model, dataset.db_paths(), local_kind, progress)
    rankings, ms = rerank_rankings(evidence, model, dataset.q_paths(), db_desc, q_desc, k, max(ns), local_kind, progress,
                                   patch_global_weight)
    result = recall_of_rankings(rankings[:, : max(ns)], dataset.positives(), len(db_desc), ns, per_query, queries)
    return {**result, "evidence_s": evidence.seconds, "evidence_bytes_per_photo": evidence.bytes_per_photo,
            "ms_per_query": ms, "rerank": method, "rerank_k": k,
            **({"patch_global_weight": patch_global_weight} if method == "patch" else {})}
