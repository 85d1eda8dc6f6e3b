"""Learning-rate schedules for finetuning and the growth schedule of the pruning penalty.

Both are pure functions of the epoch / iteration, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("step", "cosine", "constant")


def finetune_lr(schedule: str, base_lr: float, epoch: int, epochs: int, milestones: Sequence[float]) -> float:
    """LR for `epoch` (0-based) of `epochs`.

    step: base, /10 and /100 after each milestone (fractions of `epochs`, as the paper's 60/90 of 120);
    cosine: half-cosine from base to 0; constant: base.
    """
    if schedule == "step":
        drops = sum(1 for m in milestones if epoch >= round(m * epochs))
        return base_lr * (0.1**drops)
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "constant":
        return base_lr
    raise ValueError(f"schedule: unknown schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")


class PenaltySchedule:
    """The penalty factor of the regularisation stage.

    It starts at 0 and grows by `growth` every `interval` iterations until it reaches `limit`
    (the growing phase), then stays at `limit` for `stabilize` iterations (the stabilize phase, in
    which the pruned filters are zeroed layer by layer).
    """

    def __init__(self, growth: float, interval: int, limit: float, stabilize: int):
        if growth <= 0 or interval < 1 or limit <= 0 or stabilize < 0:
            raise ValueError("penalty schedule needs growth > 0, interval >= 1, limit > 0, stabilize >= 0")
        self.growth, self.interval, self.limit, self.stabilize = growth, interval, limit, stabilize
        # Number of increments to reach the limit; the tolerance absorbs float error (1.0 / 1e-3 = 999.99..).
        self.steps_to_limit = math.ceil(limit / growth - 1e-9)
        self.growing_iters = self.steps_to_limit * interval
        self.total_iters = self.growing_iters + stabilize

    def factor(self, iteration: int) -> float:
        """Penalty factor at 0-based `iteration` of the stage."""
        return min(self.limit, (iteration // self.interval) * self.growth)

    def zeroing_iterations(self, num_layers: int) -> list[int]:
        """Iteration at which each layer's pruned filters are hard-zeroed (spread over stabilizing)."""
        return [self.growing_iters + (i * self.stabilize) // max(num_layers, 1) for i in range(num_layers)]
