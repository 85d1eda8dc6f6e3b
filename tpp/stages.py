"""What the dense, prune and finetune stages share: the data a run trains on (its validation split made
once), the evaluation batches, the Jacobian-singular-value measurement, training FLOPs, and a member's
accuracy metrics from its history."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

from tpp.config import RunConfig
from tpp.data import load_data
from tpp.metrics import jacobian_singular_values, jsv_summary
from tpp.models import ModelSpec

VAL_SPLIT_SEED = 0  # the held-out samples are the same for every stage and every seed of a study


def model_spec(cfg: RunConfig, data) -> ModelSpec:
    return ModelSpec(cfg.model, data.num_classes, tuple(data.input_shape), dict(cfg.model_kwargs))


def load_run_data(cfg: RunConfig):
    return load_data(cfg.data, root=cfg.data_root, **cfg.data_kwargs)


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_splits(cfg: RunConfig, data) -> tuple[Any, Any | None]:
    """(the samples a run trains on, the validation bundle or None) for `cfg.val_fraction`.

    Every stage trains on the same training part, so the validation samples stay unseen; the split is
    made once per data bundle.
    """
    if not cfg.val_fraction:
        return data, None
    cache = _SPLITS.setdefault(data, {})
    if cfg.val_fraction not in cache:
        cache[cfg.val_fraction] = data.split_validation(cfg.val_fraction, VAL_SPLIT_SEED)
    return cache[cfg.val_fraction]


def measure_jsv(model: nn.Module, data, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Jacobian singular-value summary on the data's fixed evaluation batch (always in float32)."""
    return jsv_summary(jacobian_singular_values(model, data.eval_inputs(cfg.jsv_samples, device)))


def test_batches(data, cfg: RunConfig, device: torch.device):
    return data.test_batches(cfg.eval_batch_size, device)



def train_flops(forward_flops: int, samples: int) -> float:
    """Training FLOPs of `samples` forward + backward passes: the usual 3 x forward estimate."""
    return 3.0 * forward_flops * samples


def history_metrics(history: list[dict[str, Any]], status: str, num_classes: int) -> dict[str, float]:
    """A member's accuracy metrics from its per-epoch history (the epochs a diverged run reached).

    best_acc: the maximum test accuracy over epochs -- the paper's convention, selected on the test
    set; test_acc_at_best_val: the test accuracy at the epoch of the best validation accuracy (the
    honest one, when a validation split exists); last_acc: the last epoch's. Epoch numbers (best_epoch,
    epoch_at_best_val, diverged_epoch) count from 1, as progress lines do (0: diverged before epoch 1).
    """
    finite = [h for h in history if math.isfinite(h["train_loss"])]
    chance = 100.0 / num_classes
    out: dict[str, float] = {"epochs_run": len(history)}
    if status == "diverged":
        out["diverged_epoch"] = history[-1]["epoch"] + 1 if history else 0
    if not finite:
        return {**out, "best_acc": chance, "last_acc": chance}
    best = max(finite, key=lambda h: h["test_acc"])
    out.update(best_acc=best["test_acc"], best_epoch=best["epoch"] + 1, last_acc=finite[-1]["test_acc"])
    if "val_acc" in finite[0]:
        by_val = max(finite, key=lambda h: h["val_acc"])  # the first epoch of the best, as max() keeps
        out.update(val_best_acc=by_val["val_acc"], test_acc_at_best_val=by_val["test_acc"],
                   epoch_at_best_val=by_val["epoch"] + 1)
    return out
