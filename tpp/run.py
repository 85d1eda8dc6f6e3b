"""One pruning run, as three stages: dense training, the prune stage, finetuning.

The prune stage depends only on (model, data, method, ratios, penalty knobs, seed, dense weights), not
on the finetuning LR — `prune_key` hashes exactly those inputs so a study can compute it once and
reuse it for every LR. Progress leaves through `on_event(dict)`; the library never logs anywhere itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tpp.config import RunConfig
from tpp.data import load_data
from tpp.methods import get_method
from tpp.metrics import count_flops, count_params, jacobian_singular_values, jsv_summary
from tpp.models import ModelSpec, build_model, model_prune_preset
from tpp.pruning import (
    PruneRegularizer,
    expand_preset,
    find_followers,
    kept_indices,
    orthp_reinit,
    remove_pruned,
    resolve_layers,
    select_l1,
    zero_pruned,
)
from tpp.results import DenseModel, PrunedModel, RunResult, cpu_state_dict, example_input
from tpp.schedules import PenaltySchedule, finetune_lr
from tpp.train import (
    Precision,
    epoch_generator,
    evaluate,
    resolve_device,
    seed_everything,
    set_lr,
    sgd,
    train_epoch,
)

EventFn = Callable[[dict[str, Any]], None]

# RunConfig fields that change what the prune stage produces (everything else is finetuning or I/O).
PRUNE_FIELDS = ("model", "model_kwargs", "data", "data_kwargs", "method", "pr", "prune_layers", "growth",
                "update_reg_interval", "reg_upper_limit", "stabilize_reg_interval", "lw_opp", "reg_lr",
                "batch_size", "momentum", "weight_decay", "seed")
REG_ONLY_FIELDS = ("growth", "update_reg_interval", "reg_upper_limit", "stabilize_reg_interval", "lw_opp",
                   "reg_lr", "batch_size", "momentum", "weight_decay")


class DivergedError(FloatingPointError):
    """A stage before finetuning produced a NaN/inf loss (finetuning divergence is a status, not this)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage} stage diverged: {message}")
        self.stage = stage


def _emit(on_event: EventFn | None, **event: Any) -> None:
    if on_event is not None:
        on_event(event)


def model_spec(cfg: RunConfig, data) -> ModelSpec:
    return ModelSpec(cfg.model, data.num_classes, tuple(data.input_shape), dict(cfg.model_kwargs))


def load_run_data(cfg: RunConfig):
    return load_data(cfg.data, root=cfg.data_root, **cfg.data_kwargs)


def measure_jsv(model: nn.Module, data, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Jacobian singular-value summary on the data's fixed evaluation batch (always in float32)."""
    return jsv_summary(jacobian_singular_values(model, data.eval_inputs(cfg.jsv_samples, device)))


def _test_batches(data, cfg: RunConfig, device: torch.device):
    return data.test_batches(cfg.eval_batch_size, device)


# ----------------------------------------------------------------------------------------------- dense
def train_dense(cfg: RunConfig, data=None, on_event: EventFn | None = None) -> DenseModel:
    """Train the unpruned network: SGD, cosine LR from `dense_lr` over `dense_epochs` epochs."""
    data = data if data is not None else load_run_data(cfg)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    seed_everything(cfg.seed)
    spec = model_spec(cfg, data)
    model = precision.prepare_model(build_model(spec), device)
    opt = sgd(model, cfg.dense_lr, cfg.momentum, cfg.weight_decay)
    start = time.perf_counter()
    acc = float("nan")
    for epoch in range(cfg.dense_epochs):
        set_lr(opt, finetune_lr("cosine", cfg.dense_lr, epoch, cfg.dense_epochs, ()))
        batches = data.train_batches(cfg.batch_size, epoch_generator(cfg.seed, "dense", epoch), device)
        stats = train_epoch(model, batches, opt, device, precision)
        if not stats.finite:
            raise DivergedError("dense", f"the loss became NaN/inf at epoch {epoch} "
                                f"(dense_lr={cfg.dense_lr})")
        acc = evaluate(model, _test_batches(data, cfg, device), device, precision)
        _emit(on_event, event="epoch", stage="dense", epoch=epoch, train_loss=stats.loss, test_acc=acc,
              lr=opt.param_groups[0]["lr"])
    if cfg.dense_epochs == 0:
        acc = evaluate(model, _test_batches(data, cfg, device), device, precision)
    jsv = measure_jsv(model, data, cfg, device)
    metrics = {"dense_acc": acc, "time_dense_s": time.perf_counter() - start,
               **{f"dense_jsv_{k}": v for k, v in jsv.items()}}
    _emit(on_event, event="stage_end", stage="dense", **metrics)
    return DenseModel(spec, cpu_state_dict(model), metrics)


# ----------------------------------------------------------------------------------------------- prune
def prune_key(cfg: RunConfig, dense: DenseModel) -> str:
    """Stable hash of everything the prune stage depends on (and nothing it does not)."""
    fields = PRUNE_FIELDS if get_method(cfg.method).regularize else tuple(
        f for f in PRUNE_FIELDS if f not in REG_ONLY_FIELDS)
    d = cfg.to_dict()
    h = hashlib.sha256(json.dumps({f: d[f] for f in fields}, sort_keys=True, default=str).encode())
    for name in sorted(dense.state_dict):
        t = dense.state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:20]


def layer_ratios(cfg: RunConfig, model: nn.Module) -> dict[str, float]:
    """{module name: ratio} from the explicit `prune_layers` or the model's preset at `pr`."""
    if cfg.prune_layers is not None:
        patterns = dict(cfg.prune_layers)
    else:
        preset = model_prune_preset(cfg.model, **cfg.model_kwargs)
        if not preset:
            raise ValueError(f"prune_layers: model {cfg.model!r} has no pruning preset; give prune_layers "
                             "as {glob pattern: ratio}")
        patterns = expand_preset(preset, cfg.pr)
    return {name: r for name, r in resolve_layers(model, patterns).items() if r > 0}


def _regularize(cfg: RunConfig, model: nn.Module, masks, followers, data, device, precision,
                on_event: EventFn | None) -> int:
    """The growing-penalty stage; ends with every pruned filter hard-zeroed. Returns iterations run."""
    method = get_method(cfg.method)
    reg = PruneRegularizer(model, masks, followers, gram=method.gram, bn=method.bn, target=method.target,
                           lw=cfg.lw_opp)
    schedule = PenaltySchedule(cfg.growth, cfg.update_reg_interval, cfg.reg_upper_limit,
                               cfg.stabilize_reg_interval)
    zero_plan = sorted(zip(schedule.zeroing_iterations(len(masks)), list(masks), strict=True))
    opt = sgd(model, cfg.reg_lr, cfg.momentum, cfg.weight_decay)
    state = {"it": 0, "factor": 0.0}

    def extra_loss() -> torch.Tensor:
        state["factor"] = schedule.factor(state["it"])
        return reg.loss(state["factor"])

    def after_backward() -> None:
        reg.add_l2_grads(state["factor"])

    def after_step() -> None:
        state["it"] += 1
        while zero_plan and zero_plan[0][0] < state["it"]:
            reg.zero_layer(zero_plan.pop(0)[1])
        reg.reapply_zeros()

    epoch = 0
    while state["it"] < schedule.total_iters:
        batches = data.train_batches(cfg.batch_size, epoch_generator(cfg.seed, "prune", epoch), device)
        stats = train_epoch(model, batches, opt, device, precision, extra_loss, after_backward, after_step,
                            max_iterations=schedule.total_iters - state["it"])
        acc = evaluate(model, _test_batches(data, cfg, device), device, precision)
        _emit(on_event, event="epoch", stage="prune", epoch=epoch, train_loss=stats.loss, test_acc=acc,
              lr=cfg.reg_lr, reg=state["factor"], iteration=state["it"])
        if not stats.finite:
            raise DivergedError("prune", f"the regularisation loss became NaN/inf at iteration {state['it']} "
                                f"(reg_lr={cfg.reg_lr}, lw_opp={cfg.lw_opp}, growth={cfg.growth})")
        epoch += 1
    reg.zero_all()
    return state["it"]


def _reinit_scratch(model: nn.Module, seed: int) -> None:
    """Random re-initialisation of the pruned architecture (the Scratch baseline)."""
    torch.manual_seed(seed + 7919)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


def prune_stage(cfg: RunConfig, dense: DenseModel, data=None, on_event: EventFn | None = None) -> PrunedModel:
    """Select filters on the dense weights, run the method's regulariser, remove filters physically."""
    data = data if data is not None else load_run_data(cfg)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    method = get_method(cfg.method)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    model = dense.build()
    ratios = layer_ratios(cfg, model)
    masks = select_l1(model, ratios)
    followers = find_followers(model, example_input(dense.spec), list(masks))
    params_dense, flops_dense = count_params(model), count_flops(model, dense.spec.input_shape)
    model = precision.prepare_model(model, device)
    iterations = 0
    if method.regularize:
        iterations = _regularize(cfg, model, masks, followers, data, device, precision, on_event)
        zero_pruned(model, masks, followers)
    model = remove_pruned(model.to("cpu").to(memory_format=torch.contiguous_format), masks, followers)
    if method.reinit == "orthp":
        orthp_reinit(model)
    elif method.reinit == "scratch":
        _reinit_scratch(model, cfg.seed)
    model = precision.prepare_model(model, device)
    params, flops = count_params(model), count_flops(model, dense.spec.input_shape)
    acc = evaluate(model, _test_batches(data, cfg, device), device, precision)
    jsv = measure_jsv(model, data, cfg, device)
    metrics = {
        "acc_after_removal": acc, "params": params, "flops": flops, "params_dense": params_dense,
        "flops_dense": flops_dense, "speedup": flops_dense / max(flops, 1),
        "param_ratio": params_dense / max(params, 1), "prune_iterations": iterations,
        "pruned_filters": int(sum(int(m.sum()) for m in masks.values())),
        "time_prune_s": time.perf_counter() - start,
        **{f"jsv_after_removal_{k}": v for k, v in jsv.items()},
    }
    _emit(on_event, event="stage_end", stage="prune", **metrics)
    return PrunedModel(dense.spec, kept_indices(masks), cpu_state_dict(model), metrics)


# -------------------------------------------------------------------------------------------- finetune
def finetune_stage(cfg: RunConfig, pruned: PrunedModel, data=None, on_event: EventFn | None = None,
                   resume_state: dict[str, Any] | None = None, checkpoint_every: int = 1,
                   checkpoint_min_interval_s: float = 0.0) -> RunResult:
    """Finetune the pruned network with a fresh SGD and the configured LR schedule.

    Every `checkpoint_every` epochs the epoch event carries `checkpoint`, a resumable state, unless the
    last one was taken less than `checkpoint_min_interval_s` seconds ago (short epochs are cheaper to
    redo than to save); passing it back as `resume_state` continues exactly where it was taken. A
    non-finite loss ends the run with status "diverged" and the metrics reached so far.
    """
    data = data if data is not None else load_run_data(cfg)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    seed_everything(cfg.seed)
    model = precision.prepare_model(pruned.build(), device)
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    best, history, start_epoch, elapsed = -math.inf, [], 0, 0.0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        best, history = resume_state["best_acc"], list(resume_state["history"])
        start_epoch, elapsed = resume_state["epoch"] + 1, resume_state.get("elapsed_s", 0.0)
        torch.set_rng_state(resume_state["torch_rng"])
    t0 = time.perf_counter() - elapsed
    last_checkpoint = time.perf_counter()
    status = "completed"
    for epoch in range(start_epoch, cfg.epochs):
        lr = finetune_lr(cfg.schedule, cfg.lr, epoch, cfg.epochs, cfg.milestones)
        set_lr(opt, lr)
        batches = data.train_batches(cfg.batch_size, epoch_generator(cfg.seed, "finetune", epoch), device)
        stats = train_epoch(model, batches, opt, device, precision)
        acc = evaluate(model, _test_batches(data, cfg, device), device, precision)
        record: dict[str, Any] = {"epoch": epoch, "train_loss": stats.loss, "test_acc": acc, "lr": lr}
        if not stats.finite:
            status = "diverged"
        else:
            best = max(best, acc)
            if cfg.jsv_every and (epoch + 1) % cfg.jsv_every == 0:
                record["jsv_mean"] = measure_jsv(model, data, cfg, device)["mean"]
        history.append(record)
        event = {"event": "epoch", "stage": "finetune", **record}
        if (status == "completed" and checkpoint_every and (epoch + 1) % checkpoint_every == 0
                and time.perf_counter() - last_checkpoint >= checkpoint_min_interval_s):
            last_checkpoint = time.perf_counter()
            event["checkpoint"] = {
                "epoch": epoch, "model": cpu_state_dict(model), "optimizer": opt.state_dict(),
                "best_acc": best, "history": history, "elapsed_s": time.perf_counter() - t0,
                "torch_rng": torch.get_rng_state(),
            }
        _emit(on_event, **event)
        if status == "diverged":
            break
    last = history[-1]["test_acc"] if history else float("nan")
    metrics = {"best_acc": best if best > -math.inf else last, "last_acc": last,
               "epochs_run": len(history), "time_finetune_s": time.perf_counter() - t0}
    if status == "completed":
        metrics.update({f"final_jsv_{k}": v for k, v in measure_jsv(model, data, cfg, device).items()})
    _emit(on_event, event="stage_end", stage="finetune", status=status, **metrics)
    return RunResult(status, metrics, history, model)


def run_experiment(cfg: RunConfig, dense: DenseModel | None = None, on_event: EventFn | None = None,
                   data=None) -> RunResult:
    """Dense (trained unless given) -> prune stage -> finetune, with every stage's metrics merged.

    A prune stage that diverges gives status "diverged" (the dense model itself diverging is an error).
    """
    data = data if data is not None else load_run_data(cfg)
    dense = dense if dense is not None else train_dense(cfg, data, on_event)
    try:
        pruned = prune_stage(cfg, dense, data, on_event)
    except DivergedError as e:
        chance = 100.0 / data.num_classes  # what a collapsed network scores; a usable value for searchers
        return RunResult("diverged", {**dense.metrics, "best_acc": chance, "last_acc": chance},
                         [{"error": str(e)}])
    result = finetune_stage(cfg, pruned, data, on_event)
    result.metrics = {**dense.metrics, **pruned.metrics, **result.metrics}
    return result
