"""torchvision's efficient and grouped architectures, randomly initialised (never downloads weights).

Their prunable widths sit behind depthwise or grouped convolutions, squeeze-excitation products and
residual sums, so their presets prune with coupled channel groups (`coupling: groups`, their
default): each preset prunes the hidden width of every block, the usual structured-pruning target.
Small inputs work (32 x 32 gives a 1 x 1 final map); other input channel counts replace the stem conv.
"""

from __future__ import annotations

from torch import nn

from tpp.models.cifar_resnet import _image_channels
from tpp.models.registry import register_model


def _set_stem(model: nn.Module, path: str, in_channels: int) -> nn.Module:
    """Replace the conv at `path` by the same conv taking `in_channels` inputs (Kaiming init)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    if old.in_channels == in_channels:
        return model
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    setattr(parent, attr, new)
    return model


def _build(arch: str, stem: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    import torchvision  # lazy: only these models need it

    in_channels = _image_channels(arch, input_shape)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
    return _set_stem(model, stem, in_channels)


@register_model("mobilenet_v2", prune_preset={"features.*.conv.0.0": "pr", "features.18.0": "pr"},
                coupling="groups")
def mobilenet_v2(num_classes: int, input_shape: tuple[int, ...], width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2; the preset prunes each inverted residual's expansion (for the first block, the
    stem, whose channels its depthwise conv takes) and the last 1x1 conv."""
    return _build("mobilenet_v2", "features.0.0", num_classes, input_shape, width_mult=width_mult)


@register_model("efficientnet_b0", prune_preset={"features.*.*.block.0.0": "pr", "features.8.0": "pr",
                                                 "features.*.*.block.*.fc1": "pr"}, coupling="groups")
def efficientnet_b0(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """EfficientNet-B0; the preset prunes each MBConv's expansion (with its depthwise conv, BatchNorms
    and squeeze-excitation gate), each squeeze-excitation's reduction and the last 1x1 conv."""
    return _build("efficientnet_b0", "features.0.0", num_classes, input_shape)


@register_model("resnext50_32x4d", prune_preset={"layer*.*.conv1": "pr", "layer*.*.conv2": "pr"},
                coupling="groups")
def resnext50_32x4d(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """ResNeXt-50 32x4d; the preset prunes conv1 and the grouped conv2 of every bottleneck, equal
    positions in each of the 32 groups (the ResNet50 preset of the paper, coupled)."""
    return _build("resnext50_32x4d", "conv1", num_classes, input_shape)


@register_model("regnet_y_400mf", coupling="groups",
                prune_preset={"trunk_output.*.*.f.a.0": "pr", "trunk_output.*.*.f.b.0": "pr"})
def regnet_y_400mf(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """RegNetY-400MF; the preset prunes the 1x1 conv `a` and the grouped conv `b` (with its
    squeeze-excitation gate) of every block."""
    return _build("regnet_y_400mf", "stem.0", num_classes, input_shape)


@register_model("shufflenet_v2_x1_0", prune_preset={"stage*.*.branch2.0": "pr"}, coupling="groups")
def shufflenet_v2_x1_0(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """ShuffleNetV2 1.0x; the preset prunes the first 1x1 conv of every block's main branch (with its
    depthwise conv). Channels that cross the channel shuffle cannot be traced by torch_pruning."""
    return _build("shufflenet_v2_x1_0", "conv1.0", num_classes, input_shape)


@register_model("convnext_tiny", prune_preset={"features.*.*.block.3": "pr"}, coupling="groups")
def convnext_tiny(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """ConvNeXt-T; the preset prunes the hidden width of every block's MLP (the residual stream goes
    through LayerNorms, whose statistics removal would change)."""
    return _build("convnext_tiny", "features.0.0", num_classes, input_shape)
