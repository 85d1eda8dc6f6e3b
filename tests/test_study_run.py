"""Studies end to end on a real Ray, real Optuna and real MLflow (SQLite, a real `mlflow server`, and a
multi-node `ray.cluster_utils.Cluster`), with a tiny MLP on the synthetic set so each takes seconds.

What is checked is what users of a study rely on: every trial is one MLflow run nested under the
study's run, with its per-epoch history, the right status and tags; the prune stage is computed once
per prune key and reused otherwise; an interrupted study resumes without duplicating anything; the
tracking server may go away for a while without losing a metric.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from ray import tune

import study
from study.config import load_config
from study.space import point_from_config, run_config
from study.store import StudyFolder

TINY = {
    "name": "tiny",
    "model": {"name": "mlp", "kwargs": {"depth": 3, "width": 16, "activation": "relu"}},
    "data": {"name": "synthetic", "kwargs": {"n_train": 256, "n_test": 128}},
    "dense": {"epochs": 2, "lr": 0.05},
    "methods": ["l1", "tpp"],
    # lr 1e4 makes the finetuning loss blow up: those trials must end "diverged", not "failed".
    "space": {"lr": [1e-2, 1e4], "pr": [0.5, 0.75], "growth": [0.2], "seeds": [0]},
    "finetune": {"epochs": 2},
    "fixed": {"batch_size": 64, "update_reg_interval": 1, "stabilize_reg_interval": 4, "jsv_samples": 4,
              "device": "cpu"},
    "sampler": "grid",
    "max_concurrent": 2,
}


def tiny(name: str, **changes) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["name"] = name
    cfg.update(changes)
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
    from study.mlflow_logging import children

    return children(res.tracking_uri, res.experiment_id, res.parent_run_id)


def prune_keys(folder: Path, runs: list, cfg_dict: dict) -> set[str]:
    """The distinct prune keys of the runs of regularising methods, computed independently of the study."""
    from tpp.checkpoint import load_dense
    from tpp.methods import uses_growth
    from tpp.run import prune_key

    cfg = load_config(cfg_dict, storage=str(folder.parent))
    dense = load_dense(folder / "dense.pt")
    keys = set()
    for r in runs:
        p = r.data.params
        if not uses_growth(p["method"]):
            continue
        point = point_from_config({"method": p["method"], "pr": p["pr"], "lr": p["lr"], "growth": p["growth"],
                                   "seed": p["seed"]})
        keys.add(prune_key(run_config(cfg, point), dense))
    return keys


def check_trial_runs(res: study.StudyResult, runs: list, epochs: int) -> None:
    """Every trial: nested, tagged, named, parametrised, with its per-epoch history and final metrics."""
    c = client(res.tracking_uri)
    assert len(runs) == res.num_trials
    assert len({r.data.tags["tpp.trial_id"] for r in runs}) == len(runs)  # no duplicates
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        assert tags["mlflow.parentRunId"] == res.parent_run_id
        assert tags["tpp.study"] == res.name and tags["tpp.role"] == "trial"
        assert tags["tpp.method"] == params["method"]
        assert tags["tpp.status"] in ("completed", "diverged")
        assert r.info.status == "FINISHED"
        assert (params["growth"] == "none") == (params["method"] == "l1")
        assert r.info.run_name.startswith(f"{params['method']} pr=")
        assert {"best_acc", "last_acc", "acc_after_removal", "params", "flops", "dense_acc"} <= set(metrics)
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
    from study.mlflow_logging import MAX_METRICS, Outbox

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


def test_study_end_to_end_sqlite(local_ray, tmp_path, capsys):
    cfg = tiny("e2e")
    res = study.run(cfg, storage=str(tmp_path))
    out = capsys.readouterr().out
    assert res.status == "completed" and res.num_trials == 2 * 2 * 2
    folder = StudyFolder(res.path)
    db = tmp_path / "e2e" / "mlflow.db"
    assert folder.path == tmp_path / "e2e" and res.tracking_uri == f"sqlite:///{db}"

    # progress: one line per finished trial, then where things are and how to open the UI on loopback
    progress = [line for line in out.splitlines() if line.startswith("[e2e] ") and " done (" in line]
    assert len(progress) == 8 and progress[-1].startswith("[e2e] 8/8 done")
    assert f"--backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000" in out

    # the parent run: config params, num_trials, artifacts, dense metrics
    c = client(res.tracking_uri)
    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tpp.role"] == "study" and parent.data.tags["tpp.study"] == "e2e"
    assert parent.data.params["num_trials"] == "8" and parent.data.params["sampler"] == "grid"
    assert parent.data.params["model.name"] == "mlp" and parent.data.params["space.pr"] == "[0.5, 0.75]"
    assert {"dense_test_acc", "dense_acc"} <= set(parent.data.metrics)
    assert len(c.get_metric_history(res.parent_run_id, "dense/test_acc")) == 2
    assert {a.path for a in c.list_artifacts(res.parent_run_id)} >= {"study_config.yaml", "search_space.json"}

    # the trials
    runs = child_runs(res)
    check_trial_runs(res, runs, epochs=2)
    status = Counter(r.data.tags["tpp.status"] for r in runs)
    assert status == {"completed": 4, "diverged": 4}, status
    for r in runs:
        if r.data.tags["tpp.status"] == "diverged":
            assert r.data.params["lr"] == "10000.0" and r.data.metrics["best_acc"] >= 0

    # prune-stage reuse: computed exactly once per distinct prune key, every other tpp trial reused it
    reuse = Counter(r.data.tags["tpp.reuse"] for r in runs)
    keys = prune_keys(folder.path, runs, cfg)
    assert len(keys) == 2
    assert reuse == {"none": 4, "computed": len(keys), "reused": 4 - len(keys)}, reuse
    assert res.reuse == dict(reuse)
    assert len(list(folder.prune_cache.glob("*.pt"))) == len(keys)
    computed = [r for r in runs if r.data.tags["tpp.reuse"] == "computed"]
    assert all(c.get_metric_history(r.info.run_id, "prune/reg") for r in computed)

    # study metadata, list and status
    meta = folder.read_meta()
    assert (meta.status, meta.done, meta.num_trials) == ("completed", 8, 8)
    assert meta.parent_run_id == res.parent_run_id
    assert folder.optuna_db.is_file() and folder.dense_path.is_file()
    from study.cli import main

    assert main(["list", "--storage", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "e2e" in listing and "completed" in listing and "8/8" in listing and res.parent_run_id in listing
    assert main(["status", "e2e", "--storage", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "computed 2" in shown and "completed 4" in shown and "diverged 4" in shown

    # an existing study is not overwritten by accident
    with pytest.raises(study.StudyError, match="already exists"):
        study.run(cfg, storage=str(tmp_path))


class CountReports(tune.Callback):
    def __init__(self) -> None:
        self.reports: Counter = Counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reports[trial.trial_id] += 1


@pytest.mark.parametrize("asha", [False, True])
def test_short_epochs_are_reported_in_batches_yet_all_logged(local_ray, tmp_path, asha):
    """Each report stalls the trial for a round trip through the driver: sub-second epochs travel in
    batches -- unless ASHA, which counts reports as epochs, needs every one."""
    cfg = tiny(f"batched-{asha}", space={"lr": [1e-2], "pr": [0.5], "growth": [0.2], "seeds": [0]},
               finetune={"epochs": 8}, early_stopping={"asha": asha, "grace_period": 8})
    counter = CountReports()
    res = study.run(cfg, storage=str(tmp_path), callbacks=[counter])
    assert res.status == "completed" and len(counter.reports) == 2
    if asha:
        assert set(counter.reports.values()) == {8}
    else:  # the first epoch at once (the trial is seen alive), the rest with the final metrics
        assert max(counter.reports.values()) <= 3, counter.reports
    check_trial_runs(res, child_runs(res), epochs=8)  # every epoch of every trial reached MLflow


class Interrupt(tune.Callback):
    """A Tune callback that interrupts the study (as Ctrl-C would) once `after` trials have finished.

    It fires once per marker file: Tune pickles callbacks into its state, and the resumed study must
    not be interrupted again.
    """

    def __init__(self, marker: str, after: int = 2):
        self.marker, self.after, self.seen = marker, after, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen += 1
        if self.seen == self.after and not os.path.exists(self.marker):
            Path(self.marker).write_text("fired")
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own "stop and save state" signal


@pytest.mark.slow
def test_interrupted_study_resumes_without_duplicates(local_ray, tmp_path):
    cfg = tiny("resumable", space={"lr": [1e-3, 1e-2], "pr": [0.5, 0.75], "growth": [0.2], "seeds": [0]},
               finetune={"epochs": 4})
    marker = str(tmp_path / "fired")
    first = study.run(cfg, storage=str(tmp_path), callbacks=[Interrupt(marker)])
    assert first.status == "interrupted" and os.path.exists(marker)
    folder = StudyFolder(first.path)
    assert folder.read_meta().status == "interrupted"
    dense_mtime = folder.dense_path.stat().st_mtime_ns
    finished_before = {r.data.tags["tpp.trial_id"]: r.info.run_id for r in child_runs(first)
                       if r.data.tags.get("tpp.status") == "completed"}
    assert 2 <= len(finished_before) < 8
    assert client(first.tracking_uri).get_run(first.parent_run_id).info.status == "KILLED"

    second = study.resume(str(folder.path))
    assert second.status == "completed" and second.parent_run_id == first.parent_run_id
    assert folder.dense_path.stat().st_mtime_ns == dense_mtime  # never retrained on resume
    runs = child_runs(second)
    check_trial_runs(second, runs, epochs=4)
    after = {r.data.tags["tpp.trial_id"]: r.info.run_id for r in runs}
    assert all(after[t] == run_id for t, run_id in finished_before.items())  # same runs, continued
    reuse = Counter(r.data.tags["tpp.reuse"] for r in runs)
    assert reuse["computed"] == len(prune_keys(folder.path, runs, cfg)) == 2
    assert client(second.tracking_uri).get_run(second.parent_run_id).info.status == "FINISHED"


def test_clear_errors_before_anything_starts(local_ray, tmp_path):
    # GPUs asked for on a cluster without any
    with pytest.raises(study.StudyError, match=r"resources\.gpu: .*no GPUs"):
        study.run(tiny("gpu", resources={"gpu": 0.5}), storage=str(tmp_path))
    assert not (tmp_path / "gpu").exists()
    # an MLflow server that does not answer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(study.StudyError, match="does not answer"):
        study.run(tiny("noserver"), storage=str(tmp_path), tracking_uri=f"http://127.0.0.1:{port}")
    assert not (tmp_path / "noserver").exists()


def test_prune_cache_claims_leases_and_failures(local_ray, tmp_path):
    """One computation per key; waiters reuse it; a dead or failing claimant does not block the key."""
    import ray
    import torch

    from study import prune_cache as pc

    actor = pc.PruneCacheActor.options(name=pc.ACTOR_NAME, namespace=pc.namespace("claims")).remote(
        str(tmp_path), 0.5)
    assert ray.get(actor.claim.remote("k", "A")) == ("compute", 0.5)
    assert ray.get(actor.claim.remote("k", "B")) == ("wait", "A")
    time.sleep(0.7)  # A never renewed its lease (its process died): B may compute
    assert ray.get(actor.claim.remote("k", "B")) == ("compute", 0.5)
    ray.get(actor.release.remote("k", "B"))
    assert ray.get(actor.claim.remote("k", "C")) == ("compute", 0.5)

    def save(path, obj):
        torch.save(obj, path)

    def load(path):
        return torch.load(path, weights_only=True)

    def boom():
        raise RuntimeError("prune stage crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        pc.get_or_compute("claims", tmp_path, "k2", "A", boom, save, load)
    calls = []

    def compute():
        calls.append(1)
        time.sleep(1.5)  # longer than the lease: the heartbeat keeps the claim alive
        return {"w": torch.ones(3)}

    results = {}
    threads = [threading.Thread(target=lambda h=h: results.__setitem__(
        h, pc.get_or_compute("claims", tmp_path, "k2", h, compute, save, load))) for h in ("B", "C")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # the failed claim was released; of two concurrent claimants one computed
    assert sorted(how for _, how in results.values()) == ["computed", "reused"]
    assert all(torch.equal(obj["w"], torch.ones(3)) for obj, _ in results.values())
    assert (tmp_path / "k2.pt").is_file()
    # the trial that computed it still counts as "computed" when resumed; others reuse
    assert pc.get_or_compute("claims", tmp_path, "k2", "D", compute, save, load)[1] == "reused"
    owner = next(h for h, (_, how) in results.items() if how == "computed")
    assert pc.get_or_compute("claims", tmp_path, "k2", owner, compute, save, load)[1] == "computed"
    ray.kill(actor)
    # without the coordinator (e.g. a resumed study before it starts one) the disk cache still serves
    assert pc.get_or_compute("claims", tmp_path, "k2", "E", compute, save, load)[1] == "reused"
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (its own process group, so it can be paused and killed)."""
    port = free_port()
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--artifacts-destination", str(tmp_path / "server" / "artifacts")],
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
    yield uri, proc
    os.killpg(proc.pid, signal.SIGCONT)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


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
    cfg = tiny("served", space={"lr": [1e-3, 1e-2], "pr": [0.5], "growth": [0.2], "seeds": [0, 1]},
               finetune={"epochs": 3})
    res = study.run(cfg, storage=str(tmp_path / "studies"), tracking_uri=uri,
                    callbacks=[PauseServer(proc.pid, seconds=8)])
    out = capsys.readouterr().out
    assert "MLflow unreachable" in out  # the outage was noticed, writes were kept
    assert res.status == "completed" and res.tracking_uri == uri
    assert not (tmp_path / "studies" / "served" / "mlflow.db").exists()  # everything went to the server
    runs = child_runs(res)
    check_trial_runs(res, runs, epochs=3)  # nothing lost: every epoch of every trial is there
    assert Counter(r.data.tags["tpp.reuse"] for r in runs) == {"none": 4, "computed": 2, "reused": 2}
    parent = client(uri).get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and "study_config.yaml" in {
        a.path for a in client(uri).list_artifacts(res.parent_run_id)}


# ---------------------------------------------------------------------------------------------- embedded
@pytest.mark.slow
def test_cli_embedded_study_starts_and_stops_its_own_ray(tmp_path):
    import yaml

    cfg_path = tmp_path / "cli.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny("cli", methods=["l1"], space={"lr": [1e-2], "pr": [0.5, 0.75],
                                                                          "seeds": [0]})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage = tmp_path / "studies"
    cmd = [str(Path(sys.executable).with_name("tpp-study")), "run", str(cfg_path), "--storage", str(storage)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[cli] 2/2 done" in proc.stdout and "--host 127.0.0.1 --port 5000" in proc.stdout
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
    cfg = tiny("cluster", space={"lr": [1e-3, 1e-2, 3e-2], "pr": [0.5], "growth": [0.2], "seeds": [0]},
               max_concurrent=3)
    res = study.run(cfg, storage=str(tmp_path), address=cluster.address)
    assert res.status == "completed"
    assert not ray.is_initialized()  # the study joined the cluster and disconnected
    runs = child_runs(res)
    check_trial_runs(res, runs, epochs=2)
    # one prune computation for the three tpp trials, wherever they ran
    assert Counter(r.data.tags["tpp.reuse"] for r in runs) == {"none": 3, "computed": 1, "reused": 2}
    nodes = {r.data.tags["tpp.node"] for r in runs}
    assert len(nodes) >= 2, nodes
