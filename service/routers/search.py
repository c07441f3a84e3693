"""POST /v1/search: rank the collection by similarity to one or several uploaded photos."""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from netvlad.rerank.shortlist import DEFAULT_RERANK_K, NEEDS_PICTURES
from netvlad.search import Rerank
from service.deps import ReadAccess, ServiceState, State
from service.guards import GuardedRoute, too_large
from service.routers.images import display_name, file_url
from service.schemas import (DEFAULT_FUSION, ErrorOut, Fusion, LocationEstimate, RerankMethod, RerankOut,
                             SearchOut, SearchResult)
from service.uploads import decode_upload

router = APIRouter(tags=["search"], route_class=GuardedRoute)

ERRORS = {
    400: {"model": ErrorOut, "description": "Malformed multipart body."},
    401: {"model": ErrorOut, "description": "API key missing or wrong (when reads are protected)."},
    409: {"model": ErrorOut, "description": "A re-ranking this index cannot serve (it holds no local evidence "
                                            "for it; `/v1/info` lists the ones it can)."},
    413: {"model": ErrorOut, "description": "A file or image over the size or pixel limit."},
    415: {"model": ErrorOut, "description": "A file that is not an image."},
    422: {"description": "Corrupt image, or invalid parameters."},
}


def _rerank_out(evidence: Rerank | None) -> RerankOut | None:
    return RerankOut.model_validate(evidence, from_attributes=True) if evidence is not None else None


def _prepare(state: ServiceState, uploads: list[tuple[str, UploadFile]], rerank: str
             ) -> tuple[list[torch.Tensor], list[Image.Image] | None]:
    """Decode and resize query photos, straight from their spooled files and within the decode
    budget → uint8 (3, H, W) network inputs and, when `rerank` needs them, the photos for its
    evidence: RGB images, long side at most the evidence's (`IndexEvidence.picture_side`; 640 px
    by default). Pillow and SQLite reads only: run it on a worker thread."""
    preprocess = state.index.model.preprocess
    settings = state.settings
    side = (state.index.evidence.picture_side(rerank) or preprocess.max_side) if rerank in NEEDS_PICTURES else None
    reduce_to = max(preprocess.reduce_to, side) if side and preprocess.reduce_to else preprocess.reduce_to
    inputs, pictures = [], []
    for name, upload in uploads:
        image = decode_upload(upload.file, name, settings.max_pixels, state.decode_budget, reduce_to)
        inputs.append(preprocess.resize(image))
        if side:
            image.thumbnail((side, side))
            pictures.append(image)
    return inputs, pictures if side else None


@router.post("/v1/search", response_model=SearchOut, responses=ERRORS, dependencies=[ReadAccess])
async def search(
    request: Request,
    state: State,
    images: Annotated[list[UploadFile], File(description="One or more photos of the same place.")],
    top_k: Annotated[int, Form(ge=1, description="How many results (at most the service's max_top_k).")] = 10,
    fusion: Annotated[Fusion, Form(description="How several query photos are combined.")] = DEFAULT_FUSION,
    rerank: Annotated[RerankMethod, Form(description="Re-order the top `rerank_k` results with local evidence "
                                         "(`/v1/info` lists what this index serves).")] = "none",
    rerank_k: Annotated[int | None, Form(ge=1, description="How many of the top results are re-ranked (at most "
                                         f"the service's max_rerank_k; default {DEFAULT_RERANK_K}, or "
                                         "max_rerank_k when smaller).")] = None,
) -> SearchOut:
    """Search the collection with one or several photos; several photos of one place are fused
    into one ranking, and the best results' coordinates into a location estimate. With `rerank`
    the top of the ranking is re-ordered by local evidence, and each result shows it (`rerank`:
    for `geometric`, the matched points between a query photo and the result)."""
    start = time.perf_counter()
    settings = state.settings
    if len(images) > settings.max_query_images:
        raise HTTPException(422, f"{len(images)} photos: at most {settings.max_query_images} per search")
    if top_k > settings.max_top_k:
        raise HTTPException(422, f"top_k={top_k} is more than the limit of {settings.max_top_k}")
    if rerank_k is None:
        rerank_k = min(DEFAULT_RERANK_K, settings.max_rerank_k)
    elif rerank_k > settings.max_rerank_k:
        raise HTTPException(422, f"rerank_k={rerank_k} is more than the limit of {settings.max_rerank_k}")
    # Evidence the index lacks is refused before any photo is decoded: RerankUnavailableError, a 409.
    await run_in_threadpool(state.index.evidence.require, rerank)
    uploads = [(upload.filename or f"photo {i + 1}", upload) for i, upload in enumerate(images)]
    for name, upload in uploads:
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise too_large(settings.max_upload_bytes, name)
    pictures: list[Image.Image] | None = None

    async def prepare() -> list[torch.Tensor]:
        nonlocal pictures
        inputs, pictures = await run_in_threadpool(_prepare, state, uploads, rerank)
        return inputs

    descriptors: np.ndarray = await state.batcher.describe(prepare())
    found = await state.run(partial(state.index.search_descriptors, descriptors, top_k, fusion.value,
                                    rerank=rerank, rerank_k=rerank_k, query_images=pictures))
    results = []
    for rank, hit in enumerate(found.hits, start=1):
        record = hit.record
        results.append(SearchResult(
            rank=rank, id=hit.id, score=hit.score, query_scores=hit.query_scores,
            name=display_name(record) if record else None, path=record.public_path if record else None,
            lat=hit.lat, lon=hit.lon, taken_at=record.taken_at if record else None,
            metadata=record.metadata if record else {}, file_url=file_url(request, hit.id),
            width=record.width if record else None, height=record.height if record else None,
            rerank=_rerank_out(hit.rerank),
        ))
    return SearchOut(
        results=results,
        location=LocationEstimate.model_validate(found.location, from_attributes=True) if found.location else None,
        queries=found.queries, fusion=fusion, rerank=found.rerank, rerank_ms=found.rerank_ms,
        took_ms=(time.perf_counter() - start) * 1000,
    )
