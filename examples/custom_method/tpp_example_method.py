"""A complete tpp-study method plug-in: a data-driven selection, a growing penalty in the library's
loop, and a short post-removal recovery, with validated parameters.

    variance-lasso: prune the units whose outputs vary least on a few fixed training batches, push
    them to zero with a growing group-lasso penalty, remove them, then re-estimate the BatchNorm
    statistics of the smaller network on the same batches.

Use it from your own code by importing this module (it registers itself), or install this folder
(`pip install ./examples/custom_method`): its pyproject.toml declares the entry point
`tpp_study.methods`, so `tpp run --method variance-lasso` and a study config find it on every node.
"""

from __future__ import annotations

import torch
from torch import nn

from tpp.methods import Param, PenaltyHooks, PruneContext, penalty_stage, register_method
from tpp.pruning import masks_from_scores, pruned_slots, zero_pruned


def output_variance(ctx: PruneContext) -> dict[str, torch.Tensor]:
    """{group root: variance of each unit's output over the fixed criterion batches}."""
    outputs: dict[str, list[torch.Tensor]] = {root: [] for root in ctx.groups}
    modules = dict(ctx.model.named_modules())

    def keep(root: str):
        def hook(module, _inputs, out):
            channels = out.movedim(-1 if isinstance(module, nn.Linear) else 1, -1)
            outputs[root].append(channels.reshape(-1, channels.shape[-1]).detach())
        return hook

    hooks = [modules[root].register_forward_hook(keep(root)) for root in ctx.groups]
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        with torch.no_grad():
            for x, _ in ctx.criterion_batches():
                ctx.model(x)
    finally:
        ctx.model.train(was_training)
        for h in hooks:
            h.remove()
    scores = {}
    for root, group in ctx.groups.items():
        per_channel = torch.cat(outputs[root]).var(dim=0).cpu()
        link = group.filters[0]  # the root's own rows: which unit each output channel belongs to
        units = torch.tensor(link.root)
        total = torch.zeros(group.units).index_add_(0, units, per_channel[list(link.index)])
        scores[root] = total / torch.bincount(units, minlength=group.units)
    return scores


class GroupLasso(PenaltyHooks):
    """lw * factor * Σ ‖pruned row‖₂ over every filter row of the selected units (any coupled layer)."""

    def __init__(self, ctx: PruneContext):
        self.ctx, self.lw = ctx, ctx.params["lw"]
        modules = dict(ctx.model.named_modules())
        self.rows = []
        for root, mask in ctx.masks.items():
            for s in pruned_slots(ctx.model, root, mask, ctx.groups[root]):
                if s.role == "filter" and s.attr == "weight" and len(s.index):
                    self.rows.append((getattr(modules[s.module], s.attr), s.index.to(ctx.device)))

    def loss(self, factor: float) -> torch.Tensor | None:
        if not factor:
            return None
        return self.lw * factor * sum(w[idx].flatten(1).norm(dim=1).sum() for w, idx in self.rows)

    def finish(self) -> None:
        zero_pruned(self.ctx.model, self.ctx.masks, self.ctx.groups)


@torch.no_grad()
def recalibrate_batchnorm(ctx: PruneContext) -> None:
    """A short recovery: BatchNorm running statistics re-estimated on the criterion batches."""
    if not ctx.params["recalibrate"]:
        return
    ctx.model = ctx.model.to(ctx.device)
    norms = [m for m in ctx.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    ctx.model.train()
    for x, _ in ctx.criterion_batches():
        ctx.model(x)
    for bn in norms:
        bn.momentum = 0.1


@register_method("variance-lasso",
                 description="lowest output variance, growing group lasso, BatchNorm recalibration",
                 params={"lw": Param(1e-2, "weight of the group-lasso penalty", minimum=0.0),
                         "recalibrate": Param(True, "re-estimate BatchNorm statistics after removal")},
                 stage=penalty_stage(GroupLasso), after_removal=recalibrate_batchnorm)
def select_by_variance(ctx: PruneContext) -> dict[str, torch.Tensor]:
    """Which units to prune: the lowest-variance ones, at each layer's ratio (the run's `scope`)."""
    return masks_from_scores(output_variance(ctx), ctx.ratios, ctx.cfg.scope)
