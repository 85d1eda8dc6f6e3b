"""The library's regularisation loop: SGD at a constant LR with the growing penalty factor, hooks in
between, a test evaluation per epoch, and divergence (a NaN/inf loss) returned as a value."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tpp.methods.base import PenaltyHooks, PruneContext, StageFn, StageResult
from tpp.train import epoch_generator, evaluate, sgd, train_epoch


def run_penalty_loop(ctx: PruneContext, hooks: PenaltyHooks) -> StageResult:
    """Train `ctx.model` for the schedule's iterations with `hooks`; `hooks.finish()` at the end.

    Each epoch's record (epoch, train_loss, reg factor, iteration, test_acc) goes to `ctx.history`
    and out as a prune-stage epoch event.
    """
    cfg, model, schedule = ctx.cfg, ctx.model, ctx.schedule
    opt = sgd(model, cfg.reg_lr, cfg.reg_momentum, cfg.reg_weight_decay)
    zero = torch.zeros((), device=next(model.parameters()).device)
    state = {"it": 0, "factor": 0.0}

    def extra_loss() -> torch.Tensor:
        state["factor"] = schedule.factor(state["it"])
        term = hooks.loss(state["factor"])
        return zero if term is None else term

    def after_backward() -> None:
        hooks.after_backward(state["factor"])

    def after_step() -> None:
        state["it"] += 1
        hooks.after_step(state["it"])

    epoch = 0
    while state["it"] < schedule.total_iters:
        t0 = time.perf_counter()
        gen = epoch_generator(cfg.seed, "prune", epoch)
        batches = ctx.data.train_batches(cfg.reg_batch_size, gen, ctx.device)
        stats = train_epoch(model, batches, opt, ctx.device, ctx.precision, extra_loss, after_backward,
                            after_step, max_iterations=schedule.total_iters - state["it"])
        test = ctx.data.test_batches(cfg.eval_batch_size, ctx.device)
        record = {"epoch": epoch, "train_loss": stats.loss, "reg": state["factor"], "iteration": state["it"],
                  "test_acc": evaluate(model, test, ctx.device, ctx.precision)}
        ctx.history.append(record)
        ctx.emit(event="epoch", stage="prune", iterations=schedule.total_iters,
                 seconds=time.perf_counter() - t0, **record)
        if not stats.finite:
            why = (f"the regularisation loss became NaN/inf at iteration {state['it']} "
                   f"(reg_lr={cfg.reg_lr}, lw_opp={cfg.lw_opp}, growth={cfg.growth})")
            return StageResult(state["it"], why)
        epoch += 1
    hooks.finish()
    return StageResult(state["it"])


def penalty_stage(make_hooks: Callable[[PruneContext], PenaltyHooks]) -> StageFn:
    """A method's `stage`: build the hooks from the context, then run the library's loop with them."""

    def stage(ctx: PruneContext) -> StageResult:
        return run_penalty_loop(ctx, make_hooks(ctx))

    stage.__doc__ = f"The library's penalty loop with {getattr(make_hooks, '__name__', 'hooks')}."
    stage.make_hooks = make_hooks  # type: ignore[attr-defined]  # what tpp.lockstep stacks
    return stage
