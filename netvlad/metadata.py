"""Photo metadata: the typed fields (`lat`, `lon`, `taken_at`, `name`) and free JSON keys.

One rule set, applied wherever metadata enters (the Python API, the service's form fields and
metadata JSON) by `validate_metadata`, and again when a catalog row is read (`clean_coordinate`,
`clean_taken_at`, `clean_extra`), so that a value stored by an older version or written to the
catalog by hand can never break a search or a record: it reads as absent.

    lat       decimal degrees (WGS 84), finite, in [-90, 90]; given together with lon
    lon       decimal degrees (WGS 84), finite, in [-180, 180]
    taken_at  capture time, ISO 8601 ("2021-06-01T12:30:00", a zone allowed), stored as given
    name      display name, a non-empty string of at most 200 characters
    other     any JSON value (nested too), kept as given
"""

from __future__ import annotations

import json
import math
from datetime import datetime

from netvlad.errors import MetadataError

#: Inclusive valid range of each coordinate, degrees.
COORDINATE_RANGES = {"lat": (-90.0, 90.0), "lon": (-180.0, 180.0)}
MAX_NAME_LENGTH = 200


def _coordinate(key: str, value: object) -> float:
    low, high = COORDINATE_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetadataError(f"metadata '{key}' must be a number of degrees, not {json.dumps(value)[:40]}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise MetadataError(f"metadata '{key}' = {value} is outside [{low:g}, {high:g}] degrees")
    return number


def _taken_at(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MetadataError(f"metadata 'taken_at' must be an ISO 8601 date-time string, not {json.dumps(value)[:40]}")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise MetadataError(f"metadata 'taken_at' = {value[:40]!r} is not an ISO 8601 date-time "
                            "(e.g. 2021-06-01T12:30:00)") from None
    return value


def _name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_LENGTH:
        raise MetadataError(f"metadata 'name' must be a non-empty string of at most {MAX_NAME_LENGTH} characters")
    return value


def _json_value(key: str, value: object) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"metadata '{key}' is not a JSON value ({exc})") from None


def validate_metadata(metadata: object) -> dict:
    """A checked copy of one photo's metadata (None → {}); `MetadataError` naming the first bad
    field. Typed fields are checked as the module docstring says; `lat` and `lon` come together."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise MetadataError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    clean = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise MetadataError(f"metadata keys must be strings, not {key!r}")
        if key in COORDINATE_RANGES:
            clean[key] = _coordinate(key, value)
        elif key == "taken_at":
            clean[key] = _taken_at(value)
        elif key == "name":
            clean[key] = _name(value)
        else:
            _json_value(key, value)
            clean[key] = value
    if ("lat" in clean) != ("lon" in clean):
        raise MetadataError("give both lat and lon, or neither")
    return clean


def clean_coordinate(key: str, value: object) -> float | None:
    """A stored `lat`/`lon` as a float, None when absent or not a valid coordinate."""
    try:
        return _coordinate(key, value)
    except MetadataError:
        return None


def clean_taken_at(value: object) -> str | None:
    """A stored capture time, None when absent or not ISO 8601."""
    try:
        return _taken_at(value)
    except MetadataError:
        return None


def clean_extra(stored: object) -> dict:
    """The metadata keys stored as JSON text (name and free keys), {} when absent or unreadable;
    a `name` that is not a valid name is left out."""
    if not isinstance(stored, str):
        return {}
    try:
        value = json.loads(stored)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    if "name" in value:
        try:
            _name(value["name"])
        except MetadataError:
            value.pop("name")
    return value
