"""Liveness, readiness, Prometheus metrics and the service description used by the web page."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from netvlad.rerank.shortlist import DEFAULT_RERANK_K
from netvlad.search import FUSIONS
from service.deps import State, StatusAccess
from service.guards import GuardedRoute
from service.schemas import DEFAULT_FUSION, Health, Info, Ready

router = APIRouter(tags=["status"], route_class=GuardedRoute)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers (liveness)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "Not ready."}})
async def readyz(request: Request):
    """Model and index are loaded and the catalog answers (readiness)."""
    state = getattr(request.app.state, "service", None)
    if state is None:
        return JSONResponse(Ready(ready=False, detail="model and index not loaded").model_dump(), status_code=503)
    try:
        count = await run_in_threadpool(len, state.index)
        await run_in_threadpool(state.index.counts)
    except Exception as exc:  # whatever breaks the catalog or index makes the service unready
        return JSONResponse(Ready(ready=False, model=state.model_name, detail=f"index unavailable: {exc}").model_dump(),
                            status_code=503)
    return Ready(ready=True, model=state.model_name, images=count)


@router.get("/metrics", response_class=Response, dependencies=[StatusAccess],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
async def metrics(request: Request) -> Response:
    """Request counts and latencies per route, forward-pass batch sizes, index size."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", response_model=Info, dependencies=[StatusAccess])
async def info(state: State) -> Info:
    """Model, collection size, limits, access rules and the re-rankings this index serves (what
    the web page adapts to)."""
    settings = state.settings
    has_key = settings.api_key is not None
    methods = await run_in_threadpool(state.index.rerank_methods)
    return Info(
        model=state.model_name, dim=state.index.dim, device=str(state.index.model.device),
        micro_batching=state.batcher.enabled, count=await run_in_threadpool(len, state.index),
        fusion_modes=list(FUSIONS), default_fusion=DEFAULT_FUSION,
        writes_allowed=settings.allow_writes and state.index.writable,
        writes_need_key=has_key, reads_need_key=has_key and settings.protect_reads,
        status_needs_key=has_key and settings.protect_status,
        max_upload_bytes=settings.max_upload_bytes, max_request_bytes=settings.max_request_bytes,
        max_pixels=settings.max_pixels,
        max_query_images=settings.max_query_images, max_top_k=settings.max_top_k,
        rerank_methods=list(methods), default_rerank_k=min(DEFAULT_RERANK_K, settings.max_rerank_k),
        max_rerank_k=settings.max_rerank_k,
    )
