"""Model size and cost: parameters and FLOPs, the denominators of every speed-up the study reports."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (weights, biases, BatchNorm gamma/beta; not the running statistics)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one sample of `input_shape` (per-sample shape, no batch dim).

    FLOPs = 2 x multiply-accumulates of the convolutions and matrix products, as counted by
    torch.utils.flop_counter (the convention behind "ResNet56: 0.25 GFLOPs"); BatchNorm, activations
    and pooling are not counted. Runs in eval mode (no BatchNorm statistics change) and restores it.
    """
    param = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        for m, training in modes.items():
            m.training = training
