"""Decoding photos: one entry point, `load_image`, and one error type, `ImageError`.

Policy: EXIF orientation applied, converted to RGB (grey, palette, CMYK and alpha images included),
and images above `max_pixels` refused before decoding (decompression bombs). Resizing is the
model's job (`netvlad.transforms`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from netvlad.errors import ImageError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image]

#: Refuse images with more pixels than this (about 10 000 × 10 000), whatever the file size.
DEFAULT_MAX_PIXELS = 100_000_000

#: File name endings treated as photos when walking folders.
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "upload" if isinstance(source, (bytes, bytearray)) else "image"


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """Decode `source` (path, bytes, file object or PIL image) into an RGB `PIL.Image`.

    `reduce_to`: the long side (pixels) the caller will shrink the photo to. JPEGs are then
    decoded directly at the largest reduction (½, ¼ or ⅛, libjpeg's DCT scaling) that keeps the
    long side at least that long: several times faster for camera photos, same content.
    Raises `ImageError` saying why when the file is missing, empty, truncated, not an image,
    or larger than `max_pixels` (width × height).
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        name = _describe(source)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{name}: no such file")
            if path.stat().st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")
            handle: BinaryIO = open(path, "rb")
        elif isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageError(f"{name}: empty (0 bytes)")
            handle = io.BytesIO(source)
        else:
            handle = source
        try:
            with warnings.catch_warnings():
                # Pillow warns, then errors, at its own bomb limit; we apply ours explicitly below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(handle)
                if image.width * image.height > max_pixels:
                    raise ImageError(
                        f"{name}: {image.width}×{image.height} pixels is more than the limit of "
                        f"{max_pixels:,} pixels"
                    )
                if reduce_to is not None and image.format == "JPEG" and max(image.size) >= 2 * reduce_to:
                    scale = reduce_to / max(image.size)
                    image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
                image.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image, or a format Pillow cannot read") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name}: too many pixels ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
        finally:
            if handle is not source:
                handle.close()
    if image.width * image.height > max_pixels:
        raise ImageError(f"{image.width}×{image.height} pixels is more than the limit of {max_pixels:,}")
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, TypeError):
        pass  # unreadable EXIF block: keep the stored orientation
    return image.convert("RGB") if image.mode != "RGB" else image


def walk_photos(root: Path, exclude: tuple[Path, ...] = ()) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of each photo file under `root`, in sorted order.

    Hidden files and folders (name starting with ".") and folders in `exclude` are skipped;
    symbolic links to folders are followed once per real folder (no loops); links to files are
    yielded like files (broken ones too: reading them reports the error).
    """
    root = Path(root)
    visited = {os.path.realpath(root)}
    excluded = {os.path.realpath(p) for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if name.startswith(".") or real in visited or real in excluded:
                continue
            visited.add(real)
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in PHOTO_SUFFIXES:
                continue
            path = Path(dirpath) / name
            yield path.relative_to(root).as_posix(), path


def find_photos(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a list of photo files (folders walked by `walk_photos`).

    Files given explicitly are kept whatever their suffix; a missing path is an `ImageError`.
    """
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(path for _, path in walk_photos(entry))
        elif entry.exists():
            found.append(entry)
        else:
            raise ImageError(f"{entry}: no such file or folder")
    return found
