"""The unpruned control of a prune stage: the dense model trained by the stage's own loop for the same
iterations, without penalty or mask. A trainability number after pruning is read against it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tpp.config import RunConfig
from tpp.data import load_data  # noqa: F401 - re-exported? no
from tpp.methods import PenaltyHooks, PruneContext
from tpp.methods.stage import run_penalty_loop
from tpp.results import DenseModel
from tpp.stages import load_run_data, measure_jsv, run_splits, test_batches
from tpp.train import Precision, evaluate_metrics, resolve_device, seed_everything

# with the model, data and dense settings and the iterations: all a control depends on
CONTROL_INPUTS = ("val_fraction", "seed", "reg_lr", "reg_momentum", "reg_weight_decay", "reg_batch_size",
                  "bf16", "jsv_samples")


CONTROL_PREFIX = "control-"  # a control's key starts with it (a prune key is plain hex)


def control_inputs(cfg: RunConfig, iterations: int) -> dict[str, Any]:
    """What the unpruned control of a prune stage of `iterations` iterations depends on: the data, the
    stage's optimizer and batch order (seed), the iterations; not the method, PR or penalty."""
    d = cfg.to_dict()
    return {**cfg.section("model", "data", "dense"), **{k: d[k] for k in CONTROL_INPUTS},
            "iterations": int(iterations)}


def control_key(cfg: RunConfig, dense: DenseModel | str, iterations: int) -> str:
    """The control's share key (as `prune_key`, over `control_inputs` and the dense weights)."""
    h = hashlib.sha256(json.dumps({"control": control_inputs(cfg, iterations)}, sort_keys=True,
                                  default=str).encode())
    h.update((dense if isinstance(dense, str) else dense.digest()).encode())
    return CONTROL_PREFIX + h.hexdigest()[:20]


def train_control(cfg: RunConfig, dense: DenseModel, data=None, iterations: int = 0) -> dict[str, float]:
    """The unpruned control of a prune stage: the dense model trained by the stage's own loop
    (`run_penalty_loop`: same optimizer, LR, batch order) for the same `iterations`, with no penalty and
    no mask. A trainability number after pruning means little without it: on data the model can fit,
    cross-entropy alone keeps scaling the network (and its Jacobian) up, pruned or not. Metrics:
    control_jsv_*, control_acc, control_loss, control_train_acc, control_iterations (0: the dense model)."""
    data = data if data is not None else load_run_data(cfg)
    train, _ = run_splits(cfg, data)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    seed_everything(cfg.seed)
    model = precision.prepare_model(dense.build(), device)
    train_acc = float("nan")
    if iterations:
        ctx = PruneContext(cfg, {}, model, {}, {}, "none", train, device, precision)
        result = run_penalty_loop(ctx, PenaltyHooks(), iterations=int(iterations))  # no penalty, no mask
        train_acc = ctx.history[-1]["train_acc"] if ctx.history else float("nan")
        iterations = result.iterations
    acc, loss = evaluate_metrics(model, test_batches(data, cfg, device), device, precision)
    jsv = measure_jsv(model, data, cfg, device)
    return {"control_acc": acc, "control_loss": loss, "control_train_acc": train_acc,
            "control_iterations": int(iterations), **{f"control_jsv_{k}": v for k, v in jsv.items()}}
