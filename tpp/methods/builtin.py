"""The built-in methods, expressed on the same interface a plug-in uses.

Every one selects by the run's `criterion` and `scope` (L1 per layer by default, the paper's) unless
it says otherwise; they differ only in their regularisation stage, post-removal step and
finetuning penalty, so comparing two methods changes exactly the parts that differ between them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tpp.methods.base import Masks, Method, Param, PenaltyHooks, PruneContext
from tpp.methods.registry import register_builtin
from tpp.methods.stage import penalty_stage
from tpp.pruning.criteria import score_units
from tpp.pruning.orthp import orthp_reinit
from tpp.pruning.penalties import approximate_isometry, kernorth_loss, orthconv_loss
from tpp.pruning.regularizer import PruneRegularizer
from tpp.pruning.select import masks_from_scores


def select_by_criterion(ctx: PruneContext) -> Masks:
    """The default selection: the run's `criterion` scores the units, `scope` ranks them."""
    scores = score_units(ctx.cfg.criterion, ctx.score_inputs())
    return masks_from_scores(scores, ctx.ratios, ctx.cfg.scope)


# ---------------------------------------------------------------------------------- penalty stages
class FilterPenalty(PenaltyHooks):
    """The growing penalty of TPP / GReg on the selected units (`PruneRegularizer`): the gram term in
    the loss, L2 (and BatchNorm) terms on the gradients, pruned units zeroed layer by layer while the
    factor stabilises at its limit, everything pruned zeroed at the end."""

    def __init__(self, ctx: PruneContext, gram: bool, bn: bool, target: str):
        assert ctx.masks is not None, "the filter penalty runs after selection"
        self.reg = PruneRegularizer(ctx.model, ctx.masks, ctx.groups, gram=gram, bn=bn, target=target,
                                    lw=ctx.cfg.lw_opp)
        self.schedule = ctx.schedule
        self.zero_plan = self._zero_plan()
        self.ratio_limit, self.check_every = ctx.cfg.reg_mag_ratio_limit, ctx.cfg.update_reg_interval
        self.ratio: dict[str, float] = {}  # layer -> EMA of its kept / pruned mean |w| (the authors' hist)

    def _zero_plan(self) -> list[tuple[int, str]]:
        layers = list(self.reg.masks)
        return sorted(zip(self.schedule.zeroing_iterations(len(layers)), layers, strict=True))

    @torch.no_grad()
    def _check_ratio(self, iteration: int) -> None:
        """The authors' early stop (RunConfig.reg_mag_ratio_limit): every `update_reg_interval` iterations
        of the growing phase, each pruned layer's kept-to-pruned ratio of mean |w| per filter enters an
        EMA (0.9 old + 0.1 new; the first value as is); once every layer's EMA reaches the limit, the
        growth stops and the stabilising phase starts."""
        modules = dict(self.reg.model.named_modules())
        for name, mask in self.reg.masks.items():
            w = modules[name].weight
            score = w.abs().reshape(w.shape[0], -1).mean(1).cpu()
            now = float(score[~mask].mean() / score[mask].mean().clamp_min(1e-30))
            self.ratio[name] = now if name not in self.ratio else 0.9 * self.ratio[name] + 0.1 * now
        if all(v >= self.ratio_limit for v in self.ratio.values()):
            self.schedule.stop_growth(iteration)
            self.zero_plan = [z for z in self._zero_plan() if z[1] not in self.reg.zeroed]

    def loss(self, factor: float) -> torch.Tensor:
        return self.reg.loss(factor)

    def after_backward(self, factor: float) -> None:
        self.reg.add_l2_grads(factor)

    def after_step(self, iteration: int) -> None:
        growing = self.schedule.stopped_at is None and iteration < self.schedule.growing_iters
        if self.ratio_limit is not None and growing and iteration % self.check_every == 0:
            self._check_ratio(iteration)
        while self.zero_plan and self.zero_plan[0][0] < iteration:
            self.reg.zero_layer(self.zero_plan.pop(0)[1])
        self.reg.reapply_zeros()

    def finish(self) -> None:
        self.reg.zero_all()


def filter_penalty(gram: bool, bn: bool, target: str = "gram") -> Callable[[PruneContext], PenaltyHooks]:
    def make(ctx: PruneContext) -> PenaltyHooks:
        return FilterPenalty(ctx, gram, bn, target)

    make.__name__ = f"filter_penalty(gram={gram}, bn={bn}, target={target!r})"
    return make


class WeightPenalty(PenaltyHooks):
    """lw * factor * loss_fn(model): a whole-model penalty (KernOrth, OrthConv) under the growing factor."""

    def __init__(self, ctx: PruneContext, loss_fn: Callable[[nn.Module], torch.Tensor]):
        self.model, self.loss_fn, self.lw = ctx.model, loss_fn, float(ctx.params["lw"])

    def loss(self, factor: float) -> torch.Tensor | None:
        return (self.lw * factor) * self.loss_fn(self.model) if factor else None


def weight_penalty(loss_fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[PruneContext], PenaltyHooks]:
    def make(ctx: PruneContext) -> PenaltyHooks:
        return WeightPenalty(ctx, loss_fn)

    make.__name__ = f"weight_penalty({loss_fn.__name__})"
    return make


def finetune_with(loss_fn: Callable[[nn.Module], torch.Tensor]):
    """A finetuning penalty: params["lw"] * loss_fn(model)."""

    def penalty(model: nn.Module, params: Mapping[str, Any]) -> torch.Tensor:
        return float(params["lw"]) * loss_fn(model)

    penalty.__name__ = f"finetune_{loss_fn.__name__}"
    return penalty


# -------------------------------------------------------------------------------- after removal
def orthp_step(ctx: PruneContext) -> None:
    """OrthP: exact isometry re-initialisation (QR) of every Linear layer."""
    orthp_reinit(ctx.model)


def scratch_step(ctx: PruneContext) -> None:
    """Random re-initialisation of the pruned architecture (the Scratch baseline)."""
    torch.manual_seed(ctx.cfg.seed + 7919)
    for m in ctx.model.modules():
        if hasattr(m, "reset_parameters") and m is not ctx.model:
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


@torch.no_grad()
def ai_step(ctx: PruneContext) -> None:
    """Approximate isometry: every Conv/Linear kernel (grouped convs aside) optimised towards an
    orthonormal smaller side with Adam, from its pruned weights."""
    for m in ctx.model.modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1):
            m.weight.copy_(approximate_isometry(m.weight, int(ctx.params["iters"]), float(ctx.params["lr"])))


_LW = Param(0.1, "weight of the orthogonality loss (the authors' lw_orth_reg)", minimum=0.0)

BUILTIN_METHODS = [
    Method("l1", "selection by the run's criterion (L1 by default), removal at once, finetune "
           "(Li et al. 2017)"),
    Method("tpp", "Trainability Preserving Pruning: growing L2 + gram penalty incl. BatchNorm",
           stage=penalty_stage(filter_penalty(gram=True, bn=True))),
    Method("greg", "GReg-1: the growing L2 penalty on pruned filters, no gram term",
           stage=penalty_stage(filter_penalty(gram=False, bn=False))),
    Method("tpp-nobn", "TPP without the BatchNorm regularisation (ablation)",
           stage=penalty_stage(filter_penalty(gram=True, bn=False))),
    Method("tpp-korth", "TPP with a kernel-orthogonality target (identity) instead of the gram target",
           stage=penalty_stage(filter_penalty(gram=True, bn=True, target="identity"))),
    Method("orthp", "L1 removal, then exact isometry re-initialisation by QR (linear MLPs)",
           after_removal=orthp_step),
    Method("ai", "L1 removal, then approximate isometry: Adam steps towards orthonormal kernels "
           "(Lee et al. ICLR20)", after_removal=ai_step,
           params={"iters": Param(10_000, "Adam steps per layer (the authors' 10000)", minimum=0),
                   "lr": Param(1e-3, "Adam learning rate (the authors' lr_AI)", minimum=0.0)}),
    Method("scratch", "the pruned architecture trained from random initialisation",
           after_removal=scratch_step),
    Method("l1-kernorth", "L1 removal, then finetuning with kernel orthogonality (CVPR17) on every layer",
           finetune_penalty=finetune_with(kernorth_loss), params={"lw": _LW}),
    Method("l1-orthconv", "L1 removal, then finetuning with orthogonal convolution (CVPR20) on every "
           "layer but the first", finetune_penalty=finetune_with(orthconv_loss), params={"lw": _LW}),
    Method("kernorth-l1", "kernel orthogonality (growing) on the dense model, then L1 selection, removal, "
           "finetune", stage=penalty_stage(weight_penalty(kernorth_loss)), stage_before_selection=True,
           params={"lw": _LW}),
    Method("orthconv-l1", "orthogonal convolution (growing) on the dense model, then L1 selection, "
           "removal, finetune", stage=penalty_stage(weight_penalty(orthconv_loss)),
           stage_before_selection=True, params={"lw": _LW}),
]

for _method in BUILTIN_METHODS:
    register_builtin(_method)
