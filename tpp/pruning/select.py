"""L1-norm filter selection (Li et al. 2017), the criterion TPP and all its baselines share.

Selection happens once, on the dense weights, and the masks are never revised: every method then
differs only in what it does with the same filters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def num_pruned(ratio: float, n: int) -> int:
    """Filters pruned out of `n` at `ratio`: ceil(ratio * n), keeping at least one filter.

    The 1e-6 absorbs float error (0.3 * 10 = 3.0000000000000004 must prune 3, not 4). This is the
    authors' rounding: ResNet56 at 0.9 keeps 1/3/6 of 16/32/64 filters, at 0.95 keeps 1/1/3.
    """
    return max(0, min(math.ceil(ratio * n - 1e-6), n - 1))


def filter_l1(weight: torch.Tensor) -> torch.Tensor:
    """Mean |w| of each output filter (row of the flattened weight)."""
    return weight.detach().abs().flatten(1).mean(1)


def select_l1(model: nn.Module, ratios: dict[str, float]) -> dict[str, torch.Tensor]:
    """{layer name: bool mask over its output filters, True = pruned}: the smallest-L1 filters.

    Ties are broken by filter index (the lower index is pruned first), via a stable sort, so the
    selection is deterministic on every device.
    """
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}
    for name, ratio in ratios.items():
        if name not in modules or not hasattr(modules[name], "weight"):
            raise ValueError(f"select_l1: {name!r} is not a layer with weights in the model")
        weight = modules[name].weight
        n = int(weight.shape[0])
        k = num_pruned(ratio, n)
        scores = filter_l1(weight).float().cpu()
        order = torch.sort(scores, stable=True).indices
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[:k]] = True
        masks[name] = mask
    return masks


def kept_indices(masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """{layer name: ascending indices of the kept filters} (what a saved pruned model records)."""
    return {name: torch.nonzero(~m.cpu(), as_tuple=False).flatten().tolist() for name, m in masks.items()}


def masks_from_kept(kept: dict[str, list[int]], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The inverse of `kept_indices`, given each layer's dense number of filters."""
    masks: dict[str, torch.Tensor] = {}
    for name, idx in kept.items():
        n = sizes[name]
        if not idx or min(idx) < 0 or max(idx) >= n or len(set(idx)) != len(idx):
            raise ValueError(f"kept indices of {name!r} must be distinct, non-empty and in [0, {n})")
        mask = torch.ones(n, dtype=torch.bool)
        mask[torch.tensor(idx, dtype=torch.long)] = False
        masks[name] = mask
    return masks
