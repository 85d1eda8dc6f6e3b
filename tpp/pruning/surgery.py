"""Zeroing and physical removal of pruned filters.

Both act on the same entries (`pruned_slots`): the pruned filters (+ bias) and those of every layer
tied to them, the matching channels of the BatchNorms that normalise them, and the input channels
that consume them. Zeroing all of these makes the masked network compute exactly the function of the
physically smaller one, whatever the activation does at 0, so the two can be checked against each
other (`removal_error`) and the removal is lossless.

Why our own slicing rather than torch_pruning's `Group.prune`: the removal must act on exactly the
slots the penalty and the zeroing act on, from a saved description applied to a freshly built model
(`rebuild_pruned`), including groups torch_pruning cannot trace (declared attention heads, layers
traced inside an enclosing module). The tests check it against `Group.prune` on every traced preset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from tpp.pruning.graph import Followers, find_followers
from tpp.pruning.layers import PRUNABLE
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
    """Every parameter entry that carries the pruned units of layer `name`'s group (bool `mask` over
    its units, True = pruned): the one description the penalty, the zeroing and the removal share.

    A vectorised trainer of K stacked models can build its masks from these slots (a slot is a
    module attribute, a dim and the indices along it).
    """
    modules = dict(model.named_modules())
    pruned = mask.cpu().bool()
    slots = []
    for link in followers.filters:
        rows = link.positions(pruned)
        slots.append(Slot(link.name, "weight", 0, rows, "filter"))
        if getattr(modules[link.name], "bias", None) is not None:
            slots.append(Slot(link.name, "bias", 0, rows, "filter"))
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
    # The weight's dim 1 holds in_channels / groups columns: a grouped consumer drops the same
    # within-group positions in every group (its Link already names them); a depthwise conv's
    # single column per row goes with its row.
    keep_in = _keep(w.shape[1], in_drop).to(w.device)
    _set_param(module, "weight", w.index_select(0, keep_out).index_select(1, keep_in))
    if module.bias is not None:
        _set_param(module, "bias", module.bias.index_select(0, keep_out))
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(keep_out.numel()), int(keep_in.numel())
        return
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    if depthwise:
        module.groups = int(keep_out.numel())
    elif int(keep_out.numel()) % module.groups:
        raise ValueError(f"cannot remove {w.shape[0] - int(keep_out.numel())} filters of a convolution with "
                         f"{module.groups} groups: every group must keep the same number")
    module.out_channels = int(keep_out.numel())
    module.in_channels = module.groups * int(keep_in.numel())


def _remove_in_place(model: nn.Module, masks: dict[str, torch.Tensor],
                     followers: dict[str, Followers]) -> nn.Module:
    out_drop: dict[str, list[torch.Tensor]] = {}
    in_drop: dict[str, list[torch.Tensor]] = {}
    for name, mask in masks.items():
        pruned = mask.cpu().bool()
        for link in followers[name].filters:
            out_drop.setdefault(link.name, []).append(link.positions(pruned))
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
    """Apply a saved pruning (`kept_indices`: the kept units of each group root) to a freshly built
    dense model, in place, and return it.

    The groups are traced with coupling "groups": a root pruned with coupling "none" has no tied
    members, so its group is the same either way. The result has the shapes of the pruned model, so
    the pruned model's state_dict loads into it.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in kept if n not in modules or not isinstance(modules[n], PRUNABLE)]
    if unknown:
        raise ValueError(f"rebuild_pruned: {unknown} are not Conv/Linear modules of the model")
    followers = find_followers(model, example_input, list(kept), coupling="groups")
    masks = masks_from_kept(kept, {n: followers[n].units for n in kept})
    return _remove_in_place(model, masks, followers)


# The zeroed and the removed model must agree to this (relative) tolerance, or the removal was not exact.
REMOVAL_TOLERANCE = 1e-4


@torch.no_grad()
def removal_error(zeroed: nn.Module, removed: nn.Module, inputs: torch.Tensor) -> float:
    """Max |output difference| between the zeroed model and its removed version in eval mode, in
    float32, relative to (1 + max |output|): ~1e-7 when the removal is exact, inf when the removed
    model cannot even run (train flags restored)."""
    modes = {m: m.training for m in (*zeroed.modules(), *removed.modules())}
    try:
        a = zeroed.eval()(inputs.to(next(zeroed.parameters()).device)).float().cpu()
        b = removed.eval()(inputs.to(next(removed.parameters()).device)).float().cpu()
    except RuntimeError:  # shapes that no longer fit: channels were mapped wrongly
        return float("inf")
    finally:
        for m, training in modes.items():
            m.training = training
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / (1 + a.abs().max()))


def _error_of(model: nn.Module, masks: dict[str, torch.Tensor], followers: dict[str, Followers],
              inputs: torch.Tensor) -> float:
    zeroed = copy.deepcopy(model)
    zero_pruned(zeroed, masks, followers)
    return removal_error(zeroed, _remove_in_place(copy.deepcopy(zeroed), masks, followers), inputs)


def verify_removal(model: nn.Module, masks: dict[str, torch.Tensor], followers: dict[str, Followers],
                   inputs: torch.Tensor) -> float:
    """Check, on copies, that removing `masks` computes what zeroing them does; returns the error.

    The safety net for groups a trace got wrong (a channel shuffle that torch_pruning maps as the
    identity): a one-line ValueError naming the groups whose removal is not exact.
    """
    error = _error_of(model, masks, followers, inputs)
    if error <= REMOVAL_TOLERANCE:
        return error
    bad = [name for name in masks if not _error_of(model, {name: masks[name]}, followers, inputs)
           <= REMOVAL_TOLERANCE]
    shown = ", ".join(repr(n) for n in bad[:4]) or "the pruned layers together"
    raise ValueError(f"prune_layers: removing the pruned channels of {shown} would change the model's "
                     f"outputs (relative error {error:.1e}): their channel groups are not traced correctly "
                     "(e.g. through a channel shuffle); prune other layers")
