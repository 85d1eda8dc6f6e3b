"""Fully connected networks: the paper's 7-layer linear MLP and its nonlinear variants.

Init: PyTorch's default `nn.Linear` init (what the authors' code uses) for the identity and tanh
activations; Kaiming-normal (fan_in, ReLU gain, zero bias) for ReLU so deep ReLU MLPs train from scratch.
With identity activations the default init shrinks the signal (JSV well below 1) — that is the
setting the paper studies, so it is kept on purpose.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tpp.models.registry import register_model

ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Flatten, then `depth` Linear layers (`layers.0` ... `layers.{depth-1}`), activation between them."""

    def __init__(self, in_features: int, num_classes: int, depth: int = 7, width: int = 100,
                 activation: str = "identity", bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"mlp width must be >= 1, got {width}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"mlp activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        sizes = [in_features] + [width] * (depth - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias)
                                    for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.act = ACTIVATIONS[activation]()
        self.activation = activation
        if activation == "relu":
            for lin in self.layers:
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return x

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor, shared: bool) -> torch.Tensor:
        """The forward of K copies whose weights are stacked on dim 0 (`tpp.lockstep`): batched matrix
        products instead of vmap, ~2x faster per step for these small layers. `x` is [B, ...] for every
        copy (`shared`) or [K, B, ...]; the result is [K, B, classes]."""
        x = x.flatten(1) if shared else x.flatten(2)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = torch.matmul(x, params[f"layers.{i}.weight"].transpose(1, 2))
            if layer.bias is not None:
                x = x + params[f"layers.{i}.bias"].unsqueeze(1)
            if i < last:
                x = self.act(x)
        return x


def mlp_preset(depth: int = 7, **_: object) -> dict[str, str | float]:
    """Every Linear but the last (the classifier's outputs are the classes)."""
    return {f"layers.{i}": "pr" for i in range(depth - 1)}


@register_model("mlp", prune_preset=mlp_preset)
def mlp(num_classes: int, input_shape: tuple[int, ...], depth: int = 7, width: int = 100,
        activation: str = "identity", bias: bool = True) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes, depth, width, activation, bias)


@register_model("mlp7_linear", prune_preset=mlp_preset(7))
def mlp7_linear(num_classes: int, input_shape: tuple[int, ...], bias: bool = True) -> nn.Module:
    """The paper's 7-layer linear MLP: width 100, no activations."""
    return MLP(math.prod(input_shape), num_classes, 7, 100, "identity", bias)
