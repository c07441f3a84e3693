"""Uploaded photos: bounded reading and decoding, and the HTTP status of each image error.

Memory is bounded at three levels: the request body (`service.guards`: one photo for an add,
`max_request_bytes` for a search; multipart files are spooled to disk, not held in memory), the
pixels of one photo (`max_pixels`, refused from the header: decompression bombs never decode),
and the memory all decodes in progress hold together (`DecodeBudget`): a decode reserves the
size of the picture it will produce (after reduced-scale decoding) and waits until it fits.

Statuses: 413 for a file over the byte limit, an image over the pixel limit or one too large to
decode within the budget; 415 when the bytes are not an image format Pillow reads; 422 when the
image is empty, corrupt or truncated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from fastapi import UploadFile
from PIL import Image

from netvlad.errors import ImageError, NotAnImageError, TooManyPixelsError
from netvlad.imageio import decode_image, open_image
from service.guards import too_large

CHUNK = 1 << 20
#: Bytes a decoded pixel takes at most while decoding (Pillow keeps RGB as 4 bytes a pixel).
BYTES_PER_PIXEL = 4
#: HTTP status of each kind of image error; any other `ImageError` is a 422.
IMAGE_ERROR_STATUS = {NotAnImageError: 415, TooManyPixelsError: 413}


def image_error_status(exc: ImageError) -> int:
    return next((status for kind, status in IMAGE_ERROR_STATUS.items() if isinstance(exc, kind)), 422)


class DecodeBudget:
    """Bytes that the decodes in progress may hold together. `reserve(n)` waits until n more
    fit; a single reservation over the whole budget is refused with `TooManyPixelsError`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._room = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int, name: str) -> Iterator[None]:
        if nbytes > self.capacity:
            raise TooManyPixelsError(name, f"decoding it takes {nbytes / 1e6:,.0f} MB, more than this "
                                           f"service decodes at once ({self.capacity / 1e6:,.0f} MB)")
        with self._room:
            self._room.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes
        try:
            yield
        finally:
            with self._room:
                self.used -= nbytes
                self._room.notify_all()


def decode_cost(image: Image.Image) -> int:
    """Bytes decoding an opened image (`open_image`, reduced scale applied) takes at most."""
    return image.width * image.height * BYTES_PER_PIXEL


def decode_upload(source: bytes | BinaryIO, name: str, max_pixels: int, budget: DecodeBudget,
                  reduce_to: int | None = None) -> Image.Image:
    """Decode an uploaded photo within `budget` → RGB `PIL.Image` (reduced-scale decoding for a
    long side of `reduce_to`, see `netvlad.imageio.load_image`); `ImageError` subclasses say why
    not. Blocking: call it from a worker thread."""
    if not isinstance(source, bytes):
        source.seek(0)
    image = open_image(source, max_pixels, reduce_to, name=name)
    with budget.reserve(decode_cost(image), name):
        return decode_image(image, reduce_to, name)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The bytes of one uploaded file; 413 when it is over `limit` bytes."""
    if upload.size is not None and upload.size > limit:
        raise too_large(limit, upload.filename or "upload")
    data = bytearray()
    while chunk := await upload.read(CHUNK):
        data += chunk
        if len(data) > limit:
            raise too_large(limit, upload.filename or "upload")
    return bytes(data)
