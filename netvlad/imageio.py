"""Decoding photos: `load_image`, or its two steps `open_image` (header) and `decode_image`, and
one error type, `ImageError`.

Policy: EXIF orientation applied, converted to RGB (grey, palette, CMYK and alpha images included),
images above `max_pixels` refused from their header (decompression bombs), and pictures decoded
at a reduced scale when the caller says how small it will make them (`reduce_to`). The two steps
let a server see how much memory a decode will take before it starts (`Image.size` after
`open_image`). Resizing to the network's input is the model's job (`netvlad.transforms`).
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

from netvlad.errors import CorruptImageError, ImageError, NotAnImageError, TooManyPixelsError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image]

#: Refuse images with more pixels than this (about 10 000 × 10 000), whatever the file size.
DEFAULT_MAX_PIXELS = 100_000_000

#: File name endings treated as photos when walking folders.
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "upload" if isinstance(source, (bytes, bytearray)) else "image"


def _reduce_on_open(image: Image.Image, reduce_to: int) -> None:
    """Ask the decoder for a smaller picture whose long side stays ≥ `reduce_to`, where the format
    can decode at a reduced scale: JPEG (and MPO) by libjpeg's DCT scaling (½, ¼, ⅛), JPEG 2000
    by dropping resolution levels. Other formats decode at full size (then `_reduce_loaded`)."""
    long_side = max(image.size)
    if long_side < 2 * reduce_to:
        return
    if image.format in ("JPEG", "MPO"):
        scale = reduce_to / long_side
        image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    elif image.format == "JPEG2000":
        image.reduce = int(math.log2(long_side // reduce_to))  # halvings


def _reduce_loaded(image: Image.Image, reduce_to: int) -> Image.Image:
    """Shrink a decoded picture by a whole factor (box filter) keeping the long side ≥ `reduce_to`,
    before any full-size copy (orientation, colour conversion) is made."""
    factor = max(image.size) // reduce_to
    if factor < 2:
        return image
    if image.mode not in ("1", "L", "LA", "I", "F", "RGB", "RGBA", "RGBa", "La", "CMYK", "YCbCr"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode.endswith("A") else "RGB")
    return image.reduce(factor)


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None,
               name: str | None = None) -> Image.Image:
    """Read the header of `source` (path, bytes or file object): the lazy `PIL.Image` whose `size`
    is what decoding will produce (a reduced scale already chosen, see `load_image`). Refuses with
    `ImageError` a missing, empty or unreadable file and more than `max_pixels` (width × height of
    the stored picture: decompression bombs never reach the decoder). Decode it with
    `decode_image`; a path or bytes source is read until then. `name` names it in errors
    (default: the path, or "upload" for bytes)."""
    name = name or _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(name, "no such file")
        if path.stat().st_size == 0:
            raise CorruptImageError(name, "empty file (0 bytes)")
        handle: str | os.PathLike | BinaryIO = path  # Pillow opens it and closes it once decoded
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise CorruptImageError(name, "empty (0 bytes)")
        handle = io.BytesIO(source)
    else:
        handle = source
        start = handle.tell()
        if handle.seek(0, io.SEEK_END) == start:
            raise CorruptImageError(name, "empty (0 bytes)")
        handle.seek(start)
    try:
        with warnings.catch_warnings():
            # Pillow warns, then errors, at its own bomb limit; ours is applied explicitly below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
    except UnidentifiedImageError:
        raise NotAnImageError(name, "not an image, or a format that cannot be read (JPEG, PNG, WebP, TIFF, BMP, GIF are)") from None
    except Image.DecompressionBombError as exc:
        raise TooManyPixelsError(name, f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(name, f"corrupt or truncated image ({exc})") from None
    if image.width * image.height > max_pixels:
        image.close()
        raise TooManyPixelsError(name, f"{image.width}×{image.height} = {image.width * image.height:,} pixels is more "
                               f"than the limit of {max_pixels:,} pixels")
    if reduce_to is not None:
        _reduce_on_open(image, reduce_to)
    return image


def decode_image(image: Image.Image, reduce_to: int | None = None, name: str = "image") -> Image.Image:
    """Decode an image from `open_image` into an RGB `PIL.Image` (shrunk by a whole factor first
    when `reduce_to` is given, EXIF orientation applied). `ImageError` when the data is corrupt or
    truncated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            decoded = _reduce_loaded(image, reduce_to) if reduce_to is not None else image
            if decoded is not image:
                decoded.info["exif"] = image.getexif().tobytes()  # TIFF keeps orientation in its tags
                image.close()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        image.close()
        raise CorruptImageError(name, f"corrupt or truncated image ({exc})") from None
    try:
        decoded = ImageOps.exif_transpose(decoded)
    except (OSError, ValueError, SyntaxError, TypeError):
        pass  # unreadable EXIF block: keep the stored orientation
    return decoded.convert("RGB") if decoded.mode != "RGB" else decoded


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """Decode `source` (path, bytes, file object or PIL image) into an RGB `PIL.Image`.

    `reduce_to`: the long side (pixels) the caller will shrink the photo to. The picture is then
    decoded at a reduced scale where the format allows it (JPEG ½ ¼ ⅛, JPEG 2000 levels) and
    shrunk by a whole factor right after decoding otherwise, keeping the long side at least that
    long: several times faster and smaller for camera photos, same content.
    Raises `ImageError` saying why when the file is missing, empty, truncated, not an image,
    or larger than `max_pixels` (width × height).
    """
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise TooManyPixelsError("image", f"{source.width}×{source.height} pixels is more than the limit of {max_pixels:,}")
        try:
            source = ImageOps.exif_transpose(source)
        except (OSError, ValueError, SyntaxError, TypeError):
            pass
        return source.convert("RGB") if source.mode != "RGB" else source
    return decode_image(open_image(source, max_pixels, reduce_to), reduce_to, _describe(source))


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def walk_photos(root: Path, exclude: tuple[Path, ...] = (), outside: list[tuple[str, str]] | None = None
                ) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of each photo file under `root`, in sorted order.

    Hidden files and folders (name starting with ".") and folders in `exclude` are skipped;
    symbolic links to folders are followed once per real folder (no loops); links to files are
    yielded like files (broken ones too: reading them reports the error). With a list `outside`,
    links whose target lies outside `root` are neither followed nor yielded but appended to it
    as (relative path, reason): a collection never reaches past its own folder.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    visited = {real_root}
    excluded = {os.path.realpath(p) for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if name.startswith(".") or real in visited or real in excluded:
                continue
            if outside is not None and not _inside(real, real_root):
                outside.append((Path(path).relative_to(root).as_posix(), "a link to a folder outside the photo folder: skipped"))
                continue
            visited.add(real)
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in PHOTO_SUFFIXES:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            # folders walked are inside the root, so only a link can lead out of it
            if outside is not None and path.is_symlink() and not _inside(os.path.realpath(path), real_root):
                outside.append((rel, "a link to a file outside the photo folder: skipped"))
                continue
            yield rel, path


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
            raise ImageError(str(entry), "no such file or folder")
    return found
