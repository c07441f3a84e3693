"""Reader for the Pittsburgh / Tokyo 24/7 `dbStruct` MATLAB files of the NetVLAD authors.

The struct holds `dbImage`, `qImage` (cell arrays of relative image paths), `utmDb`, `utmQ`
(2 × N easting/northing in metres), `posDistThr` (25 m), `posDistSqThr` (625) and
`nonTrivPosDistSqThr` (100, i.e. 10 m). Files of any MATLAB version are read by `netvlad.matfile`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from netvlad.errors import DatasetError
from netvlad.matfile import cells, read_mat_variable

STRUCT_NAME = "dbStruct"
REQUIRED_FIELDS = ("dbImage", "utmDb", "qImage", "utmQ")


@dataclass
class DbStruct:
    """Contents of a dbStruct: image paths as stored, coordinates (N, 2) float64 metres,
    radii in metres (None when the file does not give them)."""

    db_images: list[str]
    utm_db: np.ndarray
    q_images: list[str]
    utm_q: np.ndarray
    pos_radius_m: float | None
    nontrivial_radius_m: float | None


def read_dbstruct(path: Path) -> DbStruct:
    """Read the `dbStruct` variable of a MATLAB v5 or v7.3 file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    struct = read_mat_variable(path, STRUCT_NAME, DatasetError)
    if not isinstance(struct, SimpleNamespace):
        raise DatasetError(f"{path}: '{STRUCT_NAME}' is a {type(struct).__name__}, not a struct")
    fields = vars(struct)
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise DatasetError(f"{path}: {STRUCT_NAME} lacks field(s) {', '.join(missing)}")

    def radius(name: str, squared: str) -> float | None:
        if name in fields:
            return float(np.asarray(fields[name]).ravel()[0])
        if squared in fields:
            return float(np.sqrt(np.asarray(fields[squared]).ravel()[0]))
        return None

    db_images, q_images = (_strings(fields[name]) for name in ("dbImage", "qImage"))
    utm_db, utm_q = (_points(np.asarray(fields[name], dtype=np.float64)) for name in ("utmDb", "utmQ"))
    for images, utm, what in ((db_images, utm_db, "utmDb"), (q_images, utm_q, "utmQ")):
        if utm.shape != (len(images), 2):
            raise DatasetError(f"{path}: {what} has shape {utm.shape}, expected ({len(images)}, 2) after transposing")
    return DbStruct(
        db_images=db_images,
        utm_db=utm_db,
        q_images=q_images,
        utm_q=utm_q,
        pos_radius_m=radius("posDistThr", "posDistSqThr"),
        nontrivial_radius_m=radius("nonTrivPosDistThr", "nonTrivPosDistSqThr"),
    )


def _strings(value) -> list[str]:
    """A cell array of image paths (a lone string when it holds one) → list of str."""
    return [value] if isinstance(value, str) else [str(c) for c in cells(value)]


def _points(matrix: np.ndarray) -> np.ndarray:
    """MATLAB's 2 × N coordinate matrix (as MATLAB indexes it) as (N, 2). An N × 2 matrix is
    accepted too; squeezing may have turned 2 × 1 into (2,)."""
    if matrix.ndim == 1 and matrix.size == 2:
        return matrix.reshape(1, 2)
    if matrix.ndim == 2 and matrix.shape[0] == 2:
        return np.ascontiguousarray(matrix.T)
    return matrix
