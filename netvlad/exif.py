"""What a photo's header says about it: displayed size, capture time and GPS position (EXIF).

Only the header is read (Pillow opens images lazily), so probing a large collection is cheap.
Whether the pixels decode is `netvlad.imageio.load_image`'s call, not this module's: a file whose
header cannot be read simply yields an empty `PhotoInfo`.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Union

from PIL import ExifTags, Image

ORIENTATION_TAG = 0x0112
DATETIME_ORIGINAL_TAG = 0x9003
DATETIME_TAG = 0x0132
#: EXIF orientations that rotate the picture by ±90°, so displayed width and height swap.
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class PhotoInfo:
    """Header facts. width/height in displayed pixels (EXIF orientation applied); taken_at as ISO
    8601 local time without zone ("2021-06-01T12:30:00"); lat/lon in decimal degrees (WGS 84);
    format as Pillow names it ("JPEG", "PNG", …)."""

    width: int | None = None
    height: int | None = None
    taken_at: str | None = None
    lat: float | None = None
    lon: float | None = None
    format: str | None = None


def _exif_datetime(value: object) -> str | None:
    """EXIF "YYYY:MM:DD HH:MM:SS" → ISO "YYYY-MM-DDTHH:MM:SS"; None when absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def _degrees(value: object, ref: object, negative: str) -> float | None:
    """EXIF (degrees, minutes, seconds) rationals and an N/S/E/W reference → signed degrees."""
    try:
        d, m, s = (float(part) for part in value)  # type: ignore[union-attr]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    degrees = d + m / 60.0 + s / 3600.0
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "ignore")
    if isinstance(ref, str) and ref.strip("\x00 ").upper() == negative:
        degrees = -degrees
    return degrees if math.isfinite(degrees) else None


def _gps(gps: dict) -> tuple[float | None, float | None]:
    lat = _degrees(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), "S")
    lon = _degrees(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), "W")
    if lat is None or lon is None or not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None, None
    return lat, lon


def read_photo_info(source: Union[str, os.PathLike, bytes]) -> PhotoInfo:
    """Header facts of a photo file or its bytes; fields the header lacks (or all, when it cannot
    be parsed) are None."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb and EXIF warnings: the decoder reports bombs
            with Image.open(handle) as image:
                width, height = image.size
                image_format = image.format
                exif = image.getexif()
                orientation = exif.get(ORIENTATION_TAG)
                details = exif.get_ifd(ExifTags.IFD.Exif)
                gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except Exception:  # any parse failure of a foreign file means "no header facts"
        return PhotoInfo()
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    taken_at = _exif_datetime(details.get(DATETIME_ORIGINAL_TAG)) or _exif_datetime(exif.get(DATETIME_TAG))
    lat, lon = _gps(gps)
    return PhotoInfo(width, height, taken_at, lat, lon, image_format)
