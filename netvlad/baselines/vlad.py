"""RootSIFT-VLAD, the hand-crafted baseline: SIFT → RootSIFT → k-means vocabulary → VLAD.

VLAD (Jégou et al. 2010) with the normalisation of "All about VLAD" (Arandjelović & Zisserman
2013): hard assignment of each local descriptor to its nearest word, sum of residuals per word,
optional signed-square-root power normalisation, intra-normalisation (L2 per word), then global
L2. RootSIFT (Arandjelović & Zisserman 2012): L1-normalise a SIFT descriptor, take the
element-wise square root, so that Euclidean distance compares Hellinger kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import faiss
import numpy as np
from tqdm.auto import tqdm

from netvlad.errors import DatasetError
from netvlad.imageio import ImageSource, load_image
from netvlad.transforms import resized_shape

SIFT_DIM = 128
_EPS = 1e-12


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """(M, 128) SIFT → (M, 128) float32 RootSIFT: each row L1-normalised, then square-rooted.
    Rows are non-negative with unit L2 norm (all-zero rows stay zero)."""
    sift = np.maximum(np.asarray(descriptors, dtype=np.float32), 0)
    return np.sqrt(sift / np.maximum(sift.sum(axis=1, keepdims=True), _EPS))


def assign(features: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(M,) int64 index of the nearest centre (squared L2) of each of the (M, D) features."""
    # ‖x − c‖² = ‖x‖² − 2 xᵀc + ‖c‖²; ‖x‖² is the same for every centre.
    scores = (centres * centres).sum(axis=1)[None, :] - 2 * features @ centres.T
    return scores.argmin(axis=1).astype(np.int64)


def vlad(features: np.ndarray, centres: np.ndarray, power_norm: bool = False) -> np.ndarray:
    """(K·D,) float32 VLAD of (M, D) local features over (K, D) centres.

    V_k = Σ_{i: nearest(x_i) = k} (x_i − c_k); with `power_norm`, V ← sign(V)·√|V|; then each
    V_k is L2-normalised (empty words stay zero) and the flattened vector too. No features
    give the zero vector.
    """
    features = np.asarray(features, dtype=np.float32)
    centres = np.asarray(centres, dtype=np.float32)
    k, d = centres.shape
    residuals = np.zeros((k, d), dtype=np.float32)
    if len(features):
        words = assign(features, centres)
        np.add.at(residuals, words, features)
        residuals -= np.bincount(words, minlength=k)[:, None].astype(np.float32) * centres
    if power_norm:
        residuals = np.sign(residuals) * np.sqrt(np.abs(residuals))
    residuals /= np.maximum(np.linalg.norm(residuals, axis=1, keepdims=True), _EPS)
    flat = residuals.ravel()
    return flat / max(float(np.linalg.norm(flat)), _EPS)


@dataclass
class RootSIFTVLAD:
    """RootSIFT-VLAD image descriptor: `fit(images)` learns the vocabulary, `describe(images)`
    returns (N, clusters·128) float32 unit-norm descriptors (zero for a photo without keypoints).

    Photos are decoded with `load_image`, converted to grey and resized so that the longer side
    is `max_side` pixels (as the networks' preprocessing does). The vocabulary is `faiss.Kmeans`
    on up to `per_image` random RootSIFT descriptors of each fitting photo. SIFT's
    `contrast_threshold` defaults to 0.01, not OpenCV's 0.04: on 320×240 real-photo place sets
    the lower threshold finds about twice the keypoints and raised Recall@1 from 0.70 to 0.78.
    """

    clusters: int = 64
    max_side: int = 640
    per_image: int = 300
    power_norm: bool = False
    contrast_threshold: float = 0.01
    kmeans_iterations: int = 25
    seed: int = 0
    centres: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.clusters < 1 or self.max_side < 16 or self.per_image < 1:
            raise ValueError("clusters, per_image must be positive and max_side at least 16")
        self._sift = cv2.SIFT_create(contrastThreshold=self.contrast_threshold)

    @property
    def dim(self) -> int:
        return self.clusters * SIFT_DIM

    def local_features(self, image: ImageSource) -> np.ndarray:
        """(M, 128) float32 RootSIFT descriptors of one photo (M = 0 when SIFT finds no keypoint)."""
        grey = load_image(image).convert("L")
        height, width = resized_shape(grey.width, grey.height, self.max_side)
        pixels = np.asarray(grey)
        interpolation = cv2.INTER_AREA if width < grey.width else cv2.INTER_LINEAR
        pixels = cv2.resize(pixels, (width, height), interpolation=interpolation)
        _, descriptors = self._sift.detectAndCompute(pixels, None)
        if descriptors is None:
            return np.zeros((0, SIFT_DIM), dtype=np.float32)
        return rootsift(descriptors)

    def fit(self, images: Sequence[ImageSource], progress: bool = False) -> "RootSIFTVLAD":
        """Learn the `clusters`-word vocabulary from `images`; returns self. Raises DatasetError
        when the photos hold fewer SIFT descriptors than words."""
        rng = np.random.default_rng(self.seed)
        samples = []
        for image in tqdm(images, desc="RootSIFT vocabulary", unit="img", disable=not progress):
            features = self.local_features(image)
            if len(features) > self.per_image:
                features = features[rng.choice(len(features), self.per_image, replace=False)]
            samples.append(features)
        features = np.concatenate(samples) if samples else np.zeros((0, SIFT_DIM), dtype=np.float32)
        if len(features) < self.clusters:
            raise DatasetError(
                f"only {len(features)} SIFT descriptors in {len(samples)} photos: too few for a "
                f"{self.clusters}-word RootSIFT-VLAD vocabulary"
            )
        kmeans = faiss.Kmeans(SIFT_DIM, self.clusters, niter=self.kmeans_iterations, seed=self.seed)
        kmeans.train(features)
        self.centres = kmeans.centroids.copy()
        return self

    def describe(self, images: Sequence[ImageSource], progress: bool = False) -> np.ndarray:
        """(N, clusters·128) float32 VLAD descriptors of `images`, in order."""
        if self.centres is None:
            raise RuntimeError("RootSIFTVLAD.describe() needs a vocabulary: call fit() first")
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, image in enumerate(tqdm(images, desc="RootSIFT-VLAD", unit="img", disable=not progress)):
            out[i] = vlad(self.local_features(image), self.centres, self.power_norm)
        return out
