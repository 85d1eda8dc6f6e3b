"""What a pruning method is: optional hooks into the prune stage and finetuning, plus its parameters.

A method may supply any of
  select(ctx) -> masks          which units to prune (default: the run's `criterion` and `scope`);
  stage(ctx) -> StageResult     a regularisation stage, run after selection (or before it with
                                `stage_before_selection`); `penalty_stage(make_hooks)` runs hooks in
                                the library's loop with the growing penalty schedule, or write your own;
  after_removal(ctx)            a post-removal step on the physically pruned model, handed over on the
                                CPU (re-initialisation; a short recovery may move it to `ctx.device`;
                                it may replace `ctx.model`);
  finetune_penalty(model, params) -> scalar tensor   added to every finetuning step's loss;
and declares `params`, the schema of `RunConfig.method_params` (validated, logged, in the prune key).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tpp.pruning.criteria import ScoreInputs
from tpp.pruning.graph import Followers
from tpp.schedules import PenaltySchedule
from tpp.train import Precision, epoch_generator

Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Param:
    """One method parameter: default (its type is the parameter's type), help text with the unit, and
    optional accepted values (`choices`) or bounds (`minimum`/`maximum`, inclusive)."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def accepted(self) -> str:
        if self.choices is not None:
            return " | ".join(map(str, self.choices))
        kind = {bool: "true | false", int: "an integer", float: "a number", str: "a string"}.get(
            type(self.default), type(self.default).__name__)
        bounds = [f">= {self.minimum:g}" if self.minimum is not None else "",
                  f"<= {self.maximum:g}" if self.maximum is not None else ""]
        return " ".join([kind, *[b for b in bounds if b]])

    def check(self, value: Any) -> Any:
        """`value` coerced to the parameter's type, or None if it is not acceptable."""
        kind = type(self.default)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, kind)
        if not ok or (self.choices is not None and value not in self.choices):
            return None
        too_low = self.minimum is not None and value < self.minimum
        if too_low or (self.maximum is not None and value > self.maximum):
            return None
        return value


@dataclass(frozen=True)
class StageResult:
    """What a regularisation stage returns: iterations run, and why the loss became NaN/inf (or None)."""

    iterations: int
    diverged: str | None = None


@dataclass
class PruneContext:
    """What a method's prune-stage hooks see (and may change: `model`, `masks`).

    ratios and groups are keyed by group root (the first pruned layer of each channel group; coupling
    is the mode they were traced in, "none" or "groups"); masks
    are bool over each group's units, True = pruned (None before selection); data is the training
    split (`data.test_batches` is the test set); history collects the stage's per-epoch records.
    """

    cfg: Any  # the run's tpp.config.RunConfig (not imported here: RunConfig validates method names
    #           through this package, so the import would close a circle)
    params: dict[str, Any]
    model: nn.Module
    ratios: dict[str, float]
    groups: dict[str, Followers]
    coupling: str
    data: Any
    device: torch.device
    precision: Precision
    on_event: Callable[[dict[str, Any]], None] | None = None
    masks: Masks | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    _batches: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, init=False, repr=False)
    _schedule: PenaltySchedule | None = field(default=None, init=False, repr=False)

    @property
    def schedule(self) -> PenaltySchedule:
        """The growing penalty schedule of the run's penalty knobs (growth, intervals or epochs, limit): one
        object per stage, so an early stop (`PenaltySchedule.stop_growth`) is seen by every hook."""
        if self._schedule is None:
            self._schedule = self.cfg.penalty_schedule(self.data.num_train)
        return self._schedule

    def emit(self, **event: Any) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def criterion_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed training samples of data-driven criteria: the first `cfg.criterion_samples` of an
        epoch shuffled from the run's seed alone (the same for every method with that seed)."""
        if self._batches is None:
            n, got, out = int(self.cfg.criterion_samples), 0, []
            gen = epoch_generator(self.cfg.seed, "criterion", 0)
            for x, y in self.data.train_batches(min(n, 128), gen, self.device):
                take = min(len(y), n - got)
                out.append((x[:take], y[:take]))
                got += take
                if got >= n:
                    break
            self._batches = out
        return self._batches

    def score_inputs(self) -> ScoreInputs:
        """What a selection criterion scores: the model now, its groups, the fixed samples."""
        return ScoreInputs(self.model, self.groups, self.coupling, self.cfg.seed, self.criterion_batches)


SelectFn = Callable[[PruneContext], Masks]
StageFn = Callable[[PruneContext], StageResult]
AfterRemovalFn = Callable[[PruneContext], None]
FinetunePenaltyFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A pruning method by name: its hooks (all optional) and its parameter schema."""

    name: str
    description: str
    select: SelectFn | None = None
    stage: StageFn | None = None
    stage_before_selection: bool = False
    after_removal: AfterRemovalFn | None = None
    finetune_penalty: FinetunePenaltyFn | None = None
    params: Mapping[str, Param] = field(default_factory=dict)

    @property
    def regularize(self) -> bool:
        """Whether the method has a regularisation stage (so the penalty knobs, growth first, matter)."""
        return self.stage is not None

    def resolve_params(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """The defaults updated by `given`, or a one-line ValueError naming the first bad entry."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            accepted = ", ".join(self.params) or "none"
            raise ValueError(f"method_params: got {unknown[0]!r}, which method {self.name!r} does not take; "
                             f"accepted: {accepted}")
        out = {name: p.default for name, p in self.params.items()}
        for name, value in given.items():
            checked = self.params[name].check(value)
            if checked is None:
                raise ValueError(f"method_params: got {name}={value!r}; accepted: "
                                 f"{self.params[name].accepted()} ({self.params[name].help})")
            out[name] = checked
        return out


class PenaltyHooks:
    """Hooks of the library's regularisation loop (`penalty_stage`); every one is optional.

    factor is the growing penalty factor of the current iteration (0 ... `reg_upper_limit`).
    """

    def loss(self, factor: float) -> torch.Tensor | None:
        """A differentiable term added to the cross-entropy of the step (None: nothing)."""
        return None

    def after_backward(self, factor: float) -> None:
        """Called between backward() and the optimizer step (e.g. to add to gradients)."""

    def after_step(self, iteration: int) -> None:
        """Called after the optimizer step; `iteration` counts the steps done (1-based)."""

    def finish(self) -> None:
        """Called once when the stage ends without diverging."""
