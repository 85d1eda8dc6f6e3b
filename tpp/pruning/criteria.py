"""Selection criteria: a score for every unit of every channel group (higher = more important).

In the paper's per-layer mode (coupling "none") a criterion scores the pruned layer's own filters
(its BatchNorm for `bn_scale`). With coupled groups it is aggregated over the group's members as
torch_pruning does: the mean over every Conv/Linear whose output rows or input columns carry the
unit (filters only for FPGM; the BatchNorms for `bn_scale`), each member scoring the unit on its
entries. Our own implementations, not `torch_pruning.importance`'s: theirs score a traced
torch_pruning Group, while ours also score declared groups (attention heads) and must reproduce the
per-layer criteria exactly; the tests check ours against theirs where the definitions agree, and
torch_pruning's FPGM (distances between |w|^p) and Hessian (its gradient accumulation keeps only the
last sample) differ from the papers, so ours follow the papers.

Data-driven criteria (taylor, hessian) use a fixed, seeded set of training samples, in eval mode (no
BatchNorm statistics change, and the scores do not depend on how the samples are batched).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from tpp.pruning.graph import Followers, Link

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ScoreInputs:
    """What a criterion sees: the dense model, its channel groups (root: Followers), the coupling mode,
    the seed, and `batches()`, the fixed training samples of data-driven criteria (loaded on first use)."""

    model: nn.Module
    groups: dict[str, Followers]
    coupling: str
    seed: int
    batches: Callable[[], list[Batch]]


CriterionFn = Callable[[ScoreInputs], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: CriterionFn
    description: str
    data_driven: bool = False


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, *, description: str,
                       data_driven: bool = False) -> Callable[[CriterionFn], CriterionFn]:
    """Decorator: register `fn(inputs: ScoreInputs) -> {group root: scores over its units}` as `name`
    (usable as `criterion:` by every method that selects by criterion). Replaces an existing name."""

    def deco(fn: CriterionFn) -> CriterionFn:
        CRITERIA[name] = Criterion(name, fn, description, data_driven)
        return fn

    return deco


def registered_in_code() -> list[Criterion]:
    """The criteria registered outside this library (by the running program or a plug-in): what a Ray
    worker, which never runs the program, must be handed (`adopt`)."""
    return [c for c in CRITERIA.values() if not c.fn.__module__.startswith("tpp.")]


def adopt(criteria: list[Criterion]) -> None:
    """Register criteria another process registered (see `registered_in_code`)."""
    for c in criteria:
        CRITERIA[c.name] = c


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"criterion: got {name!r}; accepted: {', '.join(CRITERIA)}")
    return CRITERIA[name]


# ------------------------------------------------------------------------------------------ members
@dataclass(frozen=True)
class _Member:
    param: torch.Tensor  # the member's weight (or BatchNorm gamma)
    dim: int  # the channel dim of `param` that `link` indexes
    link: Link


def _members(model: nn.Module, group: Followers, coupling: str, which: str) -> list[_Member]:
    """The parameters a criterion scores a group's units on: "weights" (the layer's own filters, or
    with coupled groups every Conv/Linear member), "filters" (output rows only) or "norms"."""
    modules = dict(model.named_modules())
    if which == "norms":
        links = [(link, 0) for link in group.norms if getattr(modules[link.name], "weight", None) is not None]
    elif coupling == "none":
        links = [(group.filters[0], 0)]
    else:
        links = [(link, 0) for link in group.filters]
        if which == "weights":
            links += [(link, 1) for link in group.consumers]
    return [_Member(modules[link.name].weight, dim, link) for link, dim in links]


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` as [positions along `dim`, entries per position]."""
    return t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)


def _is_identity(link: Link, size: int, units: int) -> bool:
    return size == units == len(link.index) and link.index == link.root == tuple(range(size))


def _per_unit(values: torch.Tensor, link: Link, units: int, reduce: str) -> torch.Tensor:
    """[units] reduction ("sum" or "mean") of the per-entry `values` [positions, entries] over each
    unit's entries in one member (NaN for a unit with none there)."""
    if _is_identity(link, values.shape[0], units):
        return values.sum(1) if reduce == "sum" else values.mean(1)
    index = torch.tensor(link.index, dtype=torch.long, device=values.device)
    root = torch.tensor(link.root, dtype=torch.long, device=values.device)
    total = torch.zeros(units, dtype=values.dtype, device=values.device)
    total.scatter_add_(0, root, values.sum(1)[index])
    if reduce == "sum":
        count = torch.zeros(units, dtype=values.dtype, device=values.device).scatter_add_(
            0, root, torch.ones_like(root, dtype=values.dtype))
        return torch.where(count > 0, total, torch.full_like(total, float("nan")))
    count = torch.zeros(units, dtype=values.dtype, device=values.device).scatter_add_(
        0, root, torch.full_like(root, values.shape[1], dtype=values.dtype))
    return total / count


def _mean_over_members(scores: list[torch.Tensor]) -> torch.Tensor:
    """The group score: mean over members, each unit over the members it has entries in."""
    if len(scores) == 1:
        return scores[0]
    stacked = torch.stack(scores)
    return stacked.nansum(0) / (~stacked.isnan()).sum(0)


def _entrywise(inputs: ScoreInputs, which: str, values: Callable[[_Member], torch.Tensor], reduce: str,
               post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{root: scores}: per member `values(member)` [positions, entries] reduced per unit, `post`
    applied per member, then the mean over members."""
    out: dict[str, torch.Tensor] = {}
    for root, group in inputs.groups.items():
        members = _members(inputs.model, group, inputs.coupling, which)
        if not members:
            raise ValueError(f"criterion: layer {root!r} has no {which[:-1]} to score (e.g. bn_scale needs a "
                             "BatchNorm after the layer)")
        per_member = []
        for m in members:
            s = _per_unit(values(m), m.link, group.units, reduce)
            per_member.append(post(s) if post is not None else s)
        out[root] = _mean_over_members(per_member)
    return out


# ----------------------------------------------------------------------------------------- criteria
@register_criterion("l1", description="mean |w| of the unit's weights (Li et al. 2017; the paper's)")
def l1_norm(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    return _entrywise(inputs, "weights", lambda m: _rows(m.param, m.dim).abs(), "mean")


@register_criterion("l2", description="L2 norm of the unit's weights")
def l2_norm(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    return _entrywise(inputs, "weights", lambda m: _rows(m.param, m.dim).pow(2), "sum", torch.sqrt)


@register_criterion("random", description="uniform random scores (seeded by the run's seed)")
def random_scores(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(inputs.seed + 104_729)
    return {root: torch.rand(group.units, generator=gen) for root, group in inputs.groups.items()}


@register_criterion("bn_scale", description="|gamma| of the unit's BatchNorm channels (network slimming, "
                    "Liu et al. 2017)")
def bn_scale(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    return _entrywise(inputs, "norms", lambda m: _rows(m.param, 0).abs(), "mean")


def _unit_vectors(param: torch.Tensor, link: Link, units: int) -> torch.Tensor:
    """[units, entries]: each unit's rows of a filter member, concatenated (equal counts per unit)."""
    rows = _rows(param, 0)
    if _is_identity(link, rows.shape[0], units):
        return rows
    order = sorted(range(len(link.index)), key=lambda i: (link.root[i], link.index[i]))
    counts = torch.bincount(torch.tensor(link.root), minlength=units)
    if int(counts.min()) != int(counts.max()):
        raise ValueError("criterion fpgm: the units of a channel group own unequal numbers of rows")
    idx = torch.tensor([link.index[i] for i in order], dtype=torch.long, device=rows.device)
    return rows[idx].reshape(units, -1)


@register_criterion("fpgm", description="sum of distances to the layer's other filters (geometric median, "
                    "He et al. 2019): filters near the median are redundant")
def fpgm(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for root, group in inputs.groups.items():
        scores = []
        for m in _members(inputs.model, group, inputs.coupling, "filters"):
            x = _unit_vectors(m.param, m.link, group.units)
            scores.append(torch.cdist(x[None], x[None]).squeeze(0).sum(1))
        out[root] = _mean_over_members(scores)
    return out


def lamp_normalise(scores: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al. ICLR21): s_u / Σ_{v ranked at or above u} s_v for squared magnitudes s,
    comparable across layers (the layer's largest unit scores 1)."""
    order = torch.sort(scores, stable=True).indices
    ranked = scores[order]
    tail = ranked.flip(0).cumsum(0).flip(0)  # Σ of the scores ranked at or above each one
    out = torch.empty_like(scores)
    out[order] = ranked / tail
    return out


@register_criterion("lamp", description="layer-adaptive magnitude (LAMP, Lee et al. 2021): squared L2 "
                    "normalised by the layer's larger scores; meant for scope: global")
def lamp(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    squared = _entrywise(inputs, "weights", lambda m: _rows(m.param, m.dim).pow(2), "sum")
    return {root: lamp_normalise(s) for root, s in squared.items()}


def _scored_params(inputs: ScoreInputs) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} of every weight a data-driven criterion needs gradients of."""
    wanted = {id(m.param) for root, g in inputs.groups.items()
              for m in _members(inputs.model, g, inputs.coupling, "weights")}
    return {n: p for n, p in inputs.model.named_parameters() if id(p) in wanted}


def _in_eval(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def mean_loss_gradients(model: nn.Module, batches: list[Batch],
                        params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """d(mean cross-entropy over every sample of `batches`)/d(param), in eval mode (.grad untouched)."""
    modes = _in_eval(model)
    total = sum(int(y.numel()) for _, y in batches)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        with torch.enable_grad():
            for x, y in batches:
                loss = F.cross_entropy(model(x), y, reduction="sum") / total
                for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                    grads[n] += g
    finally:
        for m, training in modes.items():
            m.training = training
    return grads


def fisher_diagonal(model: nn.Module, batches: list[Batch], params: dict[str, nn.Parameter],
                    chunk: int = 16) -> dict[str, torch.Tensor]:
    """Mean over samples of the squared per-sample gradient (the empirical Fisher, the usual cheap
    Hessian diagonal of OBD), in eval mode; per-sample gradients by torch.func, `chunk` at a time."""
    modes = _in_eval(model)
    state = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}

    def sample_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, {**state, **p}, (x[None],)), y[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    total = sum(int(y.numel()) for _, y in batches)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    detached = {n: p.detach() for n, p in params.items()}
    try:
        with torch.enable_grad():
            for x, y in batches:
                for i in range(0, len(y), chunk):
                    for n, g in per_sample(detached, x[i:i + chunk], y[i:i + chunk]).items():
                        fisher[n] += g.pow(2).sum(0) / total
    finally:
        for m, training in modes.items():
            m.training = training
    return fisher


def _by_param(inputs: ScoreInputs, values: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    params = dict(inputs.model.named_parameters())
    return {id(params[n]): v for n, v in values.items()}


@register_criterion("taylor", data_driven=True, description="first-order Taylor (Molchanov et al. 2019): "
                    "(Σ w·dL/dw)² over the unit's weights, on the fixed samples")
def taylor(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    grads = _by_param(inputs, mean_loss_gradients(inputs.model, inputs.batches(), _scored_params(inputs)))
    return _entrywise(inputs, "weights", lambda m: _rows(m.param * grads[id(m.param)], m.dim), "sum",
                      torch.square)


@register_criterion("hessian", data_driven=True, description="optimal brain damage (LeCun et al. 1990): "
                    "Σ ½ w² H_ww with the empirical Fisher for the Hessian diagonal, on the fixed samples")
def hessian(inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    fisher = _by_param(inputs, fisher_diagonal(inputs.model, inputs.batches(), _scored_params(inputs)))
    return _entrywise(inputs, "weights", lambda m: _rows(0.5 * m.param.pow(2) * fisher[id(m.param)], m.dim),
                      "sum")


def score_units(name: str, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """{root: float32 CPU scores over its units} of criterion `name`, checked for shape and finiteness."""
    raw: dict[str, Any] = get_criterion(name).fn(inputs)
    out: dict[str, torch.Tensor] = {}
    for root, group in inputs.groups.items():
        s = raw.get(root)
        if not isinstance(s, torch.Tensor) or s.shape != (group.units,):
            raise ValueError(f"criterion {name!r}: expected {group.units} scores for {root!r}, got "
                             f"{None if s is None else tuple(getattr(s, 'shape', ()))}")
        s = s.detach().float().cpu()
        if not torch.isfinite(s).all():
            raise ValueError(f"criterion {name!r}: non-finite scores for {root!r}")
        out[root] = s
    return out
