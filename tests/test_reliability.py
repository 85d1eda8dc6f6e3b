"""Faults a long study meets, each with real processes: the driver interrupted (SIGINT) or hard-killed
(SIGKILL) and resumed, a trial's worker process killed, a worker node of a multi-node cluster removed;
plus the hygiene and security rules every study relies on. Tiny MLPs on the synthetic set.

The invariant checked after each fault is the one users rely on: every planned trial has exactly one
finished MLflow run, none is left RUNNING, and a trial finished before the fault was not re-run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml
from ray import tune
from test_study_run import check_trial_runs, tiny

import study
from study.driver import collect
from study.mlflow_logging import children
from study.store import StudyFolder

ROOT = Path(__file__).resolve().parents[1]
TPP_STUDY = str(Path(sys.executable).with_name("tpp-study"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _runs_by_trial(res: study.StudyResult) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in children(res.tracking_uri, res.experiment_id, res.parent_run_id):
        out.setdefault(r.data.tags["tpp.trial_id"], []).append(r)
    return out


def _interrupt_cli(tmp_path: Path, name: str, sig: int) -> tuple[Path, dict[str, str], str]:
    """Start `tpp-study run`, send `sig` once 2 trials finished; returns (storage, finished, output)."""
    cfg = tiny(name, space={"lr": [1e-3, 3e-3, 1e-2, 3e-2], "pr": [0.5, 0.75], "growth": [0.2], "seeds": [0]},
               finetune={"epochs": 3}, max_concurrent=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    storage = tmp_path / "studies"
    proc = subprocess.Popen([TPP_STUDY, "run", str(path), "--storage", str(storage)], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    two_done = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if re.search(rf"\[{name}\] [2-9]/16 done", line):
                two_done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert two_done.wait(300), "".join(lines[-40:])
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: a crash, no clean-up
    else:
        os.kill(proc.pid, sig)  # Ctrl-C on the driver
    code = proc.wait(180)
    reader.join(10)
    out = "".join(lines)
    if sig == signal.SIGINT:
        assert code == 1, out[-3000:]
        assert "Resume:" in out and "tpp-study resume" in out
    # what MLflow holds now, per trial: the finished ones must survive the resume untouched
    folder = StudyFolder(storage / name)
    meta = folder.read_meta()
    finished = {r.data.tags["tpp.trial_id"]: r.info.run_id
                for r in children(meta.tracking_uri, meta.experiment_id, meta.parent_run_id)
                if r.info.status == "FINISHED"}
    assert len(finished) >= 2, out[-3000:]
    return storage, finished, out


def _resume_and_check(storage: Path, name: str, finished_before: dict[str, str]) -> None:
    proc = subprocess.run([TPP_STUDY, "resume", name, "--storage", str(storage)], cwd=storage.parent,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = collect(StudyFolder(storage / name))
    assert res.status == "completed" and res.num_trials == 16
    by_trial = _runs_by_trial(res)
    assert len(by_trial) == 16 and all(len(v) == 1 for v in by_trial.values())  # exactly one run per trial
    runs = [v[0] for v in by_trial.values()]
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]  # nothing left RUNNING
    check_trial_runs(res, runs, epochs=3)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(res.tracking_uri)
    for tid, run_id in finished_before.items():
        assert by_trial[tid][0].info.run_id == run_id
        # not re-run: each epoch of a trial finished before the fault was logged exactly once
        steps = [m.step for m in client.get_metric_history(run_id, "finetune/test_acc")]
        assert sorted(steps) == sorted(set(steps)), (tid, steps)
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_driver_ctrl_c_then_resume(tmp_path):
    storage, finished, _ = _interrupt_cli(tmp_path, "sigint", signal.SIGINT)
    _resume_and_check(storage, "sigint", finished)


@pytest.mark.slow
def test_driver_hard_kill_then_resume(tmp_path):
    storage, finished, _ = _interrupt_cli(tmp_path, "sigkill", signal.SIGKILL)
    _resume_and_check(storage, "sigkill", finished)


# ---------------------------------------------------------------------------------------------- workers
class KillWorker(tune.Callback):
    """SIGKILL the process running the first trial that reports its second finetuning epoch."""

    def __init__(self) -> None:
        self.killed: str | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and result.get("epoch") == 1 and "tpp_final" not in result:
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
def test_killed_trial_worker_is_retried_from_its_checkpoint(local_ray, tmp_path):
    cfg = tiny("workerkill", space={"lr": [1e-2, 3e-2], "pr": [0.5], "growth": [0.2], "seeds": [0]},
               finetune={"epochs": 5}, max_failures=2, checkpoint_min_interval_s=0)
    killer = KillWorker()
    res = study.run(cfg, storage=str(tmp_path), callbacks=[killer])
    assert killer.killed is not None
    assert res.status == "completed"
    by_trial = _runs_by_trial(res)
    assert all(len(v) == 1 for v in by_trial.values()) and len(by_trial) == 4  # continued, not duplicated
    runs = [v[0] for v in by_trial.values()]
    check_trial_runs(res, runs, epochs=5)
    killed = by_trial[killer.killed][0]
    assert killed.data.tags["tpp.status"] == "completed"
    # continued from a checkpoint (the metric is the epoch it was taken at), not restarted from scratch
    assert killed.data.metrics["resumed_from_epoch"] >= 0
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
        if self.removed is None and victim is not None and "tpp_final" not in result:
            self.removed = victim.node_id
            threading.Thread(target=_CLUSTER["cluster"].remove_node, args=(victim,), daemon=True).start()


@pytest.mark.slow
def test_study_survives_losing_a_worker_node(tmp_path, multi_node_cluster):
    cluster, workers = multi_node_cluster
    _CLUSTER.update(cluster=cluster, workers=workers)
    try:
        remover = RemoveNode()
        cfg = tiny("nodeloss", space={"lr": [1e-3, 1e-2, 3e-2], "pr": [0.5], "growth": [0.2], "seeds": [0]},
                   finetune={"epochs": 4}, max_concurrent=3, max_failures=3)
        res = study.run(cfg, storage=str(tmp_path), address=cluster.address, callbacks=[remover])
        assert remover.removed is not None
        assert res.status == "completed"
        by_trial = _runs_by_trial(res)
        assert len(by_trial) == 6 and all(len(v) == 1 for v in by_trial.values())
        check_trial_runs(res, [v[0] for v in by_trial.values()], epochs=4)
        assert Counter(v[0].data.tags["tpp.status"] for v in by_trial.values()) == {"completed": 6}
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
