"""VGG19 with BatchNorm for CIFAR: 16 conv/BN/ReLU layers, global average pool, one Linear.

This is the CIFAR-100 VGG19 of the TPP paper (global average pool then a single Linear classifier).
The last max-pool of the ImageNet VGG is dropped: at 32x32 it would leave a 1x1 map before the pool.
"""

from __future__ import annotations

import torch
from torch import nn

from tpp.models.cifar_resnet import _image_channels
from tpp.models.registry import register_model

VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                              512, 512, 512, 512, "M", 512, 512, 512, 512]


def _conv_names(cfg: list[int | str]) -> list[str]:
    """Module names (`features.N`) of the convs that `make_features(cfg)` builds, in order."""
    names, i = [], 0
    for v in cfg:
        if v == "M":
            i += 1
        else:
            names.append(f"features.{i}")
            i += 3  # conv, BN, ReLU
    return names


def make_features(cfg: list[int | str], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)),
                       nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.features = make_features(cfg, in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear([v for v in cfg if v != "M"][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


# Every conv but the first (explicit names: the stem conv's outputs have no BN-free alternative).
VGG19_PRESET: dict[str, str | float] = {name: "pr" for name in _conv_names(VGG19_CFG)[1:]}


@register_model("vgg19", prune_preset=VGG19_PRESET)
def vgg19(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """VGG19-BN for CIFAR (global average pool + one Linear)."""
    return VGG(VGG19_CFG, num_classes, _image_channels("vgg19", input_shape))
