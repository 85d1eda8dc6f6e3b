"""Learning-rate schedules for finetuning and the growth schedule of the pruning penalty.

Both are pure functions of the epoch / iteration, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULES = ("step", "cosine", "linear", "constant", "onecycle", "rewind")
WARMUP_SCHEDULES = ("cosine", "linear", "onecycle")  # the schedules a warmup prefix applies to
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4  # torch.optim.lr_scheduler.OneCycleLR's defaults


@dataclass(frozen=True)
class DenseSchedule:
    """How the dense model was trained (recorded with it, so LR rewinding can replay its tail)."""

    name: str  # "cosine": half-cosine from `lr` to 0 over `epochs`
    lr: float
    epochs: int

    def lr_at(self, epoch: float) -> float:
        if self.name != "cosine":
            raise ValueError(f"dense schedule {self.name!r}: only 'cosine' can be replayed")
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / max(self.epochs, 1)))

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "lr": self.lr, "epochs": self.epochs}


def _cosine(epoch: float, epochs: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def finetune_lr(schedule: str, base_lr: float, epoch: int, epochs: int, milestones: Sequence[float] = (),
                warmup: int = 0, dense: DenseSchedule | None = None) -> float:
    """LR for `epoch` (0-based) of `epochs`.

    step: base, /10 and /100 after each milestone (fractions of `epochs`, as the paper's 60/90 of 120);
    cosine: half-cosine from base to 0; linear: straight from base to 0; constant: base;
    cosine and linear with `warmup` W: linear ramp base*(e+1)/(W+1) for e < W, then the decay over the
    remaining epochs. onecycle: torch's OneCycleLR stepped once per epoch with pct_start = W / epochs:
    cosine from base/25 up to base at epoch W-1, then cosine down to base/25/1e4 at the last epoch.
    rewind: the last `epochs` epochs of the `dense` schedule (Renda et al.'s LR rewinding), scaled to
    start at `base` -- at base = that schedule's own LR at the rewind point it replays it exactly.
    """
    if schedule == "step":
        drops = sum(1 for m in milestones if epoch >= round(m * epochs))
        return base_lr * (0.1**drops)
    if schedule == "constant":
        return base_lr
    if schedule in ("cosine", "linear"):
        if epoch < warmup:
            return base_lr * (epoch + 1) / (warmup + 1)
        e, n = epoch - warmup, epochs - warmup
        return base_lr * (_cosine(e, n) if schedule == "cosine" else 1.0 - e / max(n, 1))
    if schedule == "onecycle":
        low, final = base_lr / ONECYCLE_DIV, base_lr / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
        peak = max(warmup - 1, 0)  # OneCycleLR's phases: up over epochs [0, W-1], down over [W-1, E-1]
        if epoch <= peak:
            return base_lr + (low - base_lr) * _cosine(epoch, peak) if peak else base_lr
        return final + (base_lr - final) * _cosine(epoch - peak, max(epochs - 1 - peak, 1))
    if schedule == "rewind":
        if dense is None:
            raise ValueError("schedule: 'rewind' replays the dense model's own schedule, and this dense "
                             "model records none (train it with tpp, or use another schedule)")
        start = max(dense.epochs - epochs, 0)
        first = dense.lr_at(start)
        return base_lr * dense.lr_at(start + epoch) / first if first > 0 else 0.0
    raise ValueError(f"schedule: unknown schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")


class PenaltySchedule:
    """The penalty factor of the regularisation stage.

    It starts at 0 and grows by `growth` every `interval` iterations until it reaches `limit`
    (the growing phase), then stays at `limit` for `stabilize` iterations (the stabilize phase, in
    which the pruned filters are zeroed layer by layer). `growing_iters` (instead of `interval`) sizes
    the growing phase directly, e.g. in passes over the data (`from_epochs`): the increments are then
    spread evenly over it, `interval` = growing_iters / steps possibly fractional.
    """

    def __init__(self, growth: float, interval: int, limit: float, stabilize: int,
                 growing_iters: int | None = None):
        if growth <= 0 or interval < 1 or limit <= 0 or stabilize < 0:
            raise ValueError("penalty schedule needs growth > 0, interval >= 1, limit > 0, stabilize >= 0")
        self.growth, self.interval, self.limit, self.stabilize = growth, interval, limit, stabilize
        # Number of increments to reach the limit; the tolerance absorbs float error (1.0 / 1e-3 = 999.99..).
        self.steps_to_limit = math.ceil(limit / growth - 1e-9)
        self.growing_iters = self.steps_to_limit * interval if growing_iters is None else int(growing_iters)
        if self.growing_iters < 1:
            raise ValueError("penalty schedule needs a growing phase of at least one iteration")
        self.total_iters = self.growing_iters + stabilize
        self.stopped_at: int | None = None  # where an early stop ended the growing phase (stop_growth)

    def stop_growth(self, iteration: int) -> None:
        """End the growing phase at `iteration` (an early stop): the factor keeps the value it has there,
        and the stabilising phase follows right away."""
        if self.stopped_at is None and iteration < self.growing_iters:
            self.frozen = self.factor(iteration)
            self.stopped_at = int(iteration)
            self.total_iters = self.stopped_at + self.stabilize

    @property
    def stabilize_start(self) -> int:
        return self.growing_iters if self.stopped_at is None else self.stopped_at

    @classmethod
    def from_epochs(cls, growth: float, limit: float, growth_epochs: float, stabilize_epochs: float,
                    iters_per_epoch: int) -> PenaltySchedule:
        """The penalty reaches `limit` after `growth_epochs` passes over the training set and stays there
        for `stabilize_epochs` passes: a recipe that means the same on 4,000 and on 60,000 images."""
        return cls(growth, 1, limit, round(stabilize_epochs * iters_per_epoch),
                   growing_iters=max(1, round(growth_epochs * iters_per_epoch)))

    def factor(self, iteration: int) -> float:
        """Penalty factor at 0-based `iteration` of the stage: the number of increments done by then (exact
        integer arithmetic: with a whole `interval` it is iteration // interval) times `growth`."""
        if self.stopped_at is not None and iteration >= self.stopped_at:
            return self.frozen
        return min(self.limit, ((iteration * self.steps_to_limit) // self.growing_iters) * self.growth)

    def zeroing_iterations(self, num_layers: int) -> list[int]:
        """Iteration at which each layer's pruned filters are hard-zeroed (spread over stabilizing)."""
        return [self.stabilize_start + (i * self.stabilize) // max(num_layers, 1) for i in range(num_layers)]
