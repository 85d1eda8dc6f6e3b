"""Running a study: validate, start (or join) Ray, train the dense model once, run the trials, report.

`run()` and `resume()` are the Python API behind `tpp-study run/resume`, so a series of studies can be
scripted. The order of steps is chosen so that a mistake costs as little as possible: the config is
validated before anything starts, the tracking server and GPU availability are checked before any
folder is written or anything is trained, and the dense model is trained once and saved before the
first trial starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from study.config import StudyConfig, StudyConfigError, load_config
from study.mlflow_logging import (
    Outbox,
    StudyLogger,
    TrackingUnavailable,
    check_tracking,
    children,
    configure_http_retries,
    end_parent,
    log_dense,
    start_parent,
)
from study.progress import Progress, fmt_duration
from study.store import StudyFolder, StudyMeta, disk_usage, find_study, human_bytes

AUTO_GPU_FRACTION = 0.25  # `gpu: auto` on a cluster with GPUs: four trials share one GPU


class StudyError(RuntimeError):
    """The study cannot start or go on (cluster, tracking server, existing folder); one clear line."""


@dataclass
class StudyResult:
    """What a finished (or interrupted) study produced and where it is."""

    name: str
    path: str
    status: str  # completed | interrupted | failed
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    num_trials: int
    counts: dict[str, int] = field(default_factory=dict)  # trial status -> count (MLflow tags)
    reuse: dict[str, int] = field(default_factory=dict)  # tpp.reuse -> count
    best: dict[str, Any] | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    disk_bytes: int = 0

    @property
    def mlflow_ui_command(self) -> str:
        store = self.tracking_uri if self.tracking_uri.startswith("sqlite:") else None
        if store is None:
            return f"open {self.tracking_uri} (the study's MLflow server)"
        mlflow = Path(sys.executable).with_name("mlflow")
        exe = str(mlflow) if mlflow.exists() else "mlflow"
        return f"{exe} server --backend-store-uri {store} --host 127.0.0.1 --port 5000"

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"Study {self.name}: {self.status} in {fmt_duration(self.wall_s)} -- "
            f"{c.get('completed', 0)} completed, {c.get('diverged', 0)} diverged, "
            f"{c.get('failed', 0)} failed, "
            f"{self.num_trials - sum(c.get(k, 0) for k in ('completed', 'diverged', 'failed'))} not finished "
            f"of {self.num_trials}",
            f"Prune stages: {self.reuse.get('computed', 0)} computed, {self.reuse.get('reused', 0)} reused, "
            f"{self.reuse.get('none', 0)} not cached (cheap methods)",
        ]
        if self.best:
            lines.append(f"Best: {self.best['metric']} {self.best['value']:.2f}  ({self.best['run_name']})")
        lines += [
            f"Results:   {self.path}  ({human_bytes(self.disk_bytes)} on disk)",
            f"MLflow:    {self.tracking_uri}  experiment {self.experiment!r}, "
            f"parent run {self.parent_run_id}",
            f"MLflow UI: {self.mlflow_ui_command}",
        ]
        if self.tracking_uri.startswith("sqlite:"):
            lines.append("           then open http://127.0.0.1:5000")
        if self.status == "interrupted":
            lines.append(f"Resume:    tpp-study resume {self.path}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- setup
def _prepare_env(embedded: bool) -> None:
    """Environment that must be set before Ray starts (see STACK.md)."""
    if embedded:
        # Ray then binds every node to 127.0.0.1: the embedded study makes no traffic off loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the log; no CSV/JSON/TBX
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 the classic output is fully silent
    configure_http_retries()
    warnings.filterwarnings("ignore", module="ray")
    warnings.filterwarnings("ignore", category=Warning, module="optuna")
    for name in ("ray", "ray.tune", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Tune's result analysis looks for the CSV/JSON logs we turn off (MLflow is the record).
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join `address` (or RAY_ADDRESS), or start an embedded local Ray. True if this call started it.

    An already initialised Ray (a notebook, a test session) is reused as is and left running.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    _prepare_env(embedded=address is None and not ray.is_initialized())
    if ray.is_initialized():
        return False
    # Trial output stays in Ray's logs: the console shows one line per finished trial (and errors).
    common = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **common)
    except Exception as e:  # noqa: BLE001 - any connection problem, said in one line
        raise StudyError(f"ray.address: cannot start/join Ray at {address or 'a local instance'}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return True


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
    """Default concurrency: as many trials as the cluster's CPUs (and GPUs) hold at once.

    Bounded so an adaptive searcher is not asked for dozens of trials before any result is back.
    """
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    res = ray.cluster_resources()
    n = int(float(res.get("CPU", 1)) // cfg.resources.cpus)
    if gpu > 0:
        n = min(n, int(float(res.get("GPU", 0)) / gpu))
    return max(n, 1)


def _absolute_paths(cfg: StudyConfig) -> StudyConfig:
    """Resolve relative paths once (the saved config must work from any directory and in trials)."""
    def ab(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().absolute())

    return cfg.model_copy(update={
        "storage": ab(cfg.storage),
        "data": cfg.data.model_copy(update={"root": ab(cfg.data.root)}),
        "dense": cfg.dense.model_copy(update={"checkpoint": ab(cfg.dense.checkpoint)}),
    })


def _dense_run_config(cfg: StudyConfig) -> Any:
    """The RunConfig of the dense stage: model, data and dense settings (the trial point does not matter)."""
    from study.space import TrialPoint, run_config

    return run_config(cfg, TrialPoint(cfg.methods[0], 0.5, 0.01, None, cfg.dense.seed))


def _preflight(cfg: StudyConfig) -> None:
    """Open the data set and the dense checkpoint before anything starts: a data folder in the wrong
    layout or a checkpoint that is corrupt or for another architecture is a config error, not a crash
    after Ray and MLflow were started."""
    from tpp.checkpoint import CheckpointError, load_dense
    from tpp.data import DataError
    from tpp.run import load_run_data, model_spec

    run_cfg = _dense_run_config(cfg)
    try:
        data = load_run_data(run_cfg)
    except DataError as e:
        raise StudyConfigError("data", str(e).splitlines()[0]) from None
    if cfg.dense.checkpoint:
        try:
            load_dense(cfg.dense.checkpoint, expected=model_spec(run_cfg, data))
        except CheckpointError as e:
            raise StudyConfigError("dense.checkpoint", str(e).splitlines()[0]) from None


# ---------------------------------------------------------------------------------------------- dense
def _dense_task(run_cfg_dict: dict[str, Any], checkpoint: str | None) -> tuple[Any, list[dict[str, Any]]]:
    """Train (or load) the dense model where the data is (a Ray task: a GPU node if there is one)."""
    from tpp.checkpoint import load_dense
    from tpp.config import RunConfig
    from tpp.run import load_run_data, model_spec, train_dense

    run_cfg = RunConfig.from_dict(run_cfg_dict)
    data = load_run_data(run_cfg)
    if checkpoint:
        return load_dense(checkpoint, expected=model_spec(run_cfg, data)), []
    history: list[dict[str, Any]] = []
    dense = train_dense(run_cfg, data, lambda ev: history.append(ev) if ev.get("event") == "epoch" else None)
    return dense, history


def _dense(cfg: StudyConfig, folder: StudyFolder, meta: StudyMeta, gpu: float, embedded: bool) -> Any:
    """The study's dense model: from the study folder if present (resume), else trained/loaded once."""
    import ray

    from tpp.checkpoint import load_dense, save_dense

    if folder.dense_path.is_file():
        return load_dense(folder.dense_path)
    run_cfg = _dense_run_config(cfg)
    what = f"loading {cfg.dense.checkpoint}" if cfg.dense.checkpoint else \
        f"training it for {cfg.dense.epochs} epochs"
    print(f"[{cfg.name}] dense model {cfg.model.name} on {cfg.data.name}: {what}", flush=True)
    t0 = time.monotonic()
    try:
        if embedded:  # this process already holds the data and the libraries: no cold worker to start
            dense, history = _dense_task(run_cfg.to_dict(), cfg.dense.checkpoint)
            _free_gpu_cache()
        else:
            task = ray.remote(_dense_task).options(num_cpus=cfg.resources.cpus,
                                                   num_gpus=gpu and min(1.0, gpu), max_retries=1)
            dense, history = ray.get(task.remote(run_cfg.to_dict(), cfg.dense.checkpoint))
    except Exception as e:  # noqa: BLE001 - one line, whatever the dense stage raised (or Ray wrapped)
        cause = getattr(e, "cause", None) or e
        raise StudyError(f"dense: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}") from None
    save_dense(folder.dense_path, dense)
    acc = dense.metrics.get("dense_acc", math.nan)
    print(f"[{cfg.name}] dense model: test accuracy {acc:.2f}% ({fmt_duration(time.monotonic() - t0)}), "
          f"saved to {folder.dense_path}", flush=True)
    log_dense(meta.tracking_uri, meta.parent_run_id, dense.metrics, history)
    return dense


def _free_gpu_cache() -> None:
    """The driver trained the dense model: hand its cached GPU memory to the trials."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- tune
def _trainable(cfg: StudyConfig, folder: StudyFolder, dense: Any, gpu: float) -> Any:
    from ray import tune

    from study.trainable import TrialContext, trial

    ctx = TrialContext(cfg, str(folder.path))
    return tune.with_resources(tune.with_parameters(trial, dense=dense, ctx=ctx),
                               {"cpu": cfg.resources.cpus, "gpu": gpu})


def _searcher(cfg: StudyConfig, folder: StudyFolder) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from study.design_sampler import DesignSampler
    from study.space import DefineByRun

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = cfg.sampler_seed
    if cfg.sampler in ("tpe", "gp"):
        sampler = (optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
                   if cfg.sampler == "tpe" else optuna.samplers.GPSampler(seed=seed))
        space = DefineByRun(cfg)
    else:  # a fixed design: DefineByRun picks each trial's point, the sampler hands it to Optuna
        sampler = DesignSampler()
        space = DefineByRun(cfg, sampler)
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder.optuna_db}")
    return OptunaSearch(space=space, metric=cfg.objective.metric, mode=cfg.objective.mode,
                        sampler=sampler, storage=storage, study_name=cfg.name)


def _tuner(cfg: StudyConfig, folder: StudyFolder, trainable: Any, gpu: float, callbacks: list[Any]) -> Any:
    from ray import tune

    scheduler = None
    if cfg.early_stopping.asha:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.finetune.epochs,
                                  grace_period=cfg.early_stopping.grace_period,
                                  reduction_factor=cfg.early_stopping.reduction_factor)
    tune_config = tune.TuneConfig(search_alg=_searcher(cfg, folder), scheduler=scheduler,
                                  num_samples=cfg.trials, max_concurrent_trials=_max_concurrent(cfg, gpu),
                                  # one worker process runs trial after trial: no process start and
                                  # torch import per trial (3x faster studies of small models)
                                  reuse_actors=True,
                                  metric=cfg.objective.metric if scheduler else None,
                                  mode=cfg.objective.mode if scheduler else None)
    run_config = tune.RunConfig(
        name=folder.tune_path.name, storage_path=str(folder.path), verbose=0,
        callbacks=[StudyLogger(str(folder.path)), Progress(str(folder.path), cfg.objective.metric,
                                                           cfg.objective.mode), *callbacks],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


# ---------------------------------------------------------------------------------------------- results
def collect(folder: StudyFolder, cfg: StudyConfig | None = None) -> StudyResult:
    """The study's outcome as recorded in MLflow (the truth, whatever process wrote it)."""
    meta = folder.read_meta()
    cfg = cfg or load_config(folder.config_path)
    runs = children(meta.tracking_uri, meta.experiment_id, meta.parent_run_id)
    counts: dict[str, int] = {}
    reuse: dict[str, int] = {}
    trials, best = [], None
    metric, mode = cfg.objective.metric, cfg.objective.mode
    for r in runs:
        tags = r.data.tags
        status = tags.get("tpp.status", "running")
        counts[status] = counts.get(status, 0) + 1
        if "tpp.reuse" in tags:
            reuse[tags["tpp.reuse"]] = reuse.get(tags["tpp.reuse"], 0) + 1
        value = r.data.metrics.get(metric)
        rec = {"trial_id": tags.get("tpp.trial_id"), "run_id": r.info.run_id, "run_name": r.info.run_name,
               "status": status, "reuse": tags.get("tpp.reuse"), "run_status": r.info.status,
               "params": dict(r.data.params), metric: value}
        trials.append(rec)
        if status in ("completed", "diverged") and value is not None and math.isfinite(value) and (
                best is None or (value > best["value"] if mode == "max" else value < best["value"])):
            best = {"metric": metric, "value": value, "run_name": r.info.run_name, "run_id": r.info.run_id,
                    "trial_id": tags.get("tpp.trial_id")}
    finished = sum(counts.get(k, 0) for k in ("completed", "diverged", "failed"))
    status = "completed" if finished >= meta.num_trials else "interrupted"
    return StudyResult(meta.name, str(folder.path), status, meta.tracking_uri, meta.experiment,
                       meta.experiment_id, meta.parent_run_id, meta.num_trials, counts, reuse, best,
                       sorted(trials, key=lambda t: t["trial_id"] or ""), disk_bytes=disk_usage(folder.path))


# ---------------------------------------------------------------------------------------------- run
def _prepare_folder(cfg: StudyConfig, if_exists: str) -> StudyFolder:
    folder = StudyFolder(cfg.study_dir())
    if folder.path.exists() and any(folder.path.iterdir()):
        if if_exists == "replace":
            shutil.rmtree(folder.path)
        elif if_exists == "error":
            raise StudyError(f"study {cfg.name!r} already exists at {folder.path}; continue it with "
                             f"`tpp-study resume {folder.path}`, or pass --if-exists replace to start over")
    return folder


def run(config: str | os.PathLike | dict[str, Any] | StudyConfig, *, if_exists: str = "error",
        callbacks: list[Any] | None = None, **overrides: Any) -> StudyResult:
    """Run a study end to end; returns its StudyResult (also when interrupted: status says so).

    `overrides` are config keys (`num_trials=8`, `storage=...`, `name=...`) or the aliases
    `tracking_uri`, `experiment`, `address`, `num_cpus`. `if_exists`: error | replace | resume.
    Raises StudyConfigError (bad config, nothing started) or StudyError (cannot start).
    """
    if if_exists not in ("error", "replace", "resume"):
        raise ValueError(f"if_exists: got {if_exists!r}; accepted: error, replace, resume")
    cfg = _absolute_paths(load_config(config, **overrides))
    folder = StudyFolder(cfg.study_dir())
    if if_exists == "resume" and folder.exists():
        return resume(str(folder.path), callbacks=callbacks)
    _preflight(cfg)
    folder = _prepare_folder(cfg, if_exists)
    uri = cfg.tracking_uri()
    try:
        check_tracking(uri)
    except TrackingUnavailable as e:
        raise StudyError(f"mlflow.tracking_uri: {e}") from None
    started = _start_ray(cfg.ray.address, cfg.ray.num_cpus)
    try:
        gpu = _gpu_fraction(cfg)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.config_path.write_text(cfg.to_yaml())
        meta = StudyMeta(name=cfg.name, tracking_uri=uri, experiment=cfg.experiment(),
                         tune_path=str(folder.tune_path), num_trials=cfg.trials,
                         ray_address=cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        folder.write_meta(meta)
        from study.space import design

        points = design(cfg)
        artifacts = {"search_space.json": json.dumps(cfg.space.model_dump(mode="json"), indent=2)}
        if points is not None:
            artifacts["design.json"] = json.dumps([p.as_dict() for p in points], indent=1)
        try:
            exp_id, parent = start_parent(uri, cfg.experiment(), folder.path, cfg.name,
                                          cfg.model_dump(mode="json"), cfg.to_yaml(), cfg.trials, artifacts)
        except Exception as e:  # noqa: BLE001
            raise StudyError(f"mlflow: cannot create the study's runs at {uri}: {e}") from None
        folder.update_meta(experiment_id=exp_id, parent_run_id=parent)
        return _execute(cfg, folder, gpu, restore=False, embedded=started and not cfg.ray.address,
                        callbacks=callbacks or [])
    finally:
        if started:
            import ray

            ray.shutdown()


def resume(name_or_path: str, *, storage: str | None = None, address: str | None = None,
           tracking_uri: str | None = None, callbacks: list[Any] | None = None) -> StudyResult:
    """Continue an interrupted study: finished trials are kept, unfinished ones finish from their last
    checkpoint, the dense model and pruned models are reused, MLflow runs are continued (no duplicates).
    """
    folder = find_study(name_or_path, storage or "./studies")
    cfg = load_config(folder.config_path)
    meta = folder.read_meta()
    if tracking_uri:
        meta = folder.update_meta(tracking_uri=tracking_uri)
    try:
        check_tracking(meta.tracking_uri, wait_s=0)
    except TrackingUnavailable as e:
        raise StudyError(f"mlflow.tracking_uri: {e}") from None
    started = _start_ray(address or meta.ray_address, cfg.ray.num_cpus)
    try:
        gpu = _gpu_fraction(cfg)
        if not meta.parent_run_id:
            raise StudyError(f"study {meta.name} never got its MLflow parent run; start it again with "
                             f"`tpp-study run {folder.config_path} --if-exists replace`")
        embedded = started and not (address or meta.ray_address)
        return _execute(cfg, folder, gpu, restore=True, embedded=embedded,
                        callbacks=callbacks or [])
    finally:
        if started:
            import ray

            ray.shutdown()


def _execute(cfg: StudyConfig, folder: StudyFolder, gpu: float, restore: bool, embedded: bool,
             callbacks: list[Any]) -> StudyResult:
    from ray import tune

    from study import prune_cache

    t0 = time.monotonic()
    folder.claim()
    meta = folder.read_meta()
    _replay_pending(folder, meta)
    if restore:
        box = Outbox(meta.tracking_uri, {"parent": meta.parent_run_id})
        box.status("parent", "RUNNING")
        box.drain(10)
    status, result = "failed", None
    try:
        dense = _dense(cfg, folder, meta, gpu, embedded)
        # Keep the handle: a named (non-detached) actor dies when its last handle goes away.
        cache_actor = prune_cache.start(cfg.name, folder.prune_cache)
        trainable = _trainable(cfg, folder, dense, gpu)
        if restore and tune.Tuner.can_restore(str(folder.tune_path)):
            print(f"[{cfg.name}] resuming from {folder.tune_path}", flush=True)
            tuner = tune.Tuner.restore(str(folder.tune_path), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            if folder.tune_path.exists():  # never reached a saved Tune state: start the trials afresh
                shutil.rmtree(folder.tune_path)
            folder.optuna_db.unlink(missing_ok=True)
            tuner = _tuner(cfg, folder, trainable, gpu, callbacks)
        print(f"[{cfg.name}] {cfg.trials} trials ({cfg.sampler} sampler), {cfg.resources.cpus:g} CPU"
              + (f" + {gpu:g} GPU" if gpu else "") + " per trial; one line per finished trial:", flush=True)
        tuner.fit()
        del cache_actor
        result = collect(folder, cfg)
        status = result.status
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        folder.update_meta(status=status, pid=0)
        metrics = {}
        if result is not None:
            metrics = {f"trials_{k}": float(v) for k, v in result.counts.items()}
            metrics.update({f"prune_{k}": float(v) for k, v in result.reuse.items()})
            if result.best:
                metrics[f"best_{result.best['metric']}"] = result.best["value"]
        end_parent(meta.tracking_uri, meta.parent_run_id,
                   {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"),
                   metrics, {"tpp.study_status": status})
    result.wall_s = time.monotonic() - t0
    result.disk_bytes = disk_usage(folder.path)
    summary = {k: v for k, v in asdict(result).items() if k != "trials"}
    (folder.path / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    print(result.summary(), flush=True)
    return result


def _replay_pending(folder: StudyFolder, meta: StudyMeta) -> None:
    """Deliver MLflow writes a previous session could not (its server was gone)."""
    if not folder.pending_log.is_file():
        return
    box = Outbox(meta.tracking_uri)
    box.load_pending(folder.pending_log)
    if box.drain(30):
        folder.pending_log.unlink()
