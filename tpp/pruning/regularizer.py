"""The growing penalty of TPP and GReg-1 on the pruned filters, vectorised.

Everything that depends only on the masks (index sets, gram targets, full-shape float masks) is built
once in `__init__`; a step then costs one batched W Wᵀ per group of same-shaped layers, and the L2
gradients and the zeroing are one fused `torch._foreach_*` call each, so the penalty stays a small
fraction of a training step on CPU and on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpp.pruning.graph import Followers
from tpp.pruning.penalties import GRAM_TARGETS, gram_penalty, gram_target
from tpp.pruning.surgery import pruned_slots

TARGETS = GRAM_TARGETS


@dataclass
class _GramGroup:
    """Same-shaped weights with pruned rows whose gram terms are computed in one batched matmul."""

    weights: list[nn.Parameter]
    n: int
    target: torch.Tensor  # [L, N, N]: kept-kept mask (target "gram") or diag(keep) (target "identity")


class _MaskedParams:
    """Parameters with a full-shape float mask each, merged when several slots hit one parameter."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def add(self, param: nn.Parameter, dim: int, index: torch.Tensor, fill: float, base: float) -> None:
        """Set the mask to `fill` at `index` along `dim` (a new mask starts as `base` everywhere)."""
        key = id(param)
        if key not in self._items:
            self._items[key] = (param, torch.full_like(param, base, requires_grad=False).detach())
        self._items[key][1].index_fill_(dim, index.to(param.device), fill)

    def lists(self) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        return [p for p, _ in self._items.values()], [m for _, m in self._items.values()]


class PruneRegularizer:
    """The TPP / GReg-1 penalty on the pruned units of `masks` (group root: bool over units, True = pruned).

    loss(factor): lw * factor * Σ_weights mean((G - T)²), G = W Wᵀ of a weight's filters flattened to
    rows, for every Conv/Linear whose output rows carry the group's channels (the pruned layer and,
    with coupled groups, every tied one); target "gram": T = G detached with pruned rows and columns
    zeroed (only entries involving a pruned filter are penalised: pruned filters go to zero norm and
    decorrelate from kept ones); target "identity": T = diag(keep) (kernel orthogonality among kept
    filters, pruned ones to 0). add_l2_grads(factor): grad += factor * w on all those pruned rows
    (+ bias) and, with `bn`, on the gamma/beta of the BatchNorm channels that normalise them.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], followers: dict[str, Followers],
                 gram: bool, bn: bool, target: str = "gram", lw: float = 1000.0):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.model, self.gram, self.bn, self.target, self.lw = model, gram, bn, target, float(lw)
        self.masks = {name: m.detach().cpu().bool() for name, m in masks.items()}
        self.followers = followers
        modules = dict(model.named_modules())
        self._zero = torch.zeros((), device=next(model.parameters()).device)
        self._groups = self._build_gram_groups(modules)
        penalised = _MaskedParams()
        for name, mask in self.masks.items():
            for s in pruned_slots(model, name, mask, followers[name]):
                if s.role == "filter" or (s.role == "norm" and bn):
                    penalised.add(getattr(modules[s.module], s.attr), s.dim, s.index, 1.0, 0.0)
        self._l2_params, self._l2_masks = penalised.lists()
        self._keep = _MaskedParams()
        self._zero_params: list[nn.Parameter] = []
        self._zero_masks: list[torch.Tensor] = []
        self.zeroed: list[str] = []

    def _pruned_rows(self, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """{layer: bool over its output rows, True = pruned} for every filter member of every group."""
        rows: dict[str, torch.Tensor] = {}
        for name, mask in self.masks.items():
            for link in self.followers[name].filters:
                n = int(modules[link.name].weight.shape[0])
                pruned = rows.setdefault(link.name, torch.zeros(n, dtype=torch.bool))
                pruned[link.positions(mask)] = True
        return rows

    def _build_gram_groups(self, modules: dict[str, nn.Module]) -> list[_GramGroup]:
        pruned_rows = self._pruned_rows(modules)
        by_shape: dict[tuple, list[str]] = {}
        for name in pruned_rows:
            w = modules[name].weight
            key = (tuple(w.shape), w.device, w.dtype)
            by_shape.setdefault(key, []).append(name)
        groups = []
        for (shape, device, dtype), names in by_shape.items():
            keep = torch.stack([(~pruned_rows[n]).to(dtype) for n in names])  # [L, N]
            groups.append(_GramGroup([modules[n].weight for n in names], shape[0],
                                     gram_target(keep, self.target).to(device)))
        return groups

    def named_plan(self) -> dict:
        """The penalty by parameter name (what a vectorised trainer of K stacked models rebuilds it from):
        {"gram": [(weight name, target [N, N])], "l2": {param name: full-shape mask}, "zero": {layer:
        [(param name, dim, index)]}}, plus the flags gram, target and lw."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        modules = dict(self.model.named_modules())
        gram = [(names[id(w)], g.target[i]) for g in self._groups for i, w in enumerate(g.weights)]
        zero = {}
        for layer, mask in self.masks.items():
            slots = pruned_slots(self.model, layer, mask, self.followers[layer])
            zero[layer] = [(names[id(getattr(modules[s.module], s.attr))], s.dim, s.index) for s in slots]
        return {"gram": gram, "l2": {names[id(p)]: m for p, m in zip(self._l2_params, self._l2_masks,
                                                                       strict=True)},
                "zero": zero, "gram_on": self.gram, "target": self.target, "lw": self.lw}

    def loss(self, factor: float) -> torch.Tensor:
        """The differentiable gram term, weighted lw * factor (a zero tensor without the gram term)."""
        if not self.gram or factor == 0 or not self._groups:
            return self._zero
        total = self._zero
        for g in self._groups:
            w = torch.stack([p.reshape(g.n, -1) for p in g.weights])  # [L, N, D]
            total = total + gram_penalty(w, g.target, self.target).sum()
        return (self.lw * factor) * total

    @torch.no_grad()
    def add_l2_grads(self, factor: float) -> None:
        """grad += factor * w on the pruned entries (filters, bias, and BN gamma/beta with `bn`)."""
        if factor == 0 or not self._l2_params:
            return
        for p in self._l2_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._l2_params]
        torch._foreach_addcmul_(grads, self._l2_params, self._l2_masks, value=float(factor))

    @torch.no_grad()
    def zero_layer(self, name: str) -> None:
        """Hard-zero everything carrying layer `name`'s pruned outputs and keep it zero from now on.

        That is the filters (+ bias), the BatchNorm gamma/beta of those channels (always, with or
        without `bn`: otherwise BN(0) = beta - gamma * mean / std would survive), and the consumers'
        input columns, so the network computes exactly what the removed one will.
        """
        if name in self.zeroed:
            return
        modules = dict(self.model.named_modules())
        for s in pruned_slots(self.model, name, self.masks[name], self.followers[name]):
            self._keep.add(getattr(modules[s.module], s.attr), s.dim, s.index, 0.0, 1.0)
        self.zeroed.append(name)
        self._zero_params, self._zero_masks = self._keep.lists()
        self.reapply_zeros()

    @torch.no_grad()
    def reapply_zeros(self) -> None:
        """Re-zero the zeroed layers' entries (call after each optimizer step): one fused multiply."""
        if self._zero_params:
            torch._foreach_mul_(self._zero_params, self._zero_masks)

    def zero_all(self) -> None:
        """Zero every pruned layer (the end of the stage)."""
        for name in self.masks:
            self.zero_layer(name)
