"""NetVLADModel: backbones, describe(), whitening, model files, initialisation from real photos."""


import numpy as np
import pytest
import torch
from torchvision import models

import netvlad
from netvlad.backbones import BACKBONES, build_backbone
from netvlad.errors import ModelFileError
from netvlad.modelfile import VERSION
from netvlad.whitening import PCAWhitening


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbones_crop_at_the_documented_layer(name):
    backbone, loaded = build_backbone(name)
    assert not loaded
    spec = BACKBONES[name]
    out = backbone.eval()(torch.zeros(1, 3, 128, 96))
    assert out.shape[1] == spec.dim
    assert (out.shape[2], out.shape[3]) == (128 // spec.stride, 96 // spec.stride)


def test_vgg16_stops_at_conv5_3_before_relu():
    backbone, _ = build_backbone("vgg16")
    assert isinstance(backbone[-1], torch.nn.Conv2d) and len(backbone) == 29


def test_missing_pretrained_weights_warn_and_fall_back(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.warns(UserWarning, match="could not be loaded.*random initialisation"):
        model = netvlad.build_model("resnet18-layer3", 8, pretrained=True)
    assert model.config.meta["pretrained"] is False


def test_weights_file_loads_a_torchvision_state_dict(tmp_path):
    reference = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = netvlad.build_model("resnet18-layer3", 8, weights_file=path)
    assert model.config.meta["pretrained"] is True
    assert torch.equal(model.backbone[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone[6][1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(ModelFileError, match="does not fit|not a resnet18"):
        netvlad.build_model("resnet18-layer3", 8, weights_file=path)


def _model(**kwargs):
    torch.manual_seed(0)
    model = netvlad.build_model("resnet18-layer3", 8, input_mode="grey", max_side=96, **kwargs)
    torch.nn.init.normal_(model.pool.conv.weight, std=0.1)
    return model.eval()


def test_forward_unit_norm_and_local_features_normalised():
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    assert torch.allclose(model.local_features(x).norm(dim=1), torch.ones(2, 4, 5), atol=1e-5)
    out = model(x)
    assert out.shape == (2, model.dim) == (2, 8 * 256)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_describe_mixed_sizes_keeps_order_and_matches_forward():
    model = _model()
    rng = np.random.default_rng(0)
    from PIL import Image

    photos = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
              [(60, 80), (80, 60), (60, 80), (50, 50), (80, 60)]]
    descriptors = model.describe(photos, batch_size=2)
    assert descriptors.shape == (5, model.dim) and descriptors.dtype == np.float32
    with torch.no_grad():
        one_by_one = np.stack([model(model.preprocess(p)[None])[0].numpy() for p in photos])
    assert np.allclose(descriptors, one_by_one, atol=1e-5)
    # a list of preprocessed tensors (as the service makes them: resize, then normalize) is the same
    tensors = [model.preprocess.normalize(model.preprocess.resize(p)) for p in photos]
    assert all(t.dtype == torch.float32 for t in tensors)
    assert np.allclose(model.describe(tensors, batch_size=2), descriptors, atol=1e-6)


def test_preprocess_resize_policy_and_grey_standardisation():
    from PIL import Image

    model = _model()
    tensor = model.preprocess(Image.new("RGB", (300, 150), (200, 10, 10)))
    assert tensor.shape == (3, 48, 96)  # long side 96, aspect kept
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (100, 100, 3), dtype=np.uint8))
    x = model.preprocess(noisy)
    assert torch.equal(x[0], x[1]) and abs(float(x[0].mean())) < 1e-4 and float(x[0].std()) == pytest.approx(1, abs=1e-3)


def test_pca_whitening_decorrelates_and_reduces():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20)) + 3.0
    layer = PCAWhitening(20, 5).double()
    variances = layer.fit(data)
    assert np.all(np.diff(variances) <= 0)
    projected = layer.linear(torch.from_numpy(data)).detach().numpy()
    assert np.allclose(np.cov(projected.T), np.eye(5), atol=1e-6)
    assert np.allclose(projected.mean(0), 0, atol=1e-8)
    eig = np.sort(np.linalg.eigvalsh(np.cov(data.T)))[::-1][:5]
    assert np.allclose(variances, eig, rtol=1e-6)
    with pytest.raises(ValueError, match="needs more than 5"):
        PCAWhitening(20, 5).fit(data[:5])


def test_model_file_round_trip_and_fingerprint(tmp_path):
    model = _model()
    path = netvlad.save_model(model, tmp_path / "m.pt")
    loaded = netvlad.load_model(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert netvlad.model_fingerprint(model) == netvlad.model_fingerprint(loaded)
    with torch.no_grad():
        loaded.pool.centroids.add_(1e-3)
    assert netvlad.model_fingerprint(model) != netvlad.model_fingerprint(loaded)


def test_model_file_mismatches_are_explained(tmp_path):
    model = _model()
    path = netvlad.save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)

    def write(mutate):
        data = {**payload, "config": dict(payload["config"]), "state_dict": dict(payload["state_dict"])}
        mutate(data)
        torch.save(data, path)

    write(lambda d: d["config"].update(clusters=16))
    with pytest.raises(ModelFileError, match=r"shape mismatch pool\.(centroids|conv)"):
        netvlad.load_model(path)
    write(lambda d: d.update(version=VERSION + 1))
    with pytest.raises(ModelFileError, match="newer"):
        netvlad.load_model(path)
    write(lambda d: d["state_dict"].pop("pool.centroids"))
    with pytest.raises(ModelFileError, match="missing 1 tensors.*pool.centroids"):
        netvlad.load_model(path)
    write(lambda d: d["config"].update(colour="blue"))
    with pytest.raises(ModelFileError, match="unknown model config keys: colour"):
        netvlad.load_model(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelFileError, match="import-checkpoint"):
        netvlad.load_model(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="not a readable model file"):
        netvlad.load_model(path)
    with pytest.raises(ModelFileError, match="no such model file"):
        netvlad.load_model(tmp_path / "absent.pt")


def test_init_from_real_photos_then_whitening(real_photos):
    model = netvlad.build_model("resnet18-layer3", 8, input_mode="grey", max_side=128)
    photos = real_photos[:12]
    summary = netvlad.init_model(model, photos, per_image=50, whitening_dim=10)
    assert summary["bn_images"] == len(photos) and 30 * len(photos) < summary["features"] <= 50 * len(photos)
    assert summary["alpha"] > 0 and model.dim == 10
    descriptors = model.describe(photos)
    assert descriptors.shape == (12, 10)
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1, atol=1e-5)
    # the same photo described twice is identical; different photos are not
    again = model.describe(photos[:2])
    assert np.allclose(again, descriptors[:2], atol=1e-5)
    assert np.abs(descriptors @ descriptors.T - np.eye(12)).max() < 0.999


def test_amp_on_a_cpu_without_bf16_instructions_is_warned_about(monkeypatch):
    from netvlad import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert "8-11x slower" in devices.slow_bf16_warning(cpu, True)
    assert devices.slow_bf16_warning(cpu, None) is None and devices.slow_bf16_warning(cpu, False) is None
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.slow_bf16_warning(cpu, True) is None
