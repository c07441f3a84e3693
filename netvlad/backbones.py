"""torchvision CNNs cropped at the convolutional layer the place-recognition literature pools.

Each backbone maps (N, 3, H, W) images to (N, D, H/s, W/s) local features (stride s).
Pretrained weights come from torchvision's weight enums (the torch hub cache, or a download where
that works); when they cannot be loaded the backbone keeps its random init and a warning says why.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn
from torchvision import models

from netvlad.errors import ModelFileError
from netvlad.torchfiles import load_weights_only


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one cropped backbone: its torchvision builder, weight enum and crop."""

    builder: Callable[..., nn.Module]
    weights: models.WeightsEnum
    crop: Callable[[nn.Module], nn.Module]
    dim: int
    stride: int


def _resnet_to(layer: str) -> Callable[[nn.Module], nn.Module]:
    def crop(net: nn.Module) -> nn.Module:
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        keep = names[: names.index(layer) + 1]
        return nn.Sequential(*(getattr(net, name) for name in keep))

    return crop


BACKBONES: dict[str, BackboneSpec] = {
    # VGG16 conv5_3 before its ReLU and max-pool: NetVLAD's original choice.
    "vgg16": BackboneSpec(models.vgg16, models.VGG16_Weights.IMAGENET1K_V1,
                          lambda net: net.features[:-2], 512, 16),
    "resnet18-layer3": BackboneSpec(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1,
                                    _resnet_to("layer3"), 256, 16),
    "resnet18-layer4": BackboneSpec(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1,
                                    _resnet_to("layer4"), 512, 32),
    "resnet50-layer3": BackboneSpec(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2,
                                    _resnet_to("layer3"), 1024, 16),
    "resnet50-layer4": BackboneSpec(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2,
                                    _resnet_to("layer4"), 2048, 32),
    "mobilenetv3-large": BackboneSpec(models.mobilenet_v3_large, models.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
                                      lambda net: net.features, 960, 32),
    "mobilenetv3-small": BackboneSpec(models.mobilenet_v3_small, models.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
                                      lambda net: net.features, 576, 32),
}


def _pretrained(spec: BackboneSpec, name: str) -> nn.Module | None:
    try:
        return spec.builder(weights=spec.weights)
    except Exception as exc:  # offline, blocked hub, corrupt cache: all mean "no pretrained weights"
        warnings.warn(
            f"ImageNet weights for {name} could not be loaded ({type(exc).__name__}: {exc}); "
            f"using random initialisation. Put {spec.weights.url.rsplit('/', 1)[-1]} in the torch hub "
            f"cache (torch.hub.get_dir()/checkpoints) or pass a weights file.",
            stacklevel=3,
        )
        return None


def _from_file(spec: BackboneSpec, name: str, weights_file: str | os.PathLike) -> nn.Module:
    """The full torchvision model with a state dict from `weights_file` (as torchvision publishes them)."""
    net = spec.builder(weights=None)
    state = load_weights_only(weights_file, "state dict")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"{weights_file}: expected a state dict of torchvision's {spec.builder.__name__}")
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelFileError(f"{weights_file}: does not fit {name}: {exc}") from None
    kept = {id(p) for p in spec.crop(net).parameters()}
    missing_kept = [k for k, p in net.named_parameters() if k in missing and id(p) in kept]
    if unexpected or missing_kept:
        raise ModelFileError(
            f"{weights_file}: not a {spec.builder.__name__} state dict "
            f"(missing {missing_kept[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return net


def build_backbone(
    name: str, pretrained: bool = False, weights_file: str | os.PathLike | None = None
) -> tuple[nn.Module, bool]:
    """Cropped torchvision backbone `name` (see `BACKBONES`) and whether trained weights were loaded.

    `weights_file` (a state dict of the full torchvision model) wins over `pretrained` (ImageNet
    weights through torchvision's weight enum and the torch hub cache).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if weights_file is not None:
        net = _from_file(spec, name, weights_file)
    else:
        net = _pretrained(spec, name) if pretrained else None
    return spec.crop(net if net is not None else spec.builder(weights=None)), net is not None
