"""CIFAR ResNets of depth 6n+2 (He et al. 2016, sec. 4.2) with option-A shortcuts.

Option A (parameter-free: stride-2 subsampling + zero-padded channels) is what the TPP paper's ResNet56
uses (0.85M params, 0.25 GFLOPs); with it only the first conv of each block can be pruned freely,
because the second conv's outputs are added to the shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpp.models.registry import register_model


class ShortcutA(nn.Module):
    """Option-A shortcut: take every other pixel, zero-pad the new channels (half on each side).

    A module rather than a lambda so models pickle (Ray, torch.save of whole modules).
    """

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.in_planes, self.out_planes = in_planes, out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.out_planes - self.in_planes
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_planes} -> {self.out_planes}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2:
                raise ValueError("option-A shortcuts only support stride 2 when the width changes")
            self.shortcut: nn.Module = ShortcutA(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv1/bn1 stem (16 ch), layer1..3 of n blocks (16, 32, 64 ch), global average pool, fc."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        planes = widths[0]
        self.layer1, planes = self._stage(planes, widths[0], n, 1)
        self.layer2, planes = self._stage(planes, widths[1], n, 2)
        self.layer3, planes = self._stage(planes, widths[2], n, 2)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> tuple[nn.Sequential, int]:
        blocks = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks), planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W), got input_shape={tuple(input_shape)}")
    return int(input_shape[0])


# Only the first conv of each basic block: the second is tied to the residual sum.
RESNET_CIFAR_PRESET = {"layer1.*.conv1": "pr", "layer2.*.conv1": "pr", "layer3.*.conv1": "pr"}


def _make(depth: int):
    def factory(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return CifarResNet(depth, num_classes, _image_channels(f"resnet{depth}", input_shape))

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcuts)."
    return factory


for _depth in (20, 32, 56, 110):
    register_model(f"resnet{_depth}", prune_preset=RESNET_CIFAR_PRESET)(_make(_depth))
