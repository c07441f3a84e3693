"""Request and response bodies of the REST API (pydantic v2); they define the OpenAPI document."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, Field

from netvlad.rerank.shortlist import RERANK_METHODS
from netvlad.search import FUSIONS

#: How the similarities of several query photos to one collection photo become its score:
#: ``softmedian`` (robust to a bad query photo, see docs/design.md), ``mean`` or ``max``.
Fusion = Enum("Fusion", {name: name for name in FUSIONS}, type=str)
DEFAULT_FUSION = Fusion(FUSIONS[0])
#: How the top of the global ranking is re-ordered with local evidence: ``none``, ``geometric``
#: (local features and RANSAC), ``patch`` (Patch-NetVLAD-style patch matching) or ``aqe`` (α-weighted
#: query expansion); which ones an index serves, `/v1/info` says (`rerank_methods`).
RerankMethod = Literal[RERANK_METHODS]


class ErrorOut(BaseModel):
    """Every error response: one sentence saying what was wrong."""

    detail: str = Field(examples=["upload is 31,457,280 bytes; the limit is 20,000,000 bytes"])


class ImageOut(BaseModel):
    """A photo of the collection."""

    id: int = Field(description="Image id (stable; never reused).")
    status: str = Field(description="pending, indexed, failed or removed.")
    name: str | None = Field(None, description="Display name (metadata `name`, else the file name).")
    path: str | None = Field(None, description="Its file, relative to the collection's photo folder (or "
                             "`uploads/…` for photos added through the API); never a server path.")
    sha256: str
    size: int = Field(description="File size in bytes.")
    width: int | None = Field(None, description="Pixels, EXIF orientation applied.")
    height: int | None = None
    taken_at: str | None = Field(None, description="Capture time, ISO 8601 local time.")
    lat: float | None = Field(None, description="Latitude, decimal degrees (WGS 84).")
    lon: float | None = Field(None, description="Longitude, decimal degrees (WGS 84).")
    metadata: dict = Field(default_factory=dict, description="Other metadata given when it was added.")
    added_at: float = Field(description="Unix time it entered the catalog.")
    file_url: str = Field(description="Where to download the photo.")


class RerankOut(BaseModel):
    """The local evidence behind a re-ranked result."""

    method: RerankMethod
    score: float = Field(description="Inliers for `geometric`; for `patch`, the patch score plus the global "
                         "similarity, each relative to the shortlist (0: average); expanded similarity for `aqe`.")
    verified: bool = Field(description="Whether the evidence passed the method's threshold (verified results "
                           "come first, in score order; the others keep their global order after them).")
    query: int = Field(0, ge=0, description="The query photo it was matched with (0-based, upload order).")
    model: str | None = Field(None, description="The geometric model that won (e.g. homography, fundamental).")
    query_size: tuple[int, int] | None = Field(None, description="Width and height of that query photo as "
                                               "searched: the pixels `points` give for it.")
    points: list[tuple[float, float, float, float]] = Field(
        default_factory=list, description="Matched points [x_q, y_q, x_c, y_c]: pixels of the query photo as "
        "searched (`query_size`) and of this result's photo file at full size (`width` × `height`).")


class SearchResult(BaseModel):
    """One collection photo in a result list, best first."""

    rank: int = Field(ge=1)
    id: int
    score: float = Field(description="Cosine similarity to the query (fused over the query photos).")
    query_scores: list[float] = Field(description="Cosine similarity to each query photo, in upload order.")
    name: str | None = None
    path: str | None = Field(None, description="Its file, relative to the collection (see ImageOut.path).")
    lat: float | None = None
    lon: float | None = None
    taken_at: str | None = None
    metadata: dict = Field(default_factory=dict)
    file_url: str
    width: int | None = Field(None, description="Pixels of its file, EXIF orientation applied (the scale of "
                              "`rerank.points`).")
    height: int | None = None
    rerank: RerankOut | None = Field(None, description="Its re-ranking evidence (absent without re-ranking).")


class LocationEstimate(BaseModel):
    """Where the query photos were probably taken: a robust (soft weighted median) combination of
    the coordinates of the best results, weighted by their scores."""

    lat: float
    lon: float
    support: int = Field(description="How many results with coordinates were combined.")
    spread_m: float = Field(description="Score-weighted mean distance of those results from the estimate, metres.")


class SearchOut(BaseModel):
    results: list[SearchResult]
    location: LocationEstimate | None = Field(None, description="Absent when no result has coordinates.")
    queries: int = Field(description="Number of query photos.")
    fusion: Fusion
    rerank: RerankMethod = Field("none", description="The re-ranking applied.")
    rerank_ms: float = Field(0.0, description="Server time of the re-ranking, milliseconds (part of took_ms).")
    took_ms: float = Field(description="Server time for this search, milliseconds.")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    ready: bool
    model: str | None = None
    images: int | None = Field(None, description="Indexed images.")
    detail: str | None = Field(None, description="Why the service is not ready.")


class Info(BaseModel):
    """What the web page needs to know about this service."""

    model: str
    dim: int
    device: str = Field(description="Where the model runs (cpu, cuda:0, …).")
    micro_batching: bool = Field(description="Whether concurrent searches share forward passes.")
    count: int = Field(description="Indexed images.")
    fusion_modes: list[Fusion]
    default_fusion: Fusion
    writes_allowed: bool
    writes_need_key: bool
    reads_need_key: bool
    status_needs_key: bool = Field(description="Whether /v1/info and /metrics need the API key.")
    max_upload_bytes: int
    max_request_bytes: int = Field(description="Largest search request body, all photos together.")
    max_pixels: int
    max_query_images: int
    max_top_k: int
    rerank_methods: list[RerankMethod] = Field(description="Re-rankings this index can serve: always `none` and "
                                               "`aqe`; `geometric` when it holds local features, `patch` when "
                                               "it holds patch features.")
    default_rerank_k: int = Field(description="How many of the top results are re-ranked unless `rerank_k` says.")
    max_rerank_k: int = Field(description="Largest `rerank_k` a search may ask for.")
