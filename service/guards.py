"""Refuse a request from its headers, before any of its body is read or spooled to disk.

FastAPI reads (and spools) a form body before it solves a route's dependencies, so the API-key
dependencies alone would check the key only after a 300 MB upload had been written to disk.
`GuardedRoute` runs the same access check first, then the route's body limit: a declared
Content-Length over it is a 413 at once, and a body streamed without one is cut off as soon as
it passes the limit. Limits per route (`BODY_LIMITS`, by endpoint name): one photo for adding,
`max_request_bytes` for a search, nothing for the others.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from starlette.types import Message, Receive

from service.deps import get_state, require_read_key, require_status_key, require_write_key
from service.settings import Settings

#: Room for multipart boundaries, part headers and form fields on top of the files themselves.
MULTIPART_SLACK = 64 * 1024
#: Body bytes a route may receive, by endpoint name; routes not listed take no body.
BODY_LIMITS: dict[str, Callable[[Settings], int]] = {
    "add_image": lambda settings: settings.max_upload_bytes + MULTIPART_SLACK,
    "search": lambda settings: settings.max_request_bytes,
}
ACCESS_CHECKS = (require_write_key, require_read_key, require_status_key)


def too_large(limit: int, what: str = "request body") -> HTTPException:
    return HTTPException(413, f"{what} is larger than the limit of {limit:,} bytes", headers={"Connection": "close"})


def limited(receive: Receive, limit: int) -> Receive:
    """`receive` that raises a 413 once more than `limit` body bytes have arrived."""
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large(limit)
        return message

    return receive_within_limit


class GuardedRoute(APIRoute):
    """An API route whose access check and body limit run on the headers, before the body."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        checks = [d.dependency for d in self.dependencies if d.dependency in ACCESS_CHECKS]
        body_limit = BODY_LIMITS.get(self.name)

        async def guarded_handler(request: Request):
            limit = 0
            if checks or body_limit:  # health and readiness answer before the state is loaded
                state = get_state(request)
                for check in checks:
                    check(state, request.headers.get("x-api-key"))
                limit = body_limit(state.settings) if body_limit else 0
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise too_large(limit)
            return await handler(Request(request.scope, limited(request.receive, limit)))

        return guarded_handler
