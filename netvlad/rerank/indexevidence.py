"""The re-ranking evidence an index folder keeps, and keeping it in step with the catalog.

    DIR/evidence.sqlite    one BLOB per (photo, kind): local features ("sift" or "orb") and
                           patch descriptors ("patch"), with each kind's settings
                           (`netvlad.rerank.evidence`)
    DIR/patch-pca.npz      the PCA reducing patch descriptors, learned once on the index's own
                           photos (`PCA_PHOTOS` of them) when patch features are first asked for

An index keeps evidence only when asked (`netvlad index … --local-features sift|orb`,
``--patch-features``). From then on every photo's evidence is stored before the catalog commits it
as indexed (`Index.store_descriptors` and `Index.add` call `store`), removed photos lose theirs with
them, and a writer opening the folder drops orphans a killed run left (`prune`). Photos indexed
before the evidence was asked for are filled in by the next `netvlad index` run (`missing`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from netvlad.errors import ImageError, IndexStoreError, RerankUnavailableError
from netvlad.exif import read_photo_info
from netvlad.imageio import DEFAULT_MAX_PIXELS, load_image
from netvlad.rerank.evidence import EvidenceStore
from netvlad.rerank.localfeatures import LOCAL_KINDS, LocalFeatures, extract_local_features
from netvlad.rerank.patch import (
    DEFAULT_MAX_PATCHES, DEFAULT_SIDE, DEFAULT_SIZES, QUERY_STRIDE, PatchFeatures, PatchPCA, extract_patch_features,
    fit_patch_pca, training_patches,
)
from netvlad.rerank.shortlist import RERANK_METHODS
from netvlad.storage import atomic_path

log = logging.getLogger(__name__)

PATCH = "patch"
PATCH_PCA = "patch-pca.npz"
#: Photos whose patches the patch PCA is learned on (the first ones indexed).
PCA_PHOTOS = 100
#: Patch settings of indexes written before they were stored: the patch pass at the model's own
#: input size (side None), patch sizes of 2, 4 and 6 cells.
EARLY_PATCH_SETTINGS = {"side": None, "sizes": [2, 4, 6]}
#: Keypoints kept per photo and the long side (pixels) local features are found at.
MAX_KEYPOINTS = 1000
MAX_SIDE = 640
#: Threads extracting local features (OpenCV releases the GIL).
THREADS = 2


class IndexEvidence:
    """The evidence of the index folder `directory`: its store (None while it keeps none) and, with
    patch features, their PCA. Writes are serialised by the caller (the index's writer lock)."""

    def __init__(self, directory: Path, store: EvidenceStore | None):
        self.directory = directory
        self.store = store
        self._pca: PatchPCA | None = None

    @classmethod
    def open(cls, directory: Path, writable: bool) -> "IndexEvidence":
        """The folder's evidence (an empty one when it keeps none)."""
        if not EvidenceStore.exists(directory):
            return cls(directory, None)
        return cls(directory, EvidenceStore(directory, readonly=not writable))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # ------------------------------------------------------------------------------ what it keeps

    @property
    def local(self) -> dict | None:
        """{"kind", "max_keypoints", "max_side"} of the local features kept, None without."""
        for kind in LOCAL_KINDS:
            settings = self.store.settings(kind) if self.store is not None else None
            if settings is not None:
                return {"kind": kind, **settings}
        return None

    @property
    def patch(self) -> dict | None:
        """{"side", "sizes"} of the patch descriptors kept (`extract_patch_features`), None without."""
        settings = self.store.settings(PATCH) if self.store is not None else None
        return None if settings is None else {**EARLY_PATCH_SETTINGS, **settings}

    def picture_side(self, method: str) -> int | None:
        """Long side (pixels) a query picture needs for `method`'s evidence (None: any)."""
        if method == "geometric" and self.local is not None:
            return self.local["max_side"]
        if method == PATCH and self.patch is not None:
            return self.patch["side"]
        return None

    def kinds(self) -> list[str]:
        """The evidence kinds kept: the local feature kind and/or ``patch``."""
        local = self.local
        return ([local["kind"]] if local else []) + ([PATCH] if self.patch else [])

    def methods(self) -> list[str]:
        """The re-rankings this index can serve (`netvlad.rerank.shortlist.RERANK_METHODS`)."""
        kept = {"geometric": self.local is not None, PATCH: self.patch is not None}
        return [m for m in RERANK_METHODS if kept.get(m, True)]

    def require(self, method: str) -> None:
        """`RerankUnavailableError` when `method` needs evidence this index does not keep."""
        if method in RERANK_METHODS and method not in self.methods():
            option = "--local-features sift" if method == "geometric" else "--patch-features"
            raise RerankUnavailableError(
                f"this index holds no evidence for '{method}' re-ranking: add it with "
                f"`netvlad index PHOTOS --index DIR {option}` (it can serve: {', '.join(self.methods())})")

    def enable(self, local: str | None = None, max_keypoints: int = MAX_KEYPOINTS, patch: bool = False) -> None:
        """Start keeping local features of kind `local` and/or patch descriptors (a writer call).
        A kind already kept stays as it is; another local kind than the kept one is refused."""
        if local is None and not patch:
            return
        if local is not None and local not in LOCAL_KINDS:
            raise ValueError(f"local features must be one of {LOCAL_KINDS}, not {local!r}")
        if self.store is None:
            self.store = EvidenceStore(self.directory)
        current = self.local
        if local is not None and current is not None and current["kind"] != local:
            raise IndexStoreError(f"{self.directory} keeps {current['kind']} local features, not {local}: "
                                  "use another --index folder")
        if local is not None and current is None:
            self.store.set_settings(local, {"max_keypoints": int(max_keypoints), "max_side": MAX_SIDE})
        if patch and not self.patch:
            self.store.set_settings(PATCH, {"pca": PATCH_PCA, "side": DEFAULT_SIDE, "sizes": list(DEFAULT_SIZES)})

    # ------------------------------------------------------------------------------ extracting

    def local_features(self, image, full_size: tuple[int, int] | None = None) -> LocalFeatures:
        """Local features of a picture (PIL image or (H, W, 3) uint8), by the kept settings; points
        map to a `full_size` (w, h) original when the picture is a reduced decode of it."""
        local = self.local
        if local is None:
            raise RerankUnavailableError("this index keeps no local features")
        features = extract_local_features(image, local["kind"], local["max_keypoints"], local["max_side"])
        width = image.width if hasattr(image, "width") else image.shape[1]
        if full_size and full_size[0]:
            features.scale *= width / full_size[0]
        return features


    def pca(self, model) -> PatchPCA | None:
        """The patch PCA (None until learned)."""
        if self._pca is None and (self.directory / PATCH_PCA).is_file():
            self._pca = PatchPCA.load(self.directory / PATCH_PCA)
            if self._pca.input_dim != model.pool.output_dim:
                raise IndexStoreError(f"{self.directory / PATCH_PCA} was learned for another model")
        return self._pca

    def patch_features(self, model, images: Sequence, query: bool = False, amp: bool | None = None
                       ) -> list[PatchFeatures]:
        """`extract_patch_features` of pictures at the kept settings, reduced by the index's PCA
        (learned from them when it has none yet): as stored (a sub-grid of each size) or, for
        `query` pictures, every patch at `QUERY_STRIDE`."""
        kept = self.patch
        if kept is None:
            raise RerankUnavailableError("this index keeps no patch descriptors")
        pca = self.pca(model)
        if pca is None and query:
            raise RerankUnavailableError("this index has not learned its patch PCA yet: index some photos first")
        pca = pca or self.learn_pca(model, images)
        max_patches, stride = (None, QUERY_STRIDE) if query else (DEFAULT_MAX_PATCHES, 1)
        return extract_patch_features(model, images, pca, kept["sizes"], max_patches, amp=amp, side=kept["side"],
                                      stride=stride)

    def learn_pca(self, model, images: Sequence) -> PatchPCA:
        """Learn and save the patch PCA from the patches of up to `PCA_PHOTOS` of `images`."""
        sample = list(images)[:PCA_PHOTOS]
        raw = training_patches(model, sample, self.patch["sizes"], side=self.patch["side"])
        pca = fit_patch_pca(raw, dim=min(128, len(raw) - 1))
        with atomic_path(self.directory / PATCH_PCA) as tmp:
            pca.save(tmp)
        log.info("learned the patch PCA on %d patches of %d photos", len(raw), len(sample))
        self._pca = pca
        return pca

    def extract(self, model, pictures: Sequence[tuple[Image.Image, tuple[int, int] | None]],
                amp: bool | None = None) -> dict[str, list[bytes]]:
        """kind → bytes of each picture (PIL image, (w, h) of the original it was decoded from at a
        reduced scale, or None), for every kept kind; points are in the original's pixels."""
        out: dict[str, list[bytes]] = {}
        if not pictures:
            return out
        local = self.local
        if local is not None:
            with ThreadPoolExecutor(THREADS, thread_name_prefix="local-features") as pool:
                out[local["kind"]] = [f.to_bytes() for f in pool.map(lambda p: self.local_features(*p), pictures)]
        if self.patch is not None:
            features = self.patch_features(model, [image for image, _ in pictures], amp=amp)
            out[PATCH] = [_at_full_size(f, full).to_bytes() for f, (_, full) in zip(features, pictures)]
        return out

    def extract_files(self, model, photos: Sequence[tuple[int, str]], max_pixels: int = DEFAULT_MAX_PIXELS,
                      amp: bool | None = None) -> dict[str, dict[int, bytes]]:
        """kind → {id: bytes} for photos (id, file path); a photo that no longer decodes is left
        out with a warning (its descriptor step records the failure)."""
        reduce_to = max(MAX_SIDE, (self.patch or {}).get("side") or 0, model.preprocess.reduce_to or 0)

        def load(item):
            image_id, path = item
            try:
                info = read_photo_info(path)
                return image_id, load_image(path, max_pixels, reduce_to=reduce_to), (info.width, info.height)
            except (ImageError, OSError) as exc:
                log.warning("evidence of photo %d: %s", image_id, exc)
                return None

        with ThreadPoolExecutor(THREADS, thread_name_prefix="decode") as pool:
            loaded = [item for item in pool.map(load, photos) if item is not None]
        found = self.extract(model, [(image, full) for _, image, full in loaded], amp)
        return {kind: {image_id: data for (image_id, _, _), data in zip(loaded, blobs)} for kind, blobs in found.items()}

    # ------------------------------------------------------------------------------ in step with the catalog

    def put(self, evidence: dict[str, dict[int, bytes]]) -> None:
        for kind, items in evidence.items():
            if items:
                self.store.put(kind, items)

    def missing(self, indexed_ids: Sequence[int]) -> np.ndarray:
        """Indexed ids lacking some kept kind of evidence (sorted)."""
        ids = np.asarray(sorted(indexed_ids), dtype=np.int64)
        lacking = [np.setdiff1d(ids, self.store.ids(kind)) for kind in self.kinds()]
        return np.unique(np.concatenate(lacking)) if lacking else np.zeros(0, np.int64)

    def delete(self, ids: Sequence[int]) -> None:
        if self.store is not None and len(ids):
            self.store.delete([int(i) for i in ids])

    def prune(self, indexed_ids: Sequence[int]) -> None:
        """Drop evidence of photos the catalog does not list as indexed (a killed run's)."""
        if self.store is not None:
            removed = self.store.prune_orphans(indexed_ids)
            if removed:
                log.info("dropped the evidence of %d photos a killed run left", removed)

    # ------------------------------------------------------------------------------ reading

    def local_of(self, ids: Sequence[int]) -> dict[int, LocalFeatures]:
        local = self.local
        return {} if local is None else {i: LocalFeatures.from_bytes(b) for i, b in self.store.get(local["kind"], ids).items()}

    def patches_of(self, ids: Sequence[int]) -> dict[int, PatchFeatures]:
        if self.patch is None:
            return {}
        return {i: PatchFeatures.from_bytes(b) for i, b in self.store.get(PATCH, ids).items()}

    def bytes_per_photo(self) -> dict[str, float]:
        """Mean stored bytes of one photo's evidence, per kind kept."""
        return {kind: self.store.bytes_per_photo(kind) for kind in self.kinds()}


def _at_full_size(features: PatchFeatures, full_size: tuple[int, int] | None) -> PatchFeatures:
    """`features` of a reduced decode with their centres in the pixels of the `full_size` original."""
    if not full_size or not full_size[0] or tuple(full_size) == tuple(features.image_size):
        return features
    factor = np.array([full_size[0] / features.image_size[0], full_size[1] / features.image_size[1]], np.float32)
    for level in features.levels:
        level.centres = level.centres * factor
    features.image_size = (int(full_size[0]), int(full_size[1]))
    features.cell *= float(factor[0])
    return features
