"""Ray Tune assembly: the searcher, the Tuner with its callbacks and failure/checkpoint settings, the
GPU share per trial, a restorable saved state, and the disk guard that stops a study before a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from ray import tune

from study.config import StudyConfig
from study.errors import StudyError
from study.logger import StudyLogger
from study.progress import Progress
from study.store import StudyFolder, human_bytes, where_now

AUTO_GPU_FRACTION = 0.25  # `gpu: auto` on a cluster with GPUs: four trials share one GPU


def _gpu_fraction(cfg: StudyConfig) -> float:
    """Per-trial GPU fraction; a clear error when GPUs are asked for and the cluster has none."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    asked = cfg.resources.gpu
    if asked == "auto":
        return AUTO_GPU_FRACTION if gpus > 0 else 0.0
    if float(asked) > 0 and gpus == 0:
        raise StudyError(f"resources.gpu: {asked} GPU per trial was asked, but the Ray cluster has no GPUs; "
                         "use gpu: 0 (CPU) or gpu: auto")
    return float(asked)


def _max_concurrent(cfg: StudyConfig, gpu: float) -> int:
    """Default concurrency: as many trials as the cluster's CPUs (and GPUs) hold at once."""
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    res = ray.cluster_resources()
    n = int(float(res.get("CPU", 1)) // cfg.resources.cpus)
    if gpu > 0:
        n = min(n, int(float(res.get("GPU", 0)) / gpu))
    return max(n, 1)


class DiskGuard(tune.Callback):
    """Stops the study cleanly (as Ctrl-C would: resumable) when the study folder's disk runs low.

    A full disk otherwise surfaces as errors in whatever writes next -- Tune's state, a trial's
    checkpoint, the MLflow store -- and a trial that fails for it would be recorded as failed. Checked
    every few seconds; the reason is kept in `stopped` for the driver's one-line message.
    """

    EVERY_S = 2.0
    last_stop: str | None = None  # why the guard of this process stopped a study (read by the driver)

    def __init__(self, path: str, min_free_mb: float):
        self.path, self.min_free_mb = path, min_free_mb
        self.checked = 0.0

    def problem(self) -> str | None:
        free = shutil.disk_usage(self.path).free
        if free >= self.min_free_mb * 2**20:
            return None
        return (f"disk almost full at {self.path}: {human_bytes(free)} free, below min_free_mb = "
                f"{self.min_free_mb:g} MB; free some space, then resume the study")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "min_free_mb": self.min_free_mb}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(where_now(state["path"]), state["min_free_mb"])

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if DiskGuard.last_stop is not None or time.monotonic() - self.checked < self.EVERY_S:
            return
        self.checked = time.monotonic()
        DiskGuard.last_stop = self.problem()
        if DiskGuard.last_stop is not None:
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own "stop and save the state" signal


def _searcher(cfg: StudyConfig, folder: StudyFolder, dense: Any, slots: int) -> tuple[Any, int]:
    """(Tune searcher, number of trials): the design's units, or Optuna proposing single members."""
    if cfg.is_design:
        from study.design import plan, point_prune_key
        from study.searcher import design_searcher

        p = plan(cfg, slots, train_samples=folder.read_meta().train_samples)
        keys = {i: point_prune_key(cfg, pt, dense) for i, pt in enumerate(p.points)}
        return design_searcher(p.units, keys, p, folder.prune_cache), len(p.units)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from study.searcher import DefineByRun, FolderOptunaStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed, multivariate=True, group=True)
    storage = FolderOptunaStorage(f"sqlite:///{folder.optuna_db}")
    return OptunaSearch(space=DefineByRun(cfg), metric=cfg.objective.metric, mode=cfg.objective.mode,
                        sampler=sampler, storage=storage, study_name=cfg.name), cfg.num_trials or 0


class ForgetDelivered(tune.Callback):
    """The last callback: drops from each result what the trainable sent for the study's own callbacks
    (`tpp_*`: per-member metric rows, ended members with their metrics, notices), once they took it.
    Tune keeps a trial's last result in its experiment state, rewritten at every checkpoint, and tracks
    every numeric leaf of it as a metric series in driver memory: with the payload that was ~47 KB of
    state per member (28 MB at 600 members), growing with the study. Tune lets callbacks modify the
    result in place (`TuneController._process_trial_result`); the searcher and scheduler have already
    seen it whole."""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for key in [k for k in result if k.startswith("tpp_") and k != "tpp_node"]:
            del result[key]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A finished trial's per-metric statistics (max, min, mean, last-5/10 averages with their deques:
        ~13 KB of objects and ~7 KB of cached JSON per trial, in memory and in every state file Tune
        writes) feed only Tune's ResultGrid, which the study does not read: its results are in MLflow."""
        trial.run_metadata.metric_analysis = {}  # an assignment: Tune's cached JSON is dropped with it
        trial.run_metadata.metric_n_steps = {}


def _tuner(cfg: StudyConfig, folder: StudyFolder, trainable: Any, dense: Any, gpu: float,
           callbacks: list[Any]) -> Any:
    from ray import tune

    slots = _max_concurrent(cfg, gpu)
    searcher, num_samples = _searcher(cfg, folder, dense, slots)
    scheduler = None
    if cfg.early_stopping.asha:
        from ray.tune.schedulers import ASHAScheduler

        epochs = max(cfg.finetune.axes().get("epochs", [120]))
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                  grace_period=cfg.early_stopping.grace_period,
                                  reduction_factor=cfg.early_stopping.reduction_factor)
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                  max_concurrent_trials=slots,
                                  # one worker process runs trial after trial: no process start and
                                  # torch import per trial (3x faster studies of small models)
                                  reuse_actors=True,
                                  metric=cfg.objective.metric if scheduler else None,
                                  mode=cfg.objective.mode if scheduler else None)
    run_config = tune.RunConfig(
        name=folder.tune_path.name, storage_path=str(folder.path), verbose=0,
        callbacks=[StudyLogger(str(folder.path)), Progress(str(folder.path)),
                   DiskGuard(str(folder.path), cfg.min_free_mb), *callbacks, ForgetDelivered()],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _tune_state_readable(tune_path: Path) -> bool:
    """Whether Tune can restore its trial list from `tune_path`.

    Tune copies its state into the study folder file by file; a disk that filled up (or a kill) during
    the copy leaves a truncated `experiment_state-*.json` next to a complete searcher state, and a
    restore from that pair silently drops the trials in flight. Such a study starts its unfinished runs
    afresh instead: finished runs are skipped and prune stages come from the cache either way.
    """
    from ray import tune

    if not tune.Tuner.can_restore(str(tune_path)):
        return False
    newest = max(tune_path.glob("experiment_state-*.json"), default=None)
    try:
        json.loads(newest.read_text()) if newest else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        print(f"[resume] Tune's saved trial list {newest.name} is damaged (a full disk or a kill while "
              "it was written); the unfinished runs start afresh", flush=True)
        return False
    return True
