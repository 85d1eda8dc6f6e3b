"""One pruning pipeline: dense training -> prune stage -> removal -> finetuning of one or several members.

A *member* is one finetuning configuration (a RunConfig differing from its siblings only in finetune
and I/O fields, `tpp.config`); all members of one pipeline share one pruned model, which is what a
study's trial is. The prune stage depends only on `prune_key` (the prune-stage inputs and the dense
weights), so a study computes it once per key and reuses it. Divergence is handled here and only here:
a dense stage that diverges is an error (`DivergedError`); a prune stage that diverges is a result
(every member "diverged"); a member that diverges ends with the metrics it reached.

Progress leaves through `on_event(dict)`; the library never logs anywhere itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from tpp.config import RunConfig
from tpp.control import control_inputs, control_key, train_control
from tpp.methods import Method, PruneContext, StageResult, get_method, select_by_criterion
from tpp.methods.stage import OVERFIT_ACC
from tpp.metrics import count_flops, count_params, latency_metrics
from tpp.models import build_model, model_prune_preset, resolve_coupling
from tpp.pruning import (
    channel_groups,
    expand_preset,
    kept_indices,
    remove_pruned,
    resolve_layers,
    verify_removal,
    zero_pruned,
)
from tpp.results import DenseModel, PrunedModel, RunResult, cpu_state_dict, example_input
from tpp.schedules import DenseSchedule, finetune_lr
from tpp.stages import (
    history_metrics,
    load_run_data,
    measure_jsv,
    model_spec,
    run_splits,
    test_batches,
    train_flops,
)
from tpp.train import (
    Precision,
    epoch_generator,
    evaluate,
    evaluate_metrics,
    resolve_device,
    seed_everything,
    set_lr,
    sgd,
    train_epoch,
)

EventFn = Callable[[dict[str, Any]], None]


class DivergedError(FloatingPointError):
    """The dense stage produced a NaN/inf loss (prune and finetune divergence are results, not this)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage} stage diverged: {message}")
        self.stage = stage


def _emit(on_event: EventFn | None, **event: Any) -> None:
    if on_event is not None:
        on_event(event)


# ----------------------------------------------------------------------------------------------- dense
def train_dense(cfg: RunConfig, data=None, on_event: EventFn | None = None) -> DenseModel:
    """Train the unpruned network: SGD, cosine LR from `dense_lr` over `dense_epochs` epochs."""
    data = data if data is not None else load_run_data(cfg)
    train, _ = run_splits(cfg, data)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    seed_everything(cfg.seed)
    spec = model_spec(cfg, data)
    model = precision.prepare_model(build_model(spec), device)
    opt = sgd(model, cfg.dense_lr, cfg.dense_momentum, cfg.dense_weight_decay)
    schedule = DenseSchedule("cosine", cfg.dense_lr, cfg.dense_epochs)
    start = time.perf_counter()
    acc, iterations = float("nan"), 0
    for epoch in range(cfg.dense_epochs):
        set_lr(opt, schedule.lr_at(epoch))
        t0 = time.perf_counter()
        batches = train.train_batches(cfg.dense_batch_size, epoch_generator(cfg.seed, "dense", epoch), device)
        stats = train_epoch(model, batches, opt, device, precision)
        iterations += stats.iterations
        if not stats.finite:
            raise DivergedError("dense", f"the loss became NaN/inf at epoch {epoch} "
                                f"(dense_lr={cfg.dense_lr})")
        acc = evaluate(model, test_batches(data, cfg, device), device, precision)
        _emit(on_event, event="epoch", stage="dense", epoch=epoch, epochs=cfg.dense_epochs,
              train_loss=stats.loss, test_acc=acc, lr=opt.param_groups[0]["lr"],
              seconds=time.perf_counter() - t0)
    if cfg.dense_epochs == 0:
        acc = evaluate(model, test_batches(data, cfg, device), device, precision)
    jsv = measure_jsv(model, data, cfg, device)
    flops = count_flops(model, spec.input_shape)
    metrics = {"dense_acc": acc, "time_dense_s": time.perf_counter() - start, "iters_dense": iterations,
               "flops_train_dense": train_flops(flops, iterations * cfg.dense_batch_size),
               **{f"dense_jsv_{k}": v for k, v in jsv.items()}}
    _emit(on_event, event="stage_end", stage="dense", **metrics)
    return DenseModel(spec, cpu_state_dict(model), metrics, schedule.to_dict())


# ----------------------------------------------------------------------------------------------- prune
def prune_key(cfg: RunConfig, dense: DenseModel | str) -> str:
    """Stable hash of everything the prune stage depends on and nothing it does not: the prune-stage
    inputs `RunConfig.prune_inputs()` declares, and the dense weights' digest (not their path; a
    `DenseModel` or its `digest()`)."""
    h = hashlib.sha256(json.dumps(cfg.prune_inputs(), sort_keys=True, default=str).encode())
    h.update((dense if isinstance(dense, str) else dense.digest()).encode())
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
    coupling = resolve_coupling(cfg.coupling, cfg.model)
    return {name: r for name, r in resolve_layers(model, patterns, coupling).items() if r > 0}


def _select(method: Method, ctx: PruneContext) -> dict[str, torch.Tensor]:
    """The method's selection (or the run's criterion), checked: one bool mask per group, none empty."""
    masks = (method.select or select_by_criterion)(ctx)
    for root, group in ctx.groups.items():
        m = masks.get(root)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != (group.units,) or m.all():
            raise ValueError(f"method {method.name!r}: its selection must give {root!r} a bool mask of "
                             f"{group.units} units (True = pruned) that keeps at least one")
    return {root: masks[root].cpu() for root in ctx.groups}


@dataclass
class PruneJob:
    """A prune stage between its selection and its regularisation: what `finish_prune` completes."""

    cfg: RunConfig
    dense: DenseModel
    data: Any
    method: Method
    ctx: PruneContext
    start: float
    params_dense: int
    flops_dense: int
    result: StageResult = field(default_factory=lambda: StageResult(0))

    @property
    def needs_stage(self) -> bool:
        """Whether the method's regularisation stage (after the selection) is still to run."""
        return (self.method.stage is not None and not self.method.stage_before_selection
                and self.result.diverged is None)


def prepare_prune(cfg: RunConfig, dense: DenseModel, data=None, on_event: EventFn | None = None) -> PruneJob:
    """Trace the channel groups and select (after a stage that runs before selection, if any); the
    selection's removal is verified exact on copies right away, before any costly stage."""
    data = data if data is not None else load_run_data(cfg)
    train, _ = run_splits(cfg, data)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    method = get_method(cfg.method)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    model = dense.build()
    coupling = resolve_coupling(cfg.coupling, cfg.model)
    ratios, groups = channel_groups(model, example_input(dense.spec), layer_ratios(cfg, model), coupling)
    params_dense, flops_dense = count_params(model), count_flops(model, dense.spec.input_shape)
    model = precision.prepare_model(model, device)
    ctx = PruneContext(cfg, method.resolve_params(cfg.method_params), model, ratios, groups, coupling, train,
                       device, precision, on_event)
    job = PruneJob(cfg, dense, data, method, ctx, start, params_dense, flops_dense)
    if method.stage is not None and method.stage_before_selection:
        job.result = method.stage(ctx)
    if job.result.diverged is None:
        ctx.masks = _select(method, ctx)
        verify_removal(ctx.model, ctx.masks, groups, data.eval_inputs(8, device))
    return job


def finish_prune(job: PruneJob) -> PrunedModel:
    """Zero, remove physically, run the post-removal step and measure: the PrunedModel of a job whose
    stages ran (`job.result`); a diverged stage gives one with `diverged` set and no weights."""
    cfg, ctx, method, dense, data = job.cfg, job.ctx, job.method, job.dense, job.data
    device, precision, on_event = ctx.device, ctx.precision, ctx.on_event
    iterations, diverged = job.result.iterations, job.result.diverged
    fitted = [h for h in ctx.history if "train_acc" in h]
    fit = {}
    if fitted:  # the stage's own training accuracy: at ~100 % it is in the overfit regime (tpp.methods.stage)
        fit["prune_train_acc"] = fitted[-1]["train_acc"]
        first = next((h["iteration"] for h in fitted if h["train_acc"] >= OVERFIT_ACC), None)
        if first is not None:
            fit["prune_fit_iteration"] = first
    base = {**fit, "prune_iterations": iterations, "iters_prune": iterations,
            "params_dense": job.params_dense,
            "flops_dense": job.flops_dense,
            "flops_train_prune": train_flops(job.flops_dense, iterations * cfg.reg_batch_size),
            "pruned_filters": int(sum(int(m.sum()) for m in (ctx.masks or {}).values()))}
    if diverged is not None:
        metrics = {**base, "time_prune_s": time.perf_counter() - job.start}
        _emit(on_event, event="stage_end", stage="prune", diverged=diverged, **metrics)
        return PrunedModel(dense.spec, {}, {}, metrics, dense.schedule, diverged, ctx.history)
    masks, groups = ctx.masks, ctx.groups
    if method.stage is not None:
        zero_pruned(ctx.model, masks, groups)
    ctx.model = remove_pruned(ctx.model.to("cpu").to(memory_format=torch.contiguous_format), masks, groups)
    if method.after_removal is not None:
        method.after_removal(ctx)
    model = precision.prepare_model(ctx.model, device)
    params, flops = count_params(model), count_flops(model, dense.spec.input_shape)
    acc, loss = evaluate_metrics(model, test_batches(data, cfg, device), device, precision)
    jsv = measure_jsv(model, data, cfg, device)
    metrics = {
        **base, "acc_after_removal": acc, "loss_after_removal": loss, "params": params, "flops": flops,
        "speedup": job.flops_dense / max(flops, 1), "param_ratio": job.params_dense / max(params, 1),
        "time_prune_s": time.perf_counter() - job.start,
        **{f"jsv_after_removal_{k}": v for k, v in jsv.items()},
    }
    _emit(on_event, event="stage_end", stage="prune", **metrics)
    return PrunedModel(dense.spec, kept_indices(masks), cpu_state_dict(model), metrics, dense.schedule,
                       None, ctx.history)


def prune_stage(cfg: RunConfig, dense: DenseModel, data=None, on_event: EventFn | None = None) -> PrunedModel:
    """Trace the channel groups, run the method's stages around the selection, remove physically.

    The method's hooks (`tpp.methods`): an optional regularisation stage before or after the
    selection (by default the run's criterion on the dense weights; its removal is verified exact on
    copies right away: the zeroed and the removed model compute the same outputs), the removal,
    then an optional post-removal step. A stage whose loss becomes NaN/inf gives a PrunedModel with
    `diverged` set (and no weights). `tpp.lockstep.prune_lockstep` runs several jobs' stages at once.
    """
    job = prepare_prune(cfg, dense, data, on_event)
    if job.needs_stage:
        job.result = job.method.stage(job.ctx)
    return finish_prune(job)


def prune_stages(cfgs: Sequence[RunConfig], dense: DenseModel, data=None, lockstep: bool | str = "auto",
                 on_event: Callable[[int], EventFn | None] | None = None) -> list[PrunedModel]:
    """The pruned models of several prune configs of one dense model: their regularisation stages in
    lockstep (`tpp.lockstep.prune_lockstep`, one vectorised model) when `lockstep` (True, or "auto" and
    `tpp.lockstep.lockstep_refusal` has no objection) and every stage is the library's filter penalty,
    else one after another. `on_event(i)`: stage i's event callback."""
    from tpp.lockstep import lockstep_prune_supported, prune_lockstep, use_lockstep

    data = data if data is not None else load_run_data(cfgs[0])
    jobs = [prepare_prune(rc, dense, data, on_event(i) if on_event else None) for i, rc in enumerate(cfgs)]
    if len(jobs) > 1:
        lockstep, why = use_lockstep(lockstep, jobs[0].ctx.model, jobs[0].ctx.device)
        if why:
            _emit(jobs[0].ctx.on_event, event="notice", message=f"lockstep: {why}")
    if lockstep and len(jobs) > 1 and all(lockstep_prune_supported(j) for j in jobs):
        prune_lockstep(jobs)
    else:
        for job in jobs:
            if job.needs_stage:
                job.result = job.method.stage(job.ctx)
    return [finish_prune(job) for job in jobs]


# --------------------------------------------------------------------------------------------- control


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
    train, val = run_splits(cfg, data)
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    dense_schedule = DenseSchedule(**pruned.dense_schedule) if pruned.dense_schedule else None
    seed_everything(cfg.seed)
    model = precision.prepare_model(pruned.build(), device)
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    method = get_method(cfg.method)  # its finetuning penalty (e.g. L1 + KernOrth), if it declares one
    penalty, params = method.finetune_penalty, method.resolve_params(cfg.method_params)
    extra_loss = (lambda: penalty(model, params)) if penalty is not None else None
    history, start_epoch, elapsed, iterations = [], 0, 0.0, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        history = list(resume_state["history"])
        start_epoch, elapsed = resume_state["epoch"] + 1, resume_state.get("elapsed_s", 0.0)
        iterations = resume_state.get("iterations", 0)
        torch.set_rng_state(resume_state["torch_rng"])
    t0 = time.perf_counter() - elapsed
    last_checkpoint = time.perf_counter()
    status = "completed"
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        lr = finetune_lr(cfg.schedule, cfg.lr, epoch, cfg.epochs, cfg.milestones, cfg.warmup_epochs,
                         dense_schedule)
        set_lr(opt, lr)
        batches = train.train_batches(cfg.batch_size, epoch_generator(cfg.seed, "finetune", epoch), device)
        stats = train_epoch(model, batches, opt, device, precision, extra_loss)
        iterations += stats.iterations
        record: dict[str, Any] = {"epoch": epoch, "train_loss": stats.loss, "lr": lr}
        record["test_acc"] = evaluate(model, test_batches(data, cfg, device), device, precision)
        if val is not None:
            record["val_acc"] = evaluate(model, test_batches(val, cfg, device), device, precision)
        if not stats.finite:
            status = "diverged"
        elif cfg.jsv_every and (epoch + 1) % cfg.jsv_every == 0:
            record["jsv_mean"] = measure_jsv(model, data, cfg, device)["mean"]
        history.append(record)
        event = {"event": "epoch", "stage": "finetune", "epochs": cfg.epochs,
                 "seconds": time.perf_counter() - t_epoch, **record}
        if (status == "completed" and checkpoint_every and (epoch + 1) % checkpoint_every == 0
                and time.perf_counter() - last_checkpoint >= checkpoint_min_interval_s):
            last_checkpoint = time.perf_counter()
            event["checkpoint"] = {
                "epoch": epoch, "model": cpu_state_dict(model), "optimizer": opt.state_dict(),
                "history": history, "elapsed_s": time.perf_counter() - t0, "iterations": iterations,
                "torch_rng": torch.get_rng_state(),
            }
        _emit(on_event, **event)
        if status == "diverged":
            break
    metrics = history_metrics(history, status, data.num_classes)
    flops = train_flops(pruned.metrics.get("flops", 0), iterations * cfg.batch_size)
    metrics.update(iters_finetune=iterations, time_finetune_s=time.perf_counter() - t0,
                   flops_train_finetune=flops)
    if resume_state is not None:  # a retried or resumed run: where it picked up
        metrics["resumed_from_epoch"] = resume_state["epoch"]
    if status == "completed":
        metrics.update({f"final_jsv_{k}": v for k, v in measure_jsv(model, data, cfg, device).items()})
    _emit(on_event, event="stage_end", stage="finetune", status=status, **metrics)
    return RunResult(status, metrics, history, model)


# -------------------------------------------------------------------------------------------- pipeline
class PrunedStore(Protocol):
    """Where a pipeline gets a pruned model it may share (a study's cache); `how` is computed|reused.

    `inputs` are the prune-stage settings the key hashes (a store keeps them to verify what it holds).
    """

    def get_or_compute(self, key: str, inputs: dict[str, Any],
                       compute: Callable[[], PrunedModel]) -> tuple[PrunedModel, str]: ...


@dataclass
class PipelineResult:
    """One pipeline: the dense and pruned models and one RunResult per member (None: skipped)."""

    dense: DenseModel
    pruned: PrunedModel
    members: list[RunResult | None]
    reuse: str = "computed"  # computed | reused (from a PrunedStore) | given (pruned= was passed)
    extra: dict[str, Any] = field(default_factory=dict)


def check_members(members: Sequence[RunConfig]) -> list[RunConfig]:
    """The members as a list, or a ValueError naming the first prune-stage setting where they differ."""
    members = list(members)
    if not members:
        raise ValueError("members: a pipeline needs at least one finetune configuration")
    first = members[0].prune_inputs()
    for i, m in enumerate(members[1:], 1):
        other = m.prune_inputs()
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise ValueError(f"members[{i}]: members share one pruned model, so they may differ in "
                             f"finetune and I/O settings only; it differs in {', '.join(diff)}")
    return members


def diverged_prune_result(pruned: PrunedModel, num_classes: int) -> RunResult:
    """What every member of a diverged prune stage records: chance accuracy, a usable searcher value."""
    chance = 100.0 / num_classes
    return RunResult("diverged", {"best_acc": chance, "last_acc": chance, "epochs_run": 0,
                                  "diverged_stage_prune": 1.0}, [{"error": pruned.diverged}])


def measured_speed(cfg: RunConfig, dense: DenseModel, pruned: PrunedModel) -> dict[str, float]:
    """The pruned model's measured latency next to the dense one's, on the run's device, at batch 1 and
    at the finetuning batch size (tpp.metrics.latency_metrics); nothing for a diverged prune stage."""
    if pruned.diverged:
        return {}
    device, precision = resolve_device(cfg.device), Precision(cfg.bf16, cfg.channels_last)
    with precision.autocast(device):
        return latency_metrics(precision.prepare_model(dense.build(), device),
                               precision.prepare_model(pruned.build(), device), dense.spec.input_shape,
                               cfg.batch_size, device)


def member_metrics(dense: DenseModel, pruned: PrunedModel, result: RunResult,
                   speed: dict[str, float] | None = None,
                   control: dict[str, float] | None = None) -> dict[str, float]:
    """Every stage's metrics of one member, merged, with its budget totals (prune + finetune), the
    measured speed (`measured_speed`) of its pruned model, and its unpruned control's metrics with
    jsv_retained = JSV mean after removal / the control's (`train_control`)."""
    merged = {**dense.metrics, **pruned.metrics, **(speed or {}), **(control or {}), **result.metrics}
    if control and merged.get("jsv_after_removal_mean") is not None and control.get("control_jsv_mean"):
        merged["jsv_retained"] = merged["jsv_after_removal_mean"] / control["control_jsv_mean"]
    for what in ("iters", "flops_train"):
        merged[f"{what}_total"] = merged.get(f"{what}_prune", 0) + merged.get(f"{what}_finetune", 0)
    return merged


def pipeline_control(cfg: RunConfig, dense: DenseModel, pruned: PrunedModel, data,
                     store: PrunedStore | None) -> dict[str, float]:
    """The unpruned control of a pipeline's prune stage (when `cfg.control`; none for a diverged stage):
    shared through `store` like a prune stage, so one is trained per (dense model, schedule, seed)."""
    if not cfg.control or pruned.diverged:
        return {}
    iterations = int(pruned.metrics.get("prune_iterations", 0))

    def compute() -> dict[str, float]:
        return train_control(cfg, dense, data, iterations)

    if store is None or not iterations:
        return compute()
    control, _ = store.get_or_compute(control_key(cfg, dense, iterations), control_inputs(cfg, iterations),
                                      compute)
    return control


def run_pipeline(members: RunConfig | Sequence[RunConfig], *, dense: DenseModel | None = None,
                 pruned: PrunedModel | None = None, store: PrunedStore | None = None, data=None,
                 on_event: EventFn | None = None, skip: Sequence[int] = (),
                 resume_state: dict[str, Any] | None = None, checkpoint_every: int = 1,
                 checkpoint_min_interval_s: float = 0.0, lockstep: bool | str = "auto",
                 lockstep_members: int | None = None) -> PipelineResult:
    """Dense (trained unless given) -> prune stage (given, from `store`, or computed) -> finetuning of
    every member not in `skip`. Events of a member carry `member` (its index); a `pruned` event (with
    the prune stage's `history`) comes before the first member starts, a `member_end` after each.

    With `lockstep` (True; "auto": unless `tpp.lockstep.lockstep_refusal` objects, i.e. on a CPU only
    models with a batched `stacked_forward`), members that share their mini-batches
    (`tpp.lockstep.lockstep_groups`, at most `lockstep_members` at once, default tpp.lockstep.MAX_MEMBERS)
    train as one vectorised model;
    a model vmap cannot run falls back to one by one (a `notice` event says so, as does "auto").
    Checkpoint events carry {"group": member indices, "done": {index: metrics}, "state": the group's
    state}; passing one back as `resume_state` skips the done
    members and continues that group exactly. Each returned RunResult's metrics hold every stage's
    metrics (`member_metrics`).
    """
    from tpp.lockstep import (
        MAX_MEMBERS,
        LockstepUnsupported,
        finetune_lockstep,
        lockstep_groups,
        use_lockstep,
    )

    lockstep_members = lockstep_members or MAX_MEMBERS
    members = check_members([members] if isinstance(members, RunConfig) else members)
    cfg = members[0]
    data = data if data is not None else load_run_data(cfg)
    dense = dense if dense is not None else train_dense(cfg, data, on_event)
    reuse = "given"
    if pruned is None:
        if store is not None and get_method(cfg.method).regularize:
            pruned, reuse = store.get_or_compute(prune_key(cfg, dense), cfg.prune_inputs(),
                                                 lambda: prune_stage(cfg, dense, data, on_event))
        else:
            pruned, reuse = prune_stage(cfg, dense, data, on_event), "computed"
    _emit(on_event, event="pruned", reuse=reuse, history=pruned.history, diverged=pruned.diverged)
    results: list[RunResult | None] = [None] * len(members)
    done = dict((resume_state or {}).get("done", {}))
    todo_any = len(done) < len(members) - len(skip)
    speed = measured_speed(cfg, dense, pruned) if todo_any else {}
    control = pipeline_control(cfg, dense, pruned, data, store) if todo_any else {}

    def finish(i: int, result: RunResult) -> None:
        result.metrics = member_metrics(dense, pruned, result, speed, control)
        results[i] = result
        done[i] = {"status": result.status, "metrics": result.metrics}
        _emit(on_event, event="member_end", member=i, status=result.status, metrics=result.metrics)

    for i in done:
        results[i] = RunResult(done[i]["status"], done[i]["metrics"], [])
    todo = [i for i in range(len(members)) if i not in skip and i not in done]
    if pruned.diverged:
        for i in todo:
            finish(i, diverged_prune_result(pruned, data.num_classes))
        return PipelineResult(dense, pruned, results, reuse)
    if len(todo) > 1:
        lockstep, why = use_lockstep(lockstep, pruned.build(), resolve_device(cfg.device))
        if why:
            _emit(on_event, event="notice", message=f"lockstep: {why}; {len(todo)} members train one by one")
    if lockstep and get_method(cfg.method).finetune_penalty is not None:
        lockstep = False  # its penalty is a function of one live model: members train one by one
        _emit(on_event, event="notice", message=f"lockstep: method {cfg.method!r} adds a finetuning penalty; "
              "its members train one by one")
    groups = [g[j:j + lockstep_members] for g in lockstep_groups([members[i] for i in todo])
              for j in range(0, len(g), lockstep_members)] if lockstep else [[k] for k in range(len(todo))]
    groups = [[todo[k] for k in g] for g in groups]
    if resume_state and "group" in resume_state:  # the interrupted group first, exactly as it was
        resumed = list(resume_state["group"])
        groups = [resumed] + [[i for i in g if i not in resumed] for g in groups]
    for g in filter(None, groups):
        state = resume_state["state"] if resume_state and resume_state.get("group") == g else None

        def tagged(event: dict[str, Any], g: list[int] = g) -> None:
            event = dict(event)
            if "member" in event:
                event["member"] = g[event["member"]]
            if "checkpoint" in event:
                event["checkpoint"] = {"group": list(g), "done": dict(done), "state": event["checkpoint"]}
            _emit(on_event, **event)

        if len(g) > 1 or (state is not None and state.get("lockstep")):
            try:
                finetune_lockstep([members[i] for i in g], pruned, data, tagged,
                                  lambda pos, result, g=g: finish(g[pos], result), resume_state=state,
                                  checkpoint_every=checkpoint_every,
                                  checkpoint_min_interval_s=checkpoint_min_interval_s)
                continue
            except LockstepUnsupported as e:
                _emit(on_event, event="notice", message=f"lockstep: {members[0].model} cannot be vectorised "
                      f"({e}); training its {len(g)} members one by one")
                state = None
        for i in g:
            if i in done:
                continue
            result = finetune_stage(members[i], pruned, data, lambda e, i=i: tagged({**e, "member": 0}, [i]),
                                    resume_state=state, checkpoint_every=checkpoint_every,
                                    checkpoint_min_interval_s=checkpoint_min_interval_s)
            state = None
            finish(i, result)
    return PipelineResult(dense, pruned, results, reuse)
