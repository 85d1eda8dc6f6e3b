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
import shlex
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from study.config import OBJECTIVE_TEXT, StudyConfig, StudyConfigError
from study.errors import StudyError, StudyInterrupted
from study.loading import load_config
from study.outbox import Outbox
from study.record import StudyResult, _start_parent, adopt_artifact_root, collect, end_parent
from study.store import StudyBusy, StudyFolder, StudyMeta, find_study, running_from
from study.tracking import (
    TrackingUnavailable,
    absolute_uri,
    check_store,
    check_tracking,
    children,
    configure_mlflow_env,
    end_wait_s,
    finished_members,
    flatten,
    hand_over,
    is_http,
    server_healthy,
    sqlite_checkpoint,
)

# study.tuner (Ray Tune, ~1.5 s to import) and study.dense are imported where a study trains, so that
# `resume` of a finished study, `status` and the config checks start without them.

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
    if address:
        _check_answers(address)
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **common)
    except Exception as e:  # noqa: BLE001 - any connection problem, said in one line
        raise StudyError(f"ray.address: cannot start/join Ray at {address or 'a local instance'}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return True


def _check_answers(address: str, timeout_s: float = 10.0) -> None:
    """A cluster address (`HOST:PORT`, `ray://HOST:PORT`) must accept a connection before `ray.init` joins
    it: Ray itself retries an address nobody listens on for minutes. ("auto" is Ray's to resolve.)"""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        how = ("`ray start --head --port PORT` on the head" if not address.startswith("ray://")
               else "a Ray client server (`ray start --head` serves ray:// on port 10001)")
        why = e.strerror or type(e).__name__
        raise StudyError(f"ray.address: nothing answers at {address} (tried a TCP connection to "
                         f"{host}:{port} for {timeout_s:.0f} s: {why}); start {how}, or leave ray.address "
                         "out for an embedded local Ray") from None


def _absolute_paths(cfg: StudyConfig) -> StudyConfig:
    """Resolve relative paths once (the saved config must work from any directory and in trials)."""
    def ab(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().absolute())

    uri = cfg.mlflow.tracking_uri
    return cfg.model_copy(update={
        "storage": ab(cfg.storage),
        "mlflow": cfg.mlflow.model_copy(update={"tracking_uri": absolute_uri(uri) if uri else uri}),
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
    from tpp.run import load_run_data, model_spec, run_splits

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
    return run_splits(run_cfg, data)[0].num_train


# ---------------------------------------------------------------------------------------------- dense


# ---------------------------------------------------------------------------------------------- tune


# ---------------------------------------------------------------------------------------------- results


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
                         f"`tpp-study resume {shlex.quote(str(folder.path))}`, or pass --if-exists "
                         "replace to start over")
    uri = cfg.tracking_uri()
    try:
        check_tracking(uri)  # before anything is written: a bad URI leaves no folder behind
    except TrackingUnavailable as e:
        raise StudyError(f"mlflow.tracking_uri: {e}") from None
    new_folder = not folder.path.exists()
    new_storage = not folder.path.parent.exists()
    begun = False  # the parent run exists: from here on the folder holds a (resumable) study
    _lock(folder)
    try:
        if folder.path.exists():
            for child in folder.path.iterdir():  # replace: everything but the lock we hold
                if child != folder.lock_path:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        started = _start_ray(cfg.ray.address, cfg.ray.num_cpus)
        try:
            from study.tuner import _gpu_fraction

            gpu = _gpu_fraction(cfg)
            folder.config_path.write_text(cfg.to_yaml())
            num_runs = _num_runs(cfg)
            meta = StudyMeta(name=cfg.name, tracking_uri=uri, experiment=cfg.experiment(), num_runs=num_runs,
                             config_digest=config_digest(cfg), train_samples=train_samples,
                             ray_address=cfg.ray.address or os.environ.get("RAY_ADDRESS"))
            folder.write_meta(meta)
            _start_parent(cfg, folder, uri, num_runs)
            begun = True
            with running_from(folder):
                return _execute(cfg, folder, gpu, restore=False, embedded=started and not cfg.ray.address,
                                callbacks=callbacks or [])
        finally:
            if started:
                import ray

                ray.shutdown()
    finally:
        folder.unlock()
        if new_folder and not begun:  # it could not start: "nothing started" leaves nothing behind
            shutil.rmtree(folder.path, ignore_errors=True)
            if new_storage:
                with contextlib.suppress(OSError):  # only while empty: another study may have begun there
                    folder.path.parent.rmdir()


def _num_runs(cfg: StudyConfig) -> int:
    from study.design import plan

    return plan(cfg).num_runs if cfg.is_design else cfg.num_trials or 0


def _lock(folder: StudyFolder) -> None:
    try:
        folder.lock()
    except StudyBusy as e:
        raise StudyError(str(e)) from None
    except OSError as e:  # a file given as --storage, read-only media, no permission
        raise StudyError(f"storage: cannot write the study folder {folder.path} ({e.strerror}); a study "
                         "needs a writable folder (--storage)") from None


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
        if _finish_extension(folder, meta):
            cfg = load_config(folder.config_path)
        if meta.config_digest and config_digest(cfg) != meta.config_digest:
            raise StudyError(f"{folder.config_path} was edited after the study started (digest "
                             f"{config_digest(cfg)} vs {meta.config_digest}); restore it, or start a new "
                             "study with `tpp-study run CONFIG --if-exists replace`")
        if not meta.parent_run_id:
            raise StudyError(f"study {meta.name} never got its MLflow parent run; start it again with "
                             f"`tpp-study run {folder.config_path} --if-exists replace`")
        uri = absolute_uri(tracking_uri) if tracking_uri else meta.tracking_uri
        check_record(uri, meta, "--tracking-uri" if tracking_uri else "mlflow.tracking_uri")
        if tracking_uri and uri != meta.tracking_uri:  # checked: the study's record is there
            print(f"[{meta.name}] its MLflow store is now {uri}", flush=True)
            meta = folder.update_meta(tracking_uri=uri)
        if not folder.pending_log.is_file():
            result = collect(folder, recorded=True)  # one read when the study ended complete
            if result.status == "completed":
                print(f"[{meta.name}] nothing to do: all {meta.num_runs} runs finished", flush=True)
                return result
        return run_locked(cfg, folder, address or meta.ray_address, restore=True, callbacks=callbacks)
    finally:
        folder.unlock()


def _finish_extension(folder: StudyFolder, meta: StudyMeta) -> bool:
    """An `extend` stopped between recording its config in study.json and putting it in place: put it in
    place (True), or drop it when study.json never recorded it."""
    pending = folder.extension_config_path
    if not pending.is_file():
        return False
    if config_digest(load_config(pending)) == meta.config_digest:
        os.replace(pending, folder.config_path)
        return True
    pending.unlink()
    return False


def run_locked(cfg: StudyConfig, folder: StudyFolder, address: str | None, restore: bool,
               callbacks: list[Any] | None) -> StudyResult:
    """Run a study whose folder this process has locked and whose record exists: join or start Ray, run
    (restoring Tune's saved state when `restore`), stop an embedded Ray."""
    started = _start_ray(address, cfg.ray.num_cpus)
    try:
        from study.tuner import _gpu_fraction

        gpu = _gpu_fraction(cfg)
        with running_from(folder):
            return _execute(cfg, folder, gpu, restore=restore, embedded=started and not address,
                            callbacks=callbacks or [])
    finally:
        if started:
            import ray

            ray.shutdown()


def changed_keys(saved: StudyConfig, new: StudyConfig) -> list[str]:
    """The dotted config keys whose values differ between two configs (operational keys left out)."""
    a, b = flatten(_result_config(saved)), flatten(_result_config(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_record(uri: str, meta: StudyMeta, field: str = "mlflow.tracking_uri") -> None:
    """The store at `uri` answers and holds the study's parent run; else StudyError naming `field`."""
    try:
        check_tracking(uri)
        check_store(uri, meta.parent_run_id, meta.name)
    except TrackingUnavailable as e:
        raise StudyError(f"{field}: {e}") from None


def _config_change(saved: StudyConfig, new: StudyConfig, folder: StudyFolder) -> str:
    keys = changed_keys(saved, new)
    return (f"study {saved.name!r} at {folder.path} was started with another config ({', '.join(keys[:8])}"
            f"{' ...' if len(keys) > 8 else ''} differ); resume it as it is with `tpp-study resume "
            f"{shlex.quote(str(folder.path))}`, or start over with --if-exists replace")


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
    from study.dense import _dense
    from study.tuner import DiskGuard

    t0 = time.monotonic()
    DiskGuard.last_stop = None
    problem = DiskGuard(str(folder.path), cfg.min_free_mb).problem()
    if problem:
        raise StudyError(problem)
    meta = folder.read_meta()
    adopt_artifact_root(folder, meta)
    _replay_pending(folder, meta)
    runs = children(meta.tracking_uri, meta.experiment_id, meta.parent_run_id)
    finished = finished_members(runs)
    box = Outbox(meta.tracking_uri, {"parent": meta.parent_run_id})
    box.status("parent", "RUNNING")
    box.drain(10)
    previous = _sigterm_as_interrupt()
    status, result = "failed", None
    try:
        hand_over(meta.parent_run_id, runs)  # its logger and progress callbacks take them: one read
        del runs
        dense = _dense(cfg, folder, meta, gpu, embedded)
        if not meta.dense_digest:
            meta = folder.update_meta(dense_digest=dense.digest())
        cfg = _resolve_lockstep(cfg, dense, gpu)
        tuner = _new_or_restored_tuner(cfg, folder, dense, gpu, restore, finished, callbacks)
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
        try:
            result = collect(folder)
        except Exception:
            if not is_http(meta.tracking_uri) or server_healthy(meta.tracking_uri):
                raise
            status = "interrupted"  # every trial ended; only the record is behind
            saved = folder.pending_log.is_file()
            kept = f"the writes it missed are saved in {folder.pending_log}; " if saved else ""
            raise StudyError(f"the MLflow server {meta.tracking_uri} stopped answering; {kept}once it "
                             f"answers again, `tpp-study resume {shlex.quote(str(folder.path))}` "
                             f"{'delivers them and ' if saved else ''}finishes the study") from None
        if result.status != "completed" and DiskGuard.last_stop is None:
            # a write that hit the full disk between two checks ended the trials: the disk is the reason
            DiskGuard.last_stop = DiskGuard(str(folder.path), cfg.min_free_mb).problem()
        status = result.status
    except KeyboardInterrupt:
        status = "interrupted"
        raise StudyInterrupted(f"study {cfg.name!r} interrupted; continue it with `tpp-study resume "
                               f"{shlex.quote(str(folder.path))}`") from None
    finally:
        hand_over(meta.parent_run_id, None)  # not taken (no trial started): not kept alive
        signal.signal(signal.SIGTERM, previous)
        wait_s = 5 if DiskGuard.last_stop else min(30, end_wait_s())
        end_parent(box, cfg, meta.experiment_id, status, result, wait_s=wait_s)
        sqlite_checkpoint(meta.tracking_uri)
    result.wall_s = time.monotonic() - t0
    result.stopped_because = DiskGuard.last_stop
    print(result.summary(), flush=True)
    if result.stopped_because:
        print(f"tpp-study: stopped: {result.stopped_because}", file=sys.stderr, flush=True)
    return result


def _new_or_restored_tuner(cfg: StudyConfig, folder: StudyFolder, dense: Any, gpu: float, restore: bool,
                           finished: dict[str, Any], callbacks: list[Any]) -> Any:
    """The Tuner of a study: restored from the study folder when it holds a readable Tune state, else new
    (an unreadable state starts the unfinished runs afresh: finished ones are skipped either way)."""
    from ray import tune

    from study.trainable import TrialContext, trial
    from study.tuner import _tune_state_readable, _tuner

    ctx = TrialContext.of(cfg, str(folder.path), finished)
    trainable = tune.with_resources(tune.with_parameters(trial, dense=dense, ctx=ctx),
                                    {"cpu": cfg.resources.cpus, "gpu": gpu})
    if restore and _tune_state_readable(folder.tune_path):
        print(f"[{cfg.name}] resuming: {len(finished)} of {folder.read_meta().num_runs} runs had finished",
              flush=True)
        return tune.Tuner.restore(str(folder.tune_path), trainable, resume_unfinished=True,
                                  resume_errored=True)
    if folder.tune_path.exists():  # never reached a saved Tune state: start the trials afresh
        shutil.rmtree(folder.tune_path)
    folder.optuna_db.unlink(missing_ok=True)
    return _tuner(cfg, folder, trainable, dense, gpu, callbacks)


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


def _replay_pending(folder: StudyFolder, meta: StudyMeta) -> None:
    """Deliver MLflow writes a previous session could not (its server was gone)."""
    if not folder.pending_log.is_file():
        return
    box = Outbox(meta.tracking_uri)
    box.load_pending(folder.pending_log)
    if box.drain(30):
        folder.pending_log.unlink()
