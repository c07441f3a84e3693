"""Importing published NetVLAD checkpoints (pytorch-NetVlad / Patch-NetVLAD `.pth.tar`, MatConvNet `.mat`).

Each layout is written here with random VGG16 weights, then the imported model must reproduce the
published forward pass, written independently in this file: pytorch-NetVlad's per-cluster loop, and
a small numpy interpreter of MatConvNet's simplenn layers (H×W×C arrays, per-cluster VLAD with
x + w2 offsets, column-major flattening, WPCA as a 1×1 conv) run in float64.
"""

from __future__ import annotations

import argparse
import copy

import h5py
import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn
from torchvision import models
from torchvision.transforms import functional as TF

from netvlad.published import import_checkpoint
from netvlad.errors import ModelFileError
from netvlad.imageio import load_image
from netvlad.modelfile import load_model, save_model

K, PCS, SIZE = 16, 64, (96, 64)  # clusters, whitening dim, photo (W, H)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
AVERAGE_RGB = np.array([123.68, 116.779, 103.939])
ATOL = 1e-5


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos(real_photos):
    """Two real photos, resized to 96×64 (both implementations get the same pixels)."""
    return [load_image(path).resize(SIZE) for path in (real_photos[0], real_photos[-1])]


@pytest.fixture(scope="module")
def vgg():
    """VGG16 features[:-2] (conv1_1…conv5_3, before its ReLU) with random weights and biases."""
    torch.manual_seed(0)
    encoder = models.vgg16().features[:-2]
    with torch.no_grad():
        for module in encoder:
            if isinstance(module, nn.Conv2d):
                module.bias.normal_(0.0, 0.1)
    return encoder.eval()


def imported_descriptors(model, photos):
    """Our model on our preprocessing of the photos: (N, dim)."""
    batch = torch.stack([model.preprocess.normalize(TF.pil_to_tensor(photo)) for photo in photos])
    with torch.no_grad():
        return model(batch).numpy()


# --------------------------------------------------------------------------- pytorch-NetVlad


class PublishedNetVLAD(nn.Module):
    """pytorch-NetVlad's NetVLAD layer (netvlad.py): input L2, per-cluster residual loop, intra + L2."""

    def __init__(self, num_clusters, dim, vladv2):
        super().__init__()
        self.num_clusters = num_clusters
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=(1, 1), bias=vladv2)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

    def forward(self, x):
        n, c = x.shape[:2]
        x = F.normalize(x, p=2, dim=1)
        soft_assign = F.softmax(self.conv(x).view(n, self.num_clusters, -1), dim=1)
        x_flatten = x.view(n, c, -1)
        vlad = torch.zeros([n, self.num_clusters, c])
        for k in range(self.num_clusters):
            residual = x_flatten - self.centroids[k][None, :, None]
            vlad[:, k, :] = (residual * soft_assign[:, k : k + 1, :]).sum(dim=-1)
        vlad = F.normalize(vlad, p=2, dim=2).view(n, -1)
        return F.normalize(vlad, p=2, dim=1)


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class L2Norm(nn.Module):
    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.normalize(x, p=2, dim=self.dim)


def published_torch_model(vgg, vladv2, pca, seed):
    """nn.Module() with `encoder`, `pool` (and Patch-NetVLAD's `WPCA`), as their training scripts build it."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Module()
    model.add_module("encoder", copy.deepcopy(vgg))
    pool = PublishedNetVLAD(K, 512, vladv2)
    with torch.no_grad():
        centroids = torch.randn(K, 512, generator=generator) * 0.05
        pool.centroids.copy_(centroids)
        pool.conv.weight.copy_(30.0 * F.normalize(centroids, dim=1)[:, :, None, None])
        if vladv2:
            pool.conv.bias.normal_(0.0, 0.5, generator=generator)
    model.add_module("pool", pool)
    if pca:
        conv = nn.Conv2d(K * 512, PCS, kernel_size=(1, 1))
        with torch.no_grad():
            conv.weight.normal_(0.0, 1.0, generator=generator)
            conv.bias.normal_(0.0, 0.1, generator=generator)
        model.add_module("WPCA", nn.Sequential(conv, Flatten(), L2Norm(dim=-1)))
    return model.eval()


def published_torch_descriptors(model, photos):
    """Their pipeline: ToTensor + ImageNet Normalize, encoder, pool, WPCA (get_pca_encoding) + L2."""
    batch = torch.stack([TF.normalize(TF.to_tensor(photo), IMAGENET_MEAN, IMAGENET_STD) for photo in photos])
    with torch.no_grad():
        vlad = model.pool(model.encoder(batch))
        if hasattr(model, "WPCA"):
            vlad = model.WPCA(vlad.unsqueeze(-1).unsqueeze(-1))
    return vlad.numpy()


def as_numpy1_legacy_file(path, payload):
    """Write like a 2018 checkpoint: legacy (non-zip) torch format, numpy 1.x pickle module names."""
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\nscalar" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))


@pytest.fixture(scope="module")
def nanne(vgg, tmp_path_factory):
    """pytorch-NetVlad checkpoint.pth.tar: vlad (no conv bias), numpy recalls, legacy format."""
    model = published_torch_model(vgg, vladv2=False, pca=False, seed=1)
    path = tmp_path_factory.mktemp("nanne") / "checkpoint.pth.tar"
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    as_numpy1_legacy_file(path, {
        "epoch": 7, "state_dict": model.state_dict(),
        "recalls": {1: np.float64(0.81), 5: np.float64(0.9)}, "best_score": np.float64(0.9),
        "optimizer": optimizer.state_dict(), "parallel": False,
    })
    return model, path


@pytest.fixture(scope="module")
def patch_netvlad(vgg, tmp_path_factory):
    """Patch-NetVLAD *_WPCA64.pth.tar: vladv2 bias, WPCA, keys saved through nn.DataParallel."""
    model = published_torch_model(vgg, vladv2=True, pca=True, seed=2)
    state = {k.replace("encoder.", "encoder.module.", 1).replace("pool.", "pool.module.", 1): v
             for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("patch") / f"pitts_WPCA{PCS}.pth.tar"
    torch.save({"num_pcs": PCS, "state_dict": state}, path)
    return model, path


@pytest.mark.parametrize("layout", ["nanne", "patch_netvlad"])
def test_torch_checkpoint_reproduces_published_forward(layout, photos, request):
    reference, path = request.getfixturevalue(layout)
    expected = published_torch_descriptors(reference, photos)
    model = import_checkpoint(path)
    assert model.config.backbone == "vgg16" and model.config.clusters == K
    assert model.dim == (PCS if layout == "patch_netvlad" else K * 512)
    actual = imported_descriptors(model, photos)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL  # the photos give different descriptors


def test_round_trip_through_model_file(nanne, photos, tmp_path):
    model = import_checkpoint(nanne[1])
    assert model.config.meta["imported"] == {
        "file": "checkpoint.pth.tar", "layout": "pytorch-netvlad", "vlad": "vlad",
        "epoch": 7, "recalls": {1: 0.81, 5: 0.9},
    }
    reloaded = load_model(save_model(model, tmp_path / "model.pt"))
    np.testing.assert_array_equal(imported_descriptors(reloaded, photos), imported_descriptors(model, photos))


def test_torch_missing_tensor_is_named(nanne, tmp_path):
    state = nanne[0].state_dict()
    del state["pool.centroids"]
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(ModelFileError, match=r"missing tensor 'pool\.centroids'"):
        import_checkpoint(tmp_path / "bad.pth")


def test_torch_wrong_shape_is_named(nanne, tmp_path):
    state = dict(nanne[0].state_dict())
    state["encoder.28.weight"] = torch.zeros(512, 256, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    message = r"'encoder\.28\.weight' has shape 512×256×3×3, expected 512×512×3×3"
    with pytest.raises(ModelFileError, match=message):
        import_checkpoint(tmp_path / "bad.pt")


def test_torch_unknown_tensor_is_refused(nanne, tmp_path):
    state = dict(nanne[0].state_dict())
    state["head.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    with pytest.raises(ModelFileError, match=r"head\.weight"):
        import_checkpoint(tmp_path / "extra.pth")


def test_pickled_objects_need_trust(nanne, photos, tmp_path):
    path = tmp_path / "with_args.pth.tar"
    torch.save({"state_dict": nanne[0].state_dict(), "opt": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ModelFileError, match=r"argparse\.Namespace.*trust=True"):
        import_checkpoint(path)
    model = import_checkpoint(path, trust=True)
    np.testing.assert_allclose(imported_descriptors(model, photos), published_torch_descriptors(nanne[0], photos),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, content, message", [
    ("model.onnx", b"x", "unknown checkpoint type"),
    ("garbage.pth", b"not a torch file", "not a readable torch checkpoint"),
    ("garbage.mat", b"not a mat file at all", "not a readable MATLAB file"),
])
def test_unreadable_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        import_checkpoint(tmp_path / name)


# --------------------------------------------------------------------------- MatConvNet


def matconvnet_vgg_layers(vgg, swap_relu_pool=False):
    """simplenn layer structs for conv1_1…conv5_3: weights H×W×Cin×Cout single, biases Cout."""
    layers, block, index = [], 1, 1
    for module in vgg:
        if isinstance(module, nn.Conv2d):
            weight = module.weight.detach().numpy().transpose(2, 3, 1, 0).copy()
            layers.append({"type": "conv", "name": f"conv{block}_{index}",
                           "weights": [weight, module.bias.detach().numpy()],
                           "pad": np.array([1.0, 1, 1, 1]), "stride": np.array([1.0, 1])})
        elif isinstance(module, nn.ReLU):
            layers.append({"type": "relu", "name": f"relu{block}_{index}", "leak": 0.0, "weights": []})
            index += 1
        else:
            layers.append({"type": "pool", "name": f"pool{block}", "method": "max", "pool": np.array([2.0, 2]),
                           "stride": np.array([2.0, 2]), "pad": np.array([0.0, 0, 0, 0]), "weights": []})
            if swap_relu_pool:  # relja_swapLayersForEfficiency: pool before relu (they commute)
                layers[-2], layers[-1] = layers[-1], layers[-2]
            block, index = block + 1, 1
    return layers


def matconvnet_net(vgg, vladv2, pca, seed, average, swap_relu_pool=False):
    """A `net` struct as released by Relja/netvlad (custom layers already converted to structs)."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(0.0, 0.05, (512, K)).astype(np.float32)  # D×K
    if vladv2:
        alpha = 30.0
        vlad_weights = [(2 * alpha * centroids).reshape(1, 1, 512, K),
                        (-alpha * (centroids**2).sum(0) + rng.normal(0, 0.5, K)).astype(np.float32).reshape(1, K),
                        (-centroids).reshape(1, 1, 512, K)]
    else:
        unit = centroids / np.linalg.norm(centroids, axis=0, keepdims=True)
        vlad_weights = [(30.0 * unit).reshape(1, 1, 512, K), (-centroids).reshape(1, 1, 512, K)]
    l2 = np.array([1024.0, 1e-12, 1, 0.5])
    layers = matconvnet_vgg_layers(vgg, swap_relu_pool) + [
        {"type": "normalize", "name": "preL2", "param": l2, "weights": []},
        {"type": "custom", "name": "vlad:core", "K": float(K), "D": 512.0, "weights": vlad_weights},
        {"type": "normalize", "name": "vlad:intranorm", "param": l2, "weights": []},
        {"type": "custom", "name": "postL2", "weights": []},
    ]
    if pca:
        layers += [
            {"type": "conv", "name": "WPCA", "pad": 0.0, "stride": 1.0,
             "weights": [rng.normal(0, 1, (1, 1, K * 512, PCS)).astype(np.float32),
                         rng.normal(0, 0.1, PCS).astype(np.float32)]},
            {"type": "custom", "name": "finalL2", "weights": []},
        ]
    return {"layers": layers, "meta": {"normalization": {"averageImage": average},
                                       "sessionID": "vd16_pitts30k_conv5_3_vlad_preL2_intra_white"}}


def conv(x, weights, bias, pad):
    """vl_nnconv: y(i, j, o) = Σ_{u,v,c} x(i+u, j+v, c) w(u, v, c, o) + b(o), on H×W×C arrays."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    windows = sliding_window_view(x, weights.shape[:2], axis=(0, 1))  # (H', W', C, kh, kw)
    return np.einsum("ijcuv,uvco->ijo", windows, weights, optimize=True) + bias


def l2_channels(x, kappa):
    """vl_nnnormalize with a window covering all channels: x / sqrt(κ + Σ_c x²) along the 3rd dim."""
    return x / np.sqrt(kappa + (x**2).sum(axis=2, keepdims=True))


def matconvnet_forward(net, photo):
    """vl_simplenn on one [0, 255] RGB photo minus averageImage(1,1,:), float64 → output vector."""
    x = np.asarray(photo, dtype=np.float64) - np.asarray(net["meta"]["normalization"]["averageImage"])[0, 0]
    for layer in net["layers"]:
        w = [np.asarray(v, dtype=np.float64) for v in layer["weights"]]
        if layer["type"] == "conv":
            x = conv(x, w[0], w[1].ravel(), int(np.ravel(layer["pad"])[0]))
        elif layer["type"] == "relu":
            x = np.maximum(x, 0)
        elif layer["type"] == "pool":
            h, wd, c = x.shape
            x = x[: h // 2 * 2, : wd // 2 * 2].reshape(h // 2, 2, wd // 2, 2, c).max(axis=(1, 3))
        elif layer["type"] == "normalize":
            x = l2_channels(x, layer["param"][1])
        elif w:  # layerVLAD / layerVLADv2 forward_: [1, K, D] output
            bias = w[1].ravel() if len(w) == 3 else np.zeros(K)
            logits = conv(x, w[0], bias, 0)
            assign = np.exp(logits - logits.max(axis=2, keepdims=True))
            assign /= assign.sum(axis=2, keepdims=True)
            offset = w[-1]
            y = np.zeros((1, K, x.shape[2]))
            for k in range(K):
                y[0, k, :] = (assign[:, :, k : k + 1] * (x + offset[0, 0, :, k])).sum(axis=(0, 1))
            x = y
        else:  # layerWholeL2Normalize: reshape(x, [], 1) (column-major), L2, back to 1×1×n
            v = x.reshape(-1, order="F")
            x = (v / np.sqrt((v**2).sum() + 1e-12)).reshape(1, 1, -1, order="F")
    return x.reshape(-1, order="F")


def to_savemat(value):
    """Python layout → what scipy.io.savemat writes as MATLAB structs (dict) and cells (object array)."""
    if isinstance(value, dict):
        return {k: to_savemat(v) for k, v in value.items()}
    if isinstance(value, list):
        cells = np.empty((1, len(value)) if value else (0, 0), dtype=object)
        for i, item in enumerate(value):
            cells[0, i] = to_savemat(item)
        return cells
    return value


MATLAB_CLASSES = {np.dtype(np.float32): "single", np.dtype(np.float64): "double"}


def write_mat73(path, name, value):
    """A MATLAB -v7.3 file: HDF5 with a 512-byte MATLAB header, axes reversed, cells as references."""
    with h5py.File(path, "w", userblock_size=512) as file:
        refs = file.create_group("#refs#")

        def put(parent, key, item):
            if isinstance(item, dict):
                group = parent.create_group(key)
                group.attrs["MATLAB_class"] = np.bytes_("struct")
                for field, sub in item.items():
                    put(group, field, sub)
                return
            if isinstance(item, list) and not item:
                node = parent.create_dataset(key, data=np.zeros(2, dtype=np.uint64))
                node.attrs["MATLAB_empty"] = np.uint8(1)
                node.attrs["MATLAB_class"] = np.bytes_("cell")
                return
            if isinstance(item, list):
                for i, sub in enumerate(item):
                    put(refs, f"{parent.name.replace('/', '_')}_{key}_{i}", sub)
                targets = [refs[f"{parent.name.replace('/', '_')}_{key}_{i}"].ref for i in range(len(item))]
                node = parent.create_dataset(key, data=np.array(targets, dtype=h5py.ref_dtype).reshape(-1, 1))
                node.attrs["MATLAB_class"] = np.bytes_("cell")
                return
            if isinstance(item, str):
                node = parent.create_dataset(key, data=np.array([ord(c) for c in item], dtype=np.uint16)[:, None])
                node.attrs["MATLAB_class"] = np.bytes_("char")
                node.attrs["MATLAB_int_decode"] = np.int32(2)
                return
            array = np.asarray(item, dtype=np.float64) if np.isscalar(item) else np.asarray(item)
            array = array.reshape(1, -1) if array.ndim < 2 else array  # MATLAB arrays have ≥ 2 axes
            node = parent.create_dataset(key, data=array.T)
            node.attrs["MATLAB_class"] = np.bytes_(MATLAB_CLASSES[array.dtype])

        put(file, name, value)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 HDF5 schema 1.00 ."
    with open(path, "r+b") as handle:
        handle.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02" + b"IM")


@pytest.fixture(scope="module")
def released_mat(vgg, tmp_path_factory):
    """vd16_pitts30k_conv5_3_vlad_preL2_intra_white-style file: layerVLAD + WPCA, -v7, 1×1×3 average."""
    net = matconvnet_net(vgg, vladv2=False, pca=True, seed=3, average=AVERAGE_RGB.reshape(1, 1, 3))
    path = tmp_path_factory.mktemp("mat") / "vd16_pitts30k_conv5_3_vlad_preL2_intra_white.mat"
    scipy.io.savemat(path, {"net": to_savemat(net)})
    return net, path


@pytest.fixture(scope="module")
def v73_mat(vgg, tmp_path_factory):
    """layerVLADv2 without WPCA, -v7.3 (HDF5), H×W×3 average image, pool before relu."""
    average = np.random.default_rng(4).uniform(0, 255, (5, 4, 3))
    average[0, 0] = AVERAGE_RGB
    net = matconvnet_net(vgg, vladv2=True, pca=False, seed=5, average=average, swap_relu_pool=True)
    path = tmp_path_factory.mktemp("mat73") / "vd16_tokyoTM_conv5_3_vladv2_preL2_intra.mat"
    write_mat73(path, "net", net)
    assert scipy.io.matlab.matfile_version(path) == (2, 0)  # what MATLAB's -v7.3 header says
    return net, path


@pytest.mark.parametrize("layout", ["released_mat", "v73_mat"])
def test_matconvnet_reproduces_published_forward(layout, photos, request):
    net, path = request.getfixturevalue(layout)
    expected = np.stack([matconvnet_forward(net, photo) for photo in photos])
    if layout == "v73_mat":  # no WPCA: MATLAB's vector (index k + K·d) in our order k·D + d
        expected = expected.reshape(len(photos), 512, K).transpose(0, 2, 1).reshape(len(photos), -1)
    model = import_checkpoint(path)
    np.testing.assert_allclose(model.config.mean, AVERAGE_RGB / 255)
    np.testing.assert_allclose(model.config.std, [1 / 255] * 3)
    assert model.dim == expected.shape[1] == (PCS if layout == "released_mat" else K * 512)
    actual = imported_descriptors(model, photos)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_matlab_flattening_is_column_major(released_mat):
    """Without reordering, the WPCA rows would pair with the wrong VLAD entries: check the mapping."""
    net, path = released_mat
    model = import_checkpoint(path)
    matrix = net["layers"][-2]["weights"][0][0, 0]  # (K·D, out), row k + K·d
    k, d = 3, 100
    np.testing.assert_array_equal(model.whitening.linear.weight[:, k * 512 + d].detach().numpy(), matrix[k + K * d])


def test_matconvnet_wrong_shape_names_the_layer(vgg, tmp_path):
    net = matconvnet_net(vgg, vladv2=False, pca=False, seed=6, average=AVERAGE_RGB.reshape(1, 1, 3))
    conv5_3 = next(layer for layer in net["layers"] if layer["name"] == "conv5_3")
    conv5_3["weights"][0] = conv5_3["weights"][0][:, :, :256]
    scipy.io.savemat(tmp_path / "bad.mat", {"net": to_savemat(net)})
    message = r"'conv5_3' \(conv\) weights\{1\} has size 3×3×256×512, expected 3×3×512×512"
    with pytest.raises(ModelFileError, match=message):
        import_checkpoint(tmp_path / "bad.mat")


def test_matconvnet_without_prel2_is_refused(vgg, tmp_path):
    net = matconvnet_net(vgg, vladv2=False, pca=False, seed=6, average=AVERAGE_RGB.reshape(1, 1, 3))
    net["layers"] = [layer for layer in net["layers"] if layer["name"] != "preL2"]
    scipy.io.savemat(tmp_path / "noprel2.mat", {"net": to_savemat(net)})
    with pytest.raises(ModelFileError, match="preL2"):
        import_checkpoint(tmp_path / "noprel2.mat")


def test_matconvnet_file_without_net(tmp_path):
    scipy.io.savemat(tmp_path / "other.mat", {"dbStruct": np.zeros(3)})
    with pytest.raises(ModelFileError, match=r"no variable 'net'.*dbStruct"):
        import_checkpoint(tmp_path / "other.mat")
