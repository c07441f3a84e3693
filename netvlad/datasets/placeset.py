"""Place datasets: database and query images with metric positions (docs/design.md §6.3).

On disk a place dataset is a folder with `database.csv` and `queries.csv` (columns
`image,easting,northing` in metres, or `image,lat,lon` in WGS 84 degrees, optional integer
`place_id`; `image` relative to the folder), a Pittsburgh/Tokyo `dbStruct` .mat file, or one of
the community's layouts (`netvlad.datasets.community`: gmberton's VPR-datasets-downloader
folders, Mapillary SLS).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from netvlad.datasets import community, groundtruth
from netvlad.datasets.dbstruct import read_dbstruct
from netvlad.errors import DatasetError

DATABASE_CSV = "database.csv"
QUERIES_CSV = "queries.csv"
METRIC_COLUMNS = ("easting", "northing")
GEOGRAPHIC_COLUMNS = ("lat", "lon")
PLACE_ID_COLUMN = "place_id"


@dataclass
class PlaceDataset:
    """Database and query images of one place dataset.

    Image paths are relative to `root`; `db_utm` (Nd, 2) and `q_utm` (Nq, 2) are float64
    easting, northing in metres; `crs` names the projection when the positions were converted
    from lat/lon (e.g. "EPSG:32617"), else None. Place ids (int64, one per image) are optional.
    A query's positives are the database images within `pos_radius_m`; triplet training uses
    those within `nontrivial_radius_m` as potential positives.
    """

    root: Path
    db_images: list[str]
    db_utm: np.ndarray
    q_images: list[str]
    q_utm: np.ndarray
    db_place_ids: np.ndarray | None = None
    q_place_ids: np.ndarray | None = None
    pos_radius_m: float = groundtruth.POSITIVE_RADIUS_M
    nontrivial_radius_m: float = groundtruth.POTENTIAL_POSITIVE_RADIUS_M
    crs: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.db_images, self.q_images = list(self.db_images), list(self.q_images)
        self.db_utm = _positions(self.db_utm, "database", self.name or str(self.root))
        self.q_utm = _positions(self.q_utm, "query", self.name or str(self.root))
        for what, images, utm, ids in (
            ("database", self.db_images, self.db_utm, self.db_place_ids),
            ("query", self.q_images, self.q_utm, self.q_place_ids),
        ):
            if len(utm) != len(images):
                raise DatasetError(f"{self.name or self.root}: {len(images)} {what} images but {len(utm)} positions")
            if ids is not None and len(ids) != len(images):
                raise DatasetError(f"{self.name or self.root}: {len(images)} {what} images but {len(ids)} place ids")
        if self.db_place_ids is not None:
            self.db_place_ids = np.asarray(self.db_place_ids, dtype=np.int64)
        if self.q_place_ids is not None:
            self.q_place_ids = np.asarray(self.q_place_ids, dtype=np.int64)

    def db_paths(self) -> list[Path]:
        """Absolute paths of the database images."""
        return [self.root / image for image in self.db_images]

    def q_paths(self) -> list[Path]:
        """Absolute paths of the query images."""
        return [self.root / image for image in self.q_images]

    def positives(self) -> list[np.ndarray]:
        """Per query, database indices within `pos_radius_m`, nearest first."""
        return groundtruth.positives(self.db_utm, self.q_utm, self.pos_radius_m)

    def potential_positives(self) -> list[np.ndarray]:
        """Per query, database indices within `nontrivial_radius_m`, nearest first."""
        return groundtruth.potential_positives(self.db_utm, self.q_utm, self.nontrivial_radius_m)


def _positions(array: np.ndarray, what: str, where: str) -> np.ndarray:
    positions = np.asarray(array, dtype=np.float64)
    if positions.size == 0:
        positions = positions.reshape(0, 2)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise DatasetError(f"{where}: {what} positions must have shape (N, 2), got {positions.shape}")
    if not np.isfinite(positions).all():
        raise DatasetError(f"{where}: {what} positions contain NaN or infinite values")
    return positions


def load_place_dataset(
    path: Path,
    images_root: Path | None = None,
    queries_root: Path | None = None,
    check_images: bool = True,
    pos_radius_m: float | None = None,
    nontrivial_radius_m: float | None = None,
    split: str = "test",
    cities: tuple[str, ...] | None = None,
) -> PlaceDataset:
    """Load a place dataset folder (CSV), a dbStruct .mat file, a VPR-datasets-downloader split
    folder or dataset root (`split`: train, val or test), or an MSLS root (`cities`, default the
    validation cities).

    For a .mat file, database image paths are relative to `images_root` (default: the file's
    folder) and query paths to `queries_root` (default: `images_root`; Pittsburgh keeps its
    queries in `<root>/queries_real`). With `check_images`, every image must exist. The radii
    (metres) replace the dataset's own (25 m and 10 m unless a .mat file says otherwise).
    Raises DatasetError naming the file and row of the first problem."""
    path = Path(path)
    if path.is_dir():
        if images_root is not None or queries_root is not None:
            raise DatasetError(f"{path}: images_root/queries_root apply to .mat files only")
        dataset = _load_folder(path, check_images, split, cities)
    elif path.suffix.lower() == ".mat":
        dataset = _load_mat_dataset(path, images_root, queries_root, check_images)
    elif path.exists():
        raise DatasetError(f"{path}: expected a folder with {DATABASE_CSV} and {QUERIES_CSV}, or a .mat file")
    else:
        raise DatasetError(f"{path}: no such place dataset")
    dataset.pos_radius_m = dataset.pos_radius_m if pos_radius_m is None else pos_radius_m
    dataset.nontrivial_radius_m = dataset.nontrivial_radius_m if nontrivial_radius_m is None else nontrivial_radius_m
    if not 0 < dataset.nontrivial_radius_m <= dataset.pos_radius_m:
        raise DatasetError(f"{path}: the training-positive radius ({dataset.nontrivial_radius_m:g} m) must be positive "
                           f"and at most the positive radius ({dataset.pos_radius_m:g} m)")
    return dataset


def save_place_dataset(dataset: PlaceDataset) -> None:
    """Write `database.csv` and `queries.csv` (image,easting,northing[,place_id]) into
    `dataset.root`; the images must already be there."""
    for filename, images, utm, ids in (
        (DATABASE_CSV, dataset.db_images, dataset.db_utm, dataset.db_place_ids),
        (QUERIES_CSV, dataset.q_images, dataset.q_utm, dataset.q_place_ids),
    ):
        with open(dataset.root / filename, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["image", *METRIC_COLUMNS] + ([PLACE_ID_COLUMN] if ids is not None else []))
            for i, (image, (easting, northing)) in enumerate(zip(images, utm)):
                row = [image, f"{easting:.3f}", f"{northing:.3f}"]
                writer.writerow(row + ([int(ids[i])] if ids is not None else []))


@dataclass
class _Table:
    """One parsed CSV: images, coordinates (metres or lat/lon degrees), place ids, line numbers."""

    path: Path
    images: list[str]
    coords: np.ndarray
    geographic: bool
    place_ids: np.ndarray | None
    lines: list[int]


def _load_folder(path: Path, check_images: bool, split: str, cities: tuple[str, ...] | None) -> PlaceDataset:
    """A dataset folder in any of the layouts the module docstring lists."""
    if not (path / DATABASE_CSV).exists() and not (path / QUERIES_CSV).exists():
        folder = path if community.is_vpr_split(path) else community.vpr_split_folder(path, split)
        if folder is not None:
            db_images, db_utm, q_images, q_utm = community.load_vpr_split(folder)
            name = folder.name if folder == path else f"{path.name}/{split}"
            return PlaceDataset(folder, db_images, db_utm, q_images, q_utm, name=name)
        if community.is_msls(path):
            db_images, db_utm, q_images, q_utm = community.load_msls(path, cities)
            if check_images:
                for what, images in (("database", db_images), ("query", q_images)):
                    _check_images_exist(path, images, lambda i, w=what: f"{path}: MSLS {w} image {i + 1}")
            return PlaceDataset(path, db_images, db_utm, q_images, q_utm, name=f"msls {','.join(cities or community.MSLS_VAL_CITIES)}")
    return _load_csv_dataset(path, check_images)


def _load_csv_dataset(folder: Path, check_images: bool) -> PlaceDataset:
    db, q = _read_table(folder / DATABASE_CSV), _read_table(folder / QUERIES_CSV)
    if db.geographic != q.geographic:
        raise DatasetError(
            f"{folder}: {DATABASE_CSV} and {QUERIES_CSV} must use the same coordinate columns "
            f"(both easting,northing or both lat,lon)"
        )
    seen = dict(zip(db.images, db.lines))
    for image, line in zip(q.images, q.lines):
        if image in seen:
            raise DatasetError(
                f"{q.path}, line {line}: image '{image}' is also a database image ({db.path}, line {seen[image]})"
            )
    if check_images:
        for table in (db, q):
            _check_images_exist(folder, table.images, lambda i, t=table: f"{t.path}, line {t.lines[i]}")
    crs = None
    db_utm, q_utm = db.coords, q.coords
    if db.geographic:
        db_utm, q_utm, crs = _project_to_utm(db.coords, q.coords)
    return PlaceDataset(
        root=folder,
        db_images=db.images,
        db_utm=db_utm,
        q_images=q.images,
        q_utm=q_utm,
        db_place_ids=db.place_ids,
        q_place_ids=q.place_ids,
        crs=crs,
        name=folder.name,
    )


def _read_table(path: Path) -> _Table:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (a place dataset folder needs {DATABASE_CSV} and {QUERIES_CSV}, "
                           "or database/ and queries/ of the VPR-datasets-downloader layout, or an MSLS train_val/)")
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = [name.strip() for name in next(reader, [])]
        if "image" not in header:
            raise DatasetError(f"{path}, line 1: no 'image' column (found: {', '.join(header) or 'nothing'})")
        if all(c in header for c in METRIC_COLUMNS):
            coord_columns, geographic = METRIC_COLUMNS, False
        elif all(c in header for c in GEOGRAPHIC_COLUMNS):
            coord_columns, geographic = GEOGRAPHIC_COLUMNS, True
        else:
            raise DatasetError(
                f"{path}, line 1: expected columns image,easting,northing or image,lat,lon "
                f"(found: {', '.join(header)})"
            )
        image_col = header.index("image")
        coord_cols = [header.index(c) for c in coord_columns]
        id_col = header.index(PLACE_ID_COLUMN) if PLACE_ID_COLUMN in header else None
        images, coords, ids, lines = [], [], [], []
        first_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DatasetError(f"{path}, line {line}: {len(row)} fields, header has {len(header)}")
            image = row[image_col].strip()
            _check_relative(image, path, line)
            if image in first_line:
                raise DatasetError(f"{path}, line {line}: duplicate image '{image}' (first on line {first_line[image]})")
            first_line[image] = line
            values = [_number(row[c], coord_columns[k], path, line) for k, c in enumerate(coord_cols)]
            if geographic and not (-90 <= values[0] <= 90 and -180 <= values[1] <= 180):
                raise DatasetError(f"{path}, line {line}: lat,lon ({values[0]}, {values[1]}) out of range")
            if id_col is not None:
                ids.append(_integer(row[id_col], path, line))
            images.append(image)
            coords.append(values)
            lines.append(line)
    if not images:
        raise DatasetError(f"{path}: no rows")
    return _Table(
        path=path,
        images=images,
        coords=np.asarray(coords, dtype=np.float64),
        geographic=geographic,
        place_ids=np.asarray(ids, dtype=np.int64) if id_col is not None else None,
        lines=lines,
    )


def _check_relative(image: str, path: Path, line: int) -> None:
    parts = PurePosixPath(image.replace("\\", "/"))
    if not image or parts.is_absolute() or ".." in parts.parts:
        raise DatasetError(f"{path}, line {line}: image path '{image}' must be relative to the dataset folder")


def _number(text: str, column: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{path}, line {line}: {column} '{text.strip()}' is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{path}, line {line}: {column} '{text.strip()}' is not finite")
    return value


def _integer(text: str, path: Path, line: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{path}, line {line}: {PLACE_ID_COLUMN} '{text.strip()}' is not an integer") from None


def _project_to_utm(db_latlon: np.ndarray, q_latlon: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Project (N, 2) lat, lon degrees to the WGS 84 UTM zone of the dataset's mean position;
    returns database and query (N, 2) easting, northing metres and the CRS as "EPSG:code"."""
    from pyproj import Transformer
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    lat, lon = np.concatenate([db_latlon, q_latlon]).mean(axis=0)
    zones = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
    if not zones:
        raise DatasetError(f"no UTM zone covers the dataset's mean position ({lat:.5f}, {lon:.5f})")
    crs = f"EPSG:{zones[0].code}"
    transformer = Transformer.from_crs("EPSG:4326", crs, always_xy=True)

    def project(latlon: np.ndarray) -> np.ndarray:
        easting, northing = transformer.transform(latlon[:, 1], latlon[:, 0])
        return np.column_stack([easting, northing]).astype(np.float64)

    return project(db_latlon), project(q_latlon), crs


def _load_mat_dataset(
    path: Path, images_root: Path | None, queries_root: Path | None, check_images: bool
) -> PlaceDataset:
    struct = read_dbstruct(path)
    root = Path(images_root) if images_root is not None else path.parent
    q_root = Path(queries_root) if queries_root is not None else root
    if check_images:
        _check_images_exist(root, struct.db_images, lambda i: f"{path}, dbImage {i + 1}")
        _check_images_exist(q_root, struct.q_images, lambda i: f"{path}, qImage {i + 1}")
    q_prefix = Path(os.path.relpath(q_root.resolve(), root.resolve()))
    radius = groundtruth.POSITIVE_RADIUS_M if struct.pos_radius_m is None else struct.pos_radius_m
    nontrivial = (
        groundtruth.POTENTIAL_POSITIVE_RADIUS_M if struct.nontrivial_radius_m is None else struct.nontrivial_radius_m
    )
    return PlaceDataset(
        root=root,
        db_images=struct.db_images,
        db_utm=struct.utm_db,
        q_images=[(q_prefix / image).as_posix() for image in struct.q_images],
        q_utm=struct.utm_q,
        pos_radius_m=radius,
        nontrivial_radius_m=nontrivial,
        name=path.stem,
    )


def _check_images_exist(root: Path, images: list[str], where: Callable[[int], str]) -> None:
    """Raise DatasetError at `where(i)` of the first image missing under `root`, with the count."""
    missing = [i for i, image in enumerate(images) if not (root / image).is_file()]
    if missing:
        raise DatasetError(
            f"{where(missing[0])}: image '{images[missing[0]]}' not found under {root} "
            f"({len(missing)} of {len(images)} missing)"
        )
