"""torchvision ResNet18/34/50, randomly initialised (never downloads weights).

Pruning presets follow the TPP paper: basic blocks prune their first conv; bottlenecks prune conv1
and conv2 (conv3 is tied to the residual sum). The paper's ResNet50 speed-up settings are available
from `resnet50_speedup_preset`.
"""

from __future__ import annotations

from torch import nn

from tpp.models.cifar_resnet import _image_channels
from tpp.models.registry import register_model

_STAGES = ("layer1", "layer2", "layer3", "layer4")

BASIC_PRESET: dict[str, str | float] = {f"{s}.*.conv1": "pr" for s in _STAGES}
BOTTLENECK_PRESET: dict[str, str | float] = {f"{s}.*.conv{c}": "pr" for s in _STAGES for c in (1, 2)}

# The paper's ResNet50 settings, named by their FLOPs speed-up: a ratio per stage.
RESNET50_SPEEDUPS: dict[str, tuple[float, float, float, float]] = {
    "1.49x": (0.3, 0.3, 0.3, 0.14),
    "2.31x": (0.6, 0.6, 0.6, 0.21),
    "2.56x": (0.74, 0.74, 0.6, 0.21),
    "3.06x": (0.68, 0.68, 0.68, 0.5),
}


def resnet50_speedup_preset(name: str) -> dict[str, str | float]:
    """{pattern: ratio} of one of the paper's ResNet50 settings ("1.49x", "2.31x", "2.56x", "3.06x")."""
    key = name if name.endswith("x") else f"{name}x"
    if key not in RESNET50_SPEEDUPS:
        raise ValueError(f"unknown ResNet50 speed-up preset {name!r}; accepted: "
                         f"{', '.join(RESNET50_SPEEDUPS)}")
    ratios = RESNET50_SPEEDUPS[key]
    return {f"{s}.*.conv{c}": r for s, r in zip(_STAGES, ratios, strict=True) for c in (1, 2)}


def _torchvision_resnet(arch: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    import torchvision  # lazy: only these three models need it

    in_channels = _image_channels(arch, input_shape)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18", prune_preset=BASIC_PRESET)
def resnet18(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return _torchvision_resnet("resnet18", num_classes, input_shape)


@register_model("resnet34", prune_preset=BASIC_PRESET)
def resnet34(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return _torchvision_resnet("resnet34", num_classes, input_shape)


@register_model("resnet50", prune_preset=BOTTLENECK_PRESET)
def resnet50(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return _torchvision_resnet("resnet50", num_classes, input_shape)
