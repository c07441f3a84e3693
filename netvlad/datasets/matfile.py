"""Reader for the Pittsburgh / Tokyo 24/7 `dbStruct` MATLAB files of the NetVLAD authors.

The struct holds `dbImage`, `qImage` (cell arrays of relative image paths), `utmDb`, `utmQ`
(2 × N easting/northing in metres), `posDistThr` (25 m), `posDistSqThr` (625) and
`nonTrivPosDistSqThr` (100, i.e. 10 m). MATLAB v5 files are read with `scipy.io.loadmat`,
v7.3 files (HDF5) with h5py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError, matfile_version

from netvlad.errors import DatasetError

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
    try:
        major, _ = matfile_version(str(path))
    except (MatReadError, ValueError, OSError) as exc:
        raise DatasetError(f"{path}: not a MATLAB .mat file ({exc})") from exc
    fields = _read_hdf5(path) if major == 2 else _read_v5(path)
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise DatasetError(f"{path}: {STRUCT_NAME} lacks field(s) {', '.join(missing)}")

    def radius(name: str, squared: str) -> float | None:
        if name in fields:
            return float(np.asarray(fields[name]).ravel()[0])
        if squared in fields:
            return float(np.sqrt(np.asarray(fields[squared]).ravel()[0]))
        return None

    db_images, q_images = fields["dbImage"], fields["qImage"]
    utm_db, utm_q = fields["utmDb"], fields["utmQ"]
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


def _read_v5(path: Path) -> dict:
    """Fields of dbStruct from a v5 file; coordinates become (N, 2), cells lists of str."""
    try:
        mat = scipy.io.loadmat(str(path), simplify_cells=True, variable_names=[STRUCT_NAME])
    except Exception as exc:  # scipy raises assorted types on corrupt files
        raise DatasetError(f"{path}: cannot read MATLAB file ({exc})") from exc
    if STRUCT_NAME not in mat or not isinstance(mat[STRUCT_NAME], dict):
        raise DatasetError(f"{path}: no struct variable '{STRUCT_NAME}'")
    fields = dict(mat[STRUCT_NAME])
    for name in ("dbImage", "qImage"):
        if name in fields:
            cells = fields[name]
            fields[name] = [cells] if isinstance(cells, str) else [str(c) for c in np.ravel(cells)]
    for name in ("utmDb", "utmQ"):
        if name in fields:
            fields[name] = _points(np.asarray(fields[name], dtype=np.float64))
    return fields


def _read_hdf5(path: Path) -> dict:
    """Fields of dbStruct from a v7.3 (HDF5) file. h5py sees MATLAB's column-major arrays
    transposed, so a 2 × N matrix arrives as (N, 2); cell arrays are object references to
    uint16 character arrays."""
    import h5py

    try:
        with h5py.File(path, "r") as file:
            if STRUCT_NAME not in file or not isinstance(file[STRUCT_NAME], h5py.Group):
                raise DatasetError(f"{path}: no struct variable '{STRUCT_NAME}'")
            group = file[STRUCT_NAME]
            fields = {}
            for name, dataset in group.items():
                if not isinstance(dataset, h5py.Dataset):
                    continue
                if dataset.dtype == h5py.ref_dtype:
                    fields[name] = [_matlab_string(file[ref]) for ref in np.ravel(dataset[()])]
                elif dataset.attrs.get("MATLAB_class") in (b"char", "char"):
                    fields[name] = _matlab_string(dataset)
                else:
                    fields[name] = np.asarray(dataset[()], dtype=np.float64)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read MATLAB v7.3 file ({exc})") from exc
    for name in ("utmDb", "utmQ"):
        if name in fields:
            fields[name] = _points(fields[name].T)
    return fields


def _points(matrix: np.ndarray) -> np.ndarray:
    """MATLAB's 2 × N coordinate matrix (as MATLAB indexes it) as (N, 2). An N × 2 matrix is
    accepted too; squeezing may have turned 2 × 1 into (2,)."""
    if matrix.ndim == 1 and matrix.size == 2:
        return matrix.reshape(1, 2)
    if matrix.ndim == 2 and matrix.shape[0] == 2:
        return np.ascontiguousarray(matrix.T)
    return matrix


def _matlab_string(dataset) -> str:
    """A MATLAB char array stored in HDF5 (uint16 code units) as str."""
    codes = np.asarray(dataset[()]).ravel()
    if dataset.attrs.get("MATLAB_empty", 0):
        return ""
    return codes.astype(np.uint16).tobytes().decode("utf-16-le")
