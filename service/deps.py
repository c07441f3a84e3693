"""FastAPI dependencies: the loaded service state and API-key checks.

Auth policy: with no API key configured everything is open. With a key, writes (add, delete)
need header ``X-API-Key: <key>``; reads (search, image records and files) stay open unless
`protect_reads` is set; the service description (/v1/info) and /metrics stay open unless
`protect_status` is set (monitoring usually scrapes without a key); /healthz and /readyz are
always open. A missing or wrong key is a 401. `service.guards` runs these checks before a
request's body is read.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from netvlad.index import Index
from service.batcher import MicroBatcher
from service.settings import Settings

if TYPE_CHECKING:
    from service.uploads import DecodeBudget

T = TypeVar("T")

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False,
    description="Needed for writes when the service has an API key (and for reads when reads are protected).",
)


@dataclass
class ServiceState:
    """What the lifespan loads once and every request shares.

    `compute` is the one thread that runs all torch and faiss work (model loading, forward
    passes, index search and add): torch's OpenMP pool is per calling thread, and a second
    live pool on a small machine makes every pass slower (its spinning threads are throttled).
    """

    settings: Settings
    index: Index  # with its model, `index.model`
    model_name: str
    batcher: MicroBatcher
    compute: ThreadPoolExecutor
    decode_budget: DecodeBudget

    async def run(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, function, *args)


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise HTTPException(503, "the service is starting: model and index are not loaded yet")
    return state


State = Annotated[ServiceState, Depends(get_state)]


def _check_key(settings: Settings, given: str | None, action: str) -> None:
    expected = settings.api_key.get_secret_value() if settings.api_key else ""
    if not expected:
        return
    if not given:
        raise HTTPException(401, f"{action} needs an API key: send it in the X-API-Key header",
                            headers={"WWW-Authenticate": "ApiKey"})
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "wrong API key", headers={"WWW-Authenticate": "ApiKey"})


def require_write_key(state: State, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """Writes: refused with 403 when disabled, 401 without the configured key."""
    if not state.settings.allow_writes:
        raise HTTPException(403, "this service is read-only (NETVLAD_ALLOW_WRITES=false)")
    if not state.index.writable:
        raise HTTPException(403, "this service is read-only: its index folder cannot be written now "
                                 "(read-only file system, full disk, or another process writes it)")
    _check_key(state.settings, key, "adding or deleting photos")


def require_read_key(state: State, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """Reads: open unless `protect_reads` is set, then like writes."""
    if state.settings.protect_reads:
        _check_key(state.settings, key, "reading from this service")


def require_status_key(state: State, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """Service description and metrics: open unless `protect_status` is set, then like writes."""
    if state.settings.protect_status:
        _check_key(state.settings, key, "reading the service's status")


WriteAccess = Depends(require_write_key)
ReadAccess = Depends(require_read_key)
StatusAccess = Depends(require_status_key)
