"""The demo collection: places made from the approved real photos, and query photos to try.

`make_placeset` turns every photo into a street of places: database views on a grid with metric
positions, and re-photographed query views (perspective, rotation, light, blur, occluders) of
points along it. The demo index holds the database views with coordinates (the placeset's metric
frame read as UTM zone 32N, so every place has a latitude and longitude); the query photos stay in
`<demo>/placeset/queries/` to be dropped on the web page, each with its true position known.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyproj
from tqdm.auto import tqdm

from netvlad.datasets.make_placeset import METADATA, PlacesetConfig, make_placeset
from netvlad.datasets.placeset import PlaceDataset, load_place_dataset
from netvlad.index import Index

#: The training sets' grid (places 12.5 m apart, about 160 per photo) and a few queries per photo.
DEMO_PLACESET = PlacesetConfig(queries_per_photo=4, seed=0)
#: The projection the placeset's easting/northing are read in.
DEMO_CRS = "EPSG:32632"
#: Database views added (and made durable) per `Index.add` call.
CHUNK = 64


@dataclass
class DemoReport:
    """What `fill_demo_index` did: places in the index, how many were described now."""

    places: int
    described: int


def demo_placeset(directory: Path, photos: list[Path], progress: bool = True) -> PlaceDataset:
    """The demo's place dataset in `directory`, made from `photos` on the first call."""
    if not (directory / METADATA).is_file():
        make_placeset(photos, directory, DEMO_PLACESET, overwrite=directory.exists(), progress=progress)
    return load_place_dataset(directory)


def lat_lon(positions: np.ndarray) -> np.ndarray:
    """(N, 2) easting, northing in metres (DEMO_CRS) → (N, 2) latitude, longitude in degrees."""
    to_wgs84 = pyproj.Transformer.from_crs(DEMO_CRS, "EPSG:4326", always_xy=True)
    lon, lat = to_wgs84.transform(positions[:, 0], positions[:, 1])
    return np.column_stack([lat, lon])


def fill_demo_index(index: Index, places: PlaceDataset, progress: bool = True) -> DemoReport:
    """Add the placeset's database views with their coordinates, `CHUNK` at a time (an interrupted
    run resumes: views already indexed are not described again)."""
    paths = places.db_paths()
    coordinates = lat_lon(places.db_utm)
    before = len(index)
    for start in tqdm(range(0, len(paths), CHUNK), desc="demo index", unit="chunk", disable=not progress):
        chunk = slice(start, start + CHUNK)
        index.add(paths[chunk], [{"lat": float(lat), "lon": float(lon)} for lat, lon in coordinates[chunk]])
    return DemoReport(places=len(index), described=len(index) - before)
