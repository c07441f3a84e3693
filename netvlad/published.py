"""Import published NetVLAD models (checkpoints of pytorch-NetVlad and MatConvNet NetVLAD; see
docs/design.md §6.2) as a `NetVLADModel` (backbone "vgg16").

Two layouts are read:

- **pytorch-NetVlad** (Nanne) and its forks such as Patch-NetVLAD: a `torch.save` dict whose
  ``state_dict`` holds ``encoder.{i}.*`` (VGG16 ``features[:-2]``, same indices as ours),
  ``pool.conv.weight`` (K, D, 1, 1) = α·ĉ (``pool.conv.bias`` (K,) only with ``vladv2``; zeros
  otherwise), ``pool.centroids`` (K, D) and optionally Patch-NetVLAD's ``WPCA.0.weight``
  (out, K·D, 1, 1) / ``WPCA.0.bias`` (out,), a 1×1 conv on the (row-major, k·D + d) VLAD vector.
  ``module.`` prefixes left by ``nn.DataParallel`` are removed. Input: RGB, ImageNet mean/std.
- **MatConvNet** (Relja/netvlad, ``vd16_*_conv5_3_vlad_preL2_intra[_white].mat``): a struct ``net``
  with ``net.layers`` = VGG16 conv1_1…conv5_3 (weights H×W×Cin×Cout), ``preL2`` (normalize),
  ``vlad:core`` (layerVLAD: 1×1×D×K assignment α·ĉ and offset −c; layerVLADv2: 2αc, −α‖c‖² as a
  bias, −c), ``vlad:intranorm``, ``postL2``, optionally ``WPCA`` (1×1×(K·D)×out, bias out) and
  ``finalL2``. MATLAB flattens the K×D VLAD matrix column-major (index k + K·d, ours k·D + d), so
  the WPCA columns are permuted; without WPCA our descriptor holds MATLAB's numbers in our order
  (reorder descriptors computed in MATLAB before mixing them with ours). MATLAB feeds
  ``pixels − averageImage(1,1,:)`` in [0, 255]: our rgb mode with mean = avg/255, std = 1/255.
  The custom layers of the released files are MATLAB class objects that no Python reader can
  decode: convert them to structs first (`MAT_CONVERSION_HINT`). Files are read by
  `netvlad.matfile` (v7 with scipy, v7.3 with h5py).

Safety: torch files are loaded with ``weights_only=True``, numpy scalars and arrays (as in
pytorch-NetVlad's ``recalls``/``best_score``) allowed as plain data. A file needing any other Python
object is refused with the names of those objects, unless ``trust=True`` (CLI ``--trust``), which
unpickles it fully — this can run code from the file, so only for files from a trusted source.

Every problem with a file raises `ModelFileError` naming the key or layer and the expected shape.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from netvlad.backbones import BACKBONES
from netvlad.errors import ModelFileError
from netvlad.matfile import cells, read_mat_variable, text
from netvlad.model import ModelConfig, NetVLADModel
from netvlad.torchfiles import unreadable
from netvlad.transforms import IMAGENET_MEAN, IMAGENET_STD

TORCH_SUFFIXES = (".pth.tar", ".pth", ".pt")
MAT_SUFFIXES = (".mat",)
BACKBONE = "vgg16"
FEATURE_DIM = BACKBONES[BACKBONE].dim

MAT_CONVERSION_HINT = (
    "convert the custom layers to structs in MATLAB first: load the file, then "
    "`for i = 1:numel(net.layers), net.layers{i} = struct(net.layers{i}); end; save('net_structs.mat', 'net');`"
)

# Data-only globals that numpy scalars and arrays pickle to, under numpy 1 and numpy 2 module names.
_NUMPY_GLOBALS = [
    (constructor, f"numpy.{package}.multiarray.{constructor.__name__}")
    for constructor in (np.float64(0).__reduce__()[0], np.zeros(1).__reduce__()[0])  # scalar, _reconstruct
    for package in ("core", "_core")
] + [np.ndarray, np.dtype, *sorted({type(np.dtype(code)) for code in np.typecodes["All"]}, key=str)]


def import_checkpoint(path: str | os.PathLike, trust: bool = False) -> NetVLADModel:
    """Read a published checkpoint (`.pth.tar`/`.pth`/`.pt` or MatConvNet `.mat`) → model in eval mode.

    `trust` allows full unpickling of torch files that hold Python objects beyond tensors and numpy
    data (see the module docstring); it has no effect on `.mat` files.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such checkpoint file")
    name = path.name.lower()
    if name.endswith(TORCH_SUFFIXES):
        return read_pytorch_netvlad(path, trust=trust)
    if name.endswith(MAT_SUFFIXES):
        return read_matconvnet(path)
    raise ModelFileError(
        f"{path}: unknown checkpoint type; expected a pytorch-NetVlad file "
        f"({', '.join(TORCH_SUFFIXES)}) or a MatConvNet NetVLAD file (.mat)"
    )


# --------------------------------------------------------------------------- shared


def _new_model(clusters: int, whitening_dim: int | None, mean, std, imported: dict) -> NetVLADModel:
    config = ModelConfig(
        backbone=BACKBONE, clusters=clusters, whitening_dim=whitening_dim, input_mode="rgb",
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        meta={"pretrained": True, "imported": imported},
    )
    # Every weight is overwritten by `_finish`: build VGG16 on the meta device to skip its (slow) init.
    spec = BACKBONES[BACKBONE]
    with torch.device("meta"):
        backbone = spec.crop(spec.builder(weights=None))
    return NetVLADModel(config, backbone.to_empty(device="cpu"))


def _finish(model: NetVLADModel, tensors: dict[str, torch.Tensor]) -> NetVLADModel:
    """Load tensors named after our state dict (all of them, already shape-checked); eval mode."""
    with torch.no_grad():
        model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    return model.eval()


def _shape(shape) -> str:
    """(3, 3, None) → "3×3×*" (None: any size)."""
    return "×".join("*" if s is None else str(s) for s in shape) if len(shape) else "scalar"


# --------------------------------------------------------------------------- pytorch-NetVlad


class _TensorTable:
    """The checkpoint's state dict, handing out tensors by key with shape checks and usage tracking."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor]):
        self.path = path
        self.state = state
        self.unused = set(state)

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        """Tensor `key`, checked against `shape` (None = any size on that axis)."""
        if key not in self.state:
            raise ModelFileError(f"{self.path}: missing tensor '{key}' (expected shape {_shape(shape)})")
        value = self.state[key]
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{self.path}: '{key}' is a {type(value).__name__}, not a tensor")
        if value.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, value.shape)):
            raise ModelFileError(f"{self.path}: tensor '{key}' has shape {_shape(value.shape)}, "
                                 f"expected {_shape(shape)}")
        self.unused.discard(key)
        return value.detach()


def _torch_load(path: Path, trust: bool):
    """torch.load with weights_only (numpy data allowed); full unpickling only when `trust`."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and torch errors all mean "not a readable checkpoint"
        # torch names the refused globals/classes and points to add_safe_globals; other errors: bad file.
        if not (isinstance(exc, pickle.UnpicklingError) and "add_safe_globals" in str(exc)):
            raise unreadable(path, "torch checkpoint", exc) from None
        if not trust:
            needed = ", ".join(sorted(set(re.findall(r"(?:GLOBAL |got <class ')([\w.]+)", str(exc)))))
            raise ModelFileError(
                f"{path}: the checkpoint needs Python objects that safe loading refuses ({needed}); loading "
                "it fully can run code stored in the file — if you trust its source, pass trust=True (CLI: --trust)"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise unreadable(path, "torch checkpoint", exc) from None


def _state_dict(path: Path, payload) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict (wrapped in 'state_dict' or bare), without DataParallel 'module.'."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        state = payload["state_dict"]
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = payload
    else:
        found = ", ".join(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: no 'state_dict' in the checkpoint (found: {found})")
    return {".".join(p for p in str(k).split(".") if p != "module"): v for k, v in state.items()}


def _plain_number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_pytorch_netvlad(path: str | os.PathLike, trust: bool = False) -> NetVLADModel:
    """pytorch-NetVlad / Patch-NetVLAD checkpoint (VGG16 encoder) → model; see the module docstring."""
    path = Path(path)
    payload = _torch_load(path, trust)
    table = _TensorTable(path, _state_dict(path, payload))
    centroids = table.take("pool.centroids", (None, None))
    clusters, dim = centroids.shape
    if dim != FEATURE_DIM:
        raise ModelFileError(
            f"{path}: 'pool.centroids' has D={dim}, but only VGG16 (conv5_3, D={FEATURE_DIM}) checkpoints "
            "can be imported"
        )
    assign = table.take("pool.conv.weight", (clusters, dim, 1, 1))
    bias = table.take("pool.conv.bias", (clusters,)) if "pool.conv.bias" in table else torch.zeros(clusters)
    whitening = None
    if "WPCA.0.weight" in table or "WPCA.0.bias" in table:
        weight = table.take("WPCA.0.weight", (None, clusters * dim, 1, 1))
        whitening = weight[:, :, 0, 0], table.take("WPCA.0.bias", (weight.shape[0],))

    imported: dict = {"file": path.name, "layout": "pytorch-netvlad",
                      "vlad": "vladv2" if "pool.conv.bias" in table else "vlad"}
    if isinstance(payload, dict):
        epoch = _plain_number(payload.get("epoch"))
        if epoch is not None:
            imported["epoch"] = int(epoch)
        if isinstance(payload.get("recalls"), dict):
            imported["recalls"] = {int(n): float(r) for n, r in payload["recalls"].items()
                                   if _plain_number(n) is not None and _plain_number(r) is not None}
    model = _new_model(clusters, None if whitening is None else whitening[0].shape[0],
                       IMAGENET_MEAN, IMAGENET_STD, imported)
    tensors = {f"backbone.{name}": table.take(f"encoder.{name}", tuple(p.shape))
               for name, p in model.backbone.state_dict().items()}
    if table.unused:
        extra = sorted(table.unused)
        raise ModelFileError(
            f"{path}: {len(extra)} tensors this importer does not know what to do with "
            f"(e.g. {', '.join(extra[:4])}); expected only encoder.*, pool.* and WPCA.0.*"
        )
    tensors.update({"pool.conv.weight": assign, "pool.conv.bias": bias, "pool.centroids": centroids})
    if whitening is not None:
        tensors.update({"whitening.linear.weight": whitening[0], "whitening.linear.bias": whitening[1]})
    return _finish(model, tensors)


# --------------------------------------------------------------------------- MatConvNet


@dataclass
class _MatLayer:
    index: int
    type: str
    name: str
    weights: list[np.ndarray]
    raw: object

    @property
    def label(self) -> str:
        return f"layer {self.index + 1} '{self.name}' ({self.type})"

    def field(self, name: str, default=None):
        return getattr(self.raw, name, default)


def _mat_layers(path: Path, net) -> list[_MatLayer]:
    if not hasattr(net, "layers"):
        raise ModelFileError(f"{path}: 'net' has no 'layers' (not a MatConvNet simplenn network)")
    layers = []
    for index, raw in enumerate(cells(net.layers)):
        if not hasattr(raw, "type"):
            raise ModelFileError(
                f"{path}: layer {index + 1} is a MATLAB class object ({type(raw).__name__}) that cannot be "
                "read from Python; " + MAT_CONVERSION_HINT
            )
        weights = [np.asarray(w) for w in cells(getattr(raw, "weights", None))]
        layers.append(_MatLayer(index, text(raw.type), text(getattr(raw, "name", "")), weights, raw))
    return layers


def _mat_array(path: Path, layer: _MatLayer, which: int, shape: tuple[int, ...]) -> np.ndarray:
    """`layer.weights{which+1}` reshaped to the MATLAB `shape` (squeezed singleton axes restored)."""
    if which >= len(layer.weights):
        raise ModelFileError(f"{path}: {layer.label} has {len(layer.weights)} weights, expected weights{{{which + 1}}}"
                             f" of size {_shape(shape)}")
    value = layer.weights[which]
    if [s for s in value.shape if s != 1] != [s for s in shape if s != 1]:
        raise ModelFileError(f"{path}: {layer.label} weights{{{which + 1}}} has size {_shape(value.shape)}, "
                             f"expected {_shape(shape)}")
    return value.astype(np.float32).reshape(shape)


def _check_l2(path: Path, layer: _MatLayer, what: str, channels: int) -> None:
    """A MatConvNet 'normalize' layer must be a plain L2 normalisation over all `channels`."""
    param = np.asarray(layer.field("param", []), dtype=float).ravel()
    if (layer.type != "normalize" or param.size != 4 or param[0] < 2 * channels - 1
            or param[2] != 1 or param[3] != 0.5 or param[1] > 1e-6):
        raise ModelFileError(
            f"{path}: expected {what} (type 'normalize', param [{2 * channels}, 1e-12, 1, 0.5]) but found "
            f"{layer.label} with param {param.tolist()}"
        )


def _check_whole_l2(path: Path, layer: _MatLayer | None, what: str) -> None:
    if layer is None or layer.type != "custom" or layer.weights:
        found = "the end of the network" if layer is None else layer.label
        raise ModelFileError(f"{path}: expected {what} (a custom whole-vector L2 layer) but found {found}")


def _structure(types: list[str]) -> str:
    """Layer types as a string (C conv, R relu, P max-pool), ReLU moved before pooling (they commute)."""
    code = "".join({"conv": "C", "relu": "R", "pool": "P"}.get(t, "?") for t in types)
    while "PR" in code:
        code = code.replace("PR", "RP")
    return code


def _backbone_tensors(path: Path, layers: list[_MatLayer], backbone: nn.Sequential) -> dict[str, torch.Tensor]:
    """VGG16 conv1_1…conv5_3 (MatConvNet H×W×Cin×Cout) → `backbone.{i}.weight/bias` (Cout, Cin, H, W)."""
    expected = _structure(["conv" if isinstance(m, nn.Conv2d) else "relu" if isinstance(m, nn.ReLU) else "pool"
                           for m in backbone])
    found = _structure([layer.type for layer in layers])
    if found != expected:
        raise ModelFileError(
            f"{path}: the layers before preL2 ({' '.join(l.name for l in layers)}) are not VGG16 cropped at "
            f"conv5_3 before its ReLU (layer types {found or 'none'}, expected {expected})"
        )
    for layer in layers:
        if layer.type == "pool" and (
            text(layer.field("method", "max")) != "max"
            or np.any(np.asarray(layer.field("pool", 2)) != 2)
            or np.any(np.asarray(layer.field("stride", 2)) != 2)
            or np.any(np.asarray(layer.field("pad", 0)) != 0)
        ):
            raise ModelFileError(f"{path}: {layer.label} is not a 2×2 max-pool with stride 2 and no padding")
        if layer.type == "relu" and np.any(np.asarray(layer.field("leak", 0)) != 0):
            raise ModelFileError(f"{path}: {layer.label} is a leaky ReLU; VGG16 uses a plain ReLU")
    convs = [layer for layer in layers if layer.type == "conv"]
    modules = [(i, m) for i, m in enumerate(backbone) if isinstance(m, nn.Conv2d)]
    tensors = {}
    for layer, (i, module) in zip(convs, modules):
        if np.any(np.asarray(layer.field("pad", 1)) != 1) or np.any(np.asarray(layer.field("stride", 1)) != 1):
            raise ModelFileError(f"{path}: {layer.label} must have pad 1 and stride 1 like VGG16")
        cout, cin, kh, kw = module.weight.shape
        weight = _mat_array(path, layer, 0, (kh, kw, cin, cout))
        tensors[f"backbone.{i}.weight"] = torch.from_numpy(weight).permute(3, 2, 0, 1).contiguous()
        tensors[f"backbone.{i}.bias"] = torch.from_numpy(_mat_array(path, layer, 1, (cout,)))
    return tensors


def _average_rgb(path: Path, net) -> np.ndarray:
    """averageImage(1,1,:) — the pixel MatConvNet NetVLAD subtracts from every [0, 255] RGB pixel."""
    average = getattr(getattr(getattr(net, "meta", None), "normalization", None), "averageImage", None)
    if average is None:
        raise ModelFileError(f"{path}: missing net.meta.normalization.averageImage")
    average = np.asarray(average, dtype=np.float64)
    if average.size == 3:
        return average.ravel()
    if average.ndim >= 2 and average.shape[-1] == 3:
        return average.reshape(-1, 3)[0]  # first pixel, as computeRepresentation/serialAllFeats use
    raise ModelFileError(f"{path}: averageImage has size {_shape(average.shape)}, expected 1×1×3 or H×W×3")


def _vlad_tensors(path: Path, core: _MatLayer) -> dict[str, torch.Tensor]:
    """layerVLAD (α·ĉ, −c) or layerVLADv2 (2αc, −α‖c‖², −c), each 1×1×D×K → `pool.*` tensors."""
    sizes = [s for s in core.weights[0].shape if s != 1]
    if len(sizes) != 2 or sizes[0] != FEATURE_DIM:
        raise ModelFileError(f"{path}: {core.label} weights{{1}} has size {_shape(core.weights[0].shape)}, expected "
                             f"1×1×{FEATURE_DIM}×K (only VGG16 conv5_3 networks, D={FEATURE_DIM}, can be imported)")
    dim, clusters = sizes
    assign = _mat_array(path, core, 0, (1, 1, dim, clusters))[0, 0].T  # (K, D)
    if len(core.weights) == 2:
        bias = np.zeros(clusters, dtype=np.float32)
    else:
        bias = _mat_array(path, core, 1, (1, clusters)).ravel()
    offset = _mat_array(path, core, len(core.weights) - 1, (1, 1, dim, clusters))[0, 0].T  # −c, (K, D)
    return {
        "pool.conv.weight": torch.from_numpy(np.ascontiguousarray(assign))[:, :, None, None],
        "pool.conv.bias": torch.from_numpy(bias),
        "pool.centroids": torch.from_numpy(np.ascontiguousarray(-offset)),
    }


def _whitening_tensors(path: Path, core: _MatLayer, tail: list[_MatLayer], clusters: int) -> dict[str, torch.Tensor]:
    """Check vlad:intranorm, postL2 [, WPCA, finalL2] after the VLAD layer; WPCA → `whitening.linear.*`."""
    dim = FEATURE_DIM
    if not tail:
        raise ModelFileError(f"{path}: expected vlad:intranorm after {core.label}, found the end of the network")
    _check_l2(path, tail[0], "vlad:intranorm", dim)
    _check_whole_l2(path, tail[1] if len(tail) > 1 else None, "postL2")
    if len(tail) == 2:
        return {}
    pca = tail[2]
    if pca.type != "conv" or len(pca.weights) != 2:
        raise ModelFileError(f"{path}: expected the WPCA conv layer or the end of the network after postL2, "
                             f"found {pca.label}")
    _check_whole_l2(path, tail[3] if len(tail) > 3 else None, "finalL2")
    if len(tail) > 4:
        raise ModelFileError(f"{path}: unexpected {tail[4].label} after finalL2")
    out = pca.weights[1].size
    matrix = _mat_array(path, pca, 0, (1, 1, clusters * dim, out))[0, 0]  # row k + K·d (MATLAB order)
    # Rows reordered to our flattening k·D + d, then transposed to the linear layer's (out, K·D).
    weight = matrix.reshape(dim, clusters, out).transpose(1, 0, 2).reshape(clusters * dim, out).T
    return {
        "whitening.linear.weight": torch.from_numpy(np.ascontiguousarray(weight)),
        "whitening.linear.bias": torch.from_numpy(_mat_array(path, pca, 1, (out,))),
    }


def read_matconvnet(path: str | os.PathLike) -> NetVLADModel:
    """MatConvNet NetVLAD network (Relja/netvlad, layers converted to structs) → model; see the module docstring."""
    path = Path(path)
    net = read_mat_variable(path, "net", ModelFileError, MAT_CONVERSION_HINT)
    layers = _mat_layers(path, net)
    core = next((layer for layer in layers if layer.type == "custom" and len(layer.weights) in (2, 3)), None)
    if core is None:
        raise ModelFileError(f"{path}: no NetVLAD layer (vlad:core, a custom layer with 2 or 3 weights) in net.layers")
    head, tail = layers[: core.index], layers[core.index + 1 :]
    if not head or head[-1].type != "normalize":
        raise ModelFileError(f"{path}: expected the preL2 'normalize' layer right before {core.label}; "
                             "networks pooling unnormalised features cannot be imported")
    _check_l2(path, head[-1], "preL2", FEATURE_DIM)
    tensors = _vlad_tensors(path, core)
    clusters = tensors["pool.centroids"].shape[0]
    tensors.update(_whitening_tensors(path, core, tail, clusters))

    imported = {"file": path.name, "layout": "matconvnet", "vlad": "vlad" if len(core.weights) == 2 else "vladv2"}
    session = getattr(getattr(net, "meta", None), "sessionID", None)
    if isinstance(session, str):
        imported["session"] = session
    whitening = tensors.get("whitening.linear.weight")
    model = _new_model(clusters, None if whitening is None else whitening.shape[0],
                       _average_rgb(path, net) / 255.0, (1.0 / 255.0,) * 3, imported)
    tensors.update(_backbone_tensors(path, head[:-1], model.backbone))
    return _finish(model, tensors)
