"""Patch-NetVLAD-style re-ranking (Hausler et al., CVPR 2021) from the model's own feature map
(docs/reranking.md).

- `patch_vlad`: NetVLAD vectors of the square patches of the feature map at a few sizes, all
  patches of one size from integral (cumulative) sums of the assignment-weighted features
  ``a_k(x)·x`` and of ``a_k(x)``: ``V_k(patch) = Σ a·x − c_k Σ a``, then intra-normalised and
  L2-normalised like the NetVLAD layer. No loop over patches; only the patches kept
  (`patch_positions`: every `stride` cells, or a stored photo's thinned sub-grid) are computed.
- `PatchPCA` / `fit_patch_pca`: the PCA(-whitening) learned at index time that reduces K·D
  dimensions to `dim`, saved as an .npz file.
- `PatchFeatures`: one photo's reduced patch descriptors (float16) and centres (original-image
  pixels) per size, with a compact versioned byte format (`to_bytes` / `from_bytes`).
- `extract_patch_features`: photos → `PatchFeatures`, batched like `NetVLADModel.describe`.
- `patch_score` / `patch_rerank`: per size, mutual nearest neighbours, then RANSAC on the matched
  patch centres; each size's inlier fraction is standardised over the shortlist and the sizes are
  summed with Patch-NetVLAD's weights — the authors' "performance" matcher, with one change: a
  similarity transform (shift, scale, rotation; 2-point samples) where they fit a homography
  (4-point samples). On at most 64 coarse patch matches a homography took thousands of RANSAC
  iterations, 4 ms a fit and 600 ms a query at k = 50 on this project's 2-core CPU; the
  similarity takes 11 ms a query, and on val/ (160 queries, top 50) gave R@1 80.0 % against the
  homography's 78.8 %. Their faster "rapid spatial scoring" (consistency of the displacements
  alone) was measured and dropped: on val/ (sizes weighted equally) it took R@1 to 71.2 % where
  RANSAC scoring gave 81.2 %; it rewarded far crops of the same scene, whose few matches still
  agree on a shift.

Defaults, Patch-NetVLAD's own: the patch pass runs on the photo resized to a 640-px long side
(its 640×480 input; the global descriptor keeps the model's own input size), which gives the
stride-16 backbones a 40×30 feature map; patch sizes 2, 5 and 8 cells weighted 0.45, 0.15 and
0.4. One addition, measured (docs/reranking.md): the final score adds the candidate's global
similarity, standardised over the shortlist like each size (`GLOBAL_WEIGHT`; 0 gives the
authors' ranking by patches alone). 128 PCA dimensions, whitened; at most 64 patches of each
size stored per database photo (an evenly spaced sub-grid): ≈ 3 × 60 × (128 × 2 + 8) bytes ≈
43 KB a photo.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from netvlad.batching import Source, evaluating, group_by_shape, load_tensors
from netvlad.devices import amp_dtype
from netvlad.exif import ORIENTATION_TAG, TRANSPOSED_ORIENTATIONS, read_photo_info
from netvlad.pooling import NetVLAD

if TYPE_CHECKING:
    from netvlad.model import NetVLADModel

#: Long side (pixels) of the patch pass's input: Patch-NetVLAD's 640×480 (a 40×30 feature map).
DEFAULT_SIDE = 640
#: Patch sides in feature-map cells: Patch-NetVLAD's.
DEFAULT_SIZES = (2, 5, 8)
#: Weights of the smallest, middle and largest of three patch sizes: Patch-NetVLAD's published
#: 0.45, 0.15, 0.4 (for its sizes 2, 5, 8). Other numbers of sizes are weighted equally.
SIZE_WEIGHTS = (0.45, 0.15, 0.4)
#: Weight of the global similarity in a candidate's score, against 1 for the patch sizes together
#: (both standardised over the shortlist); 0: Patch-NetVLAD's ranking by patches alone.
GLOBAL_WEIGHT = 1.0
#: RANSAC threshold on matched patch centres, in the query's feature-map cells (Patch-NetVLAD: 1.5).
RANSAC_CELLS = 1.5
RANSAC_ITERS = 2000
RANSAC_CONFIDENCE = 0.99
#: PCA dimensions of a stored patch descriptor.
DEFAULT_DIM = 128
#: Patches of one size kept per database photo (queries keep all of them: `max_patches=None`).
DEFAULT_MAX_PATCHES = 64
#: Queries keep the patches at every other cell in each direction (a quarter of them; the
#: database keeps a sparser sub-grid): 4× less work for the query's patch pass and matching.
QUERY_STRIDE = 2
#: Elements of the (b, K, D, H, W) integral tensor computed at once (256 MB in float32).
INTEGRAL_BUDGET = 64 << 20

_MAGIC = b"NVPF"
_VERSION = 2
_START = struct.Struct("<4sB")  # magic, version
_HEADERS = {1: struct.Struct("<4sBBHII"),  # magic, version, levels, dim, width, height
            2: struct.Struct("<4sBBHIIf")}  # … and the feature-map cell in pixels
_LEVEL = struct.Struct("<HHHI")  # patch size, grid rows, grid columns, patches


# ---------------------------------------------------------------------------------- patch vectors

def patch_positions(h: int, w: int, size: int, stride: int = 1, max_patches: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-left cells (rows (gh,), columns (gw,)) of the size×size patches kept on an h×w feature
    map: every `stride` cells, thinned to an evenly spaced sub-grid of at most `max_patches`."""
    ys, xs = np.arange(0, h - size + 1, stride), np.arange(0, w - size + 1, stride)
    if max_patches is None or len(ys) * len(xs) <= max_patches:
        return ys, xs
    f = math.sqrt(max_patches / (len(ys) * len(xs)))
    keep_r, keep_c = max(1, int(len(ys) * f)), max(1, int(len(xs) * f))
    return (ys[np.round(np.linspace(0, len(ys) - 1, keep_r)).astype(int)],
            xs[np.round(np.linspace(0, len(xs) - 1, keep_c)).astype(int)])


def _take(t: torch.Tensor, dim: int, index: np.ndarray) -> torch.Tensor:
    """`t` at positions `index` along `dim` (negative): a strided view when they are evenly spaced
    (every grid of a query), a copy (`index_select`) otherwise (a stored photo's thinned sub-grid)."""
    steps = np.diff(index)
    if len(index) and (len(steps) == 0 or (steps[0] > 0 and (steps == steps[0]).all())):
        where = slice(int(index[0]), int(index[-1]) + 1, int(steps[0]) if len(steps) else 1)
        return t[(Ellipsis, where) + (slice(None),) * (-1 - dim)]
    return t.index_select(dim, torch.from_numpy(index).to(t.device))


def _box_sums(integral: torch.Tensor, size: int, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """Sums over the size×size windows with top-left cells `rows` × `cols` from an integral tensor
    (…, H+1, W+1) → (…, len(rows), len(cols))."""
    def corner(ys: np.ndarray, xs: np.ndarray) -> torch.Tensor:
        return _take(_take(integral, -2, ys), -1, xs)

    return corner(rows + size, cols + size) - corner(rows, cols + size) - corner(rows + size, cols) + corner(rows, cols)


def patch_vlad_from_features(pool: NetVLAD, features: torch.Tensor, sizes: Sequence[int] = DEFAULT_SIZES,
                             stride: int = 1, max_patches: int | None = None) -> list[torch.Tensor]:
    """(B, D, H, W) unit-norm local features → per size s, (B, gh, gw, K·D) unit-norm NetVLAD
    vectors of the s×s patches at `patch_positions(H, W, s, stride, max_patches)` (all of them
    every `stride` cells by default: gh = (H − s) // stride + 1; 0 when s > H), in the dtype of
    `features` (the layer's parameters are used in that dtype)."""
    if stride < 1 or any(s < 1 for s in sizes):
        raise ValueError(f"patch sizes and stride must be positive, got sizes {tuple(sizes)}, stride {stride}")
    b, d, h, w = features.shape
    k = pool.num_clusters
    assignment = pool.soft_assignment(features).unflatten(2, (h, w))  # (B, K, H, W)
    integral_w = features.new_zeros((b, k, d, h + 1, w + 1))
    integral_w[..., 1:, 1:] = torch.einsum("bkhw,bdhw->bkdhw", assignment, features).cumsum(-2).cumsum(-1)
    integral_a = features.new_zeros((b, k, h + 1, w + 1))
    integral_a[..., 1:, 1:] = assignment.cumsum(-2).cumsum(-1)
    centroids = pool.centroids.to(features)[None, :, :, None, None]
    out = []
    for s in sizes:
        if s > h or s > w:
            out.append(features.new_zeros((b, 0, 0, k * d)))
            continue
        rows, cols = patch_positions(h, w, s, stride, max_patches)
        vlad = _box_sums(integral_w, s, rows, cols) - _box_sums(integral_a, s, rows, cols)[:, :, None] * centroids
        vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalisation (B, K, D, gh, gw)
        out.append(F.normalize(vlad.permute(0, 3, 4, 1, 2).flatten(3), p=2, dim=3))
    return out


def patch_vlad(model: NetVLADModel, images: torch.Tensor, sizes: Sequence[int] = DEFAULT_SIZES, stride: int = 1,
               max_patches: int | None = None, amp: bool | None = None
               ) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Preprocessed images (B, 3, H, W) → (per size, (B, gh, gw, K·D) float32 patch NetVLAD vectors
    of the patches `patch_positions` keeps; the feature map's (h, w)): `patch_vlad_from_features`
    on the model's feature map, backbone under autocast with `amp` (default on CUDA), pooling in
    float32. Run it under `torch.inference_mode()`."""
    device = model.device
    images = images.to(device)
    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=device.type == "cuda" if amp is None else amp):
        features = model.backbone(images)
    per_size = patch_vlad_from_features(model.pool, model.local_norm(features.float()), sizes, stride, max_patches)
    return per_size, (features.shape[-2], features.shape[-1])


# ---------------------------------------------------------------------------------- PCA

@dataclass
class PatchPCA:
    """x (…, K·D) → L2-normalised ((x − mean) @ componentsᵀ) · scale, (…, dim) float32.
    `scale` is 1/√variance when whitened, ones otherwise."""

    mean: np.ndarray  # (K·D,) float32
    components: np.ndarray  # (dim, K·D) float32, orthonormal rows
    scale: np.ndarray  # (dim,) float32

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @property
    def input_dim(self) -> int:
        return self.components.shape[1]

    def transform(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, K·D) → (N, dim) float32, unit norm."""
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"patch PCA expects {self.input_dim}-dim patch vectors, got {x.shape[-1]}: "
                             "it was learned for another model")
        mean, components, scale = (torch.from_numpy(a).to(x.device) for a in (self.mean, self.components, self.scale))
        return F.normalize((x - mean) @ components.T * scale, dim=-1).cpu().numpy()

    def save(self, path: str | Path) -> None:
        """Write an .npz file (`path` as given; callers make it atomic with `atomic_path`)."""
        with open(path, "wb") as handle:
            np.savez(handle, version=np.int64(_VERSION), mean=self.mean, components=self.components, scale=self.scale)

    @classmethod
    def load(cls, path: str | Path) -> "PatchPCA":
        """Read a file written by `save`; `ValueError` when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["version"])
                pca = cls(data["mean"].astype(np.float32), data["components"].astype(np.float32),
                          data["scale"].astype(np.float32))
        except (KeyError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a patch PCA file ({exc})") from None
        if version != _VERSION:
            raise ValueError(f"{path}: patch PCA format version {version}, this netvlad reads {_VERSION}")
        return pca


def fit_patch_pca(descriptors: np.ndarray | torch.Tensor, dim: int = DEFAULT_DIM, whiten: bool = True,
                  seed: int = 0) -> PatchPCA:
    """Learn a `PatchPCA` from sampled patch vectors (N, K·D), N > dim (e.g. `training_patches`),
    by randomised SVD (deterministic for a `seed`)."""
    x = torch.as_tensor(descriptors, dtype=torch.float32)
    if x.ndim != 2 or x.shape[0] <= dim or x.shape[1] < dim:
        raise ValueError(f"patch PCA to {dim} dims needs (N, D) patch vectors with N > {dim} and D ≥ {dim}, "
                         f"got {tuple(x.shape)}")
    mean = x.mean(dim=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, singular, v = torch.svd_lowrank(x - mean, q=min(dim + 16, *x.shape), niter=4)
    variances = singular[:dim] ** 2 / (x.shape[0] - 1)
    scale = (variances + 1e-6 * variances[0]).rsqrt() if whiten else torch.ones(dim)
    return PatchPCA(mean.numpy(), v[:, :dim].T.contiguous().numpy(), scale.float().numpy())


# ---------------------------------------------------------------------------------- features

@dataclass
class PatchLevel:
    """The patches of one size of one photo: `descriptors` (P, dim) float16 unit norm, `centres`
    (P, 2) float32 (x, y) in original-image pixels, P = rows × columns of the kept sub-grid."""

    size: int
    grid: tuple[int, int]
    descriptors: np.ndarray
    centres: np.ndarray


@dataclass
class PatchFeatures:
    """One photo's patch evidence: `image_size` (width, height) in original pixels, one `PatchLevel`
    per patch size, and `cell`: one feature-map cell in those pixels (what RANSAC thresholds are
    measured in)."""

    image_size: tuple[int, int]
    levels: list[PatchLevel]
    cell: float

    @property
    def dim(self) -> int:
        return self.levels[0].descriptors.shape[1] if self.levels else 0

    def to_bytes(self) -> bytes:
        """Compact little-endian bytes: a header, one record per level, then float16 descriptors
        and float32 centres of each level (≈ 2·dim + 8 bytes a patch)."""
        parts = [_HEADERS[_VERSION].pack(_MAGIC, _VERSION, len(self.levels), self.dim, *self.image_size, self.cell)]
        parts += [_LEVEL.pack(lv.size, *lv.grid, len(lv.descriptors)) for lv in self.levels]
        for lv in self.levels:
            parts += [np.ascontiguousarray(lv.descriptors, "<f2").tobytes(),
                      np.ascontiguousarray(lv.centres, "<f4").tobytes()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PatchFeatures":
        """Inverse of `to_bytes`, also of version 1 (written without `cell`: stored photos kept
        their full grid's first patch at column 0, half a patch from the edge); `ValueError` on
        anything else."""
        view = memoryview(data)
        try:
            magic, version = _START.unpack_from(view)
            if magic != _MAGIC or version not in _HEADERS:
                raise ValueError(f"magic {bytes(magic)!r} version {version}")
            header = _HEADERS[version]
            magic, version, count, dim, width, height, *cell = header.unpack_from(view)
            heads = [_LEVEL.unpack_from(view, header.size + i * _LEVEL.size) for i in range(count)]
            offset = header.size + count * _LEVEL.size
            levels = []
            for size, rows, cols, n in heads:
                if n != rows * cols:
                    raise ValueError(f"{n} patches in a {rows}×{cols} grid")
                desc = np.frombuffer(view, "<f2", n * dim, offset).reshape(n, dim)
                offset += desc.nbytes
                centres = np.frombuffer(view, "<f4", n * 2, offset).reshape(n, 2)
                offset += centres.nbytes
                levels.append(PatchLevel(size, (rows, cols), desc, centres))
            if offset != len(view):
                raise ValueError(f"{len(view) - offset} trailing bytes")
        except (struct.error, ValueError) as exc:
            raise ValueError(f"not patch features of format version 1 or {_VERSION} ({exc})") from None
        if not cell:  # version 1
            cell = [2 * float(levels[0].centres[0, 0]) / levels[0].size if levels and len(levels[0].centres) else 1.0]
        return cls((width, height), levels, cell[0])


def _displayed_size(source: Source) -> tuple[int, int] | None:
    """(width, height) of a photo as displayed (EXIF orientation applied); None when unknown."""
    if isinstance(source, torch.Tensor):
        return source.shape[-1], source.shape[-2]
    if isinstance(source, Image.Image):
        swap = source.getexif().get(ORIENTATION_TAG) in TRANSPOSED_ORIENTATIONS
        return (source.height, source.width) if swap else source.size
    if isinstance(source, (str, bytes, bytearray)) or hasattr(source, "__fspath__"):
        info = read_photo_info(source)
        return (info.width, info.height) if info.width and info.height else None
    return None


def _raw_levels(model: NetVLADModel, images: Sequence[Source], sizes: Sequence[int], max_patches: int | None,
                batch_size: int, amp: bool | None, side: int | None, stride: int = 1
                ) -> Iterator[tuple[int, tuple[int, int], float, list[tuple]]]:
    """Per photo, batch after batch (grouped by shape, so not in input order): (its position,
    displayed size, one feature-map cell in its pixels, [(patch size, kept grid, raw (P, K·D)
    float32 tensor, centres (P, 2))]), the photo resized to a `side`-px long side (None: the
    model's own input size), the patches `patch_positions` keeps. The raw vectors are views of
    the batch's: consume them before asking for the next batch."""
    preprocess = model.preprocess if side is None else dataclasses.replace(model.preprocess, max_side=side, size=None)
    tensors = load_tensors(list(images), preprocess)
    k, d = model.pool.num_clusters, model.pool.dim
    with evaluating(model), torch.inference_mode():
        for group in group_by_shape(tensors):
            cells = max(1, tensors[group[0]][0].numel() // 256)  # feature-map cells at a 16-px stride
            step = max(1, min(batch_size, INTEGRAL_BUDGET // (k * d * cells)))
            for start in range(0, len(group), step):
                chunk = group[start : start + step]
                batch = torch.stack([tensors[i] for i in chunk])
                per_size, (feat_h, feat_w) = patch_vlad(model, batch, sizes, stride, max_patches, amp=amp)
                for j, i in enumerate(chunk):
                    width, height = _displayed_size(images[i]) or (batch.shape[-1], batch.shape[-2])
                    levels = []
                    for s, grid in zip(sizes, per_size):
                        rows, cols = patch_positions(feat_h, feat_w, s, stride, max_patches)
                        ys, xs = np.meshgrid(rows + s / 2, cols + s / 2, indexing="ij")
                        centres = np.stack([xs.ravel() * width / feat_w, ys.ravel() * height / feat_h], axis=1)
                        levels.append((s, (len(rows), len(cols)), grid[j].reshape(-1, k * d), centres.astype(np.float32)))
                    yield i, (width, height), width / feat_w, levels


def extract_patch_features(model: NetVLADModel, images: Sequence[Source], pca: PatchPCA,
                           sizes: Sequence[int] = DEFAULT_SIZES, max_patches: int | None = DEFAULT_MAX_PATCHES,
                           batch_size: int = 8, amp: bool | None = None, side: int | None = DEFAULT_SIDE,
                           stride: int = 1) -> list[PatchFeatures]:
    """`PatchFeatures` of photos (paths, bytes, PIL images), in input order: resized to a
    `side`-px long side (None: the model's own input size) and normalised as the model's
    `preprocess` says (preprocessed (3, H, W) tensors are taken as they are); photos of one shape
    batched `batch_size` at a time (fewer when the integral tensor would pass
    `INTEGRAL_BUDGET`); the patches every `stride` cells, at most `max_patches` of each size kept
    (None: all; queries take all at `QUERY_STRIDE`). Centres are in the photo's displayed pixels
    (in the network input's for file objects, whose size is not read). Raises `ImageError`."""
    if pca.input_dim != model.pool.output_dim:
        raise ValueError(f"patch PCA expects {pca.input_dim}-dim patch vectors, this model gives "
                         f"{model.pool.output_dim}: it was learned for another model")
    features: list = [None] * len(images)
    for i, image_size, cell, raw_levels in _raw_levels(model, images, sizes, max_patches, batch_size, amp, side,
                                                       stride):
        levels = [PatchLevel(s, grid, pca.transform(raw).astype(np.float16), centres)
                  for s, grid, raw, centres in raw_levels]
        features[i] = PatchFeatures(image_size, levels, cell)
    return features


def training_patches(model: NetVLADModel, images: Sequence[Source], sizes: Sequence[int] = DEFAULT_SIZES,
                     per_image: int = 64, seed: int = 0, batch_size: int = 8, side: int | None = DEFAULT_SIDE
                     ) -> np.ndarray:
    """Raw patch vectors (N, K·D) float32 for `fit_patch_pca`: up to `per_image` patches of each
    photo (at a `side`-px long side, as `extract_patch_features`), drawn at random (seeded) from all
    its sizes."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, _, _, raw_levels in _raw_levels(model, images, sizes, None, batch_size, None, side):
        raw = torch.cat([level[2] for level in raw_levels]).numpy()
        parts.append(raw[np.sort(rng.choice(len(raw), min(per_image, len(raw)), replace=False))])
    return np.concatenate(parts) if parts else np.zeros((0, model.pool.output_dim), np.float32)


# ---------------------------------------------------------------------------------- matching

class PatchMatch(NamedTuple):
    """How well a candidate's patches match the query's. `fractions`: per patch size both have, the
    RANSAC inliers among the mutual matches over the most there can be (the fewer patches of that
    size of the two: a stored photo keeps a sub-grid, a query all of them), in [0, 1].
    `score`: their weighted mean (`patch_score`, in [0, 1]) or, from `patch_rerank`, the
    shortlist-relative score it orders by (standardised fractions, plus the global similarity's
    share). `points` (m, 4) float32: the inlier patch centres
    (x_q, y_q, x_c, y_c) in original-image pixels, all sizes together."""

    score: float
    fractions: dict[int, float]
    points: np.ndarray


class PatchRanking(NamedTuple):
    """Candidate ids in their new order and, aligned with them, their `PatchMatch` (None: no
    patch features)."""

    ids: list[int]
    matches: list[PatchMatch | None]


def mutual_nearest(query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mutual nearest neighbours by inner product between query rows (Pq, d) and the rows (Pc, d) of
    each candidate → per candidate, (query rows, candidate rows) of its m mutual pairs. One matrix
    product for all candidates (Pq × ΣPc similarities), then an argmax per candidate."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(query) == 0 or not candidates:
        return [empty] * len(candidates)
    bounds = np.cumsum([0] + [len(c) for c in candidates])
    sims = np.dot(np.asarray(query, np.float32), np.concatenate(candidates).astype(np.float32).T)
    backward = sims.argmax(axis=0)  # best query row of each candidate row
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start == end:
            out.append(empty)
            continue
        forward = sims[:, start:end].argmax(axis=1)
        rows = np.flatnonzero(backward[start:end][forward] == np.arange(len(query)))
        out.append((rows, forward[rows]))
    return out


def patch_inliers(query_xy: np.ndarray, candidate_xy: np.ndarray, threshold: float) -> np.ndarray:
    """Inlier mask (m,) of m matched patch centres (m, 2) each: a similarity transform (shift,
    scale, rotation) from the candidate's centres to the query's fitted by RANSAC (OpenCV,
    deterministic), `threshold` in the query's units. Fewer than 3 matches: no inliers."""
    if len(query_xy) < 3:
        return np.zeros(len(query_xy), bool)
    _, mask = cv2.estimateAffinePartial2D(np.asarray(candidate_xy, np.float32), np.asarray(query_xy, np.float32),
                                          method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                          maxIters=RANSAC_ITERS, confidence=RANSAC_CONFIDENCE, refineIters=0)
    return np.zeros(len(query_xy), bool) if mask is None else mask.ravel().astype(bool)


def _weights(query: PatchFeatures, weights: Mapping[int, float] | None) -> dict[int, float]:
    """Weight per patch size of `query`, summing to 1: `weights` as given (rescaled); else
    `SIZE_WEIGHTS` for three sizes, smallest first, and equal weights for other numbers of sizes."""
    sizes = sorted(level.size for level in query.levels)
    if weights is not None:
        chosen = {s: float(weights.get(s, 0.0)) for s in sizes}
    elif len(sizes) == len(SIZE_WEIGHTS):
        chosen = dict(zip(sizes, SIZE_WEIGHTS))
    else:
        chosen = {s: 1.0 for s in sizes}
    total = sum(chosen.values())
    return {s: w / total for s, w in chosen.items()} if total > 0 else chosen


def _match_many(query: PatchFeatures, candidates: Sequence[PatchFeatures]) -> list[tuple[dict[int, float], np.ndarray]]:
    """Per candidate, (inlier fraction per patch size both have, inlier points (m, 4)): one
    `mutual_nearest` matrix product per patch size for all candidates, then `patch_inliers`."""
    for c in candidates:
        if query.levels and c.levels and query.dim != c.dim:
            raise ValueError(f"patch features of {query.dim} and {c.dim} dims cannot be compared "
                             "(extracted with different PCAs)")
    fractions: list[dict[int, float]] = [{} for _ in candidates]
    points: list[list[np.ndarray]] = [[] for _ in candidates]
    for q in query.levels:
        having = [(j, level) for j, c in enumerate(candidates) for level in c.levels if level.size == q.size]
        pairs = mutual_nearest(q.descriptors, [level.descriptors for _, level in having])
        threshold = RANSAC_CELLS * query.cell
        for (j, c), (qi, ci) in zip(having, pairs):
            keep = patch_inliers(q.centres[qi], c.centres[ci], threshold)
            fractions[j][q.size] = float(keep.sum()) / max(1, min(len(q.descriptors), len(c.descriptors)))
            points[j].append(np.concatenate([q.centres[qi[keep]], c.centres[ci[keep]]], axis=1))
    return [(f, np.concatenate(p).astype(np.float32) if p else np.zeros((0, 4), np.float32))
            for f, p in zip(fractions, points)]


def patch_score(query: PatchFeatures, candidate: PatchFeatures, weights: Mapping[int, float] | None = None
                ) -> PatchMatch:
    """`PatchMatch` of one candidate: per patch size, mutual nearest neighbours then RANSAC
    (`patch_inliers`, threshold `RANSAC_CELLS` cells); score = the inlier fractions' weighted mean
    (`weights` by patch size, see `_weights`)."""
    (fractions, points), = _match_many(query, [candidate])
    w = _weights(query, weights)
    return PatchMatch(sum(w[s] * f for s, f in fractions.items()), fractions, points)


def _standardised(values: np.ndarray) -> np.ndarray:
    """Columns of (n, m) `values` moved to zero mean and unit deviation (a constant column → 0)."""
    spread = values.std(axis=0)
    return np.divide(values - values.mean(axis=0), spread, out=np.zeros_like(values), where=spread > 0)


def patch_rerank(query: PatchFeatures, candidates: Sequence[tuple[int, PatchFeatures | None]],
                 weights: Mapping[int, float] | None = None, global_scores: Sequence[float] | None = None,
                 global_weight: float = GLOBAL_WEIGHT) -> PatchRanking:
    """Re-order candidates (id, features or None), given in their global order, as Patch-NetVLAD
    does: each size's inlier fractions (`patch_score`) standardised over the candidates that have
    features (zero mean, unit deviation; all equal → 0) and summed with `weights` (see `_weights`;
    they sum to 1); plus, with `global_scores` (the candidates' global similarities, aligned with
    `candidates`), `global_weight` × those similarities standardised the same way. Highest first
    (ties keep the global order); then those without features, in their global order."""
    having = [j for j, (_, feats) in enumerate(candidates) if feats is not None]
    found = _match_many(query, [candidates[j][1] for j in having])
    w = _weights(query, weights)
    table = np.array([[fractions.get(s, 0.0) for s in w] for fractions, _ in found]).reshape(len(found), len(w))
    scores = _standardised(table) @ np.array(list(w.values()))
    if global_scores is not None and having:
        similarities = np.asarray(global_scores, np.float64)[having]
        scores = scores + global_weight * _standardised(similarities[:, None])[:, 0]
    order = sorted(range(len(having)), key=lambda j: -scores[j])  # stable: ties keep the global order
    missing = [i for i, feats in candidates if feats is None]
    return PatchRanking([candidates[having[j]][0] for j in order] + missing,
                        [PatchMatch(float(scores[j]), *found[j]) for j in order] + [None] * len(missing))
