"""What the stages of a run hand to each other: plain dataclasses of CPU tensors.

They pickle cheaply (Ray's object store moves them between trials and nodes) and save with
`torch.save` as dicts that load with `weights_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tpp.models import ModelSpec, build_model


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class DenseModel:
    """A trained unpruned network: its architecture, weights and metrics (e.g. dense_acc)."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)

    def build(self) -> nn.Module:
        model = build_model(self.spec)
        model.load_state_dict(self.state_dict)
        return model


@dataclass
class PrunedModel:
    """A physically pruned network: the dense architecture plus the filters kept per pruned layer."""

    spec: ModelSpec
    kept: dict[str, list[int]]
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """Rebuild the smaller network: build the dense shape, remove the same filters, load weights."""
        from tpp.pruning import rebuild_pruned

        model = rebuild_pruned(build_model(self.spec), self.kept, example_input(self.spec))
        model.load_state_dict(self.state_dict)
        return model


@dataclass
class RunResult:
    """The outcome of a run: "completed" or "diverged" (a NaN/inf loss), with the metrics reached."""

    status: str
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None


def example_input(spec: ModelSpec, batch: int = 1) -> torch.Tensor:
    """A dummy input of the model's per-sample shape (for tracing and FLOP counting)."""
    return torch.zeros(batch, *spec.input_shape)
