"""Faults a long study meets, each with real processes: the driver interrupted (SIGINT) or hard-killed
(SIGKILL) and resumed, a trial's worker process killed, a worker node of a multi-node cluster removed;
plus the hygiene and security rules every study relies on. Tiny MLPs on the synthetic set.

The invariant checked after each fault is the one users rely on: every planned trial has exactly one
finished MLflow run, none is left RUNNING, and a trial finished before the fault was not re-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from ray import tune
from test_study_run import check_member_runs, tiny

import study
from study.prune_cache import PruneCache
from study.record import collect, study_status
from study.store import StudyFolder
from study.tracking import children
from study.tuner import DiskGuard

ROOT = Path(__file__).resolve().parents[1]
TPP_STUDY = str(Path(sys.executable).with_name("tpp-study"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _runs_by_member(res: study.StudyResult) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in children(res.tracking_uri, res.experiment_id, res.parent_run_id):
        out.setdefault(r.data.tags["tpp.member_id"], []).append(r)
    return out


def _start_cli(tmp_path: Path, name: str, cfg: dict) -> tuple[subprocess.Popen, list[str], Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    storage = tmp_path / "studies"
    proc = subprocess.Popen([TPP_STUDY, "run", str(path), "--storage", str(storage)], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    return proc, lines, storage


def _wait_for(what, lines: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "".join(lines[-40:])
        time.sleep(0.2)


# two members per trial, one after the other: a stop after an odd count cuts a trial between its members
INTERRUPTED = dict(finetune__lr=[1e-3, 3e-3, 1e-2, 3e-2], finetune__epochs=3, finetune__per_trial=2,
                   max_concurrent=1, lockstep=False, data={"name": "synthetic", "kwargs": {"n_train": 6144,
                                                                                          "n_test": 128}})


def _finished_in_mlflow(path: Path) -> int:
    """FINISHED member runs in the study's SQLite store, read directly: a poll quicker than a run ends."""
    db = path / "mlflow.db"
    if not db.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        return con.execute("SELECT count(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                           "WHERE tags.key = 'tpp.member_id' AND runs.status = 'FINISHED'").fetchone()[0]


def _interrupt_cli(tmp_path: Path, name: str, sig: int) -> tuple[Path, dict[str, str], str]:
    """Start `tpp-study run`, send `sig` once 3 runs finished; returns (storage, finished, output)."""
    proc, lines, storage = _start_cli(tmp_path, name, tiny(name, **INTERRUPTED))
    stop_at = re.compile(rf"\[{name}\] ([3-9]|1[0-5])/16 runs done")
    _wait_for(lambda: any(stop_at.search(line) for line in lines), lines)
    # the writer thread delivers a finished run within a second of its line: stop once MLflow holds two
    _wait_for(lambda: _finished_in_mlflow(storage / name) >= 2, lines)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: a crash, no clean-up
    else:
        os.kill(proc.pid, sig)  # Ctrl-C, or a scheduler's / docker's stop, on the driver
    code = proc.wait(180)
    time.sleep(0.5)
    out = "".join(lines)
    if sig != signal.SIGKILL:
        assert code == 1, out[-3000:]  # interrupted: not 0, and no native crash (134)
        assert "tpp-study resume" in out and "Tuner.restore" not in out, out[-3000:]
    folder = StudyFolder(storage / name)
    meta = folder.read_meta()
    runs = children(meta.tracking_uri, meta.experiment_id, meta.parent_run_id)
    assert study_status(folder) == "interrupted"  # derived from MLflow and the (released) lock
    if sig != signal.SIGKILL:
        assert collect(folder).status == "interrupted"
        assert not [r for r in runs if r.info.status == "RUNNING"], "runs left RUNNING by a clean stop"
    finished = {r.data.tags["tpp.member_id"]: r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert len(finished) >= 2, out[-3000:]
    return storage, finished, out


def _resume_and_check(storage: Path, name: str, finished_before: dict[str, str], epochs: int = 3) -> None:
    proc = subprocess.run([TPP_STUDY, "resume", name, "--storage", str(storage)], cwd=storage.parent,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the progress counts on from the runs finished before, each run once (also those a resumed trial
    # had finished before the stop)
    counts = [int(n) for n in re.findall(rf"\[{name}\] (\d+)/16 runs done \(", proc.stdout)]
    assert counts == list(range(17 - len(counts), 17)) and len(counts) <= 16 - len(finished_before), counts
    res = collect(StudyFolder(storage / name))
    assert res.status == "completed" and res.num_runs == 16
    by_member = _runs_by_member(res)
    assert len(by_member) == 16 and all(len(v) == 1 for v in by_member.values())  # one run per member
    runs = [v[0] for v in by_member.values()]
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]  # nothing left RUNNING
    check_member_runs(res, runs, epochs=epochs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(res.tracking_uri)
    for mid, run_id in finished_before.items():
        assert by_member[mid][0].info.run_id == run_id
        # not re-run: each epoch of a member finished before the fault was logged exactly once
        steps = [m.step for m in client.get_metric_history(run_id, "finetune/test_acc")]
        assert sorted(steps) == sorted(set(steps)), (mid, steps)
    for r in runs:  # no metric step missing or doubled anywhere
        for key in ("finetune/test_acc", "finetune/train_loss"):
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert steps == list(range(epochs)), (r.info.run_name, key, steps)
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"
    again = subprocess.run([TPP_STUDY, "resume", name, "--storage", str(storage)], cwd=storage.parent,
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout and "Ray" not in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["int", "term", "kill"])
def test_driver_stopped_then_resumed(tmp_path, sig):
    name = f"stop{int(sig)}"
    storage, finished, _ = _interrupt_cli(tmp_path, name, sig)
    _resume_and_check(storage, name, finished)


def _long_prune_stage(name: str) -> dict:
    """One tpp prune point whose stage takes seconds, shared by 4 single-member trials."""
    return tiny(name, methods=["tpp"], space={"pr": [0.5], "growth": [0.01], "seeds": [0]},
                finetune__lr=[1e-3, 3e-3, 1e-2, 3e-2], finetune__per_trial=1, finetune__epochs=2,
                fixed={**tiny(name)["fixed"], "stabilize_reg_interval": 400}, max_failures=2)


@pytest.mark.slow
def test_driver_killed_while_a_shared_prune_stage_is_computed_then_resumed(tmp_path):
    name = "prunekill"
    proc, lines, storage = _start_cli(tmp_path, name, _long_prune_stage(name))
    cache = PruneCache(storage / name / "prune_cache")
    _wait_for(lambda: cache.computations(), lines)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert not list(cache.folder.glob("*.pt"))  # killed mid-stage: nothing half-written in the cache
    resumed = subprocess.run([TPP_STUDY, "resume", name, "--storage", str(storage)], cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    res = collect(StudyFolder(storage / name))
    by_member = _runs_by_member(res)
    assert res.status == "completed" and len(by_member) == 4 and all(len(v) == 1 for v in by_member.values())
    check_member_runs(res, [v[0] for v in by_member.values()], epochs=2)
    assert list(cache.computations().values()) == [2]  # the killed attempt and the one that finished


class KillPruneWorker(tune.Callback):
    """SIGKILL the worker process computing the shared prune stage as soon as it starts."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir, self.killed = cache_dir, False

    def on_step_end(self, iteration, trials, **info):
        log = Path(self.cache_dir) / "computed.log"
        if not self.killed and log.is_file() and log.read_text():
            pid = int(log.read_text().split()[-1].rsplit(":", 1)[1])
            self.killed = True
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_worker_killed_while_computing_a_shared_prune_stage(local_ray, tmp_path):
    """The trials of that stage wait for it; Tune retries the killed one; it is computed twice at most."""
    cfg = _long_prune_stage("workerprune")
    killer = KillPruneWorker(str(tmp_path / "workerprune" / "prune_cache"))
    res = study.run(cfg, storage=str(tmp_path), callbacks=[killer])
    assert killer.killed and res.status == "completed"
    by_member = _runs_by_member(res)
    assert len(by_member) == 4 and all(len(v) == 1 for v in by_member.values())
    check_member_runs(res, [v[0] for v in by_member.values()], epochs=2)
    assert list(PruneCache(Path(res.path) / "prune_cache").computations().values()) == [2]


# ---------------------------------------------------------------------------------------------- workers
class KillWorker(tune.Callback):
    """SIGKILL the process running the first finetune trial that reports its second epoch."""

    def __init__(self) -> None:
        self.killed: str | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and result.get("epoch") == 2 and "tpp_done" not in result:
            self.killed = trial.trial_id
            os.kill(int(result["pid"]), signal.SIGKILL)


@pytest.fixture
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_killed_trial_worker_is_retried_from_its_checkpoint(local_ray, tmp_path, capsys):
    cfg = tiny("workerkill", space={"pr": [0.5], "growth": [0.2], "seeds": [0]}, finetune__lr=[1e-2, 3e-2],
               finetune__epochs=5, max_failures=2, checkpoint_min_interval_s=0)
    killer = KillWorker()
    res = study.run(cfg, storage=str(tmp_path), callbacks=[killer])
    assert killer.killed is not None
    assert res.status == "completed"
    # the progress counts each run once, also the runs the retried trial had finished before the kill
    counts = [int(n) for n in re.findall(r"\] (\d+)/4 runs done", capsys.readouterr().out)]
    assert counts == list(range(1, 5)), counts
    by_member = _runs_by_member(res)
    assert all(len(v) == 1 for v in by_member.values()) and len(by_member) == 4  # continued, not duplicated
    runs = [v[0] for v in by_member.values()]
    check_member_runs(res, runs, epochs=5)
    killed = [r for r in runs if r.data.tags["tpp.trial_id"] == killer.killed]
    assert killed and all(r.data.tags["tpp.status"] == "completed" for r in killed)
    # continued from a checkpoint (the metric is the epoch it was taken at), not restarted from scratch
    assert any(r.data.metrics.get("resumed_from_epoch", -1) >= 0 for r in killed)
    # resource hygiene: bounded checkpoints per trial, disk use reported
    for trial_dir in (Path(res.path) / "tune").glob("trial_*"):
        assert len(list(trial_dir.glob("checkpoint_*"))) <= 2, trial_dir
    assert res.disk_bytes > 0 and "on disk" in res.summary()


_CLUSTER: dict = {}  # module level: Tune pickles its callbacks, and a Cluster cannot be pickled


class RemoveNode(tune.Callback):
    """Remove the worker node that runs the first trial reporting an epoch."""

    def __init__(self) -> None:
        self.removed: str | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        node = str(result.get("tpp_node", "")).split("/")[-1]
        workers = _CLUSTER.get("workers", [])
        victim = next((w for w in workers if w.node_id.startswith(node)), None) if node else None
        if self.removed is None and victim is not None and "tpp_done" not in result:
            self.removed = victim.node_id
            threading.Thread(target=_CLUSTER["cluster"].remove_node, args=(victim,), daemon=True).start()


@pytest.mark.slow
def test_study_survives_losing_a_worker_node(tmp_path, multi_node_cluster):
    cluster, workers = multi_node_cluster
    _CLUSTER.update(cluster=cluster, workers=workers)
    try:
        remover = RemoveNode()
        cfg = tiny("nodeloss", space={"pr": [0.5], "growth": [0.2], "seeds": [0]},
                   finetune__lr=[1e-3, 1e-2, 3e-2], finetune__epochs=4, finetune__per_trial=1,
                   max_concurrent=3, max_failures=3)
        res = study.run(cfg, storage=str(tmp_path), address=cluster.address, callbacks=[remover])
        assert remover.removed is not None
        assert res.status == "completed"
        by_member = _runs_by_member(res)
        assert len(by_member) == 6 and all(len(v) == 1 for v in by_member.values())
        check_member_runs(res, [v[0] for v in by_member.values()], epochs=4)
        assert Counter(v[0].data.tags["tpp.status"] for v in by_member.values()) == {"completed": 6}
    finally:
        _CLUSTER.clear()


# ---------------------------------------------------------------------------------------------- security
SOURCES = [p for d in ("tpp", "study", "analysis", "benchmarks") for p in (ROOT / d).rglob("*.py")]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_sources_follow_the_security_rules(path):
    text = path.read_text()
    for call in re.finditer(r"torch\.load\(", text):
        args = text[call.end():text.find(")", call.end()) + 200]
        assert "weights_only=True" in args, f"{path}: torch.load without weights_only=True"
    assert not re.search(r"yaml\.(load|unsafe_load)\(", text), f"{path}: use yaml.safe_load"
    assert "shell=True" not in text and "os.system(" not in text, f"{path}: no shell strings"
    assert "0.0.0.0" not in text, f"{path}: bind to 127.0.0.1 unless the user asks otherwise"


# ---------------------------------------------------------------------------------------------- disk
class FillDisk(tune.Callback):
    """Once the first member finished, fill the study's filesystem to `leave` bytes -- once: Tune
    restores its callbacks on resume, so the marker beside the mount says it already happened."""

    def __init__(self, path: str, leave: int) -> None:
        self.path, self.leave = path, leave
        self.marker = Path(path).parent / "disk_was_filled"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.marker.exists() and result.get("tpp_done"):
            self.marker.touch()
            free = shutil.disk_usage(self.path).free
            with open(Path(self.path) / "filler", "wb") as f:
                f.write(b"\0" * max(free - self.leave, 0))


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MB filesystem (tmpfs) for the study folder; needs the right to mount (root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_study_cleanly_and_resume_finishes_it(local_ray, small_disk, capsys,
                                                                    monkeypatch):
    # the guard looks at every step, not every 2 s: the 7 runs left after the fill may take less than that
    monkeypatch.setattr(DiskGuard, "EVERY_S", 0.0)
    cfg = tiny("full", finetune__per_trial=1, finetune__epochs=3, max_concurrent=1, min_free_mb=1)
    res = study.run(cfg, storage=str(small_disk), callbacks=[FillDisk(str(small_disk), 300_000)])
    err = capsys.readouterr().err
    assert res.status == "interrupted" and res.exit_code == 1
    assert res.stopped_because and "disk almost full" in res.stopped_because and "free" in res.stopped_because
    assert [line for line in err.splitlines() if line.startswith("tpp-study: stopped:")] == [
        f"tpp-study: stopped: {res.stopped_because}"]
    folder = StudyFolder(small_disk / "full")
    assert study_status(folder) == "interrupted"  # from MLflow: study.json holds no status
    (small_disk / "filler").unlink()  # space is back
    again = study.resume(str(folder.path))
    assert again.status == "completed"
    by_member = _runs_by_member(again)
    assert len(by_member) == 8 and all(len(v) == 1 for v in by_member.values())
    check_member_runs(again, [v[0] for v in by_member.values()], epochs=3)


@pytest.mark.slow
def test_one_study_one_writer(tmp_path):
    """While a study runs, a second `run` (any --if-exists) and a `resume` refuse in one line naming
    the holder, and the running study ends with exactly one run per member."""
    cfg = tiny("busy", finetune__epochs=4)
    proc, lines, storage = _start_cli(tmp_path, "busy", cfg)
    folder = StudyFolder(storage / "busy")
    _wait_for(lambda: folder.lock_path.is_file() and folder.holder() and folder.meta_path.is_file(), lines)
    config = str(tmp_path / "busy.yaml")
    # the driver is paused (as a suspended laptop would be) while the others try: a study this small
    # could otherwise end before the fourth attempt has started; it holds its lock all the same
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        live_copy = tmp_path / "copy" / "busy"  # a copy of the live study (same id) is refused too
        shutil.copytree(folder.path, live_copy, symlinks=True)
        for argv in (["run", config], ["run", config, "--if-exists", "replace"],
                     ["run", config, "--if-exists", "resume"], ["resume", "busy"],
                     ["resume", str(live_copy)]):
            other = subprocess.run([TPP_STUDY, *argv, "--storage", str(storage)], cwd=tmp_path, env=_env(),
                                   capture_output=True, text=True, timeout=120)
            assert other.returncode == 2, (argv, other.stdout[-2000:], other.stderr[-2000:])
            err = other.stderr.strip().splitlines()
            assert len(err) == 1 and "is being run by pid" in err[0] and str(proc.pid) in err[0], (argv, err)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(300) == 0, "".join(lines[-40:])
    res = collect(folder)
    by_member = _runs_by_member(res)
    assert res.status == "completed" and len(by_member) == 8 and all(len(v) == 1 for v in by_member.values())
    assert folder.holder() is None


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` with its content digest (what "untouched" means)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_a_copied_study_folder_resumes_into_itself_leaving_the_original_untouched(tmp_path):
    """A study killed mid-run, its folder copied elsewhere under another parent (`cp -a`), resumed there:
    the copy finishes into its own store and artifact folder, the original is not written, and with the
    original deleted the copy's status and report still work."""
    name = "moved"
    storage, finished, _ = _interrupt_cli(tmp_path, name, signal.SIGKILL)
    original = storage / name
    before = _tree_digest(original)
    elsewhere = tmp_path / "laptop" / "copied studies"  # another parent, with a space in its path
    shutil.copytree(original, elsewhere / name, symlinks=True)
    _resume_and_check(elsewhere, name, finished)
    assert _tree_digest(original) == before  # nothing written to the original
    copy = StudyFolder(elsewhere / name)
    meta = copy.read_meta()
    assert meta.tracking_uri == copy.default_tracking_uri
    assert json.loads(copy.meta_path.read_text())["tracking_uri"] == ""  # its own store, relatively
    from mlflow.tracking import MlflowClient

    c = MlflowClient(meta.tracking_uri)
    assert c.get_experiment(meta.experiment_id).artifact_location == copy.artifacts.as_uri()
    assert c.get_run(meta.parent_run_id).info.artifact_uri.startswith(copy.artifacts.as_uri())
    shutil.rmtree(original)
    status = subprocess.run([TPP_STUDY, "status", str(copy.path)], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "16/16 finished" in status.stdout, status.stdout + status.stderr
    assert not original.exists()  # status created nothing at the old place
