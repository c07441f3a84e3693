"""`create_app(settings)`: the FastAPI app serving the REST API, the metrics and the web page.

The lifespan opens the index folder with its model once (writable unless writes are disabled or
another process holds the index's writer lock, then read-only), starts the micro-batcher, and on
shutdown saves the faiss index (a cache of the catalog, which is already durable) and closes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

import netvlad
from netvlad.errors import ImageError, IndexStoreError
from netvlad.index import Index
from service.batcher import MicroBatcher
from service.deps import ServiceState
from service.metrics import Metrics, RequestMetrics
from service.routers import images, search, status
from service.settings import Settings
from service.uploads import BodySizeLimit, body_limit

log = logging.getLogger("netvlad.service")
STATIC = Path(__file__).parent / "static"


def open_index(settings: Settings) -> Index:
    """The index of `settings`, writable when writes are allowed and no other process writes it."""
    if settings.allow_writes:
        try:
            index = Index.open(settings.index_dir, settings.model, writable=True, device=settings.device)
        except IndexStoreError as exc:
            try:
                index = Index.open(settings.index_dir, settings.model, writable=False, device=settings.device)
            except IndexStoreError:
                raise exc from None
            log.warning("serving %s read-only: %s", settings.index_dir, exc)
    else:
        index = Index.open(settings.index_dir, settings.model, writable=False, device=settings.device)
    index.max_pixels = settings.max_pixels
    return index


def load_state(settings: Settings, metrics: Metrics, compute: ThreadPoolExecutor) -> ServiceState:
    """Open index and model and build the batcher (blocking, run on `compute`: loading takes seconds)."""
    index = open_index(settings)
    model = index.model

    def describe(pixels: list[torch.Tensor]) -> np.ndarray:  # uint8 (3, H, W) photos, from `_prepare`
        return model.describe([model.preprocess.normalize(p) for p in pixels], batch_size=settings.max_batch)

    batching = model.device.type == "cuda" if settings.micro_batching is None else settings.micro_batching
    batcher = MicroBatcher(
        describe, max_wait_s=settings.batch_wait_ms / 1000, max_batch=settings.max_batch,
        enabled=batching, observe=metrics.observe_batch, executor=compute,
    )
    metrics.track_index_size(lambda: len(index))
    config = model.config
    name = f"{config.backbone} K={config.clusters}"
    log.info("serving %s (%d images) with %s, %d-d, on %s, micro-batching %s", settings.index_dir, len(index),
             name, model.dim, model.device, "on" if batching else "off")
    return ServiceState(settings=settings, index=index, model_name=name, batcher=batcher, compute=compute)


def close_state(state: ServiceState) -> None:
    """Save the faiss index next to the catalog (faster next start) and release the folder."""
    try:
        if state.index.writable:
            state.index.checkpoint()
    finally:
        state.index.close()


def install_error_handlers(app: FastAPI) -> None:
    """Library errors as JSON `{"detail": ...}` like FastAPI's own: a photo that does not decode is
    the client's (422), an index that cannot be changed or read is the service's (503)."""

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(IndexStoreError)
    async def index_error(request: Request, exc: IndexStoreError) -> JSONResponse:
        return JSONResponse({"detail": f"index unavailable: {exc}"}, status_code=503)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for `settings` (default: from NETVLAD_* environment variables and `.env`)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netvlad-compute")
        try:
            state = await asyncio.get_running_loop().run_in_executor(compute, load_state, settings, metrics, compute)
            await state.batcher.start()
            app.state.service = state
            try:
                yield
            finally:
                app.state.service = None
                await state.batcher.close()
                await state.run(close_state, state)
        finally:
            compute.shutdown(wait=True)

    app = FastAPI(
        title="netvlad",
        summary="Image retrieval and visual place recognition: search a photo collection by photos.",
        version=netvlad.__version__,
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.service = None
    app.add_middleware(BodySizeLimit, limit=body_limit(settings.max_upload_bytes, settings.max_query_images))
    app.add_middleware(RequestMetrics, metrics=metrics)
    install_error_handlers(app)
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(status.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
