"""Uploaded photos: per-file size limit and decoding, with an HTTP status per failure.

Statuses: 413 for a request body or a file over the byte limits and for an image over the pixel limit
(decompression bombs are refused from their header, before any pixel is decoded), 415 when the
bytes are not an image format Pillow reads, 422 when the image is corrupt or truncated.
"""

from __future__ import annotations

import io
import warnings

from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from netvlad.errors import ImageError
from netvlad.imageio import load_image

#: Room for multipart boundaries, part headers and form fields on top of the files themselves.
MULTIPART_SLACK = 64 * 1024
CHUNK = 1 << 20


def body_limit(max_upload_bytes: int, max_files: int) -> int:
    """Largest request body worth parsing: `max_files` files of `max_upload_bytes` plus form overhead."""
    return max_upload_bytes * max_files + MULTIPART_SLACK


def too_large(limit: int, what: str = "request body") -> HTTPException:
    return HTTPException(413, f"{what} is larger than the limit of {limit:,} bytes")


class BodySizeLimit:
    """ASGI middleware refusing request bodies over `limit` bytes with a JSON 413 stating the limit:
    at once when Content-Length declares too much, else as soon as the streamed body passes it
    (an `HTTPException` raised from `receive`, which FastAPI's body parsing passes through)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": too_large(self.limit).detail}, 413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise too_large(self.limit)
            return message

        await self.app(scope, limited_receive, send)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The bytes of one uploaded file; 413 when it is over `limit` bytes."""
    data = bytearray()
    while chunk := await upload.read(CHUNK):
        data += chunk
        if len(data) > limit:
            raise too_large(limit, f"{upload.filename or 'upload'}")
    return bytes(data)


def decode_upload(data: bytes, name: str, max_pixels: int, reduce_to: int | None = None) -> Image.Image:
    """Decode uploaded bytes into an RGB image (EXIF orientation applied; JPEGs at a reduced scale
    for a long side of `reduce_to`, see `load_image`); HTTPException 413, 415 or 422 with the
    reason when it cannot be used. Blocking: call it from a worker thread."""
    if not data:
        raise HTTPException(422, f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"{name}: too many pixels ({exc}); the limit is {max_pixels:,} pixels") from None
    except Exception:  # Pillow raises many types for foreign bytes; all mean "not an image we read"
        raise HTTPException(415, f"{name}: not an image, or a format that cannot be read "
                                 "(JPEG, PNG, WebP, TIFF, BMP, GIF are)") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{name}: {width}×{height} = {width * height:,} pixels is more than the "
                                 f"limit of {max_pixels:,} pixels")
    try:
        return load_image(data, max_pixels=max_pixels, reduce_to=reduce_to)
    except ImageError as exc:
        raise HTTPException(422, f"{name}: {str(exc).removeprefix('upload: ')}") from None
