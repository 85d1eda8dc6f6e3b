"""Saving and loading dense models, pruned models and resumable run states.

Everything is a dict of tensors and primitives so it loads with `torch.load(weights_only=True)`:
a checkpoint from elsewhere can never execute code on load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from tpp.models import ModelSpec
from tpp.results import DenseModel, PrunedModel

DENSE_FORMAT = "tpp-dense/1"
PRUNED_FORMAT = "tpp-pruned/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or for another architecture."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a torch file
        raise CheckpointError(f"{what}: cannot read {path} as a checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: {path} is not a tpp checkpoint")
    return obj


def save_dense(path: str | Path, dense: DenseModel) -> None:
    atomic_save({"format": DENSE_FORMAT, "spec": dense.spec.to_dict(), "state_dict": dense.state_dict,
                 "metrics": dict(dense.metrics), "schedule": dense.schedule}, path)


def load_dense(path: str | Path, expected: ModelSpec | None = None) -> DenseModel:
    """Load a dense checkpoint; with `expected`, refuse one made for another architecture.

    A bare state_dict (e.g. from the authors' code or torchvision) is accepted when `expected` says
    what to build.
    """
    obj = _load(path, "dense checkpoint")
    if obj.get("format") == DENSE_FORMAT:
        spec = ModelSpec.from_dict(obj["spec"])
        state, metrics, schedule = obj["state_dict"], obj.get("metrics", {}), obj.get("schedule")
    elif expected is not None and all(isinstance(v, torch.Tensor) for v in obj.values()):
        spec, state, metrics, schedule = expected, obj, {}, None
    else:
        raise CheckpointError(f"dense checkpoint: {path} is neither a tpp dense checkpoint nor a state_dict")
    if expected is not None and spec != expected:
        raise CheckpointError(
            f"dense checkpoint: {path} holds {spec.name} for {spec.num_classes} classes and input "
            f"{tuple(spec.input_shape)}, but the run needs {expected.name} "
            f"for {expected.num_classes} classes "
            f"and input {tuple(expected.input_shape)}")
    dense = DenseModel(spec, state, metrics, schedule)
    try:
        dense.build()
    except Exception as e:
        raise CheckpointError(f"dense checkpoint: {path} does not fit {spec.name}: {e}") from e
    return dense


def pruned_to_dict(pruned: PrunedModel) -> dict[str, Any]:
    """A pruned model as plain tensors and primitives (what `save_pruned` writes)."""
    return {"format": PRUNED_FORMAT, "spec": pruned.spec.to_dict(), "kept": pruned.kept,
            "state_dict": pruned.state_dict, "metrics": dict(pruned.metrics),
            "dense_schedule": pruned.dense_schedule, "diverged": pruned.diverged, "history": pruned.history}


def pruned_from_dict(obj: dict[str, Any], where: str = "pruned checkpoint") -> PrunedModel:
    if not isinstance(obj, dict) or obj.get("format") != PRUNED_FORMAT:
        raise CheckpointError(f"{where} is not a tpp pruned-model checkpoint")
    return PrunedModel(ModelSpec.from_dict(obj["spec"]), {k: list(v) for k, v in obj["kept"].items()},
                       obj["state_dict"], obj.get("metrics", {}), obj.get("dense_schedule"),
                       obj.get("diverged"), list(obj.get("history", [])))


def save_pruned(path: str | Path, pruned: PrunedModel) -> None:
    atomic_save(pruned_to_dict(pruned), path)


def load_pruned(path: str | Path) -> PrunedModel:
    return pruned_from_dict(_load(path, "pruned checkpoint"), str(path))


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Save a resumable run state (the `checkpoint` dict of a finetune epoch event)."""
    atomic_save(state, path)


def load_state(path: str | Path) -> dict[str, Any]:
    return _load(path, "run state")
