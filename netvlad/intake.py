"""Photo intake for `Index.add`: a path or uploaded bytes → a `Photo` ready to catalogue
(decoded, hashed, header facts read, its catalog path chosen), describing the new ones, and
cataloguing them with their uploaded bytes stored, all or nothing.

Catalog paths: a file inside the photo folder is recorded relative to it (origin ``folder``), any
other file by its absolute path (``file``), and uploaded bytes as
``uploads/<sha[:2]>/<sha><suffix>`` inside the index folder (``upload``): identical uploads share
one file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DTYPE, DescriptorStore
from netvlad.errors import ImageError
from netvlad.exif import PhotoInfo, read_photo_info
from netvlad.imageio import load_image
from netvlad.indexfolder import UPLOADS
from netvlad.storage import write_atomic

#: Upload file suffix by Pillow format name.
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif"}


@dataclass
class Photo:
    """A photo prepared for the catalog: where it is recorded, its facts, its decoded picture, and
    for uploads the bytes to store."""

    path: str
    origin: str
    size: int
    mtime_ns: int
    sha256: str
    info: PhotoInfo
    image: Image.Image
    data: bytes | None = None


def prepare_photo(item: str | os.PathLike | bytes, root: Path | None, max_pixels: int,
                  reduce_to: int | None) -> Photo:
    """Decode (`load_image`, so `ImageError` when it cannot be used), hash and read the header of
    a photo file or uploaded bytes; `root` is the photo folder (None before one is bound)."""
    if isinstance(item, (bytes, bytearray)):
        data = bytes(item)
        image = load_image(data, max_pixels, reduce_to=reduce_to)
        info = read_photo_info(data)
        sha = hashlib.sha256(data).hexdigest()
        path = f"{UPLOADS}/{sha[:2]}/{sha}{SUFFIXES.get(info.format or '', '.img')}"
        return Photo(path, "upload", len(data), time.time_ns(), sha, info, image, data)
    source = Path(item).resolve()
    image = load_image(source, max_pixels, reduce_to=reduce_to)
    stat = source.stat()
    with open(source, "rb") as handle:
        sha = hashlib.file_digest(handle, "sha256").hexdigest()
    if root is not None and source.is_relative_to(root):
        path, origin = source.relative_to(root).as_posix(), "folder"
    else:
        path, origin = str(source), "file"
    return Photo(path, origin, stat.st_size, stat.st_mtime_ns, sha, read_photo_info(source), image)


def prepare_photos(items: Sequence[str | os.PathLike | bytes], root: Path | None, max_pixels: int,
                   reduce_to: int | None) -> list[Photo]:
    """`prepare_photo` for each item; `ImageError` naming the first one that cannot be used."""
    photos = []
    for position, item in enumerate(items):
        try:
            photos.append(prepare_photo(item, root, max_pixels, reduce_to))
        except OSError as exc:
            raise ImageError(f"photo {position + 1}", exc.strerror or str(exc)) from None
    return photos


def describe_new(model, photos: Sequence[Photo], catalog: Catalog, amp: bool | None) -> dict[str, np.ndarray]:
    """sha256 → float32 descriptor (stored precision) of the photos whose content is not indexed yet."""
    todo = {p.sha256: p.image for p in photos if catalog.find(p.sha256)[1] != "indexed"}
    if not todo:
        return {}
    descriptors = np.asarray(model.describe(list(todo.values()), amp=amp), dtype=DTYPE)
    return dict(zip(todo, descriptors.astype(np.float32)))


def catalogue(store: DescriptorStore, directory: Path, photos: Sequence[Photo], metadata: Sequence[dict],
              fresh: dict[str, np.ndarray], before_commit: Callable[[dict[int, str]], None] | None = None
              ) -> tuple[list[int], dict[int, np.ndarray]]:
    """Store the uploads of `photos` in index folder `directory`, then record the photos and the
    descriptors of those not indexed yet (`fresh`, by sha256, into a shard of `store`) in one
    catalog transaction; `before_commit({id: sha256})` runs inside it, before the descriptors are
    stored, with the images about to become indexed (their evidence is stored there). Returns
    (ids, {id: descriptor} of the images that became indexed); on failure nothing stays behind."""
    catalog = store.catalog
    written = store_uploads(directory, photos)
    ids, new, shas = [], {}, {}
    try:
        with catalog.transaction():
            for photo, meta in zip(photos, metadata):
                image_id = catalog.record_file(
                    photo.path, photo.origin, photo.size, photo.mtime_ns, photo.sha256, photo.info, meta
                )
                ids.append(image_id)
                if photo.sha256 in fresh and catalog.status(image_id) != "indexed":
                    new[image_id] = fresh[photo.sha256]
                    shas[image_id] = photo.sha256
            if new and before_commit is not None:
                before_commit(shas)
            if new:
                written.append(store.append(list(new), np.stack(list(new.values()))))
    except BaseException:
        remove_files(written)  # the catalog rolled back: nothing may point to them
        raise
    return ids, new


def store_uploads(directory: Path, photos: Sequence[Photo]) -> list[Path]:
    """Write the uploaded bytes of `photos` that the index folder `directory` does not hold yet;
    returns the files written (for the caller to remove if cataloguing them fails)."""
    written = []
    try:
        for photo in photos:
            target = directory / photo.path
            if photo.data is not None and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, photo.data)
                written.append(target)
    except BaseException:
        remove_files(written)
        raise
    return written


def remove_files(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
