"""`create_app(settings)`: the FastAPI app serving the REST API, the metrics and the web page.

The lifespan opens the index folder with its model once (writable unless writes are disabled, or
else read-only with a log line when it cannot be written: another process holds its writer lock,
the folder or its file system is read-only, or the disk is full), starts the micro-batcher, and
on shutdown saves the faiss index (a cache of the catalog, which is already durable) and closes.
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
from netvlad.errors import (DiskFullError, ImageError, IndexStoreError, MetadataError, PhotoFileError,
                            RerankUnavailableError)
from netvlad.index import Index
from service.batcher import MicroBatcher
from service.deps import ServiceState
from service.memory import return_large_blocks_to_os
from service.metrics import Metrics, RequestMetrics
from service.routers import images, search, status
from service.settings import Settings
from service.uploads import DecodeBudget, image_error_status

log = logging.getLogger("netvlad.service")
STATIC = Path(__file__).parent / "static"


def open_index(settings: Settings) -> Index:
    """The index of `settings`, writable when writes are allowed and no other process writes it."""
    if settings.allow_writes:
        try:
            index = Index.open(settings.index_dir, settings.model, writable=True, device=settings.device)
        except (IndexStoreError, DiskFullError) as exc:
            try:
                index = Index.open(settings.index_dir, settings.model, writable=False, device=settings.device,
                                   mmap=settings.mmap_index)
            except IndexStoreError:
                raise exc from None
            log.warning("serving %s read-only: %s", settings.index_dir, exc)
    else:
        index = Index.open(settings.index_dir, settings.model, writable=False, device=settings.device,
                           mmap=settings.mmap_index)
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
    return ServiceState(settings=settings, index=index, model_name=name, batcher=batcher, compute=compute,
                        decode_budget=DecodeBudget(settings.decode_memory_bytes))


def close_state(state: ServiceState) -> None:
    """Save the faiss index next to the catalog (faster next start) and release the folder."""
    try:
        if state.index.writable:
            state.index.save()
    except DiskFullError as exc:  # the catalog is durable already; the faiss file is only a cache
        log.warning("faiss index not saved: %s", exc)
    finally:
        state.index.close()


def without_index_path(request: Request, message: str) -> str:
    """`message` with the index folder's server path (as configured, and resolved) written INDEX."""
    state = getattr(request.app.state, "service", None)
    if state is None:
        return message
    folders = {str(state.settings.index_dir), str(Path(state.settings.index_dir).resolve()), str(state.index.directory)}
    for folder in sorted((f for f in folders if f not in ("", ".")), key=len, reverse=True):
        message = message.replace(folder, "INDEX")
    return message


def install_error_handlers(app: FastAPI) -> None:
    """Library errors as JSON `{"detail": ...}` like FastAPI's own, in one place: a photo that does
    not decode or metadata that is invalid is the client's (413/415/422 by kind), a photo file that
    cannot be served a 404 with the reason, a re-ranking the index holds no evidence for a 409
    (how to add it, with the index folder named INDEX), an index that cannot be changed or read is
    the service's (503), a full disk too (507)."""

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return error(image_error_status(exc), str(exc))

    @app.exception_handler(MetadataError)
    async def metadata_error(request: Request, exc: MetadataError) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(PhotoFileError)
    async def photo_file_error(request: Request, exc: PhotoFileError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(RerankUnavailableError)
    async def rerank_unavailable(request: Request, exc: RerankUnavailableError) -> JSONResponse:
        return error(409, without_index_path(request, str(exc)))

    @app.exception_handler(IndexStoreError)
    async def index_error(request: Request, exc: IndexStoreError) -> JSONResponse:
        return error(503, f"index unavailable: {exc}")

    @app.exception_handler(DiskFullError)
    async def disk_full(request: Request, exc: DiskFullError) -> JSONResponse:
        log.error("%s", exc)
        return error(507, "the server's disk is full: nothing was stored; try again later")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for `settings` (default: from NETVLAD_* environment variables and `.env`)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        return_large_blocks_to_os()
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
