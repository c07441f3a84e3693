"""Place datasets in the layouts the community distributes them in.

- **VPR-datasets-downloader layout** (gmberton; Pitts30k, Tokyo 24/7, SF-XL, St Lucia, … as most
  recent visual place recognition work uses them): a split folder holding `database/` and
  `queries/`, every image (`*.jpg`, searched recursively) named
  `@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@…@.jpg`. The dataset root holds
  `images/{train,val,test}/` (or the split folders directly); pick one with `split`.
- **Mapillary SLS (MSLS)**: `<root>/train_val/<city>/{database,query}/` with `postprocessed.csv`
  (columns `key`, `easting`, `northing`, …), `raw.csv` (`pano`, …) and `images/<key>.jpg`.
  Panoramas are left out, as the MSLS authors' loader does; cities default to the validation
  cities (cph, sf) on which MSLS results are usually reported. Positions of several cities are
  kept apart by an offset of `CITY_OFFSET_M` per city (their UTM zones differ).

Both load (`netvlad.datasets.placeset.load_place_dataset`) into a `PlaceDataset` with the
community's positive radius, 25 m.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from netvlad.errors import DatasetError

SPLITS = ("train", "val", "test")
MSLS_VAL_CITIES = ("cph", "sf")
#: Easting offset between the cities of one MSLS dataset (metres): far beyond any radius.
CITY_OFFSET_M = 1e8


def is_vpr_split(folder: Path) -> bool:
    """Whether `folder` is a split folder of the VPR-datasets-downloader layout."""
    return (folder / "database").is_dir() and (folder / "queries").is_dir()


def vpr_split_folder(root: Path, split: str) -> Path | None:
    """The split folder `split` of a VPR-datasets-downloader dataset root, None when `root` is not one."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    for folder in (root / "images" / split, root / split):
        if is_vpr_split(folder):
            return folder
    return None


def _utm_from_name(path: Path, folder: Path) -> tuple[float, float]:
    fields = path.name.split("@")
    try:
        return float(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        raise DatasetError(f"{path.relative_to(folder)}: not a VPR-datasets-downloader image name "
                           "(@UTM_east@UTM_north@…@.jpg)") from None


def load_vpr_split(folder: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(database images, (Nd, 2) UTM, query images, (Nq, 2) UTM) of a split folder; image paths
    relative to `folder`, sorted."""
    out = []
    for part in ("database", "queries"):
        paths = sorted((folder / part).rglob("*.jpg"))
        if not paths:
            raise DatasetError(f"{folder / part}: no .jpg images")
        out += [[p.relative_to(folder).as_posix() for p in paths], np.array([_utm_from_name(p, folder) for p in paths])]
    return tuple(out)


def is_msls(root: Path) -> bool:
    """Whether `root` is an MSLS dataset root."""
    return (root / "train_val").is_dir()


def _read_msls_table(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (an MSLS city folder holds postprocessed.csv and raw.csv)")
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return rows


def _msls_part(folder: Path, root: Path) -> tuple[list[str], np.ndarray]:
    """Images (relative to `root`) and (N, 2) UTM of one MSLS city part, panoramas left out."""
    post = _read_msls_table(folder / "postprocessed.csv")
    raw = _read_msls_table(folder / "raw.csv")
    if len(raw) != len(post):
        raise DatasetError(f"{folder}: postprocessed.csv has {len(post)} rows, raw.csv {len(raw)}")
    images, utm = [], []
    for line, (row, raw_row) in enumerate(zip(post, raw), start=2):
        if raw_row.get("pano", "False").strip().lower() == "true":
            continue
        try:
            utm.append((float(row["easting"]), float(row["northing"])))
            images.append((folder / "images" / f"{row['key']}.jpg").relative_to(root).as_posix())
        except (KeyError, ValueError) as exc:
            raise DatasetError(f"{folder / 'postprocessed.csv'}, line {line}: needs key, easting and northing ({exc})") from None
    return images, np.array(utm, dtype=np.float64).reshape(-1, 2)


def load_msls(root: Path, cities: tuple[str, ...] | None = None) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(database images, UTM, query images, UTM) of the MSLS `cities` (default: the validation
    cities), images relative to `root`."""
    cities = tuple(cities) if cities else MSLS_VAL_CITIES
    db_images, db_utm, q_images, q_utm = [], [], [], []
    for number, city in enumerate(cities):
        folder = root / "train_val" / city
        if not folder.is_dir():
            available = sorted(p.name for p in (root / "train_val").iterdir() if p.is_dir())
            raise DatasetError(f"{root}: no MSLS city {city!r} (available: {', '.join(available) or 'none'})")
        offset = np.array([number * CITY_OFFSET_M, 0.0])
        for part, images, utm in (("database", db_images, db_utm), ("query", q_images, q_utm)):
            names, positions = _msls_part(folder / part, root)
            images += names
            utm.append(positions + offset)
    return db_images, np.vstack(db_utm), q_images, np.vstack(q_utm)

