"""Writing studies into a real MLflow SQLite store exactly as the study driver's schema (v2) says, and
checking that analysis.load reads every field back. The other test_analysis_* modules import `Member`,
`write_study` and `ladder` from here.

Schema v2: one parent run (tags tpp.study, tpp.role=study; param num_trials = planned member runs;
artifact study_config.yaml), one child run per finetune member (tags mlflow.parentRunId, tpp.study,
tpp.role=trial, tpp.method, tpp.status, tpp.reuse, tpp.member_id, tpp.prune_key, tpp.trial_id,
tpp.diverged_stage), every setting as a param (growth only for methods with a penalty), final metrics at
step 0 and per-epoch metrics finetune/* with step = epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

PENALTY = {"tpp", "greg", "tpp-nobn", "tpp-korth"}


def ladder(low: float, high: float, per_decade: int) -> list[float]:
    """The study's LR ladder: log-spaced, inclusive."""
    n = round(math.log10(high / low) * per_decade)
    return [float(low * 10 ** (k / per_decade)) for k in range(n + 1)]


@dataclass
class Member:
    """One finetune member with known results. `acc` is the reported accuracy metric value; best_acc,
    test_acc_at_best_val and last_acc are derived from it with fixed offsets unless given."""

    method: str
    pr: float
    lr: float
    seed: int
    acc: float
    status: str = "completed"
    growth: float | None = None
    jsv: float = 1.0
    acc_removal: float = 30.0
    loss_removal: float = 2.0
    epochs: int = 3
    schedule: str = "step"
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    val: bool = True  # the study held out a validation split
    best_acc: float | None = None  # default acc + 1 (test-selected: optimistic)
    last_acc: float | None = None  # default acc - 0.5
    extra_params: dict = field(default_factory=dict)
    member_id: str | None = None  # default: one id per Member

    def metrics(self) -> dict[str, float]:
        out = {"best_acc": self.acc + 1.0 if self.best_acc is None else self.best_acc,
               "last_acc": self.acc - 0.5 if self.last_acc is None else self.last_acc,
               "best_epoch": float(self.epochs), "acc_after_removal": self.acc_removal,
               "loss_after_removal": self.loss_removal, "jsv_after_removal_mean": self.jsv,
               "jsv_after_removal_std": 0.1, "dense_acc": 95.0, "params": 1000.0, "flops": 2000.0,
               "speedup": 2.0, "iters_dense": 100.0, "iters_prune": 0.0 if self.growth is None else 50.0,
               "iters_finetune": 10.0 * self.epochs}
        out["iters_total"] = out["iters_prune"] + out["iters_finetune"]
        if self.val:
            out["test_acc_at_best_val"] = self.acc
            out["val_best_acc"] = self.acc + 0.3
        return out


def write_study(client, name: str, members: list[Member], *, root: Path, planned: int | None = None,
                running: bool = False, config: str | None = None, growth_none_string: bool = False) -> str:
    """Write a study; returns the parent run id. `growth_none_string`: log growth "none" for methods
    without a penalty (the v1 schema) instead of leaving it out (v2)."""
    from mlflow.entities import Metric, Param, RunTag

    exp = client.create_experiment(f"{name}-exp", artifact_location=(root / "artifacts" / name).as_uri())
    parent = client.create_run(exp, run_name=name, tags={"tpp.study": name, "tpp.role": "study"})
    pid = parent.info.run_id
    params = [Param("name", name)] + ([Param("num_trials", str(planned))] if planned is not None else [])
    client.log_batch(pid, params=params)
    if config:
        client.log_text(pid, config, "study_config.yaml")
    for i, m in enumerate(members):
        prune_key = f"{m.method}-{m.pr}-{m.growth}-{m.seed}"
        tags = {"mlflow.parentRunId": pid, "tpp.study": name, "tpp.role": "trial", "tpp.method": m.method,
                "tpp.reuse": "computed", "tpp.member_id": m.member_id or f"m{i:04d}",
                "tpp.prune_key": prune_key, "tpp.trial_id": f"t{i // 2:04d}"}
        g = "" if m.growth is None else f" g={m.growth:g}"
        run = client.create_run(exp, run_name=f"{m.method} pr={m.pr}{g} lr={m.lr:.2g} s{m.seed}", tags=tags)
        rid = run.info.run_id
        p = {"method": m.method, "pr": repr(m.pr), "lr": repr(m.lr), "seed": str(m.seed),
             "epochs": str(m.epochs), "schedule": m.schedule, "weight_decay": repr(m.weight_decay),
             "warmup_epochs": str(m.warmup_epochs), "momentum": "0.9", "batch_size": "64",
             "has_penalty": "1" if m.method in PENALTY else "0", "log10_lr": repr(math.log10(m.lr)),
             "model": "mlp7_linear", "data": "digits", **m.extra_params}
        if m.growth is not None:
            p["growth"] = repr(m.growth)
        elif growth_none_string:
            p["growth"] = "none"
        metrics, run_tags = [], []
        if m.status != "failed":
            n_ep = m.epochs if m.status != "running" else 1
            for e in range(n_ep):
                v = m.acc - (m.epochs - 1 - e)
                metrics += [Metric("finetune/test_acc", v, 0, e), Metric("finetune/lr", m.lr, 0, e),
                            Metric("finetune/train_loss", 1 / (e + 1), 0, e)]
                if m.val:
                    metrics.append(Metric("finetune/val_acc", v + 0.3, 0, e))
        if m.status in ("completed", "diverged"):
            metrics += [Metric(k, float(v), 0, 0) for k, v in m.metrics().items()]
        if m.status != "running":
            run_tags.append(RunTag("tpp.status", m.status))
        if m.status == "diverged":
            run_tags.append(RunTag("tpp.diverged_stage", "finetune"))
        client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in p.items()], tags=run_tags)
        if m.status != "running":
            end = {"failed": "FAILED", "interrupted": "KILLED"}.get(m.status, "FINISHED")
            client.set_terminated(rid, end)
    if not running:
        client.set_terminated(pid, "FINISHED")
    return pid


def new_store(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    return uri, MlflowClient(uri)


# ------------------------------------------------------------------------------------ the schema read back

@pytest.fixture(scope="module")
def schema_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    uri, client = new_store(root)
    lrs = ladder(1e-3, 1e-1, 1)
    members = [Member("l1", 0.5, lr, 0, 80.0 + k) for k, lr in enumerate(lrs)]
    members += [Member("tpp", 0.5, lr, 0, 85.0 + k, growth=1e-3) for k, lr in enumerate(lrs)]
    members[2].status = "diverged"
    members.append(Member("tpp", 0.5, 1e-1, 1, 0.0, growth=1e-3, status="failed"))
    members.append(Member("tpp", 0.5, 1e-2, 1, 0.0, growth=1e-3, status="interrupted"))
    write_study(client, "v2", members, root=root, planned=9)
    write_study(client, "v1", [Member("l1", 0.5, 1e-3, 0, 80.0)], root=root, growth_none_string=True)
    return uri


def test_ladder_is_log_spaced_and_inclusive():
    assert ladder(1e-4, 1e-1, 3) == pytest.approx([1e-4 * 10 ** (k / 3) for k in range(10)])
    assert ladder(1e-4, 1e-1, 3)[1] == pytest.approx(2.154e-4, rel=1e-3) and len(ladder(1e-3, 1e-1, 1)) == 3


def test_v2_schema_reads_back(schema_store):
    from analysis import load_study

    d = load_study("v2", schema_store)
    t = d.trials
    assert len(t) == 8 and d.progress.planned == 9
    assert t["status"].value_counts().to_dict() == {"completed": 5, "diverged": 1, "failed": 1,
                                                    "interrupted": 1}
    p = d.progress
    assert (p.completed, p.diverged, p.failed, p.interrupted, p.finished, p.not_started) == (5, 1, 1, 1, 6, 1)
    assert "1 member run(s) interrupted (excluded; `tpp-study resume` finishes them)" in d.missing()
    assert t.loc[t["method"] == "l1", "growth"].isna().all()  # absent for methods without a penalty
    assert np.allclose(t.loc[t["method"] == "tpp", "growth"], 1e-3)
    assert t["member_id"].str.startswith("m").all() and t["prune_key"].notna().all()
    assert t.loc[t["status"] == "diverged", "diverged_stage"].tolist() == ["finetune"]
    assert t["has_penalty"].tolist().count(1) == 5 and t["schedule"].eq("step").all()
    assert {"method", "growth", "lr", "seed", "epochs", "weight_decay"} <= set(d.param_names)
    assert "best_acc" not in d.param_names and "test_acc_at_best_val" in t
    e = d.epochs
    assert {"test_acc", "val_acc", "train_loss", "epoch_lr"} <= set(e.columns)


def test_v1_growth_none_string_is_nan(schema_store):
    from analysis import load_study

    t = load_study("v1", schema_store, histories=None).trials
    assert t["growth"].isna().all() and t["growth"].dtype == float


def test_bulk_history_reads_equal_one_call_per_run_and_key(tmp_path, monkeypatch):
    """The per-epoch table read with one query per key and 500 runs (the SQL store's bulk read) equals the
    one read run by run and key, a value logged twice at one step (a resumed run) included: the later one
    is kept either way."""
    from mlflow.entities import Metric

    from analysis.load import _histories, load_study

    uri, client = new_store(tmp_path)
    members = [Member(m, 0.5, lr, s, 80.0 + s, growth=1e-3 if m == "tpp" else None)
               for m in ("l1", "tpp") for lr in ladder(1e-3, 1e-1, 1) for s in range(3)]
    write_study(client, "bulk", members, root=tmp_path)
    run = load_study("bulk", uri, histories=None).trials["run_id"].iloc[0]
    client.log_batch(run, metrics=[Metric("finetune/test_acc", 12.5, 10 ** 12, 0)])  # logged again, later
    runs = load_study("bulk", uri, histories=None).trials["run_id"].tolist()
    jobs = [(r, k) for r in runs for k in ("finetune/test_acc", "finetune/lr", "finetune/nothing")]

    def rows(results):
        return sorted((r, k, m.step, m.timestamp, m.value) for r, k, hist in results for m in hist)

    monkeypatch.setattr("analysis.load.BULK_RUNS", 4)  # 18 runs: five queries per key
    bulk, plain = _histories(client, jobs, 1), _histories(client, jobs, 1, bulk=False)
    assert [j[:2] for j in bulk] == jobs and rows(bulk) == rows(plain) and len(rows(bulk)) > len(jobs)
    epochs = load_study("bulk", uri).epochs
    first = epochs[(epochs["run_id"] == run) & (epochs["stage"] == "finetune") & (epochs["epoch"] == 0)]
    assert first["test_acc"].tolist() == [12.5]
