"""Which modules depend on a pruned layer's output channels (traced with torch_pruning's DependencyGraph).

Removing a filter also removes the BatchNorm channel that normalises it and the input channels that
consume it downstream (one per channel, or H*W of them after a flatten). The trace records, for each
such module, which of its channel positions come from which of the pruned layer's filters, so later
steps (zeroing, the BN penalty, physical removal) need no further tracing and work on any copy of the
model with the same module names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from tpp.pruning.layers import PRUNABLE

_NORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Link:
    """Channel positions `index` of module `name` (BN channels or input features) fed by filters `root`.

    `index[i]` is fed by filter `root[i]` of the pruned layer; a filter can feed several positions
    (a flatten of an H x W map feeds H*W input features).
    """

    name: str
    index: tuple[int, ...]
    root: tuple[int, ...]

    def positions(self, pruned: torch.Tensor) -> torch.Tensor:
        """Long tensor of the positions fed by the filters where the bool mask `pruned` is True."""
        index = torch.tensor(self.index, dtype=torch.long)
        root = torch.tensor(self.root, dtype=torch.long)
        return index[pruned.cpu()[root]]


@dataclass(frozen=True)
class Followers:
    """What a pruned layer's output channels flow into: BatchNorms that normalise them, and consumers."""

    norms: tuple[Link, ...]
    consumers: tuple[Link, ...]

    @property
    def bn(self) -> str | None:
        """Name of the BatchNorm that normalises the layer's outputs (None if there is none)."""
        return self.norms[0].name if self.norms else None


def _capture_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def _out_fn(module: nn.Module):
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _followers_of(dg: tp.DependencyGraph, name: str, module: nn.Module,
                  module_names: dict[nn.Module, str]) -> Followers:
    n = int(module.weight.shape[0])
    try:
        group = dg.get_pruning_group(module, _out_fn(module), list(range(n)))
    except Exception as e:  # torch_pruning raises assorted errors on graphs it cannot map
        raise ValueError(f"find_followers: cannot trace the dependencies of {name!r}: {e}") from e
    norms: list[Link] = []
    consumers: list[Link] = []
    coupled: list[str] = []
    for item in list(group)[1:]:
        target, handler = item.dep.target.module, item.dep.handler
        if target not in module_names:  # a parameter-free op of the trace (add, reshape, slice, ...)
            if isinstance(target, nn.Parameter):
                raise ValueError(f"find_followers: {name!r} feeds a bare nn.Parameter; not supported")
            continue
        other = module_names[target]
        if any(r is None for r in item.root_idxs):
            raise ValueError(f"find_followers: cannot map the channels of {name!r} into {other!r}")
        link = Link(other, tuple(int(i) for i in item.idxs), tuple(int(r) for r in item.root_idxs))
        if isinstance(target, _NORM):
            norms.append(link)
        elif isinstance(target, PRUNABLE) and dg.is_in_channel_pruning_fn(handler) \
                and not dg.is_out_channel_pruning_fn(handler):
            if getattr(target, "groups", 1) != 1:
                raise ValueError(f"find_followers: {name!r} feeds the grouped convolution {other!r}; "
                                 "pruning it would need pruning that layer too (not supported)")
            consumers.append(link)
        elif isinstance(target, PRUNABLE):
            coupled.append(other)
        else:
            raise ValueError(f"find_followers: the outputs of {name!r} flow into {other!r} "
                             f"({type(target).__name__}), which cannot be pruned with it; supported "
                             "followers are BatchNorm, Conv and Linear layers")
    if coupled:
        shown = ", ".join(sorted(set(coupled))[:8])
        raise ValueError(f"find_followers: the outputs of {name!r} are tied (e.g. by a residual sum) "
                         f"to the outputs of {shown}; pruning them would need pruning those layers too, "
                         "which is not supported: prune only layers whose outputs feed a single path")
    if not consumers:
        raise ValueError(f"find_followers: no layer consumes the outputs of {name!r}: it is the final "
                         "classifier (its outputs are the model's outputs) and cannot be pruned")
    return Followers(tuple(norms), tuple(consumers))


def find_followers(model: nn.Module, example_input: torch.Tensor, names: list[str]) -> dict[str, Followers]:
    """{pruned layer: its Followers}, traced once on `example_input` (a batch of one is enough).

    The trace runs in eval mode (so BatchNorm running statistics are not touched) and restores every
    module's train/eval flag afterwards. Layers tied to other layers' outputs (residual sums) and the
    final classifier are rejected with a ValueError.
    """
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not isinstance(modules[name], PRUNABLE):
            raise ValueError(f"find_followers: {name!r} is not a Conv/Linear module of the model")
    if not names:
        return {}
    param = next(model.parameters())
    x = example_input.to(device=param.device, dtype=param.dtype)
    modes = _capture_modes(model)
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=(x,), verbose=False)
        module_names = {m: n for n, m in model.named_modules()}
        return {name: _followers_of(dg, name, modules[name], module_names) for name in names}
    finally:
        _restore_modes(modes)
