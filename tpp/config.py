"""RunConfig: every knob of one pruning run, with the TPP authors' defaults.

It is a flat dataclass so it can be logged as parameters, hashed for prune-stage reuse and
round-tripped through JSON/YAML unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tpp.methods import list_methods
from tpp.schedules import SCHEDULES


@dataclass
class RunConfig:
    # what to prune
    model: str = "mlp7_linear"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_root: str | None = None
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "tpp"
    pr: float = 0.5  # pruning ratio, applied to the model's preset layers
    prune_layers: dict[str, float] | None = None  # explicit glob pattern -> ratio (overrides the preset)
    # prune stage of regularising methods (authors' CIFAR defaults)
    growth: float = 1e-4  # reg_granularity: penalty added every update_reg_interval iterations
    update_reg_interval: int = 10
    reg_upper_limit: float = 1.0
    stabilize_reg_interval: int = 10_000
    lw_opp: float = 1000.0  # weight of the gram term
    reg_lr: float = 1e-3  # constant LR of the regularisation stage
    # finetune
    lr: float = 1e-2
    epochs: int = 120
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs` where a step schedule drops 10x
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # dense model, when none is given
    dense_epochs: int = 30
    dense_lr: float = 0.05  # 0.1 diverges for the deep linear MLP; CIFAR configs set their own
    # run
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = False
    jsv_every: int = 0  # measure the JSV every N finetune epochs (0: only at key points)
    jsv_samples: int = 32
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it accepts."""
        def bad(name: str, accepted: str) -> None:
            raise ValueError(f"{name}: got {getattr(self, name)!r}; accepted: {accepted}")

        if self.method not in list_methods():
            bad("method", ", ".join(list_methods()))
        if not 0.0 <= self.pr < 1.0:
            bad("pr", "a pruning ratio in [0, 1)")
        for name in ("growth", "reg_upper_limit", "lr", "reg_lr", "dense_lr"):
            if not getattr(self, name) > 0:
                bad(name, "a number > 0")
        for name in ("update_reg_interval", "batch_size", "epochs", "jsv_samples", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                bad(name, "an integer >= 1")
        for name in ("stabilize_reg_interval", "dense_epochs", "jsv_every"):
            if int(getattr(self, name)) < 0:
                bad(name, "an integer >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", ", ".join(SCHEDULES))
        if any(not 0 < m < 1 for m in self.milestones):
            bad("milestones", "fractions of the epochs in (0, 1)")
        if self.prune_layers is not None and any(not 0 <= r < 1 for r in self.prune_layers.values()):
            bad("prune_layers", "a mapping of layer patterns to ratios in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown run setting; accepted: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
