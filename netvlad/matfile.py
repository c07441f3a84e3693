"""MATLAB `.mat` files read into plain Python values: the one reader behind the MatConvNet model
import (`netvlad.published`) and the Pittsburgh/Tokyo dbStruct datasets (`netvlad.datasets.dbstruct`).

v5/v7 files are read with scipy (`loadmat(squeeze_me=True, struct_as_record=False)`), v7.3 files
(HDF5) with h5py; both give the same values:

- struct → `types.SimpleNamespace` of its fields;
- cell array → numpy object array, singleton axes squeezed (`cells` lists it in MATLAB order);
- char → `str` (HDF5 stores UTF-16 code units);
- numeric and logical → numpy array in MATLAB's axis order, singleton axes squeezed (0-d for a
  scalar; HDF5 stores the axes reversed, they are put back).

MATLAB class objects (classdef, e.g. MatConvNet's custom layers) cannot be decoded from Python:
reading one raises the caller's error type with the caller's `hint`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import mat_struct

from netvlad.errors import NetVLADError

OBJECT_HINT = "save it as a plain struct in MATLAB first"
NUMERIC_CLASSES = {"single", "double", "logical", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                   "int64", "uint64"}


def read_mat_variable(path: Path, name: str, error: type[NetVLADError], hint: str = OBJECT_HINT):
    """Variable `name` of the MATLAB file `path` as plain values (see the module docstring).

    Every problem (unreadable file, no such variable, a class object) raises `error`; `hint` is
    appended to the message about class objects.
    """
    path = Path(path)
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as file:
                if name not in file:
                    found = ", ".join(k for k in file if not k.startswith("#"))
                    raise error(f"{path}: no variable '{name}' in the MATLAB file (found: {found or 'nothing'})")
                return _h5_value(file[name], file, error, hint)
        except (OSError, KeyError, ValueError) as exc:
            raise error(f"{path}: unreadable MATLAB v7.3 file ({exc})") from None
    try:
        content = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False, variable_names=[name])
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError… for bad files
        raise error(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    if name not in content:
        found = ", ".join(variable for variable, _, _ in scipy.io.whosmat(path))
        raise error(f"{path}: no variable '{name}' in the MATLAB file (found: {found or 'nothing'})")
    return _plain(content[name])


def cells(value) -> list:
    """A cell array (as read, possibly squeezed to its one element) → list of its elements in
    MATLAB (column-major) order."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value.ravel(order="F"))
    if isinstance(value, (list, tuple)):
        return list(value)
    return [] if value is None else [value]


def text(value) -> str:
    """A char value as read (str, or an array of characters) → str."""
    return value if isinstance(value, str) else "".join(np.asarray(value, dtype=str).ravel())


def _plain(value):
    """scipy's struct objects (anywhere inside cells) → SimpleNamespace."""
    if isinstance(value, mat_struct):
        return SimpleNamespace(**{field: _plain(getattr(value, field)) for field in value._fieldnames})
    if isinstance(value, np.ndarray) and value.dtype == object:
        out = np.empty(value.shape, dtype=object)
        for idx in np.ndindex(value.shape):
            out[idx] = _plain(value[idx])
        return out
    return value


def _h5_value(node, file: h5py.File, error: type[NetVLADError], hint: str):
    """A MATLAB v7.3 (HDF5) node → the value scipy's reader gives for the same v7 variable."""
    matlab_class = node.attrs.get("MATLAB_class", b"")
    matlab_class = matlab_class.decode() if isinstance(matlab_class, bytes) else str(matlab_class)
    if isinstance(node, h5py.Group):
        if matlab_class != "struct":
            raise error(f"{file.filename}: '{node.name}' is a MATLAB '{matlab_class}' object, not a struct; {hint}")
        return SimpleNamespace(**{key: _h5_value(node[key], file, error, hint) for key in node})
    if node.attrs.get("MATLAB_empty", 0):
        return "" if matlab_class == "char" else np.empty(0, dtype=object if matlab_class == "cell" else float)
    data = node[()]
    if h5py.check_ref_dtype(node.dtype) is not None:  # cell array (or fields of a struct array)
        refs = np.asarray(data).T  # HDF5 stores MATLAB arrays with their axes reversed
        out = np.empty(refs.shape, dtype=object)
        for idx in np.ndindex(refs.shape):
            out[idx] = _h5_value(file[refs[idx]], file, error, hint)
        return np.squeeze(out)
    if matlab_class == "char":
        return np.asarray(data).ravel().astype(np.uint16).tobytes().decode("utf-16-le")
    if matlab_class not in NUMERIC_CLASSES:
        raise error(f"{file.filename}: '{node.name}' is a MATLAB '{matlab_class}' value; {hint}")
    array = np.squeeze(np.asarray(data).T)
    return array.astype(bool) if matlab_class == "logical" else array
