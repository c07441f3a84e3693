"""Search: ranking an index's descriptors for query photos, multi-photo fusion, location estimate
and the results (soft order statistics: docs/design.md §3).

Several query photos of one place are fused robustly: a database image's score is the soft median
of its cosine similarities to each query photo, so one blurred, occluded or wrong photo among
three or more cannot lift a wrong image or sink the right one (the mean would let it). The
location is the weighted soft median (soft L1-medoid, in metres) of the top hits' coordinates,
weighted by the soft argmax of their scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyproj
import torch

from netvlad.records import ImageRecord
from netvlad.descriptorstore import DescriptorStore
from netvlad.rerank.expansion import DbaDescriptors
from netvlad.soft import softargmax, softmedian, weighted_softmedian
from netvlad.vectorindex import VectorIndex

FUSIONS = ("softmedian", "mean", "max")
#: Sharpness of the fusion soft median, per unit of cosine similarity: similarities 0.1 apart
#: are told apart (α·gap = 5), 0.01 apart are blended.
FUSION_ALPHA = 50.0
#: Sharpness of the soft argmax turning hit scores into location weights (per unit similarity).
LOCATION_SCORE_ALPHA = 20.0
#: Hits closer than about this many metres are blended by the location soft median.
LOCATION_SCALE_M = 25.0
#: Geodesics on the WGS84 ellipsoid (distances and azimuths for the location estimate).
WGS84 = pyproj.Geod(ellps="WGS84")


@dataclass
class Location:
    """Estimated position: WGS 84 degrees, the number of hits with coordinates it rests on, and
    the weighted mean distance (m) of those hits from it (a rough uncertainty)."""

    lat: float
    lon: float
    support: int
    spread_m: float


@dataclass
class Rerank:
    """The local evidence behind a re-ranked hit (`netvlad.rerank`): the method, its score
    (inliers for ``geometric``; for ``patch``, the patch score plus the global similarity, each
    relative to the shortlist; expanded similarity for ``aqe``), whether it passed the method's
    threshold, the query photo it was matched with (0-based), the geometric model that won, and
    matched points (x_q, y_q, x_c, y_c): pixels of that query photo as searched (`query_size`
    (w, h)) and of the hit's photo file at full size."""

    method: str
    score: float
    verified: bool
    query: int = 0
    model: str | None = None
    query_size: tuple[int, int] | None = None
    points: list[list[float]] = field(default_factory=list)


@dataclass
class Hit:
    """One result: catalog id, fused score (cosine similarity scale), absolute path of its file,
    coordinates when catalogued, its similarity to each query photo, its catalog record, and
    the evidence of a re-ranking when one was asked for."""

    id: int
    score: float
    path: str | None
    lat: float | None = None
    lon: float | None = None
    query_scores: list[float] = field(default_factory=list)
    record: ImageRecord | None = None
    rerank: Rerank | None = None


@dataclass
class SearchResult:
    """Ranked hits (best first), the location estimate (None without coordinates), the fusion
    used, the number of query photos, the re-ranking applied (``none``, ``geometric``, ``patch``,
    ``aqe``) and the milliseconds it took."""

    hits: list[Hit]
    location: Location | None
    fusion: str
    queries: int
    rerank: str = "none"
    rerank_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def fuse_scores(similarities: np.ndarray, method: str = "softmedian", alpha: float = FUSION_ALPHA) -> np.ndarray:
    """(n, m) similarities of n database images to m query photos → (n,) fused scores.

    ``softmedian`` (robust), ``mean`` or ``max``. With one query photo all three return it.
    """
    if method not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, not {method!r}")
    sims = torch.as_tensor(np.asarray(similarities, dtype=np.float64))
    if sims.ndim != 2 or sims.shape[1] == 0:
        raise ValueError(f"similarities must be (n, m) with m ≥ 1, got {tuple(sims.shape)}")
    if method == "mean":
        fused = sims.mean(dim=1)
    elif method == "max":
        fused = sims.amax(dim=1)
    else:
        fused = softmedian(sims, dim=1, alpha=alpha)
    return fused.numpy()


def estimate_location(
    lat: np.ndarray,
    lon: np.ndarray,
    scores: np.ndarray,
    score_alpha: float = LOCATION_SCORE_ALPHA,
    scale_m: float = LOCATION_SCALE_M,
) -> Location | None:
    """Robust position of the hits (degrees, NaN where unknown) given their scores (k,).

    Coordinates are mapped to metres around the best hit (azimuthal equidistant: geodesic
    distance and azimuth on the WGS84 ellipsoid), the weighted soft median taken with weights
    softargmax(scores) and sharpness 1/`scale_m`, and the result mapped back. None when no hit
    has coordinates.
    """
    lat, lon, scores = (np.asarray(a, dtype=np.float64) for a in (lat, lon, scores))
    known = np.isfinite(lat) & np.isfinite(lon) & np.isfinite(scores)
    if not known.any():
        return None
    lat, lon, scores = lat[known], lon[known], scores[known]
    best = int(np.argmax(scores))
    centre_lon, centre_lat = np.full_like(lon, lon[best]), np.full_like(lat, lat[best])
    azimuth, _, distance = WGS84.inv(centre_lon, centre_lat, lon, lat)
    points = torch.tensor(np.stack([distance * np.sin(np.radians(azimuth)), distance * np.cos(np.radians(azimuth))], axis=1))
    weights = softargmax(torch.tensor(scores), dim=0, alpha=score_alpha)
    estimate = weighted_softmedian(points, weights, dim=0, alpha=1.0 / scale_m)
    spread = float((weights * (points - estimate).norm(dim=1)).sum())
    east, north = float(estimate[0]), float(estimate[1])
    est_lon, est_lat, _ = WGS84.fwd(lon[best], lat[best], np.degrees(np.arctan2(east, north)), np.hypot(east, north))
    return Location(lat=float(est_lat), lon=float(est_lon), support=int(known.sum()), spread_m=spread)


def rank(vectors: VectorIndex, store: DescriptorStore, resolve, queries: np.ndarray, k: int, fusion: str,
         alpha: float = FUSION_ALPHA, dba: DbaDescriptors | None = None) -> SearchResult:
    """The top `k` of `vectors` for (m, dim) query descriptors of one place, with their catalog
    records from `store`'s catalog (`resolve(path, origin)` gives absolute paths). The m rankings are fused
    (`fuse_scores`) over a candidate pool of each query's top max(4k, 50), rescored exactly with
    the stored descriptors when there are several queries or the faiss scores are approximate,
    and with the database-augmented ones (`dba`, `netvlad.rerank.expansion`) where the index
    keeps them. The caller keeps `vectors` and `store` from changing meanwhile."""
    catalog = store.catalog
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")
    n = len(vectors)
    if n == 0 or k < 1:
        return SearchResult([], None, fusion, len(q))
    k = min(int(k), n)
    rescore = len(q) > 1 or vectors.spec.quantised or dba is not None
    scores, ids = vectors.search(q, min(n, max(4 * k, 50)) if rescore else k)
    if rescore:
        candidates = np.unique(ids[ids >= 0])
        x = store.descriptors(candidates)
        if dba is not None:  # photos added since DBA was computed keep their own descriptors
            augmented, found = dba.descriptors(candidates)
            x[found] = augmented[found]
        # torch, not numpy: one thread pool for small products (see vectorindex.SMALL_BATCH)
        sims = (torch.from_numpy(x) @ torch.from_numpy(q).T).numpy()
    else:
        keep = ids[0] >= 0
        candidates, sims = ids[0][keep], scores[0][keep, None]
    fused = fuse_scores(sims, fusion, alpha)
    order = np.argsort(-fused, kind="stable")[:k]
    records = catalog.records(candidates[order].tolist(), resolve)
    hits = []
    for i in order:
        record = records.get(int(candidates[i]))
        hits.append(Hit(
            id=int(candidates[i]), score=float(fused[i]), path=record.path if record else None,
            lat=record.lat if record else None, lon=record.lon if record else None,
            query_scores=[float(s) for s in sims[i]], record=record,
        ))
    coords = np.array([[np.nan if h.lat is None else h.lat, np.nan if h.lon is None else h.lon] for h in hits])
    location = estimate_location(coords[:, 0], coords[:, 1], fused[order]) if hits else None
    return SearchResult(hits, location, fusion, len(q))
