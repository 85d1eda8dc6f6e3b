"""The Tune trial: one tpp run (prune stage, reused when possible, then finetuning), reported per epoch.

Runs inside a Ray worker, possibly on another node: it never talks to MLflow (the driver logs, so a
SQLite store has a single writer). Each finetune epoch is one `tune.report` carrying the epoch's
metrics, the running objective (so ASHA and the searcher can read it at any step) and a resumable
checkpoint; the last epoch's report also carries the final metrics and the trial's status.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from study.config import StudyConfig
from study.space import point_from_config, point_id, run_config
from study.store import StudyFolder

STATE_FILE = "state.pt"
REPORT_EVERY_S = 1.0  # sub-second epochs are reported in batches (see _Reporter)
EPOCH_KEYS = ("train_loss", "test_acc", "lr", "jsv_mean", "reg")


@dataclass
class TrialContext:
    """What every trial needs besides its point; shipped once through the object store."""

    config: StudyConfig
    study_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prune_cache_dir(self) -> Path:
        return Path(self.study_dir) / "prune_cache"


def _epoch_metrics(event: dict[str, Any]) -> dict[str, float]:
    return {f"{event['stage']}/{k}": float(event[k]) for k in EPOCH_KEYS if k in event}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class _Reporter:
    """Turns tpp events into Tune reports; holds back the last epoch to merge the final metrics into it.

    Each report costs the driver (Tune's loop, the MLflow write) and the worker CPU that a small
    machine takes from the trials, so sub-second epochs are batched: an epoch is reported at once when
    it is the first, carries a checkpoint, or `every_s` seconds passed since the last report (or
    always, with `every_s` 0: ASHA counts reports as epochs); the epochs in between travel with it in
    `tpp_events`, logged at their own steps. A worker that dies loses only unreported epochs, which it
    re-runs from its last checkpoint (always reported at once).
    """

    def __init__(self, epochs: int, objective: str, reuse: str, base: dict[str, float],
                 pre_events: list[dict[str, Any]], best: float = -math.inf, last: float = math.nan,
                 every_s: float = 0.0):
        self.epochs, self.objective, self.reuse, self.base = epochs, objective, reuse, base
        self.events = pre_events  # rows {"step": s, "stage/metric": v} not yet reported
        self.best, self.last, self.every_s = best, last, every_s
        self.held: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self.last_epoch = -1
        self.reported = -math.inf  # time.monotonic() of the last report

    def running(self) -> dict[str, Any]:
        best = self.best if self.best > -math.inf else self.last
        return {"best_acc": best, "last_acc": self.last, **self.base, "tpp_reuse": self.reuse,
                "tpp_node": _node()}

    def _result(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        """A report for `epoch`, carrying (and clearing) every row not reported yet."""
        result = {"epoch": epoch, **metrics, **self.running()}
        if self.events:
            result["tpp_events"], self.events = self.events, []
        return result

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "epoch" or event.get("stage") != "finetune":
            return
        state = event.pop("checkpoint", None)
        acc = float(event["test_acc"])
        self.last = acc
        if math.isfinite(acc):
            self.best = max(self.best, acc)
        first, self.last_epoch = self.last_epoch < 0, int(event["epoch"])
        metrics = _epoch_metrics(event)
        if self.last_epoch == self.epochs - 1:
            self.held = (self._result(self.last_epoch, metrics), state)  # merged with the final metrics
        elif first or state is not None or time.monotonic() - self.reported >= self.every_s:
            _report(self._result(self.last_epoch, metrics), state)
            self.reported = time.monotonic()
        else:
            self.events.append({"step": self.last_epoch, **metrics})

    def finish(self, status: str, final: dict[str, float], chance: float) -> None:
        """Last report: final metrics, status, and an objective the searcher can use even if diverged."""
        final = {k: float(v) for k, v in final.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key in ("best_acc", "last_acc"):
            if not _finite(final.get(key)):
                final[key] = self.best if self.best > -math.inf else chance
        if self.held is not None:
            result, state = self.held
        else:  # diverged before the last epoch (or in the prune stage): unreported rows go along
            result, state = self._result(max(self.last_epoch, 0), {}), None
        objective = final.get(self.objective, result.get(self.objective))
        result.update({k: v for k, v in final.items() if k in ("best_acc", "last_acc", "acc_after_removal")})
        if not _finite(objective):
            objective = chance
        result[self.objective] = objective
        result.update(tpp_final=final, tpp_status=status)
        _report(result, state)


@functools.lru_cache(maxsize=1)
def _node() -> str:
    """Which Ray node runs the trial (logged as tag tpp.node: where to look when a node misbehaves)."""
    import ray

    ctx = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"


def _report(result: dict[str, Any], state: dict[str, Any] | None) -> None:
    if state is None:
        tune.report(result)
        return
    from tpp.checkpoint import save_state

    with tempfile.TemporaryDirectory(prefix="tpp-ckpt-") as d:
        save_state(Path(d) / STATE_FILE, state)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))


def _resume_state() -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    from tpp.checkpoint import load_state

    with ckpt.as_directory() as d:
        path = Path(d) / STATE_FILE
        return load_state(path) if path.is_file() else None


def _prune(run_cfg: Any, dense: Any, data: Any, ctx: TrialContext, holder: str,
           on_event: Any) -> tuple[Any, str]:
    """The pruned model and tpp.reuse: computed | reused (cached methods) or none (cheap, not cached)."""
    from tpp.checkpoint import load_pruned, save_pruned
    from tpp.methods import get_method
    from tpp.run import prune_key, prune_stage

    if not get_method(run_cfg.method).regularize:
        return prune_stage(run_cfg, dense, data, on_event), "none"
    if not ctx.config.prune_reuse:
        return prune_stage(run_cfg, dense, data, on_event), "computed"
    from study.prune_cache import get_or_compute

    key = prune_key(run_cfg, dense)
    return get_or_compute(ctx.config.name, ctx.prune_cache_dir, key, holder,
                          compute=lambda: prune_stage(run_cfg, dense, data, on_event),
                          save=save_pruned, load=load_pruned)


def trial(config: dict[str, Any], dense: Any = None, ctx: TrialContext | None = None) -> None:
    """The Tune function trainable (wrapped with tune.with_parameters(dense=..., ctx=...))."""
    from tpp.run import DivergedError, finetune_stage, load_run_data

    assert ctx is not None and dense is not None
    cfg = ctx.config
    point = point_from_config(config)
    run_cfg = run_config(cfg, point)
    data = load_run_data(run_cfg)
    chance = 100.0 / data.num_classes
    resume_state = _resume_state()
    pre_events: list[dict[str, Any]] = []

    def on_prune_event(event: dict[str, Any]) -> None:
        if event.get("event") == "epoch":
            pre_events.append({"step": int(event["epoch"]), **_epoch_metrics(event)})

    holder = tune.get_context().get_trial_id() or "trial"
    finished = StudyFolder(ctx.study_dir).read_finished(point_id(point))
    if finished is not None:  # finished before the driver was killed; Tune's saved state missed it
        tune.report({**finished, "tpp_replayed": True})
        return
    try:
        pruned, reuse = _prune(run_cfg, dense, data, ctx, holder, on_prune_event)
    except DivergedError as e:
        reporter = _Reporter(run_cfg.epochs, cfg.objective.metric, "computed", {}, pre_events)
        reporter.finish("diverged", {**dense.metrics, "best_acc": chance, "last_acc": chance,
                                     "diverged_stage_prune": 1.0}, chance)
        print(f"[tpp-study] {holder}: {e}")
        return
    if resume_state is not None:
        pre_events.clear()  # already logged before the interruption
    base = {"acc_after_removal": float(pruned.metrics.get("acc_after_removal", math.nan))}
    reporter = _Reporter(run_cfg.epochs, cfg.objective.metric, reuse, base, pre_events,
                         best=float(resume_state["best_acc"]) if resume_state else -math.inf,
                         every_s=0.0 if cfg.early_stopping.asha else REPORT_EVERY_S)
    result = finetune_stage(run_cfg, pruned, data, reporter.on_event, resume_state=resume_state,
                            checkpoint_every=cfg.checkpoint_every,
                            checkpoint_min_interval_s=cfg.checkpoint_min_interval_s)
    final = {**dense.metrics, **pruned.metrics, **result.metrics}
    if resume_state is not None:  # a retried or resumed trial: where it picked up
        final["resumed_from_epoch"] = float(resume_state["epoch"])
    reporter.finish(result.status, final, chance)
    del result, pruned
    _free_gpu()


def _free_gpu() -> None:
    """Trials share GPUs and their worker process runs the next trial: hand cached blocks back."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
