"""Which units to prune from their scores: per layer (the paper's) or ranked globally; and the L1-norm
selection (Li et al. 2017), the criterion TPP and all its baselines share by default.

Selection happens once, on the dense weights (or, for a method that regularises before selecting,
on the regularised ones), and the masks are never revised: every method then differs only in what
it does with the same filters.
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


SCOPES = ("layer", "global")


def masks_from_scores(scores: dict[str, torch.Tensor], ratios: dict[str, float],
                      scope: str = "layer") -> dict[str, torch.Tensor]:
    """{root: bool mask over its units, True = pruned}: the lowest-scored units.

    scope "layer": each root prunes `num_pruned(ratio, units)` of its own. scope "global": the same
    total count, taken from all roots ranked together, with a per-layer floor (every root keeps at
    least one unit). Ties are broken by position (root order, then the lower unit index is pruned
    first), via a stable sort, so the selection is deterministic on every device.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope: got {scope!r}; accepted: {', '.join(SCOPES)}")
    masks = {name: torch.zeros(len(scores[name]), dtype=torch.bool) for name in ratios}
    if scope == "layer":
        for name, ratio in ratios.items():
            order = torch.sort(scores[name].float().cpu(), stable=True).indices
            masks[name][order[:num_pruned(ratio, len(scores[name]))]] = True
        return masks
    names = list(ratios)
    budget = sum(num_pruned(ratios[n], len(scores[n])) for n in names)
    flat = torch.cat([scores[n].float().cpu() for n in names])
    owner = torch.cat([torch.full((len(scores[n]),), i, dtype=torch.long) for i, n in enumerate(names)])
    unit = torch.cat([torch.arange(len(scores[n])) for n in names])
    left = {n: len(scores[n]) for n in names}
    for j in torch.sort(flat, stable=True).indices.tolist():
        if budget == 0:
            break
        name = names[int(owner[j])]
        if left[name] > 1:  # the floor: never empty a layer
            masks[name][int(unit[j])] = True
            left[name] -= 1
            budget -= 1
    return masks


def select_l1(model: nn.Module, ratios: dict[str, float]) -> dict[str, torch.Tensor]:
    """{layer name: bool mask over its output filters, True = pruned}: the smallest-L1 filters of each
    layer (the paper's per-layer selection; ties: the lower index is pruned first)."""
    modules = dict(model.named_modules())
    for name in ratios:
        if name not in modules or not hasattr(modules[name], "weight"):
            raise ValueError(f"select_l1: {name!r} is not a layer with weights in the model")
    return masks_from_scores({name: filter_l1(modules[name].weight) for name in ratios}, ratios)


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
