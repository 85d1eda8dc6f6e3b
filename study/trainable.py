"""The Tune trial: a prune unit (prune stages into the cache) or the members of one prune point.

Runs inside a Ray worker, possibly on another node: it never talks to MLflow (the driver logs, so a
SQLite store has a single writer). Everything the driver logs travels in `tune.report` results:
`tpp_rows` (per-member metric rows, each at its own step), `tpp_done` (members that finished, with
their final metrics and status). A checkpoint carries the pipeline's resumable state, which records
the members already done, so a retried or resumed trial continues where it was and never redoes one.
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
from study.design import TrialRuns, members, resolve, run_config
from study.prune_cache import PruneCache
from study.store import StudyFolder

STATE_FILE = "state.pt"
REPORT_EVERY_S = 1.0  # sub-second epochs are reported in batches (see Reporter)
EPOCH_KEYS = ("train_loss", "test_acc", "val_acc", "lr", "jsv_mean", "reg")


@dataclass
class TrialContext:
    """What every trial needs besides its config; shipped once through the object store."""

    config: StudyConfig
    study_dir: str
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # member id -> its recorded result
    # Methods and criteria the driver's program registered in code (`@register_method` in a script): a
    # worker never runs that program, so they travel here (cloudpickle takes a script's functions by value).
    methods: list[Any] = field(default_factory=list)
    criteria: list[Any] = field(default_factory=list)

    @classmethod
    def of(cls, config: StudyConfig, study_dir: str, finished: dict[str, dict[str, Any]]) -> TrialContext:
        """The context of this driver: its config, folder, finished members and code registrations."""
        from tpp.methods import registry
        from tpp.pruning import criteria

        return cls(config, study_dir, finished, registry.registered_in_code(), criteria.registered_in_code())

    def install(self) -> None:
        """Register the driver's code registrations in this (worker) process."""
        from tpp.methods import registry
        from tpp.pruning import criteria

        registry.adopt(self.methods)
        criteria.adopt(self.criteria)

    @property
    def cache(self) -> PruneCache:
        return PruneCache(StudyFolder(self.study_dir).prune_cache)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@functools.lru_cache(maxsize=1)
def _node() -> str:
    """Which Ray node runs the trial (logged as tag tpp.node: where to look when a node misbehaves).
    Tune's own `node_ip` in every result cannot tell apart nodes that share an address (several raylets
    on one host, containers behind one IP), so the node id is added."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


class Reporter:
    """Turns pipeline events into Tune reports.

    Each report costs the driver (Tune's loop, the MLflow write) and the worker CPU that a small machine
    takes from the trials, so sub-second epochs are batched: a report goes at once for the first
    epoch or a checkpoint, else when `every_s` passed (always, with `every_s` 0: ASHA counts reports as
    epochs), and at the trial's end; the rows and ended members in between travel with it, so the
    members of a lockstep stack that end together cost one or two reports, not one each. A worker that
    dies loses only unreported rows and ends, which it re-runs from its last checkpoint (always
    reported at once).

    `shared`: metric names a member's result leaves out because they are the same for every member
    and logged once on the study run (the dense model's: accuracy, JSV, cost).
    """

    def __init__(self, runs: TrialRuns, objective: str, every_s: float, shared: frozenset[str] = frozenset()):
        self.runs, self.objective, self.every_s, self.shared = runs, objective, every_s, shared
        self.rows: list[tuple[str, str, float, int]] = []
        self.done: dict[str, dict[str, Any]] = {}
        self.reuse: dict[str, str] = {}
        self.notices: list[str] = []
        self.prune_progress: dict[str, int] | None = None
        self.best = -math.inf
        self.reported = -math.inf
        self.epoch = 0

    def _report(self, state: dict[str, Any] | None = None, **extra: Any) -> None:
        result = {"epoch": self.epoch, self.objective: self.best if self.best > -math.inf else math.nan,
                  "tpp_node": _node(), **extra}
        if self.rows:
            result["tpp_rows"], self.rows = self.rows, []
        if self.done:
            result["tpp_done"], self.done = self.done, {}
        if self.reuse:
            result["tpp_reuse"], self.reuse = self.reuse, {}
        if self.notices:
            result["tpp_notices"], self.notices = self.notices, []
        if self.prune_progress:
            result["tpp_prune_progress"], self.prune_progress = self.prune_progress, None
        self.reported = time.monotonic()
        if state is None:
            tune.report(result)
            return
        from tpp.checkpoint import save_state

        with tempfile.TemporaryDirectory(prefix="tpp-ckpt-") as d:
            save_state(Path(d) / STATE_FILE, state)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    def pruned(self, event: dict[str, Any]) -> None:
        """Tag each member's reuse and send the prune stage's curves with the one that carries them; a
        resumed trial sends them again and the logger drops the steps it already has."""
        from tpp.methods import get_method

        if not get_method(self.runs.configs[0].method).regularize:
            self.reuse = {mid: "none" for mid in self.runs.ids}
            return
        first = self.runs.first or [event["reuse"] == "computed"] * len(self.runs.ids)
        self.reuse = {mid: "computed" if f else "reused" for mid, f in zip(self.runs.ids, first, strict=True)}
        for mid, carries in zip(self.runs.ids, first, strict=True):
            if carries:
                self.rows += [(mid, f"prune/{k}", float(h[k]), int(h["epoch"])) for h in event["history"]
                              for k in EPOCH_KEYS if k in h]

    def finished(self, index: int, status: str, metrics: dict[str, Any]) -> None:
        # 6 significant digits: what the MLflow UI shows as text (93.0555555... otherwise), far below noise
        final = {k: float(f"{float(v):.6g}") for k, v in metrics.items()
                 if _finite(v) and k not in self.shared}
        self.done[self.runs.ids[index]] = {"status": status, "metrics": final}
        if _finite(final.get(self.objective)):
            self.best = max(self.best, final[self.objective])

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "pruned":
            self.pruned(event)
        elif kind == "member_end":  # members ending together (a lockstep stack) share one report
            self.finished(event["member"], event["status"], event["metrics"])
            if time.monotonic() - self.reported >= self.every_s:
                self._report()
        elif kind == "epoch" and event.get("stage") == "prune" and self.every_s:
            self.prune_progress = {"done": int(event["iteration"]), "total": int(event["iterations"])}
            if time.monotonic() - self.reported >= self.every_s:
                self._report()
        elif kind == "notice":
            self.notices.append(event["message"])
        elif kind == "checkpoint":
            self._report(event["checkpoint"])
        elif kind == "epoch" and event.get("stage") == "finetune":
            state = event.pop("checkpoint", None)
            mid = self.runs.ids[event["member"]]
            first = self.epoch == 0
            self.epoch = int(event["epoch"]) + 1  # the finetuning epochs done (of the member reporting)
            self.rows += [(mid, f"finetune/{k}", float(event[k]), int(event["epoch"])) for k in EPOCH_KEYS
                          if k in event]
            if _finite(event.get("test_acc")) and self.objective == "best_acc":
                self.best = max(self.best, float(event["test_acc"]))
            last = event["epoch"] == event["epochs"] - 1  # goes with the member's end, reported next
            if not last and (first or state is not None
                             or time.monotonic() - self.reported >= self.every_s):
                self._report(state)

    def flush(self) -> None:
        if self.rows or self.done or self.reuse or self.notices:
            self._report()


@functools.lru_cache(maxsize=1)
def die_with_raylet() -> None:
    """Stop this worker process within a second once its raylet is gone.

    An embedded Ray's raylet dies with the driver (Ray ties them together), but its workers notice
    only some seconds later and meanwhile keep computing -- a killed study would go on writing its
    prune cache and checkpoints. The raylet is the worker's parent: when the parent changes, exit.
    """
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="tpp-die-with-raylet", daemon=True).start()


def _resume_state() -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    from tpp.checkpoint import load_state

    with ckpt.as_directory() as d:
        path = Path(d) / STATE_FILE
        return load_state(path) if path.is_file() else None


def _prune_unit(config: dict[str, Any], dense: Any, ctx: TrialContext) -> None:
    """Compute the unit's prune stages into the cache (skipping what is already there)."""
    from study.design import _prune_iterations, points
    from tpp.run import load_run_data, prune_key, prune_stages, run_splits

    cfg, cache, pts = ctx.config, ctx.cache, points(ctx.config)
    configs = [run_config(cfg, pts[i], members(cfg)[0]) for i in config["points"]]
    todo = [(prune_key(rc, dense), rc) for rc in configs]
    todo = [(k, rc) for k, rc in todo if cache.load(k, rc.prune_inputs()) is None]
    if todo:
        data = load_run_data(todo[0][1])
        samples = run_splits(todo[0][1], data)[0].num_train
        progress = PruneProgress(sum(_prune_iterations(cfg, pts[i], samples) for i in config["points"]))
        with cache.locked([k for k, _ in todo]):
            # a finetune trial may have computed one while this unit waited for the locks
            todo = [(k, rc) for k, rc in todo if cache.load(k, rc.prune_inputs()) is None]
            for key, _ in todo:
                cache.record(key, "start")
            pruned = prune_stages([rc for _, rc in todo], dense, data, cfg.lockstep, progress.for_stage)
            for (key, rc), model in zip(todo, pruned, strict=True):
                cache.save(key, rc.prune_inputs(), model)
                cache.record(key, "done")
    tune.report({"epoch": 0, "tpp_node": _node()})


class PruneProgress:
    """Reports how far prune stages (one after another, or in lockstep) got, at most every
    REPORT_EVERY_S: what the progress line and ETA show while a long regularisation stage runs."""

    def __init__(self, total: int):
        self.total, self.at, self.reported = total, {}, time.monotonic()

    def for_stage(self, i: int) -> Any:
        """The event callback of stage `i` (its iterations are counted on their own)."""
        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "epoch" and event.get("stage") == "prune":
                self.at[i] = int(event["iteration"])
                if time.monotonic() - self.reported >= REPORT_EVERY_S:
                    self.reported = time.monotonic()
                    tune.report({"epoch": 0, "tpp_node": _node(),
                                 "tpp_prune_progress": {"done": sum(self.at.values()), "total": self.total}})

        return on_event


def trial(config: dict[str, Any], dense: Any = None, ctx: TrialContext | None = None) -> None:
    """The Tune function trainable (wrapped with tune.with_parameters(dense=..., ctx=...))."""
    from tpp.methods import get_method
    from tpp.run import load_run_data, run_pipeline

    assert ctx is not None and dense is not None
    die_with_raylet()
    ctx.install()
    if config["kind"] == "prune":
        _prune_unit(config, dense, ctx)
        return
    cfg = ctx.config
    runs = resolve(cfg, config, tune.get_context().get_trial_id())
    reporter = Reporter(runs, cfg.objective.metric, 0.0 if cfg.early_stopping.asha else REPORT_EVERY_S,
                        shared=frozenset(dense.metrics))
    skip = [i for i, mid in enumerate(runs.ids) if mid in ctx.finished]
    resume_state = _resume_state()
    for i, rec in (resume_state or {}).get("done", {}).items():  # done before a retry: make sure it is logged
        reporter.finished(int(i), rec["status"], rec["metrics"])
    if len(skip) == len(runs.ids):  # every member finished in an earlier session: report what it got
        for i in skip:
            reporter.finished(i, ctx.finished[runs.ids[i]]["status"], ctx.finished[runs.ids[i]]["metrics"])
        reporter.flush()
        return
    data = load_run_data(runs.configs[0])
    store = ctx.cache if get_method(runs.configs[0].method).regularize else None
    run_pipeline(runs.configs, dense=dense, store=store, data=data, on_event=reporter.on_event, skip=skip,
                 resume_state=resume_state, checkpoint_every=cfg.checkpoint_every,
                 checkpoint_min_interval_s=cfg.checkpoint_min_interval_s, lockstep=cfg.lockstep)
    reporter.flush()
    _free_gpu()


def _free_gpu() -> None:
    """Trials share GPUs and their worker process runs the next trial: hand cached blocks back."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
