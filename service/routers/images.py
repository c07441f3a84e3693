"""/v1/images: add a photo (durable when the 201 is sent), read its record or file, delete it.

Metadata is validated before anything is stored (`netvlad.metadata`: a 422 names the field); a
file is served only while its photo is indexed and its file, opened without following links,
lies inside the collection with the catalogued content (`Index.open_photo`)."""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, File, Form, HTTPException, Path, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from netvlad.records import ImageRecord
from netvlad.imageio import open_image
from netvlad.metadata import validate_metadata
from service.deps import ReadAccess, ServiceState, State, WriteAccess
from service.guards import GuardedRoute
from service.schemas import ErrorOut, ImageOut
from service.uploads import CHUNK, decode_cost, read_upload

router = APIRouter(prefix="/v1/images", tags=["images"], route_class=GuardedRoute)

ImageId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Image id.")]
NOT_FOUND = {404: {"model": ErrorOut, "description": "No image with this id."}}
AUTH = {401: {"model": ErrorOut, "description": "API key missing or wrong."}}
WRITE_AUTH = {**AUTH, 403: {"model": ErrorOut, "description": "Writes are disabled on this service."}}
UPLOAD_ERRORS = {
    **WRITE_AUTH,
    400: {"model": ErrorOut, "description": "Malformed multipart body."},
    413: {"model": ErrorOut, "description": "File or image over the size or pixel limit."},
    415: {"model": ErrorOut, "description": "Not an image."},
    422: {"description": "Corrupt image, or invalid metadata."},
    507: {"model": ErrorOut, "description": "The server's disk is full."},
}


def file_url(request: Request, image_id: int) -> str:
    return str(request.url_for("get_image_file", image_id=image_id).path)


def display_name(record: ImageRecord) -> str | None:
    """The metadata `name` when it is one, else the file name."""
    name = record.metadata.get("name")
    path = record.public_path
    return name if isinstance(name, str) and name else (os.path.basename(path) if path else None)


def image_out(request: Request, record: ImageRecord) -> ImageOut:
    fields = {key: value for key, value in record.to_dict().items() if key in ImageOut.model_fields}
    return ImageOut(**fields | {"path": record.public_path}, name=display_name(record),
                    file_url=file_url(request, record.id))


def _record(state: ServiceState, image_id: int) -> ImageRecord:
    record = state.index.get(image_id)
    if record is None:
        raise HTTPException(404, f"no image with id {image_id}")
    return record


def _metadata(name: str | None, lat: float | None, lon: float | None, extra: str | None) -> dict:
    """Catalog metadata from the form fields and the metadata JSON, validated; 422 naming the
    first bad field. Form fields win over the same keys in the JSON."""
    metadata: object = {}
    if extra:
        try:
            metadata = json.loads(extra)
        except ValueError as exc:
            raise HTTPException(422, f"metadata is not valid JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise HTTPException(422, "metadata must be a JSON object")
    if (lat is None) != (lon is None):
        raise HTTPException(422, "give both lat and lon, or neither")
    if lat is not None:
        metadata.update(lat=lat, lon=lon)
    if name:
        metadata["name"] = name
    return validate_metadata(metadata)  # MetadataError: a 422 (service.app)


def _add(state: ServiceState, data: bytes, name: str, metadata: dict) -> ImageRecord:
    """Add to catalog and index in one durable step (compute thread), decoding the photo once
    within the decode budget (its header is checked first: a refused photo costs nothing)."""
    reduce_to = state.index.model.preprocess.reduce_to
    with open_image(data, state.settings.max_pixels, reduce_to, name=name) as header:
        cost = decode_cost(header)
    with state.decode_budget.reserve(cost, name):
        (image_id,) = state.index.add([data], [metadata])
    return state.index.get(image_id)


@router.post("", status_code=201, response_model=ImageOut, responses=UPLOAD_ERRORS, dependencies=[WriteAccess])
async def add_image(
    request: Request,
    response: Response,
    state: State,
    image: Annotated[UploadFile, File(description="The photo.")],
    name: Annotated[str | None, Form(max_length=200, description="Display name.")] = None,
    lat: Annotated[float | None, Form(ge=-90, le=90, description="Latitude, decimal degrees (WGS 84).")] = None,
    lon: Annotated[float | None, Form(ge=-180, le=180, description="Longitude, decimal degrees (WGS 84).")] = None,
    metadata: Annotated[str | None, Form(max_length=10_000, description="Other metadata, a JSON object.")] = None,
) -> ImageOut:
    """Add a photo to the collection. When the answer (201) arrives, the photo is described, stored
    in the catalog and the index, and survives a restart. The same content added twice keeps one id.
    Nothing is stored when the request is refused."""
    meta = _metadata(name, lat, lon, metadata)
    data = await read_upload(image, state.settings.max_upload_bytes)
    record = await state.run(_add, state, data, image.filename or "upload", meta)
    response.headers["Location"] = str(request.url_for("get_image", image_id=record.id).path)
    return image_out(request, record)


@router.get("/{image_id}", response_model=ImageOut, responses={**NOT_FOUND, **AUTH}, dependencies=[ReadAccess])
async def get_image(request: Request, state: State, image_id: ImageId) -> ImageOut:
    """The catalog record of an image."""
    return image_out(request, await run_in_threadpool(_record, state, image_id))


def _open_file(state: ServiceState, image_id: int):
    """The record and the opened file (PhotoFileError: a 404 with the reason, service.app)."""
    record = _record(state, image_id)
    return record, state.index.open_photo(record)


def _chunks(handle) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


@router.get(
    "/{image_id}/file", response_class=StreamingResponse, dependencies=[ReadAccess],
    responses={200: {"content": {"image/*": {}}, "description": "The photo file."}, **NOT_FOUND, **AUTH},
)
async def get_image_file(state: State, image_id: ImageId) -> StreamingResponse:
    """The photo file as stored: only of an indexed photo, and only from inside the collection."""
    record, handle = await run_in_threadpool(_open_file, state, image_id)
    name = os.path.basename(record.public_path or f"image-{image_id}")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    disposition = "inline; filename*=utf-8''" + quote(name)
    return StreamingResponse(_chunks(handle), media_type=media_type, headers={
        "Content-Length": str(record.size), "Content-Disposition": disposition, "X-Content-Type-Options": "nosniff",
    })


@router.delete("/{image_id}", status_code=204, responses={**NOT_FOUND, **WRITE_AUTH}, dependencies=[WriteAccess])
async def delete_image(state: State, image_id: ImageId) -> Response:
    """Remove an image from the collection (an uploaded file is deleted; a photo of the indexed
    folder stays on disk and is not added back by later `netvlad index` runs)."""
    await run_in_threadpool(_record, state, image_id)
    await state.run(state.index.remove, [image_id])
    return Response(status_code=204)
