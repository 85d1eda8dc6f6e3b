"""Running a study: validate, lock, start (or join) Ray, train the dense model once, run the units, report.

`run()` and `resume()` are the Python API behind `tpp-study run/resume`, so a series of studies can be
scripted. The order of steps is chosen so that a mistake costs as little as possible: the config is
validated before anything starts, the tracking server and GPU availability are checked before any
folder is written or anything is trained, and the dense model is trained once and saved before the
first trial starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from study.config import OBJECTIVE_TEXT, StudyConfig, StudyConfigError, load_config
from study.mlflow_logging import (
    Outbox,
    StudyLogger,
    TrackingUnavailable,
    check_tracking,
    children,
    configure_mlflow_env,
    finished_members,
    flatten,
    runs_page_url,
    sqlite_checkpoint,
    start_parent,
    study_note,
)
from study.progress import Progress, fmt_duration, rank
from study.store import StudyBusy, StudyFolder, StudyMeta, disk_usage, find_study, human_bytes

AUTO_GPU_FRACTION = 0.25  # `gpu: auto` on a cluster with GPUs: four trials share one GPU
EXIT_CODES = {"completed": 0, "interrupted": 1, "failed": 3}  # 2: bad config or cannot start


class StudyError(RuntimeError):
    """The study cannot start or go on (cluster, tracking server, existing folder); one clear line."""


@dataclass
class StudyResult:
    """What a finished (or interrupted) study produced and where it is."""

    name: str
    path: str
    status: str  # completed | interrupted | failed (every run finished, some failed)
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    num_runs: int
    counts: dict[str, int] = field(default_factory=dict)  # member status -> count (MLflow tags)
    reuse: dict[str, int] = field(default_factory=dict)  # tpp.reuse -> count
    best: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    stopped_because: str | None = None  # a clean stop the study made itself (a full disk)
    wall_s: float = 0.0
    disk_bytes: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def mlflow_ui_command(self) -> str:
        """How to open this study's runs in the MLflow UI: the study's own server, or one to start on
        its SQLite file (loopback only, no usage telemetry)."""
        if not self.tracking_uri.startswith("sqlite:"):
            return f"open the study's MLflow server {self.tracking_uri}"
        mlflow = Path(sys.executable).with_name("mlflow")
        exe = str(mlflow) if mlflow.exists() else "mlflow"
        return (f"MLFLOW_DISABLE_TELEMETRY=true {exe} server --backend-store-uri {self.tracking_uri} "
                "--host 127.0.0.1 --port 5000")

    def ui_lines(self) -> list[str]:
        """How to open the study in the MLflow UI: the server command and the runs page's URL."""
        lines = [f"MLflow UI: {self.mlflow_ui_command}"]
        if self.experiment_id:  # the runs page in the training workflow, on the study's saved view
            base = "http://127.0.0.1:5000" if self.tracking_uri.startswith("sqlite:") else self.tracking_uri
            lines.append(f"           then open {runs_page_url(base, self.experiment_id, self.name)}")
        return lines

    def summary(self) -> str:
        c = self.counts
        finished = sum(c.get(k, 0) for k in ("completed", "diverged", "failed"))
        lines = [
            f"Study {self.name}: {self.status} in {fmt_duration(self.wall_s)} -- {c.get('completed', 0)} "
            f"completed, {c.get('diverged', 0)} diverged, {c.get('failed', 0)} failed, "
            f"{self.num_runs - finished} not finished, of {self.num_runs} runs",
            f"Prune stages: {self.reuse.get('computed', 0)} computed and shared by "
            f"{self.reuse.get('computed', 0) + self.reuse.get('reused', 0)} runs, "
            f"{self.reuse.get('none', 0)} runs of methods without a penalty stage",
        ]
        if self.best:
            lines.append(f"Best: {self.best['metric']} {self.best['value']:.2f}  ({self.best['run_name']}; "
                         f"{OBJECTIVE_TEXT.get(self.best['metric'], '')})")
        lines += [f"Results:   {self.path}  ({human_bytes(self.disk_bytes)} on disk)",
                  f"MLflow:    {self.tracking_uri}  experiment {self.experiment!r}, "
                  f"parent run {self.parent_run_id}",
                  *self.ui_lines()]
        storage = str(Path(self.path).parent)
        lines.append(f"Report:    tpp-analyze {self.name} --storage {storage}")
        if self.status != "completed":
            lines.append(f"Resume:    tpp-study resume {self.name} --storage {storage}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- setup
def _prepare_env(embedded: bool) -> None:
    """Environment that must be set before Ray starts (see STACK.md); no usage telemetry anywhere."""
    if embedded:
        # Ray then binds every node to 127.0.0.1: the embedded study makes no traffic off loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                       ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),  # MLflow is the log; no CSV/JSON/TBX
                       ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"),
                       ("RAY_AIR_NEW_OUTPUT", "0")):  # with verbose=0 the classic output is fully silent
        os.environ.setdefault(key, value)
    configure_mlflow_env()
    warnings.filterwarnings("ignore", module="ray")
    warnings.filterwarnings("ignore", category=Warning, module="optuna")
    for name in ("ray", "ray.tune", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Tune's own "interrupted ... Tuner.restore(...)" hint: our summary names `tpp-study resume`.
    for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis", "ray.tune.search.optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join `address` (or RAY_ADDRESS), or start an embedded local Ray. True if this call started it."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    _prepare_env(embedded=address is None and not ray.is_initialized())
    if ray.is_initialized():  # a notebook or test session: reused as is and left running
        return False
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
    """Default concurrency: as many trials as the cluster's CPUs (and GPUs) hold at once."""
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


# Keys a resumed study may change: how and where it runs, never what it computes.
OPERATIONAL_KEYS = ("description", "storage", "ray", "mlflow", "max_concurrent", "max_failures",
                    "checkpoint_every", "checkpoint_min_interval_s", "min_free_mb")


def _result_config(cfg: StudyConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.as_input().items() if k not in OPERATIONAL_KEYS}


def config_digest(cfg: StudyConfig) -> str:
    """A digest of everything in the config that changes results (a resume must run the same)."""
    return hashlib.sha256(json.dumps(_result_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _preflight(cfg: StudyConfig) -> int:
    """Open the data set and the dense checkpoint before anything starts: a data folder in the wrong
    layout or a checkpoint that is corrupt or for another architecture is a config error, not a crash
    after Ray and MLflow were started. Returns the samples a run trains on."""
    from study.design import dense_run_config
    from tpp.checkpoint import CheckpointError, load_dense
    from tpp.data import DataError
    from tpp.run import load_run_data, model_spec

    run_cfg = dense_run_config(cfg)
    try:
        data = load_run_data(run_cfg)
    except DataError as e:
        raise StudyConfigError("data", str(e).splitlines()[0]) from None
    if cfg.dense.checkpoint:
        try:
            load_dense(cfg.dense.checkpoint, expected=model_spec(run_cfg, data))
        except CheckpointError as e:
            raise StudyConfigError("dense.checkpoint", str(e).splitlines()[0]) from None
    return data.num_train - round(cfg.data.val_fraction * data.num_train)


# ---------------------------------------------------------------------------------------------- dense
def _dense_task(run_cfg_dict: dict[str, Any], checkpoint: str | None,
                progress: Any = None) -> tuple[Any, list[dict[str, Any]]]:
    """Train (or load) the dense model where the data is (a Ray task: a GPU node if there is one);
    `progress(event)` sees each epoch (the embedded driver's progress line)."""
    from tpp.checkpoint import load_dense
    from tpp.config import RunConfig
    from tpp.run import load_run_data, model_spec, train_dense

    run_cfg = RunConfig.from_dict(run_cfg_dict)
    data = load_run_data(run_cfg)
    if checkpoint:
        return load_dense(checkpoint, expected=model_spec(run_cfg, data)), []
    history: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "epoch":
            history.append(event)
            if progress is not None:
                progress(event)

    return train_dense(run_cfg, data, on_event), history


class DenseProgress:
    """The dense training's progress: a tqdm bar on a terminal, else a line every tenth of the epochs."""

    def __init__(self, name: str, epochs: int):
        self.name, self.epochs, self.t0 = name, epochs, time.monotonic()
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, desc=f"[{name}] dense", unit="epoch", leave=False)

    def __call__(self, event: dict[str, Any]) -> None:
        done = event["epoch"] + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"acc {event['test_acc']:.1f}%")
            if done == self.epochs:
                self.bar.close()
        elif done % max(self.epochs // 10, 1) == 0 or done == self.epochs:
            rate = (time.monotonic() - self.t0) / done
            print(f"[{self.name}] dense epoch {done}/{self.epochs}: test acc {event['test_acc']:.2f}% "
                  f"({rate:.2f} s/epoch, ETA {fmt_duration(rate * (self.epochs - done))})", flush=True)


def _dense(cfg: StudyConfig, folder: StudyFolder, meta: StudyMeta, gpu: float, embedded: bool) -> Any:
    """The study's dense model: from the study folder if present (resume), else trained/loaded once."""
    import ray

    from study.design import dense_run_config
    from tpp.checkpoint import load_dense, save_dense

    if folder.dense_path.is_file():
        return load_dense(folder.dense_path)
    run_cfg = dense_run_config(cfg)
    what = f"loading {cfg.dense.checkpoint}" if cfg.dense.checkpoint else \
        f"training it for {cfg.dense.epochs} epochs"
    print(f"[{cfg.name}] dense model {cfg.model.name} on {cfg.data.name}: {what}", flush=True)
    t0 = time.monotonic()
    try:
        if embedded:  # this process already holds the data and the libraries: no cold worker to start
            dense, history = _dense_task(run_cfg.to_dict(), cfg.dense.checkpoint,
                                         DenseProgress(cfg.name, run_cfg.dense_epochs))
        else:
            task = ray.remote(_dense_task).options(num_cpus=cfg.resources.cpus,
                                                   num_gpus=gpu and min(1.0, gpu), max_retries=1)
            dense, history = ray.get(task.remote(run_cfg.to_dict(), cfg.dense.checkpoint))
    except Exception as e:  # noqa: BLE001 - one line, whatever the dense stage raised (or Ray wrapped)
        cause = getattr(e, "cause", None) or e
        raise StudyError(f"dense: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}") from None
    save_dense(folder.dense_path, dense)
    acc = dense.metrics.get("dense_acc", float("nan"))
    print(f"[{cfg.name}] dense model: test accuracy {acc:.2f}% ({fmt_duration(time.monotonic() - t0)}), "
          f"saved to {folder.dense_path}", flush=True)
    box = Outbox(meta.tracking_uri, {"parent": meta.parent_run_id})
    rows = [(k, v, 0) for k, v in dense.metrics.items()]
    rows += [(f"dense/{k}", ev[k], ev["epoch"]) for ev in history for k in ("train_loss", "test_acc", "lr")]
    box.batch("parent", metrics=rows)
    box.drain(60)
    return dense


# ---------------------------------------------------------------------------------------------- tune
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
        self.__init__(**state)

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
        from study.design import members, plan, run_config
        from study.searcher import design_searcher
        from tpp.run import prune_key

        p = plan(cfg, slots, train_samples=folder.read_meta().train_samples)
        first = members(cfg)[0]
        keys = {i: prune_key(run_config(cfg, pt, first), dense) for i, pt in enumerate(p.points)}
        return design_searcher(p.units, keys, p, folder.prune_cache), len(p.units)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from study.design import DefineByRun

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.TPESampler(seed=cfg.sampler_seed, multivariate=True, group=True)
               if cfg.sampler == "tpe" else optuna.samplers.GPSampler(seed=cfg.sampler_seed))
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder.optuna_db}")
    return OptunaSearch(space=DefineByRun(cfg), metric=cfg.objective.metric, mode=cfg.objective.mode,
                        sampler=sampler, storage=storage, study_name=cfg.name), cfg.num_trials or 0


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
                   DiskGuard(str(folder.path), cfg.min_free_mb), *callbacks],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


# ---------------------------------------------------------------------------------------------- results
def collect(folder: StudyFolder) -> StudyResult:
    """The study's outcome as recorded in MLflow (the truth, whatever process wrote it)."""
    meta = folder.read_meta()
    cfg = load_config(folder.config_path)
    metric, mode = cfg.objective.metric, cfg.objective.mode
    counts: dict[str, int] = {}
    reuse: dict[str, int] = {}
    runs, best = [], None
    for r in children(meta.tracking_uri, meta.experiment_id, meta.parent_run_id):
        tags = r.data.tags
        status = tags.get("tpp.status", "running")
        counts[status] = counts.get(status, 0) + 1
        if "tpp.reuse" in tags:
            reuse[tags["tpp.reuse"]] = reuse.get(tags["tpp.reuse"], 0) + 1
        value = r.data.metrics.get(metric)
        lr = float(r.data.params.get("lr", "nan"))
        runs.append({"member_id": tags.get("tpp.member_id"), "run_id": r.info.run_id, metric: value,
                     "run_name": r.info.run_name, "status": status, "run_status": r.info.status})
        if status in ("completed", "diverged") and value is not None and value == value:
            key = rank(value, lr, r.info.run_name, mode)
            if best is None or key < best[0]:
                best = (key, {"metric": metric, "value": value, "run_name": r.info.run_name, "lr": lr,
                              "run_id": r.info.run_id})
    finished = sum(counts.get(k, 0) for k in ("completed", "diverged", "failed"))
    status = "interrupted" if finished < meta.num_runs else "failed" if counts.get("failed") else "completed"
    return StudyResult(meta.name, str(folder.path), status, meta.tracking_uri, meta.experiment,
                       meta.experiment_id, meta.parent_run_id, meta.num_runs, counts, reuse,
                       best[1] if best else None, sorted(runs, key=lambda t: t["run_name"] or ""),
                       disk_bytes=disk_usage(folder.path))


# ---------------------------------------------------------------------------------------------- run
def run(config: str | os.PathLike | dict[str, Any] | StudyConfig, *, if_exists: str = "error",
        callbacks: list[Any] | None = None, **overrides: Any) -> StudyResult:
    """Run a study end to end; returns its StudyResult (also when interrupted: status says so).

    `overrides` are config keys (`num_trials=8`, `storage=...`, `name=...`) or the aliases
    `tracking_uri`, `experiment`, `address`, `num_cpus`. `if_exists`: error | replace | resume.
    Raises StudyConfigError (bad config, nothing started) or StudyError (cannot start).
    """
    if if_exists not in ("error", "replace", "resume"):
        raise ValueError(f"if_exists: got {if_exists!r}; accepted: error, replace, resume")
    configure_mlflow_env()
    cfg = _absolute_paths(load_config(config, **overrides))
    folder = StudyFolder(cfg.study_dir())
    holder = folder.holder() if folder.path.is_dir() else None
    if holder:  # whatever --if-exists says: one study, one writer
        raise StudyError(f"study {cfg.name!r} is being run by {holder}; wait for it, or stop it first")
    if if_exists == "resume" and folder.exists():
        return resume(str(folder.path), callbacks=callbacks, expect=cfg)
    train_samples = _preflight(cfg)
    if if_exists == "error" and folder.path.exists() and any(folder.path.iterdir()):
        raise StudyError(f"study {cfg.name!r} already exists at {folder.path}; continue it with "
                         f"`tpp-study resume {folder.path}`, or pass --if-exists replace to start over")
    _lock(folder)
    try:
        if folder.path.exists():
            for child in folder.path.iterdir():  # replace: everything but the lock we hold
                if child != folder.lock_path:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        uri = cfg.tracking_uri()
        try:
            check_tracking(uri)
        except TrackingUnavailable as e:
            raise StudyError(f"mlflow.tracking_uri: {e}") from None
        started = _start_ray(cfg.ray.address, cfg.ray.num_cpus)
        try:
            gpu = _gpu_fraction(cfg)
            folder.config_path.write_text(cfg.to_yaml())
            num_runs = _num_runs(cfg)
            meta = StudyMeta(name=cfg.name, tracking_uri=uri, experiment=cfg.experiment(), num_runs=num_runs,
                             config_digest=config_digest(cfg), train_samples=train_samples,
                             ray_address=cfg.ray.address or os.environ.get("RAY_ADDRESS"))
            folder.write_meta(meta)
            _start_parent(cfg, folder, uri, num_runs)
            return _execute(cfg, folder, gpu, restore=False, embedded=started and not cfg.ray.address,
                            callbacks=callbacks or [])
        finally:
            if started:
                import ray

                ray.shutdown()
    finally:
        folder.unlock()


def _num_runs(cfg: StudyConfig) -> int:
    from study.design import plan

    return plan(cfg).num_runs if cfg.is_design else cfg.num_trials or 0


def _start_parent(cfg: StudyConfig, folder: StudyFolder, uri: str, num_runs: int) -> None:
    from study.design import points

    artifacts = {"study_config.yaml": cfg.to_yaml()}
    if cfg.is_design:
        artifacts["design.json"] = json.dumps([p.as_dict() for p in points(cfg)], indent=1)
    params = {**flatten(cfg.model_dump(mode="json", exclude={"description"})), "num_trials": str(num_runs)}
    tags = {"mlflow.note.content": cfg.description} if cfg.description else {}
    try:
        exp_id, parent = start_parent(uri, cfg.experiment(), folder.path, cfg.name, params, tags, artifacts)
    except Exception as e:  # noqa: BLE001
        raise StudyError(f"mlflow: cannot create the study's runs at {uri}: {e}") from None
    folder.update_meta(experiment_id=exp_id, parent_run_id=parent)


def _lock(folder: StudyFolder) -> None:
    try:
        folder.lock()
    except StudyBusy as e:
        raise StudyError(str(e)) from None


def resume(name_or_path: str, *, storage: str | None = None, address: str | None = None,
           tracking_uri: str | None = None, callbacks: list[Any] | None = None,
           expect: StudyConfig | None = None) -> StudyResult:
    """Continue an interrupted study: runs FINISHED in MLflow are kept, unfinished ones continue from
    their last checkpoint, the dense and pruned models are reused, MLflow runs continued (no duplicates).

    `expect`: the config the caller means to run (`run --if-exists resume`); a study saved with another
    config is refused, naming the keys that differ.
    """
    configure_mlflow_env()
    folder = find_study(name_or_path, storage or "./studies")
    cfg = load_config(folder.config_path)
    if expect is not None and config_digest(expect) != config_digest(cfg):
        raise StudyError(_config_change(cfg, expect, folder))
    _lock(folder)
    try:
        meta = folder.read_meta()
        if meta.config_digest and config_digest(cfg) != meta.config_digest:
            raise StudyError(f"{folder.config_path} was edited after the study started (digest "
                             f"{config_digest(cfg)} vs {meta.config_digest}); restore it, or start a new "
                             "study with `tpp-study run CONFIG --if-exists replace`")
        if tracking_uri:
            meta = folder.update_meta(tracking_uri=tracking_uri)
        if not meta.parent_run_id:
            raise StudyError(f"study {meta.name} never got its MLflow parent run; start it again with "
                             f"`tpp-study run {folder.config_path} --if-exists replace`")
        try:
            check_tracking(meta.tracking_uri, wait_s=0)
        except TrackingUnavailable as e:
            raise StudyError(f"mlflow.tracking_uri: {e}") from None
        if meta.status == "completed" and not folder.pending_log.is_file():
            result = collect(folder)
            if result.status == "completed":
                print(f"[{meta.name}] nothing to do: all {meta.num_runs} runs finished", flush=True)
                return result
        started = _start_ray(address or meta.ray_address, cfg.ray.num_cpus)
        try:
            gpu = _gpu_fraction(cfg)
            embedded = started and not (address or meta.ray_address)
            return _execute(cfg, folder, gpu, restore=True, embedded=embedded, callbacks=callbacks or [])
        finally:
            if started:
                import ray

                ray.shutdown()
    finally:
        folder.unlock()


def _config_change(saved: StudyConfig, new: StudyConfig, folder: StudyFolder) -> str:
    a, b = flatten(_result_config(saved)), flatten(_result_config(new))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return (f"study {saved.name!r} at {folder.path} was started with another config ({', '.join(keys[:8])}"
            f"{' ...' if len(keys) > 8 else ''} differ); resume it as it is with `tpp-study resume "
            f"{folder.path}`, or start over with --if-exists replace")


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (schedulers, `docker stop`) stops the study like Ctrl-C: Tune's SIGINT handler ends it."""
    def handler(sig: int, frame: Any) -> None:
        current = signal.getsignal(signal.SIGINT)
        if callable(current):
            current(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _execute(cfg: StudyConfig, folder: StudyFolder, gpu: float, restore: bool, embedded: bool,
             callbacks: list[Any]) -> StudyResult:
    from ray import tune

    from study.trainable import TrialContext, trial

    t0 = time.monotonic()
    DiskGuard.last_stop = None
    problem = DiskGuard(str(folder.path), cfg.min_free_mb).problem()
    if problem:
        raise StudyError(problem)
    meta = folder.read_meta()
    _replay_pending(folder, meta)
    finished = finished_members(children(meta.tracking_uri, meta.experiment_id, meta.parent_run_id))
    meta = folder.update_meta(status="running", done=len(finished), failed=0)
    box = Outbox(meta.tracking_uri, {"parent": meta.parent_run_id})
    box.status("parent", "RUNNING")
    box.drain(10)
    previous = _sigterm_as_interrupt()
    status, result = "failed", None
    try:
        dense = _dense(cfg, folder, meta, gpu, embedded)
        if not meta.dense_digest:
            meta = folder.update_meta(dense_digest=dense.digest())
        cfg = _resolve_lockstep(cfg, dense, gpu)
        ctx = TrialContext(cfg, str(folder.path), finished)
        trainable = tune.with_resources(tune.with_parameters(trial, dense=dense, ctx=ctx),
                                        {"cpu": cfg.resources.cpus, "gpu": gpu})
        if restore and _tune_state_readable(folder.tune_path):
            print(f"[{cfg.name}] resuming: {len(finished)} of {meta.num_runs} runs had finished", flush=True)
            tuner = tune.Tuner.restore(str(folder.tune_path), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            if folder.tune_path.exists():  # never reached a saved Tune state: start the trials afresh
                shutil.rmtree(folder.tune_path)
            folder.optuna_db.unlink(missing_ok=True)
            tuner = _tuner(cfg, folder, trainable, dense, gpu, callbacks)
        print(f"[{cfg.name}] {meta.num_runs} runs ({cfg.sampler}), {cfg.resources.cpus:g} CPU"
              + (f" + {gpu:g} GPU" if gpu else "") + " per trial; one line per finished run:", flush=True)
        print(f"[{cfg.name}] best = highest {cfg.objective.metric}: "
              f"{OBJECTIVE_TEXT.get(cfg.objective.metric, cfg.objective.metric)}", flush=True)
        try:
            tuner.fit()
        except OSError as e:  # a full disk hit before the guard saw it: a stop, resumable
            if e.errno != errno.ENOSPC:
                raise
            DiskGuard.last_stop = f"no space left on the device of {folder.path}: {e}"
        result = collect(folder)
        if result.status != "completed" and DiskGuard.last_stop is None:
            # a write that hit the full disk between two checks ended the trials: the disk is the reason
            DiskGuard.last_stop = DiskGuard(str(folder.path), cfg.min_free_mb).problem()
        status = result.status
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(OSError):  # a full disk may refuse even this small file
            folder.update_meta(status=status)
        metrics = {}
        if result is not None:
            metrics = {f"runs_{k}": float(v) for k, v in result.counts.items()}
            if result.best:
                metrics[f"best_{result.best['metric']}"] = result.best["value"]
        best = result.best if result else None
        tags = {"tpp.study_status": status,
                "mlflow.note.content": study_note(cfg.description, meta.experiment_id, cfg.name, best)}
        if best:
            tags["tpp.best_run_id"] = best["run_id"]
        box.batch("parent", metrics=[(k, v, 0) for k, v in metrics.items()], tags=tags)
        box.status("parent", {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
        box.drain(5 if DiskGuard.last_stop else 30)
        sqlite_checkpoint(meta.tracking_uri)
    result.wall_s = time.monotonic() - t0
    result.stopped_because = DiskGuard.last_stop
    summary = {k: v for k, v in asdict(result).items() if k != "runs"}
    with contextlib.suppress(OSError):  # a full disk: the summary below still says everything
        (folder.path / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    print(result.summary(), flush=True)
    if result.stopped_because:
        print(f"tpp-study: stopped: {result.stopped_because}", file=sys.stderr, flush=True)
    return result


def _resolve_lockstep(cfg: StudyConfig, dense: Any, gpu: float) -> StudyConfig:
    """The config with `lockstep: auto` decided for this run's model and trial device (printed)."""
    if cfg.lockstep != "auto":
        return cfg
    from study.design import dense_run_config
    from tpp.lockstep import lockstep_refusal

    device = dense_run_config(cfg).device  # the trials' device: fixed.device, or auto (a GPU if given one)
    why = lockstep_refusal(dense.build(), device if device != "auto" else ("cuda" if gpu else "cpu"))
    print(f"[{cfg.name}] lockstep auto: " + (f"off ({why})" if why else "on"), flush=True)
    return cfg.model_copy(update={"lockstep": why is None})


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


def _replay_pending(folder: StudyFolder, meta: StudyMeta) -> None:
    """Deliver MLflow writes a previous session could not (its server was gone)."""
    if not folder.pending_log.is_file():
        return
    box = Outbox(meta.tracking_uri)
    box.load_pending(folder.pending_log)
    if box.drain(30):
        folder.pending_log.unlink()
