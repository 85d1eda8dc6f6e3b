"""What the stages of a run hand to each other: plain dataclasses of CPU tensors.

They pickle cheaply (Ray's object store moves them between trials and nodes) and save with
`torch.save` as dicts that load with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tpp.models import ModelSpec, build_model


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes: the identity of a set of weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


@dataclass
class DenseModel:
    """A trained unpruned network: its architecture, weights, metrics (e.g. dense_acc) and, when tpp
    trained it, its LR schedule (`tpp.schedules.DenseSchedule.to_dict()`, what LR rewinding replays)."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, Any] | None = None

    def build(self) -> nn.Module:
        model = build_model(self.spec)
        model.load_state_dict(self.state_dict)
        return model

    def digest(self) -> str:
        """The weights' identity (computed once): a prune key names the dense model by it, not by a path."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = self.__dict__["_digest"] = weights_digest(self.state_dict)
        return cached


@dataclass
class PrunedModel:
    """A physically pruned network: the dense architecture plus the filters kept per pruned layer.

    `dense_schedule` is the dense model's (LR rewinding replays it); `diverged` says why the prune
    stage's loss became NaN/inf -- such a result has no weights, and every member of it diverged;
    `history` holds the regularisation stage's epochs (a study logs them once, wherever it ran).
    """

    spec: ModelSpec
    kept: dict[str, list[int]]
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    dense_schedule: dict[str, Any] | None = None
    diverged: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the prune stage's per-epoch records

    def build(self) -> nn.Module:
        """Rebuild the smaller network: build the dense shape, remove the same filters, load weights."""
        from tpp.pruning import rebuild_pruned

        model = rebuild_pruned(build_model(self.spec), self.kept, example_input(self.spec))
        model.load_state_dict(self.state_dict)
        return model


@dataclass
class RunResult:
    """The outcome of one finetune member: "completed" or "diverged" (a NaN/inf loss), with the
    metrics reached, its per-epoch history and (when it ran in this process) the trained model."""

    status: str
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None


def example_input(spec: ModelSpec, batch: int = 1) -> torch.Tensor:
    """A dummy input of the model's per-sample shape (for tracing and FLOP counting)."""
    return torch.zeros(batch, *spec.input_shape)
