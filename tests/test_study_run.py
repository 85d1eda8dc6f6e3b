"""Studies end to end on a real Ray, real Optuna and real MLflow (SQLite, a real `mlflow server`, and a
multi-node `ray.cluster_utils.Cluster`), with a tiny MLP on the synthetic set so each takes seconds.

What is checked is what users of a study rely on: every trial is one MLflow run nested under the
study's run, with its per-epoch history, the right status and tags; the prune stage is computed once
per prune key and reused otherwise; an interrupted study resumes without duplicating anything; the
tracking server may go away for a while without losing a metric.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from ray import tune

import study
from study import sql_reads
from study.design import PrunePoint, members, run_config
from study.loading import load_config
from study.prune_cache import PruneCache
from study.record import short
from study.store import StudyFolder
from tpp.models import ModelSpec
from tpp.results import PrunedModel

SPEC = ModelSpec("mlp", 10, (4,), {})
TINY = {
    "name": "tiny",
    "model": {"name": "mlp", "kwargs": {"depth": 3, "width": 16, "activation": "relu"}},
    "data": {"name": "synthetic", "kwargs": {"n_train": 256, "n_test": 128}},
    "dense": {"epochs": 2, "lr": 0.05, "batch_size": 64},
    "methods": ["l1", "tpp"],
    "space": {"pr": [0.5, 0.75], "growth": [0.2], "seeds": [0]},
    # lr 1e4 makes the finetuning loss blow up: those members must end "diverged", not "failed".
    "finetune": {"lr": [1e-2, 1e4], "epochs": 2, "batch_size": 64},
    "fixed": {"reg_batch_size": 64, "update_reg_interval": 1, "stabilize_reg_interval": 4, "jsv_samples": 4,
              "device": "cpu"},
    "max_concurrent": 2,
}


def tiny(name: str, **changes) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["name"] = name
    for key, value in changes.items():
        if "__" in key:  # finetune__epochs=3: one key of a section
            section, sub = key.split("__")
            cfg[section] = {**cfg[section], sub: value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; the study API reuses an initialised Ray and leaves it running."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def child_runs(res: study.StudyResult) -> list:
    from study.tracking import children

    return children(res.tracking_uri, res.experiment_id, res.parent_run_id)


def prune_keys(folder: Path, runs: list, cfg_dict: dict) -> set[str]:
    """The distinct prune keys of the runs of methods with a penalty, computed from each run's params
    independently of the study (and checked against the run's tag)."""
    from tpp.checkpoint import load_dense
    from tpp.methods import get_method
    from tpp.run import prune_key

    cfg = load_config(cfg_dict, storage=str(folder.parent))
    dense = load_dense(folder / "dense.pt")
    keys = set()
    for r in runs:
        p = r.data.params
        point = PrunePoint(p["method_label"], float(p["pr"]), float(p["growth"]) if "growth" in p else None,
                           int(p["seed"]))
        member = next(m for m in members(cfg) if m["lr"] == float(p["lr"]))
        key = prune_key(run_config(cfg, point, member), dense)
        assert r.data.tags["tpp.prune_key"] == key
        if get_method(p["method"]).regularize:
            keys.add(key)
    return keys


def check_member_runs(res: study.StudyResult, runs: list, epochs: int) -> None:
    """Every member: nested, tagged, named, parametrised, with its per-epoch history and final metrics."""
    c = client(res.tracking_uri)
    assert len(runs) == res.num_runs
    assert len({r.data.tags["tpp.member_id"] for r in runs}) == len(runs)  # no duplicates
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        assert tags["mlflow.parentRunId"] == res.parent_run_id
        assert tags["tpp.study"] == res.name and tags["tpp.role"] == "trial"
        assert tags["tpp.method"] == params["method_label"]
        assert tags["tpp.status"] in ("completed", "diverged")
        assert r.info.status == "FINISHED"
        assert ("growth" in params) == (params["has_penalty"] == "1") == (params["method"] != "l1")
        assert r.info.run_name.startswith(f"lr={short(float(params['lr']))} {params['method_label']} pr=")
        assert float(params["log10_lr"]) == pytest.approx(math.log10(float(params["lr"])), abs=1e-4)
        assert {"best_acc", "last_acc", "acc_after_removal", "params", "flops", "iters_total"} <= set(metrics)
        assert not any(k.startswith("dense_") for k in metrics)  # the dense model's: once, on the study run
        assert 0 <= metrics["best_acc"] <= 100
        history = c.get_metric_history(r.info.run_id, "finetune/test_acc")
        steps = sorted(m.step for m in history)
        if tags["tpp.status"] == "completed":
            assert steps == list(range(epochs)), (r.info.run_name, steps)
        else:
            assert len(steps) == len(set(steps)) >= 1


# ---------------------------------------------------------------------------------------------- tests
def test_outbox_merges_a_runs_batches_without_losing_or_reordering_writes(tmp_path):
    """Per-epoch writes of two interleaved runs go out in a few log_batch calls; a later tag value
    still wins, and a write after a run's status change stays after it."""
    from study.outbox import MAX_METRICS, Outbox

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = client(uri).create_experiment("outbox")
    box = Outbox(uri)
    for key in ("a", "b"):
        box.create_run(key, exp, key, {"tpp.status": "running"})
    epochs = 40
    for epoch in range(epochs):  # interleaved, one op per run per epoch, as trials report them
        for key in ("a", "b"):
            box.batch(key, metrics=[(f"finetune/{m}", epoch + i, epoch) for i, m in enumerate("xyz")])
    box.batch("a", tags={"tpp.status": "completed"})
    box.status("a", "FINISHED")
    box.batch("a", tags={"tpp.status": "interrupted"})  # after the status change: must stay after it
    box.batch("b", metrics=[(f"big/{i}", i, 0) for i in range(MAX_METRICS)])  # overflows one call
    queued = len(box.ops)
    assert box.flush()
    assert box.delivered < queued / 10, (box.delivered, queued)
    c = client(uri)
    for key in ("a", "b"):
        run_id = box.run_ids[key]
        for i, m in enumerate("xyz"):
            history = c.get_metric_history(run_id, f"finetune/{m}")
            assert sorted((h.step, h.value) for h in history) == [(e, e + i) for e in range(epochs)]
    a, b = c.get_run(box.run_ids["a"]), c.get_run(box.run_ids["b"])
    assert a.data.tags["tpp.status"] == "interrupted" and a.info.status == "FINISHED"
    assert len([k for k in b.data.metrics if k.startswith("big/")]) == MAX_METRICS


def test_writer_thread_delivers_every_write_once_in_order_while_more_are_queued(tmp_path):
    """Tune's loop queues while the writer thread delivers: every metric lands once, a run's later tag
    value wins, and `wait()` returns only once everything queued before it is in MLflow."""
    from study.outbox import Outbox
    from study.writer import Writer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = client(uri).create_experiment("writer")
    box = Outbox(uri)
    writer = Writer(box, every_s=0.01)  # flushing all the time: as many races as the test can make
    keys = [f"m{i}" for i in range(6)]
    for key in keys:
        box.create_run(key, exp, key, {"tpp.status": "running"})
    epochs, done = 60, threading.Event()

    def loop() -> None:  # Tune's loop: per epoch one batch per run, and a status tag that keeps changing
        for epoch in range(epochs):
            for key in keys:
                box.batch(key, metrics=[("finetune/x", epoch, epoch)], tags={"tpp.status": f"e{epoch}"})
            time.sleep(0.005)  # epochs arrive while the writer is delivering the ones before
        done.set()

    producer = threading.Thread(target=loop)
    producer.start()
    producer.join()
    writer.wait()
    assert done.is_set() and not box.ops and box.problem is None
    writer.stop()
    c = client(uri)
    for key in keys:
        run = c.get_run(box.run_ids[key])
        history = c.get_metric_history(box.run_ids[key], "finetune/x")
        assert sorted((h.step, h.value) for h in history) == [(e, e) for e in range(epochs)], key
        assert run.data.tags["tpp.status"] == f"e{epochs - 1}"
    assert box.delivered > 1  # it really delivered in several passes, not one at the end


def test_writer_wait_returns_when_the_store_is_away(tmp_path):
    """A barrier on an unreachable server gives up like the forced flush it replaces: the writes stay
    queued (saved by the logger's close), Tune's loop goes on."""
    from study.outbox import Outbox
    from study.writer import Writer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    box = Outbox(f"http://127.0.0.1:{port}", {"parent": "0" * 32})
    box.status("parent", "RUNNING")
    writer = Writer(box, every_s=60)
    t = time.monotonic()
    writer.wait()
    assert time.monotonic() - t < 10 and len(box.ops) == 1 and box.problem
    writer.stop()
    assert len(box.ops) == 1


def test_study_end_to_end_sqlite(local_ray, tmp_path, capsys):
    cfg = tiny("e2e", description="a tiny end-to-end study")
    res = study.run(cfg, storage=str(tmp_path))
    out = capsys.readouterr().out
    assert res.status == "completed" and res.num_runs == 2 * 2 * 2 and res.exit_code == 0
    folder = StudyFolder(res.path)
    db = tmp_path / "e2e" / "mlflow.db"
    assert folder.path == tmp_path / "e2e" and res.tracking_uri == f"sqlite:///{db}"

    # progress: one line per finished member, then where things are and how to open the UI on loopback
    progress = [line for line in out.splitlines() if line.startswith("[e2e] ") and " runs done (" in line]
    assert len(progress) == 8 and progress[-1].startswith("[e2e] 8/8 runs done")
    assert f"--backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000" in out
    assert f"tpp-analyze e2e --storage {tmp_path}" in out
    # the store, written in WAL mode (commits without an fsync each), is left whole in its main file and
    # in rollback mode at the end (it then opens on read-only media)
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not db.with_name("mlflow.db-wal").exists()
    # Tune's saved state keeps each trial's last result: without the per-member rows and metrics the
    # study's callbacks took from it (they are in MLflow), so it stays small whatever the study's size
    state = json.loads(next((tmp_path / "e2e" / "tune").glob("experiment_state-*.json")).read_text())
    assert "tpp_done" not in json.dumps(state) and "tpp_rows" not in json.dumps(state)
    assert "last-5-avg" not in json.dumps(state)  # nor Tune's statistics of each metric of finished trials

    # the parent run: config params, planned runs, artifacts, dense metrics, description, best run
    c = client(res.tracking_uri)
    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tpp.role"] == "study" and parent.data.tags["tpp.study"] == "e2e"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("a tiny end-to-end study") and res.best["run_id"] in note  # a link to the best
    assert parent.data.tags["tpp.best_run_id"] == res.best["run_id"]
    assert parent.data.params["num_trials"] == "8" and parent.data.params["sampler"] == "grid"
    assert parent.data.params["model.name"] == "mlp" and parent.data.params["space.pr"] == "[0.5, 0.75]"
    assert "dense_acc" in parent.data.metrics
    assert len(c.get_metric_history(res.parent_run_id, "dense/test_acc")) == 2
    assert {a.path for a in c.list_artifacts(res.parent_run_id)} >= {"study_config.yaml", "design.json"}

    # the members
    runs = child_runs(res)
    check_member_runs(res, runs, epochs=2)
    status = Counter(r.data.tags["tpp.status"] for r in runs)
    assert status == {"completed": 4, "diverged": 4}, status
    for r in runs:
        if r.data.tags["tpp.status"] == "diverged":
            assert r.data.params["lr"] == "10000.0" and r.data.metrics["best_acc"] >= 0
            assert r.data.tags["tpp.diverged_stage"] == "finetune"

    # prune-stage reuse: computed exactly once per distinct prune key, every other tpp member reused it
    reuse = Counter(r.data.tags["tpp.reuse"] for r in runs)
    keys = prune_keys(folder.path, runs, cfg)
    assert len(keys) == 2
    assert reuse == {"none": 4, "computed": len(keys), "reused": 4 - len(keys)}, reuse
    assert res.reuse == dict(reuse)
    cache = PruneCache(folder.prune_cache)
    assert cache.computations() == {k: 1 for k in keys}
    # the unpruned controls (#25): one per (dense model, stage schedule, seed), shared by its prune stages
    controls = cache.computations(controls=True)
    assert controls and set(controls.values()) == {1}
    assert len(list(folder.prune_cache.glob("*.pt"))) == len(keys) + len(controls)
    for r in runs:
        m = r.data.metrics
        if r.data.tags["tpp.status"] == "completed":
            assert m["jsv_retained"] == pytest.approx(m["jsv_after_removal_mean"] / m["control_jsv_mean"],
                                                      rel=1e-4)
    computed = [r for r in runs if r.data.tags["tpp.reuse"] == "computed"]
    assert all(c.get_metric_history(r.info.run_id, "prune/reg") for r in computed)

    # study metadata, list and status
    meta = folder.read_meta()
    from study.record import collect, study_status

    now = collect(folder)  # status, counts and best are read from MLflow, not kept in study.json
    assert (study_status(folder), sum(now.counts.values()), meta.num_runs) == ("completed", 8, 8)
    assert meta.parent_run_id == res.parent_run_id and now.best["run_name"] == res.best["run_name"]
    assert not hasattr(meta, "status") and not (folder.path / "result.json").exists()
    assert not folder.optuna_db.exists() and folder.dense_path.is_file()  # a design needs no Optuna study
    from study.cli import main

    assert main(["list", "--storage", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "e2e" in listing and "completed" in listing and "8/8" in listing and res.parent_run_id in listing
    assert main(["status", "e2e", "--storage", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "computed 2" in shown and "completed 4" in shown and "diverged 4" in shown

    # an existing study is not overwritten by accident, nor resumed with another config
    with pytest.raises(study.StudyError, match="already exists"):
        study.run(cfg, storage=str(tmp_path))
    with pytest.raises(study.StudyError, match=r"another config \(finetune.epochs"):
        study.run(tiny("e2e", finetune__epochs=3), storage=str(tmp_path), if_exists="resume")
    done = study.resume("e2e", storage=str(tmp_path))
    assert done.status == "completed" and "nothing to do" in capsys.readouterr().out


class CountReports(tune.Callback):
    def __init__(self) -> None:
        self.reports: Counter = Counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reports[trial.trial_id] += 1


@pytest.mark.parametrize("asha", [False, True])
def test_short_epochs_are_reported_in_batches_yet_all_logged(local_ray, tmp_path, asha):
    """Each report stalls the trial for a round trip through the driver: sub-second epochs travel in
    batches -- unless ASHA (adaptive samplers), which counts reports as epochs, needs every one."""
    changes = {"space": {"pr": [0.5], "growth": [0.2], "seeds": [0]}, "finetune__lr": [1e-2],
               "finetune__epochs": 8, "lockstep": False}
    if asha:
        changes.update(sampler="tpe", num_trials=2, early_stopping={"asha": True, "grace_period": 8},
                       methods=["l1"])
    counter = CountReports()
    res = study.run(tiny(f"batched-{asha}", **changes), storage=str(tmp_path), callbacks=[counter])
    assert res.status == "completed" and len(counter.reports) == 2
    if asha:
        assert set(counter.reports.values()) == {8}
    else:  # the first epoch at once (the trial is seen alive), the rest with the final metrics
        assert max(counter.reports.values()) <= 4, counter.reports
    check_member_runs(res, child_runs(res), epochs=8)  # every epoch of every member reached MLflow


class Interrupt(tune.Callback):
    """A Tune callback that interrupts the study (as Ctrl-C would) once `after` trials have finished.

    It fires once per marker file: Tune pickles callbacks into its state, and the resumed study must
    not be interrupted again.
    """

    def __init__(self, marker: str, after: int = 2):
        self.marker, self.after, self.seen = marker, after, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen += trial.config["kind"] != "prune"
        if self.seen == self.after and not os.path.exists(self.marker):
            Path(self.marker).write_text("fired")
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own "stop and save state" signal


@pytest.mark.slow
def test_interrupted_study_resumes_without_duplicates(local_ray, tmp_path, monkeypatch):
    cfg = tiny("resumable", finetune__lr=[1e-3, 1e-2], finetune__epochs=4, finetune__per_trial=1)
    marker = str(tmp_path / "fired")
    first = study.run(cfg, storage=str(tmp_path), callbacks=[Interrupt(marker)])
    assert first.status == "interrupted" and first.exit_code == 1 and os.path.exists(marker)
    folder = StudyFolder(first.path)
    from study.record import study_status

    assert study_status(folder) == "interrupted"
    dense_mtime = folder.dense_path.stat().st_mtime_ns
    finished_before = {r.data.tags["tpp.member_id"]: r.info.run_id for r in child_runs(first)
                       if r.info.status == "FINISHED"}
    assert 2 <= len(finished_before) < 8
    assert client(first.tracking_uri).get_run(first.parent_run_id).info.status == "KILLED"

    reads, read = [], sql_reads.each_member_run  # every read goes through it; counted on the way
    monkeypatch.setattr(sql_reads, "each_member_run",
                        lambda *a, **k: reads.append(k["metrics"]) or read(*a, **k))
    second = study.resume(str(folder.path))
    assert second.status == "completed" and second.parent_run_id == first.parent_run_id
    # the runs loaded once (driver, then its logger from the hand-over); the end reads the objective only
    assert reads == [None, [load_config(folder.config_path).objective.metric]], reads
    assert folder.dense_path.stat().st_mtime_ns == dense_mtime  # never retrained on resume
    runs = child_runs(second)
    check_member_runs(second, runs, epochs=4)
    after = {r.data.tags["tpp.member_id"]: r.info.run_id for r in runs}
    assert all(after[m] == run_id for m, run_id in finished_before.items())  # same runs, not re-run
    reuse = Counter(r.data.tags["tpp.reuse"] for r in runs)
    assert reuse["computed"] == len(prune_keys(folder.path, runs, cfg)) == 2
    # a stage the interrupt cut short is computed again on resume, never more
    assert set(PruneCache(folder.prune_cache).computations().values()) <= {1, 2}
    assert client(second.tracking_uri).get_run(second.parent_run_id).info.status == "FINISHED"


def test_clear_errors_before_anything_starts(local_ray, tmp_path):
    # GPUs asked for on a cluster without any
    with pytest.raises(study.StudyError, match=r"resources\.gpu: .*no GPUs"):
        study.run(tiny("gpu", resources={"gpu": 0.5}), storage=str(tmp_path))
    assert not (tmp_path / "gpu" / "study.json").exists()
    # an MLflow server that does not answer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(study.StudyError, match="does not answer"):
        study.run(tiny("noserver"), storage=str(tmp_path), tracking_uri=f"http://127.0.0.1:{port}")
    assert not (tmp_path / "noserver" / "study.json").exists()


def test_prune_cache_computes_once_verifies_and_moves_bad_files_aside(tmp_path, capsys):
    """Two concurrent claimants compute a key once; a failed computation leaves no claim; a file that
    is not what its name says is moved aside with one warning line and recomputed."""
    cache = PruneCache(tmp_path)
    calls = []

    def compute(value: float):
        def run():
            calls.append(value)
            time.sleep(0.5)
            return PrunedModel(SPEC, {}, {"w": torch.full((3,), value)}, {"acc": value})
        return run

    def boom():
        raise RuntimeError("prune stage crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cache.get_or_compute("k", {"pr": 0.5}, boom)
    results = {}
    threads = [threading.Thread(target=lambda h=h: results.__setitem__(
        h, cache.get_or_compute("k", {"pr": 0.5}, compute(1.0)))) for h in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1.0] and sorted(how for _, how in results.values()) == ["computed", "reused"]
    assert all(torch.equal(p.state_dict["w"], torch.ones(3)) for p, _ in results.values())
    assert cache.computations() == {"k": 2}  # the crashed attempt and the one that finished
    # another key's valid file copied over k's: refused, moved aside, recomputed
    cache.get_or_compute("k2", {"pr": 0.7}, compute(2.0))
    shutil.copy(cache.path("k2"), cache.path("k"))
    pruned, how = cache.get_or_compute("k", {"pr": 0.5}, compute(3.0))
    assert how == "computed" and float(pruned.state_dict["w"][0]) == 3.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "k.pt failed verification" in err and "holds prune stage 'k2'" in err
    # a truncated file: the same
    data = cache.path("k").read_bytes()
    cache.path("k").write_bytes(data[: len(data) // 2])
    assert cache.get_or_compute("k", {"pr": 0.5}, compute(4.0))[1] == "computed"
    # the same key with other settings (an edited config): refused too
    assert cache.load("k", {"pr": 0.6}) is None
    assert len(list(tmp_path.glob("k.pt.bad-*"))) == 3


def test_adaptive_trials_sharing_a_prune_key_compute_it_once(local_ray, tmp_path):
    """tpe proposes single members; two concurrent trials of one prune point share its stage."""
    cfg = tiny("adaptive", methods=["tpp"], space={"pr": [0.5], "growth": [0.2], "seeds": [0]},
               finetune__lr={"low": 1e-3, "high": 1e-1}, sampler="tpe", num_trials=4)
    res = study.run(cfg, storage=str(tmp_path))
    assert res.status == "completed" and res.num_runs == 4
    runs = child_runs(res)
    assert len(runs) == 4 and len({r.data.params["lr"] for r in runs}) == 4
    assert Counter(r.data.tags["tpp.reuse"] for r in runs) == {"computed": 1, "reused": 3}
    assert list(PruneCache(StudyFolder(res.path).prune_cache).computations().values()) == [1]
    assert StudyFolder(res.path).optuna_db.is_file()


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(db: Path, port: int) -> tuple[str, subprocess.Popen]:
    """A real `mlflow server` on 127.0.0.1 (its own process group, so it can be paused and killed)."""
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--artifacts-destination", str(db.parent / "artifacts")],
                            cwd=db.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, "mlflow server exited"
        assert time.monotonic() < deadline, "mlflow server did not answer /health"
        time.sleep(0.5)
    return uri, proc


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server(tmp_path):
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    uri, proc = start_mlflow_server(db, free_port())
    yield uri, proc
    stop_mlflow_server(proc)


class PauseServer(tune.Callback):
    """After the first finished trial, freeze the tracking server for a few seconds (as if it went away)."""

    def __init__(self, pgid: int, seconds: float):
        self.pgid, self.seconds, self.done = pgid, seconds, False

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.done:
            self.done = True
            os.killpg(self.pgid, signal.SIGSTOP)
            threading.Timer(self.seconds, os.killpg, (self.pgid, signal.SIGCONT)).start()


@pytest.mark.slow
def test_study_against_mlflow_server_survives_an_outage(local_ray, tmp_path, mlflow_server, capsys):
    uri, proc = mlflow_server
    cfg = tiny("served", space={"pr": [0.5], "growth": [0.2], "seeds": [0, 1]}, finetune__lr=[1e-3, 1e-2],
               finetune__epochs=3, finetune__per_trial=1)
    res = study.run(cfg, storage=str(tmp_path / "studies"), tracking_uri=uri,
                    callbacks=[PauseServer(proc.pid, seconds=8)])
    out = capsys.readouterr().out
    assert "MLflow unreachable" in out  # the outage was noticed, writes were kept
    assert res.status == "completed" and res.tracking_uri == uri
    assert not (tmp_path / "studies" / "served" / "mlflow.db").exists()  # everything went to the server
    runs = child_runs(res)
    check_member_runs(res, runs, epochs=3)  # nothing lost: every epoch of every member is there
    assert Counter(r.data.tags["tpp.reuse"] for r in runs) == {"none": 4, "computed": 2, "reused": 2}
    parent = client(uri).get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and "study_config.yaml" in {
        a.path for a in client(uri).list_artifacts(res.parent_run_id)}


class KillServer(tune.Callback):
    """After the first finished trial, kill the tracking server for good."""

    def __init__(self, pgid: int):
        self.pgid = pgid

    def on_trial_complete(self, iteration, trials, trial, **info):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)


@pytest.mark.slow
def test_a_server_still_down_at_the_end_is_one_error_and_resume_delivers_everything(local_ray, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("TPP_STUDY_MLFLOW_WAIT_S", "3")  # how long the end waits for the server (default 60)
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    port = free_port()
    uri, proc = start_mlflow_server(db, port)
    cfg = tiny("lost", space={"pr": [0.5], "growth": [0.2], "seeds": [0]}, finetune__lr=[1e-3, 1e-2],
               finetune__per_trial=1, max_concurrent=1)  # the second trial runs with the server gone
    try:
        with pytest.raises(study.StudyError, match="stopped answering.*saved in .*tpp-study resume"):
            study.run(cfg, storage=str(tmp_path / "studies"), tracking_uri=uri,
                      callbacks=[KillServer(proc.pid)])
        assert (tmp_path / "studies" / "lost" / "mlflow_pending.json").is_file()
        proc.wait(timeout=20)
        uri, proc = start_mlflow_server(db, port)  # the same server back, on the same store
        res = study.resume(str(tmp_path / "studies" / "lost"))
        assert res.status == "completed"
        check_member_runs(res, child_runs(res), epochs=2)  # one run per member, every epoch delivered
        assert not (tmp_path / "studies" / "lost" / "mlflow_pending.json").exists()
    finally:
        stop_mlflow_server(proc)


# ---------------------------------------------------------------------------------------------- embedded
@pytest.mark.slow
def test_cli_embedded_study_starts_and_stops_its_own_ray(tmp_path):
    import yaml

    cfg_path = tmp_path / "cli.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny("cli", methods=["l1"], space={"pr": [0.5, 0.75], "seeds": [0]},
                                            finetune__lr=[1e-2])))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage = tmp_path / "studies"
    cmd = [str(Path(sys.executable).with_name("tpp-study")), "run", str(cfg_path), "--storage", str(storage)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[cli] 2/2 runs done" in proc.stdout and "--host 127.0.0.1 --port 5000" in proc.stdout
    assert (storage / "cli" / "mlflow.db").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "resume" in again.stderr
    listing = subprocess.run([cmd[0], "list", "--storage", str(storage)], capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 0 and "cli" in listing.stdout and "2/2" in listing.stdout


# ---------------------------------------------------------------------------------------------- cluster
@pytest.mark.slow
def test_study_on_a_multi_node_cluster(tmp_path, multi_node_cluster):
    """Head + 2 worker nodes (separate raylets, all on loopback); the study joins by address."""
    import ray

    cluster, _ = multi_node_cluster
    cfg = tiny("cluster", space={"pr": [0.5], "growth": [0.2], "seeds": [0]}, finetune__lr=[1e-3, 1e-2, 3e-2],
               finetune__per_trial=1, max_concurrent=3)
    res = study.run(cfg, storage=str(tmp_path), address=cluster.address)
    assert res.status == "completed"
    assert not ray.is_initialized()  # the study joined the cluster and disconnected
    runs = child_runs(res)
    check_member_runs(res, runs, epochs=2)
    # one prune computation for the three tpp trials, wherever they ran
    assert Counter(r.data.tags["tpp.reuse"] for r in runs) == {"none": 3, "computed": 1, "reused": 2}
    nodes = {r.data.tags["tpp.node"] for r in runs}
    assert len(nodes) >= 2, nodes


def test_a_study_with_failed_runs_says_so_and_exits_3(local_ray, tmp_path):
    """A prune_layers pattern that matches nothing fails every trial of the penalty-free method at its
    prune stage: the study finishes, but not as "completed" (schedulers and scripts can tell)."""
    cfg = tiny("fails", methods=["l1"], max_failures=0,
               fixed={**TINY["fixed"], "prune_layers": {"no_such_layer*": 0.5}})
    res = study.run(cfg, storage=str(tmp_path))
    assert res.status == "failed" and res.exit_code == 3
    assert res.counts == {"failed": 4}
    runs = child_runs(res)
    assert all(r.info.status == "FAILED" and "matches no prunable" in r.data.tags["tpp.error"] for r in runs)
    from study.cli import EXIT_DOC  # the codes are documented where users look

    assert "3" in EXIT_DOC and "failed" in EXIT_DOC
