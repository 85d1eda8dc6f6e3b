"""The library's regularisation loop: SGD at a constant LR with the growing penalty factor, hooks in
between, a test evaluation per epoch, and divergence (a NaN/inf loss) returned as a value."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tpp.methods.base import PenaltyHooks, PruneContext, StageFn, StageResult
from tpp.train import epoch_generator, evaluate, sgd, train_epoch

OVERFIT_ACC = 99.5  # training accuracy (%) from which a prune stage is in the overfit regime


def run_penalty_loop(ctx: PruneContext, hooks: PenaltyHooks, iterations: int | None = None) -> StageResult:
    """Train `ctx.model` for the schedule's iterations (or `iterations`) with `hooks`; `hooks.finish()` at
    the end.

    Each epoch's record (epoch, train_loss, train_acc, reg factor, iteration, test_acc) goes to
    `ctx.history` and out as a prune-stage epoch event. The first epoch whose training accuracy reaches
    OVERFIT_ACC also emits a notice: from there on cross-entropy only scales the network up (on
    separable data its Jacobian grows without bound), which inflates every trainability number.
    """
    cfg, model, schedule = ctx.cfg, ctx.model, ctx.schedule

    def current() -> int:  # an early stop (schedule.stop_growth) shortens the stage while it runs
        return schedule.total_iters if iterations is None else int(iterations)

    total = current()
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
    while state["it"] < current():
        total = current()
        t0 = time.perf_counter()
        gen = epoch_generator(cfg.seed, "prune", epoch)
        batches = ctx.data.train_batches(cfg.reg_batch_size, gen, ctx.device)
        stats = train_epoch(model, batches, opt, ctx.device, ctx.precision, extra_loss, after_backward,
                            after_step, max_iterations=total - state["it"], track_accuracy=True,
                            should_stop=lambda: state["it"] >= current())
        test = ctx.data.test_batches(cfg.eval_batch_size, ctx.device)
        record = {"epoch": epoch, "train_loss": stats.loss, "train_acc": stats.accuracy,
                  "reg": state["factor"], "iteration": state["it"],
                  "test_acc": evaluate(model, test, ctx.device, ctx.precision)}
        note_fit(ctx, record, current())
        ctx.history.append(record)
        ctx.emit(event="epoch", stage="prune", iterations=current(),
                 seconds=time.perf_counter() - t0, **record)
        if not stats.finite:
            why = (f"the regularisation loss became NaN/inf at iteration {state['it']} "
                   f"(reg_lr={cfg.reg_lr}, lw_opp={cfg.lw_opp}, growth={cfg.growth})")
            return StageResult(state["it"], why)
        epoch += 1
    hooks.finish()
    return StageResult(state["it"])


def note_fit(ctx: PruneContext, record: dict, total: int) -> None:
    """The overfit notice, the first time a stage's epoch record reaches OVERFIT_ACC training accuracy
    (the plain loop and tpp.lockstep's call it before adding the record to `ctx.history`)."""
    acc = record.get("train_acc", float("nan"))
    if acc >= OVERFIT_ACC and not any(h.get("train_acc", 0) >= OVERFIT_ACC for h in ctx.history):
        ctx.emit(event="notice", message=f"prune stage: training accuracy {acc:.1f}% at iteration "
                 f"{record['iteration']} of {total} (epoch {record['epoch']}): the stage fits its training "
                 "set, and from here cross-entropy only scales the network up (JSV after removal grows with "
                 "it; compare it with the unpruned control, or size the stage in passes over the data: "
                 "reg_growth_epochs)")


def penalty_stage(make_hooks: Callable[[PruneContext], PenaltyHooks]) -> StageFn:
    """A method's `stage`: build the hooks from the context, then run the library's loop with them."""

    def stage(ctx: PruneContext) -> StageResult:
        return run_penalty_loop(ctx, make_hooks(ctx))

    stage.__doc__ = f"The library's penalty loop with {getattr(make_hooks, '__name__', 'hooks')}."
    stage.make_hooks = make_hooks  # type: ignore[attr-defined]  # what tpp.lockstep stacks
    return stage
