"""Zeroing and physical removal of pruned filters.

Both act on the same entries: the pruned filters (+ bias), the matching channels of the BatchNorms
that normalise them, and the input channels that consume them. Zeroing all of these makes the masked
network compute exactly the function of the physically smaller one, whatever the activation does at
0, so the two can be checked against each other and the removal is lossless.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from tpp.pruning.graph import Followers, find_followers
from tpp.pruning.layers import PRUNABLE, out_channels
from tpp.pruning.select import masks_from_kept

_NORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Slot:
    """Entries of one parameter that belong to pruned outputs: `index` along `dim` of `module.attr`.

    role: "filter" (the pruned layer's own weight/bias rows), "norm" (BatchNorm gamma/beta) or
    "consumer" (input columns of a downstream layer).
    """

    module: str
    attr: str
    dim: int
    index: torch.Tensor
    role: str


def pruned_slots(model: nn.Module, name: str, mask: torch.Tensor, followers: Followers) -> list[Slot]:
    """Every parameter entry that carries layer `name`'s pruned outputs (bool `mask`, True = pruned)."""
    modules = dict(model.named_modules())
    pruned = mask.cpu().bool()
    rows = torch.nonzero(pruned, as_tuple=False).flatten()
    layer = modules[name]
    slots = [Slot(name, "weight", 0, rows, "filter")]
    if getattr(layer, "bias", None) is not None:
        slots.append(Slot(name, "bias", 0, rows, "filter"))
    for link in followers.norms:
        if getattr(modules[link.name], "weight", None) is not None:  # affine BatchNorm
            pos = link.positions(pruned)
            slots += [Slot(link.name, "weight", 0, pos, "norm"), Slot(link.name, "bias", 0, pos, "norm")]
    for link in followers.consumers:
        slots.append(Slot(link.name, "weight", 1, link.positions(pruned), "consumer"))
    return slots


@torch.no_grad()
def zero_pruned(model: nn.Module, masks: dict[str, torch.Tensor], followers: dict[str, Followers]) -> None:
    """Zero every entry of the pruned outputs in place, so the model equals its removed version.

    Zeroing the filters alone is not enough with BatchNorm: a zero conv output becomes
    BN(0) = beta - gamma * mean / std, so gamma and beta are zeroed too (the channel is then exactly 0);
    the consumers' input columns are zeroed as well so even an activation with f(0) != 0 contributes nothing.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        for s in pruned_slots(model, name, mask, followers[name]):
            p = getattr(modules[s.module], s.attr)
            p.index_fill_(s.dim, s.index.to(p.device), 0.0)


def _keep(size: int, drop: torch.Tensor | None) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    if drop is not None:
        keep[drop] = False
    return torch.nonzero(keep, as_tuple=False).flatten()


def _set_param(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def _slice_module(module: nn.Module, out_drop: torch.Tensor | None, in_drop: torch.Tensor | None) -> None:
    """Drop output rows (`out_drop`) and input columns (`in_drop`) of one Conv/Linear/BatchNorm in place."""
    if isinstance(module, _NORM):
        keep = _keep(module.num_features, out_drop)
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if p is not None:
                _set_param(module, attr, p.index_select(0, keep.to(p.device)))
        for attr in ("running_mean", "running_var"):
            buf = getattr(module, attr, None)
            if buf is not None:
                setattr(module, attr, buf.index_select(0, keep.to(buf.device)).contiguous())
        module.num_features = int(keep.numel())
        return
    if not isinstance(module, PRUNABLE):
        raise ValueError(f"cannot remove channels of a {type(module).__name__}")
    w = module.weight
    keep_out = _keep(w.shape[0], out_drop).to(w.device)
    keep_in = _keep(w.shape[1], in_drop).to(w.device)
    _set_param(module, "weight", w.index_select(0, keep_out).index_select(1, keep_in))
    if module.bias is not None:
        _set_param(module, "bias", module.bias.index_select(0, keep_out))
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(keep_out.numel()), int(keep_in.numel())
    else:
        module.out_channels, module.in_channels = int(keep_out.numel()), int(keep_in.numel())


def _remove_in_place(model: nn.Module, masks: dict[str, torch.Tensor],
                     followers: dict[str, Followers]) -> nn.Module:
    out_drop: dict[str, list[torch.Tensor]] = {}
    in_drop: dict[str, list[torch.Tensor]] = {}
    for name, mask in masks.items():
        pruned = mask.cpu().bool()
        out_drop.setdefault(name, []).append(torch.nonzero(pruned, as_tuple=False).flatten())
        for link in followers[name].norms:
            out_drop.setdefault(link.name, []).append(link.positions(pruned))
        for link in followers[name].consumers:
            in_drop.setdefault(link.name, []).append(link.positions(pruned))
    modules = dict(model.named_modules())
    for mod_name in dict.fromkeys([*out_drop, *in_drop]):
        o, i = out_drop.get(mod_name), in_drop.get(mod_name)
        _slice_module(modules[mod_name], torch.cat(o) if o else None, torch.cat(i) if i else None)
    return model


def remove_pruned(model: nn.Module, masks: dict[str, torch.Tensor],
                  followers: dict[str, Followers]) -> nn.Module:
    """A physically smaller copy of `model` without the pruned filters (the input model is untouched).

    Removes the filters (+ bias), the BatchNorm channels (gamma, beta, running mean/var) and the
    consumers' input channels. In eval mode the result computes what the zeroed model computes.
    """
    return _remove_in_place(copy.deepcopy(model), masks, followers)


def rebuild_pruned(model: nn.Module, kept: dict[str, list[int]], example_input: torch.Tensor) -> nn.Module:
    """Apply a saved pruning (`kept_indices`) to a freshly built dense model, in place, and return it.

    The result has the shapes of the pruned model, so the pruned model's state_dict loads into it.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in kept if n not in modules or not isinstance(modules[n], PRUNABLE)]
    if unknown:
        raise ValueError(f"rebuild_pruned: {unknown} are not Conv/Linear modules of the model")
    masks = masks_from_kept(kept, {n: out_channels(modules[n]) for n in kept})
    followers = find_followers(model, example_input, list(masks))
    return _remove_in_place(model, masks, followers)
