"""Build a place dataset from ordinary photographs.

Each source photo plays a street seen from above: a source pixel is `metres_per_pixel` metres,
photo i is laid out at easting 500 000 + i·`photo_spacing_m` (10 km apart, so no two photos
share positives) and image y grows southwards. Database images are axis-aligned crops on a
grid (crop width `crop_size` source pixels, origins every `stride` pixels), each resized to
`out_size`; a crop's position is its centre; crops without detail (`min_detail`, e.g. clear sky)
are dropped. Queries revisit the photo near a random database crop (offset ≤
`max_query_offset_m`, so that crop is always a positive within 25 m and many queries sit between
grid points) and re-photograph it: random homography (perspective, rotation,
scale), gamma, gain, colour cast, illumination gradient, blur, noise, occluders and JPEG
re-compression. Place ids group blocks of grid points about 25 m wide, numbered 0..P−1 within
each written dataset; a query takes the id of its nearest database crop.

With `holdout` > 0, whole source photos are held out of training: `OUT/train` is made from the
others, and the held-out photos are split again, `test_fraction` of them into `OUT/test` and the
rest into `OUT/val`, so that `val/` (for choosing epochs and settings) and `test/` (for the
figures) share no source photo and neither shares one with `train/`. `test_fraction` 0 writes
only `OUT/train` and `OUT/val` (the older two-part layout); `holdout` 0 writes one dataset into
`OUT`. `OUT/placeset.json` records the settings and every photo with its split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from netvlad.datasets import groundtruth
from netvlad.datasets.placeset import PlaceDataset, save_place_dataset
from netvlad.errors import DatasetError, ImageError
from netvlad.imageio import load_image

log = logging.getLogger(__name__)

METADATA = "placeset.json"
ORIGIN_EASTING_M = 500_000.0
ORIGIN_NORTHING_M = 4_000_000.0
DB_JPEG_QUALITY = 92


@dataclass(frozen=True)
class PlacesetConfig:
    """Settings of `make_placeset`. Sizes in source pixels unless named `_m` (metres);
    `out_size` is (width, height) of the written images."""

    crop_size: int = 256
    stride: int = 64
    queries_per_photo: int = 40
    seed: int = 0
    out_size: tuple[int, int] = (320, 240)
    metres_per_pixel: float | None = None  # None: half a crop width spans pos_radius_m
    photo_spacing_m: float = 10_000.0
    pos_radius_m: float = groundtruth.POSITIVE_RADIUS_M
    max_query_offset_m: float = 12.5
    min_detail: float = 0.6  # grid crops flatter than this (`_detail`, e.g. clear sky) are dropped
    holdout: float = 0.0  # fraction of the source photos held out of training (val/ + test/)
    test_fraction: float = 0.5  # fraction of the held-out photos written to test/ (the rest: val/)

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(width, height) of a crop in source pixels, with the aspect ratio of `out_size`."""
        width, height = self.out_size
        return self.crop_size, max(1, round(self.crop_size * height / width))

    @property
    def mpp(self) -> float:
        """Metres per source pixel."""
        if self.metres_per_pixel is not None:
            return self.metres_per_pixel
        return self.pos_radius_m / (self.crop_size / 2)

    def validate(self) -> None:
        if min(self.crop_size, self.stride, *self.out_size) < 1 or self.queries_per_photo < 0:
            raise DatasetError("crop size, stride and output size must be positive, queries per photo ≥ 0")
        if self.mpp <= 0:
            raise DatasetError(f"metres per pixel must be positive, got {self.mpp}")
        if not 0 <= self.max_query_offset_m < self.pos_radius_m:
            raise DatasetError(
                f"max query offset {self.max_query_offset_m} m must be below the positive radius {self.pos_radius_m} m"
            )
        if self.min_detail < 0:
            raise DatasetError(f"min detail must be ≥ 0, got {self.min_detail}")
        if not 0 <= self.holdout < 1:
            raise DatasetError(f"holdout is a fraction of the photos in [0, 1), got {self.holdout}")
        if not 0 <= self.test_fraction < 1:
            raise DatasetError(f"test fraction is a fraction of the held-out photos in [0, 1), got {self.test_fraction}")


@dataclass
class PhotoRecord:
    """What became of one source photo."""

    source: str
    split: str
    folder: str = ""
    sha256: str = ""
    size: tuple[int, int] = (0, 0)
    origin_m: tuple[float, float] = (0.0, 0.0)
    database: int = 0
    queries: int = 0
    skipped: str = ""


@dataclass
class PlacesetSummary:
    """Result of `make_placeset`: dataset folders by split ("all", or "train"/"val"/"test") and one
    record per source photo (skipped ones carry the reason)."""

    out: Path
    datasets: dict[str, Path]
    photos: list[PhotoRecord] = field(default_factory=list)

    @property
    def skipped(self) -> list[PhotoRecord]:
        return [p for p in self.photos if p.skipped]

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "datasets": {k: str(v) for k, v in self.datasets.items()},
            "database": sum(p.database for p in self.photos),
            "queries": sum(p.queries for p in self.photos),
            "photos": [asdict(p) for p in self.photos],
        }


def make_placeset(
    photos: list[Path], out: Path, config: PlacesetConfig = PlacesetConfig(), overwrite: bool = False, progress: bool = True
) -> PlacesetSummary:
    """Write a place dataset (or train/val/test parts) built from `photos` into `out`. The result
    depends only on the set of photos (names and contents, not their order) and on `config`
    (seed included). Photos that
    cannot be decoded, are smaller than a crop or duplicate another photo are skipped and
    reported. Raises DatasetError when no usable photo remains in a split."""
    config.validate()
    out = Path(out)
    photos = sorted(set(map(Path, photos)), key=lambda p: (p.name, str(p)))
    if not photos:
        raise DatasetError("no source photos given")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out}: exists and is not empty (--overwrite replaces it)")
        if not (out / METADATA).is_file():
            raise DatasetError(f"{out}: not a folder written by make-placeset ({METADATA} missing); refusing to replace it")
    splits = _split(photos, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work.chmod(0o755)
    try:
        summary = _build(photos, splits, work, config, progress)
        (work / METADATA).write_text(json.dumps({"config": asdict(config), **summary.to_json()}, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    summary.out = out
    summary.datasets = {k: out / v.relative_to(work) for k, v in summary.datasets.items()}
    return summary


def _split(photos: list[Path], config: PlacesetConfig) -> list[str]:
    """Split name per photo: "all", or "train"/"val"/"test". round(holdout·n) whole photos are
    held out (at least one per held-out part, at least one left to train), chosen by the seed; of
    them round(test_fraction·held) (≥ 1 when test_fraction > 0) go to test, the rest to val.
    The held-out photos are the first of one seeded permutation, test's before val's, so with
    test_fraction 0 the split is the older train/val one."""
    if config.holdout == 0:
        return ["all"] * len(photos)
    parts = 2 if config.test_fraction > 0 else 1
    if len(photos) < parts + 1:
        what = "a val and a test part" if parts == 2 else "a val part"
        raise DatasetError(f"holding out {what} needs at least {parts + 1} source photos, got {len(photos)}")
    n_held = min(len(photos) - 1, max(parts, round(config.holdout * len(photos))))
    n_test = min(n_held - 1, max(1, round(config.test_fraction * n_held))) if parts == 2 else 0
    order = np.random.default_rng(config.seed).permutation(len(photos)).tolist()
    split = {i: "test" for i in order[:n_test]} | {i: "val" for i in order[n_test:n_held]}
    return [split.get(i, "train") for i in range(len(photos))]


def _build(photos: list[Path], splits: list[str], work: Path, config: PlacesetConfig, progress: bool) -> PlacesetSummary:
    tables: dict[str, dict[str, list]] = {}
    records, seen = [], {}
    for index, (path, split) in enumerate(tqdm(list(zip(photos, splits)), desc="make-placeset", unit="photo", disable=not progress)):
        record = PhotoRecord(source=str(path), split=split)
        records.append(record)
        try:
            data = path.read_bytes()
            image = np.ascontiguousarray(np.asarray(load_image(path))[:, :, ::-1])  # BGR for OpenCV
        except (OSError, ImageError) as exc:
            record.skipped = str(exc)
        else:
            record.sha256 = hashlib.sha256(data).hexdigest()
            crop_w, crop_h = config.crop_shape
            if record.sha256 in seen:
                record.skipped = f"same content as {seen[record.sha256]}"
            elif image.shape[1] < crop_w or image.shape[0] < crop_h:
                record.skipped = f"smaller ({image.shape[1]}x{image.shape[0]}) than a crop ({crop_w}x{crop_h})"
            elif max(image.shape[:2]) * config.mpp + 2 * config.pos_radius_m >= config.photo_spacing_m:
                raise DatasetError(
                    f"{path}: spans {max(image.shape[:2]) * config.mpp:.0f} m, too close to the "
                    f"{config.photo_spacing_m:.0f} m photo spacing; lower metres per pixel"
                )
            else:
                seen[record.sha256] = path.name
                table = tables.setdefault(split, {"db": [], "q": []})
                record.folder, record.size = f"{index:03d}_{path.stem}", (image.shape[1], image.shape[0])
                record.origin_m = (ORIGIN_EASTING_M + index * config.photo_spacing_m, ORIGIN_NORTHING_M)
                rng = np.random.default_rng([config.seed, zlib.crc32(path.name.encode())])
                root = work if split == "all" else work / split
                _render_photo(image, index, record, root, table, rng, config)
                if not record.database:
                    record.skipped = f"no crop with detail ≥ {config.min_detail}"
                    for directory in ("database", "queries"):
                        (root / directory / record.folder).rmdir()
        if record.skipped:
            log.warning("skipped %s: %s", path, record.skipped)
    datasets = {}
    for split in dict.fromkeys(splits):
        if not tables.get(split, {}).get("db"):
            where = "" if split == "all" else f" in the '{split}' split"
            raise DatasetError(f"no usable source photo left{where} (see the skipped photos)")
        root = work if split == "all" else work / split
        db_rows, q_rows = tables[split]["db"], tables[split]["q"]
        places = {key: i for i, key in enumerate(sorted({r[2] for r in db_rows}))}
        save_place_dataset(
            PlaceDataset(
                root=root,
                db_images=[r[0] for r in db_rows],
                db_utm=[r[1] for r in db_rows],
                q_images=[r[0] for r in q_rows],
                q_utm=[r[1] for r in q_rows],
                db_place_ids=[places[r[2]] for r in db_rows],
                q_place_ids=[places[r[2]] for r in q_rows],
                pos_radius_m=config.pos_radius_m,
            )
        )
        datasets[split] = root
    return PlacesetSummary(out=work, datasets=datasets, photos=records)


def _render_photo(
    image: np.ndarray, index: int, record: PhotoRecord, root: Path, table: dict, rng: np.random.Generator, config: PlacesetConfig
) -> None:
    """Write one photo's database crops and queries under `root` and append their rows
    (relative image, (easting, northing), place key) to `table`. Place keys are unique per
    (photo, block of grid points); `_build` renumbers them."""
    height, width = image.shape[:2]
    crop_w, crop_h = config.crop_shape
    xs = np.arange(0, width - crop_w + 1, config.stride)
    ys = np.arange(0, height - crop_h + 1, config.stride)
    block = max(1, round(config.pos_radius_m / (config.stride * config.mpp)))

    def position(cx: float, cy: float) -> tuple[float, float]:
        return (record.origin_m[0] + cx * config.mpp, record.origin_m[1] - cy * config.mpp)

    for directory in ("database", "queries"):
        (root / directory / record.folder).mkdir(parents=True, exist_ok=True)
    kept = []  # (centre x, centre y, place key) of the written grid crops
    for row, y in enumerate(ys):
        for col, x in enumerate(xs):
            crop = cv2.resize(image[y : y + crop_h, x : x + crop_w], config.out_size, interpolation=cv2.INTER_AREA)
            if _detail(crop) < config.min_detail:
                continue
            name = f"database/{record.folder}/r{row:03d}_c{col:03d}.jpg"
            _write_jpeg(root / name, crop, DB_JPEG_QUALITY)
            key = (index, row // block, col // block)
            kept.append((x + crop_w / 2, y + crop_h / 2, key))
            table["db"].append((name, position(*kept[-1][:2]), key))
    record.database = len(kept)
    if not kept:
        return
    centres = np.array([k[:2] for k in kept])
    max_offset_px = config.max_query_offset_m / config.mpp
    for k in range(config.queries_per_photo):
        anchor = centres[rng.integers(len(centres))]
        angle, radius = rng.uniform(0, 2 * np.pi), max_offset_px * np.sqrt(rng.uniform())
        cx = float(np.clip(anchor[0] + radius * np.cos(angle), crop_w / 2, width - crop_w / 2))
        cy = float(np.clip(anchor[1] + radius * np.sin(angle), crop_h / 2, height - crop_h / 2))
        view, quality = _rephotograph(image, (cx, cy), (crop_w, crop_h), config.out_size, rng)
        name = f"queries/{record.folder}/q{k:04d}.jpg"
        _write_jpeg(root / name, view, quality)
        nearest = int(np.argmin(np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)))
        table["q"].append((name, position(cx, cy), kept[nearest][2]))
    record.queries = config.queries_per_photo


def _detail(image: np.ndarray) -> float:
    """Mean gradient magnitude of a BGR uint8 image in grey levels per pixel (Sobel / 8): about
    0.3 for clear sky, 1–10 for textured scenes."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    return float(np.mean(np.hypot(gx, gy))) / 8


def _rephotograph(
    image: np.ndarray, centre: tuple[float, float], crop: tuple[int, int], out_size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """A new view of `image` centred near `centre` (source px) covering about a crop: returns
    the BGR uint8 view (out_size) and the JPEG quality to store it with."""
    out_w, out_h = out_size
    crop_w, crop_h = crop
    scale = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    theta = np.deg2rad(rng.uniform(-12, 12))
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * np.array([crop_w, crop_h]) / 2
    jitter = np.clip(rng.normal(0, 0.06 * crop_w, size=(4, 2)), -0.12 * crop_w, 0.12 * crop_w)
    source = np.asarray(centre) + scale * corners @ rotation.T + jitter
    target = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]])
    homography = cv2.getPerspectiveTransform(source.astype(np.float32), target.astype(np.float32))
    view = cv2.warpPerspective(image, homography, out_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)

    pixels = view.astype(np.float32) / 255.0
    pixels **= np.exp(rng.uniform(np.log(0.6), np.log(1.6)))  # gamma
    pixels *= rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, size=3)  # gain and colour cast
    direction = rng.normal(size=2)
    yy, xx = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    ramp = (xx / out_w - 0.5) * direction[0] + (yy / out_h - 0.5) * direction[1]
    pixels *= (1 + rng.uniform(0, 0.4) * ramp / max(np.linalg.norm(direction), 1e-6))[:, :, None]
    if rng.uniform() < 0.6:
        pixels = cv2.GaussianBlur(pixels, (0, 0), rng.uniform(0.4, 1.8))
    pixels += rng.normal(0, rng.uniform(0, 0.02), size=pixels.shape).astype(np.float32)
    view = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)

    for _ in range(int(rng.integers(0, 4))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        w, h = rng.uniform(0.1, 0.35) * out_w, rng.uniform(0.1, 0.35) * out_h
        x, y = rng.uniform(0, out_w), rng.uniform(0, out_h)
        if rng.uniform() < 0.5:
            cv2.rectangle(view, (int(x - w / 2), int(y - h / 2)), (int(x + w / 2), int(y + h / 2)), colour, -1)
        else:
            cv2.ellipse(view, (int(x), int(y)), (int(w / 2), int(h / 2)), float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return view, int(rng.integers(35, 91))


def _write_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise DatasetError(f"{path}: cannot write image")
