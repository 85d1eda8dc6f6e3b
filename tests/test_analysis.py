"""analysis/: measures, tables, importance, figures, report and CLI, on real MLflow runs with known values.

One SQLite MLflow store holds four studies written exactly as the study driver's schema says:
- "grid": L1 and TPP x PR {0.5, 0.9} x LR grid {1e-4, 1e-3, 1e-2, 1e-1} x seeds {0, 1}, hand-chosen
  accuracies (one diverged trial that reached 10%, one failed trial), a study_config.yaml artifact;
- "cont": LR sampled continuously; L1's accuracy is linear in log10(LR) and depends on nothing else,
  TPP's depends on the PR only (two growth rates), so interpolation and importance have exact answers;
- "live": still running (one RUNNING trial, 2 of 4 planned finished); "empty": started, no trial yet.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

LRS = [1e-4, 1e-3, 1e-2, 1e-1]
# (method, pr, seed) -> accuracy at each LR of LRS. Hand-chosen; l1/0.9/seed 1 diverged at 1e-1 (reached 10).
GRID_ACC = {
    ("l1", 0.5, 0): [80, 86, 90, 84], ("l1", 0.5, 1): [82, 88, 90, 80],
    ("l1", 0.9, 0): [60, 70, 75, 50], ("l1", 0.9, 1): [62, 74, 73, 10],
    ("tpp", 0.5, 0): [89, 90, 91, 90], ("tpp", 0.5, 1): [88, 91, 91, 89],
    ("tpp", 0.9, 0): [80, 82, 83, 81], ("tpp", 0.9, 1): [81, 83, 82, 80],
}
JSV = {("l1", 0.5): 0.02, ("l1", 0.9): 0.004, ("tpp", 0.5): 1.1, ("tpp", 0.9): 0.9}
CONFIG_YAML = "name: grid\nmethods: [l1, tpp]\npr: [0.5, 0.9]\nlr: [1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1]\n"
PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ writing the store

def _trial(method, pr, lr, seed, acc, *, status="completed", growth=None, jsv=1.0, t_prune=0.0):
    return dict(method=method, pr=pr, lr=lr, seed=seed, acc=acc, status=status, growth=growth, jsv=jsv,
                t_prune=t_prune)


def _write_study(client, name: str, trials: list[dict], *, planned: int | None = None,
                 running: bool = False, config: str | None = None, root: Path) -> str:
    from mlflow.entities import Metric, Param, RunTag

    exp = client.create_experiment(f"{name}-exp", artifact_location=(root / "artifacts" / name).as_uri())
    params = {"name": name, "mlflow.experiment": f"{name}-exp", "search.lr.low": "0.0001"}
    if planned is not None:
        params["num_trials"] = str(planned)
    parent = client.create_run(exp, run_name=name, tags={"tpp.study": name, "tpp.role": "study"})
    pid = parent.info.run_id
    client.log_batch(pid, metrics=[Metric("dense_test_acc", 95.0, 0, 0)],
                     params=[Param(k, v) for k, v in params.items()])
    if config:
        client.log_text(pid, config, "study_config.yaml")
    for i, t in enumerate(trials):
        g = "none" if t["growth"] is None else repr(t["growth"])
        run_name = f"{t['method']} pr={t['pr']} g={g} lr={t['lr']:.2g} s{t['seed']}"
        tags = {"mlflow.parentRunId": pid, "tpp.study": name, "tpp.role": "trial",
                "tpp.trial_id": f"t{i:03d}", "tpp.method": t["method"], "tpp.reuse": "computed"}
        run = client.create_run(exp, run_name=run_name, tags=tags)
        rid = run.info.run_id
        p = {"method": t["method"], "pr": repr(t["pr"]), "lr": repr(t["lr"]), "growth": g,
             "seed": str(t["seed"]), "epochs": "3", "model": "mlp7_linear", "data": "digits",
             "data_root": "None", "milestones": "[0.5, 0.75]", "model_kwargs": "{}", "bf16": "False"}
        metrics, extra_tags = [], []
        if t["status"] in ("completed", "diverged", "running"):
            acc = t["acc"]
            hist = [acc - 4.0, acc - 1.0, acc] if t["status"] != "running" else [acc - 4.0]
            for e, v in enumerate(hist):
                metrics += [Metric("finetune/test_acc", v, 0, e),
                            Metric("finetune/train_loss", 1.0 / (e + 1), 0, e),
                            Metric("finetune/lr", t["lr"] if e < 2 else t["lr"] / 10, 0, e)]
                if t["method"] == "tpp":
                    metrics.append(Metric("prune/reg", 0.5 * (e + 1), 0, e))
        if t["status"] in ("completed", "diverged"):
            finals = {"best_acc": t["acc"], "last_acc": t["acc"], "acc_after_removal": 30.0,
                      "jsv_after_removal_mean": t["jsv"], "time_prune_s": t["t_prune"],
                      "time_finetune_s": 3.0, "params": 1000.0, "flops": 2000.0, "dense_acc": 95.0}
            metrics += [Metric(k, float(v), 0, 0) for k, v in finals.items()]
        if t["status"] != "running":
            extra_tags.append(RunTag("tpp.status", t["status"]))
        client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in p.items()], tags=extra_tags)
        if t["status"] != "running":
            client.set_terminated(rid, "FAILED" if t["status"] == "failed" else "FINISHED")
    if not running:
        client.set_terminated(pid, "FINISHED")
    return pid


def _grid_trials() -> list[dict]:
    trials = []
    for (method, pr, seed), accs in GRID_ACC.items():
        for lr, acc in zip(LRS, accs, strict=True):
            status = "diverged" if (method, pr, seed, lr) == ("l1", 0.9, 1, 1e-1) else "completed"
            trials.append(_trial(method, pr, lr, seed, acc, status=status,
                                 growth=1e-3 if method == "tpp" else None, jsv=JSV[(method, pr)],
                                 t_prune=12.0 if method == "tpp" else 0.0))
    trials.append(_trial("tpp", 0.5, 1e-1, 2, math.nan, status="failed", growth=1e-3))
    return trials


def _l1_cont(lr: float) -> float:
    return 80.0 + 4.0 * (math.log10(lr) + 4.0)  # linear in log10(LR), LR only


def _cont_trials() -> list[dict]:
    trials, k = [], 0
    for pr in (0.5, 0.7, 0.9):
        for seed in (0, 1):
            for method, growths in (("l1", [None]), ("tpp", [1e-4, 1e-3])):
                for growth in growths:
                    exps = np.array([-3.9, -2.9, -1.6, -1.1]) + 0.02 * k  # distinct LRs, cover [1e-3, 1e-2]
                    k += 1
                    for lr in 10.0 ** exps:
                        acc = _l1_cont(lr) if method == "l1" else 95.0 - 20.0 * pr
                        trials.append(_trial(method, pr, float(lr), seed, acc, growth=growth,
                                             jsv=0.01 if method == "l1" else 1.0,
                                             t_prune=0.0 if growth is None else 2e-3 / growth))
    return trials


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store with the three studies; returns (uri, {study: parent run id}, root)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    ids = {
        "grid": _write_study(client, "grid", _grid_trials(), planned=33, config=CONFIG_YAML, root=root),
        "cont": _write_study(client, "cont", _cont_trials(), root=root),
        "live": _write_study(client, "live", [
            _trial("tpp", 0.5, 1e-3, 0, 90.0, growth=1e-3), _trial("tpp", 0.5, 1e-2, 0, 91.0, growth=1e-3),
            _trial("tpp", 0.5, 1e-1, 0, 70.0, status="running", growth=1e-3)],
            planned=4, running=True, root=root),
        "empty": _write_study(client, "empty", [], planned=8, running=True, root=root),
    }
    return uri, ids, root


@pytest.fixture(scope="module")
def grid(store):
    from analysis import load_study

    return load_study("grid", store[0])


@pytest.fixture(scope="module")
def cont(store):
    from analysis import load_study

    return load_study("cont", store[0], histories=None)


def _row(table: pd.DataFrame, method: str, pr: float, growth: float | None = None) -> pd.Series:
    sel = (table["method"] == method) & np.isclose(table["pr"], pr)
    if growth is not None:
        sel &= np.isclose(table["growth"], growth)
    hit = table[sel]
    assert len(hit) == 1, hit
    return hit.iloc[0]


# ------------------------------------------------------------------------------------------------ load

def test_load_tidy_tables(grid, store):
    t = grid.trials
    assert len(t) == 33 and grid.parent_run_id == store[1]["grid"]
    assert t["status"].value_counts().to_dict() == {"completed": 31, "diverged": 1, "failed": 1}
    assert t["lr"].dtype == float and t["seed"].dtype == np.int64 and t["pr"].dtype == float
    assert t.loc[t["method"] == "l1", "growth"].isna().all()  # "none" -> NaN
    assert np.allclose(t.loc[t["method"] == "tpp", "growth"], 1e-3)
    assert t["bf16"].dtype == bool and t["data_root"].isna().all() and t["model"].eq("mlp7_linear").all()
    one = t[(t["method"] == "l1") & (t["pr"] == 0.9) & (t["seed"] == 1) & (t["lr"] == 1e-1)].iloc[0]
    assert one["status"] == "diverged" and one["best_acc"] == 10.0 and one["jsv_after_removal_mean"] == 0.004
    # per-epoch table: 32 trials with histories x 3 finetune epochs (+ 3 prune epochs for the 16 TPP trials)
    e = grid.epochs
    assert len(e[e["stage"] == "finetune"]) == 32 * 3 and len(e[e["stage"] == "prune"]) == 16 * 3
    curve = e[(e["run_id"] == one["run_id"]) & (e["stage"] == "finetune")].sort_values("epoch")
    assert curve["test_acc"].tolist() == [6.0, 9.0, 10.0] and curve["epoch"].tolist() == [0, 1, 2]
    assert curve["epoch_lr"].tolist() == pytest.approx([0.1, 0.1, 0.01]) and (curve["lr"] == 0.1).all()
    assert grid.config_text == CONFIG_YAML
    assert grid.progress.planned == 33 and grid.progress.finished == 32
    assert grid.missing() == ["32 of 33 planned trials finished",
                              "1 trial(s) failed (excluded from the measures)"]


def test_load_by_run_id_and_history_subset(store):
    from analysis import load_study

    d = load_study(store[1]["grid"], store[0], histories=["finetune/test_acc"])
    assert d.name == "grid" and set(d.epochs.columns) >= {"test_acc"} and "train_loss" not in d.epochs


def test_unknown_study_lists_available(store):
    from analysis import StudyNotFoundError, list_studies, load_study

    with pytest.raises(StudyNotFoundError) as err:
        load_study("nope", store[0])
    assert err.value.available == ["cont", "empty", "grid", "live"]
    assert "nope" in str(err.value) and "available studies: cont, empty, grid, live" in str(err.value)
    studies = list_studies(store[0])
    assert sorted(studies["name"]) == ["cont", "empty", "grid", "live"]
    # studies live in different experiments: all are found
    assert set(studies["experiment"]) == {"cont-exp", "empty-exp", "grid-exp", "live-exp"}


def test_missing_store_is_an_error_not_a_new_db(tmp_path):
    from analysis import load_study

    with pytest.raises(ValueError, match="tracking_uri: no MLflow database"):
        load_study("grid", f"sqlite:///{tmp_path}/absent.db")
    assert not (tmp_path / "absent.db").exists()


def test_in_progress_study_reports_what_is_missing(store):
    from analysis import load_study, sensitivity_table

    d = load_study("live", store[0])
    p = d.progress
    assert (p.planned, p.total, p.finished, p.running, p.not_started) == (4, 3, 2, 1, 1)
    missing = d.missing()
    assert missing[0] == "the study run is still RUNNING (results may change)"
    assert missing[1].startswith("1 trial(s) still running: tpp pr=0.5")
    assert "1 of 4 planned trials not started yet" in missing and not d.is_complete
    sens = sensitivity_table(d.trials)  # the running trial is not a result yet
    assert len(sens) == 1 and sens.iloc[0]["n_trials"] == 2 and sens.iloc[0]["best_acc"] == 91.0


# -------------------------------------------------------------------------------------------- measures

def test_sensitivity_exact_on_grid(grid):
    from analysis import sensitivity_table

    sens = sensitivity_table(grid.trials)
    assert sens.attrs["lr_mode"] == "grid" and len(sens) == 4
    r = _row(sens, "l1", 0.5)  # seeds: [80, 86, 90, 84] and [82, 88, 90, 80]
    assert r["acc_diff"] == pytest.approx(-3.0) and r["acc_diff_sd"] == pytest.approx(math.sqrt(2))
    assert r["acc_diff_how"] == "matched"
    assert r["acc_range"] == pytest.approx(10.0) and r["acc_range_sd"] == pytest.approx(0.0)
    assert r["acc_std"] == pytest.approx((math.sqrt(13) + math.sqrt(17)) / 2)
    assert r["best_acc"] == 90.0 and r["best_lr"] == pytest.approx(1e-2)
    assert r["robust"] == pytest.approx(85.0) and r["n_seeds"] == 2 and r["n_lrs"] == 4
    assert r["jsv_after_removal"] == pytest.approx(0.02) and r["spread"] == "std"
    r = _row(sens, "l1", 0.9)  # [60, 70, 75, 50] and [62, 74, 73, 10 (diverged: counts as reached)]
    assert r["acc_diff"] == pytest.approx(-2.0) and r["acc_diff_sd"] == pytest.approx(math.sqrt(18))
    assert r["acc_range"] == pytest.approx(44.5) and r["acc_range_sd"] == pytest.approx(39 / math.sqrt(2))
    assert r["best_acc"] == pytest.approx(74.5) and r["best_lr"] == pytest.approx(1e-2)
    assert r["acc_range_lo"] == pytest.approx(44.5 - 39 / math.sqrt(2))  # < 5 seeds: mean - std
    assert r["diverged_share"] == pytest.approx(1 / 8) and r["n_diverged"] == 1 and r["n_failed"] == 0
    r = _row(sens, "tpp", 0.5)  # [89, 90, 91, 90] and [88, 91, 91, 89]; the failed seed-2 trial is excluded
    assert r["acc_diff"] == pytest.approx(-0.5) and r["acc_range"] == pytest.approx(2.5)
    assert r["n_failed"] == 1 and r["n_trials"] == 8 and r["growth"] == pytest.approx(1e-3)
    r = _row(sens, "tpp", 0.9)
    assert r["acc_diff"] == pytest.approx(0.0) and r["acc_diff_sd"] == pytest.approx(math.sqrt(2))
    # other named LRs and a window: acc(1e-4) - acc(1e-1) and mean accuracy over 1e-3..1e-2
    s2 = sensitivity_table(grid.trials, lrs=(1e-4, 1e-1), window=(1e-3, 1e-2))
    r = _row(s2, "l1", 0.5)
    assert r["acc_diff"] == pytest.approx(((80 - 84) + (82 - 80)) / 2)
    assert r["robust"] == pytest.approx(((86 + 90) / 2 + (88 + 90) / 2) / 2)
    # an LR not in the grid is reported missing, never interpolated on a grid
    s3 = sensitivity_table(grid.trials, lrs=(3e-3, 1e-2))
    assert s3["acc_diff"].isna().all() and (s3["acc_diff_how"] == "missing").all()


def test_divergence_by_lr(grid):
    from analysis import divergence_table

    div = divergence_table(grid.trials)
    hit = div[(div["method"] == "l1") & np.isclose(div["pr"], 0.9) & np.isclose(div["lr"], 1e-1)].iloc[0]
    assert (hit["n"], hit["n_diverged"], hit["diverged_share"]) == (2, 1, 0.5)
    assert div["n_diverged"].sum() == 1 and len(div) == 16
    by_lr = divergence_table(grid.trials, by=["method"])
    l1_top = (by_lr["method"] == "l1") & np.isclose(by_lr["lr"], 1e-1)
    assert by_lr.loc[l1_top, "diverged_share"].item() == 0.25


def test_continuous_lr_interpolates_exactly(cont):
    from analysis import lr_curves, sensitivity_table

    assert cont.is_complete and cont.missing() == [] and cont.progress.planned is None
    sens = sensitivity_table(cont.trials, window=(1e-3, 1e-2))
    assert sens.attrs["lr_mode"] == "continuous" and len(sens) == 3 * 3  # l1 + tpp at 2 growths, x 3 PRs
    assert any("interpolated linearly in log10(LR)" in n for n in sens.attrs["notes"])
    l1 = sens[sens["method"] == "l1"]
    assert np.allclose(l1["acc_diff"], -4.0) and (l1["acc_diff_how"] == "interpolated").all()
    assert np.allclose(l1["robust"], 86.0)  # mean of a linear function over the log window = its midpoint
    assert np.allclose(l1["acc_range"], 4.0 * 2.8)
    tpp = sens[sens["method"] == "tpp"]
    assert np.allclose(tpp["acc_diff"], 0.0) and np.allclose(tpp["acc_range"], 0.0)
    assert np.allclose(tpp["robust"], 95.0 - 20.0 * tpp["pr"])
    assert _row(sens, "tpp", 0.9, 1e-4)["time_prune_s"] == pytest.approx(20.0)
    curves = lr_curves(cont.trials)
    c = curves[(curves["method"] == "l1") & np.isclose(curves["pr"], 0.5)]
    assert np.allclose(c["mean"], [_l1_cont(x) for x in c["lr"]])


def test_sparse_design_pools_seeds(cont):
    """A space-filling design can give each (group, seed) a single LR: seeds are then pooled."""
    from analysis import lr_curves, sensitivity_table

    t = cont.trials[(cont.trials["method"] == "l1") & np.isclose(cont.trials["pr"], 0.5)]
    sparse = t.head(8).reset_index(drop=True)  # real loaded rows; LRs, seeds and accuracies rewritten
    sparse["lr"] = [1e-4, 1e-3, 1e-2, 1e-1, 2e-4, 2e-3, 2e-2, 2e-1]  # continuous: 8 distinct LRs
    sparse["seed"] = range(8)
    sparse["best_acc"] = [_l1_cont(x) for x in sparse["lr"]]
    sens = sensitivity_table(sparse, lrs=(3e-3, 1e-2))
    r = sens.iloc[0]
    assert r["spread"] == "pooled seeds" and r["n_seeds"] == 8 and math.isnan(r["acc_diff_sd"])
    assert r["acc_diff"] == pytest.approx(4 * math.log10(0.3)) and r["acc_diff_how"] == "interpolated"
    assert r["acc_range"] == pytest.approx(4 * math.log10(2000))
    assert any("pooled" in n for n in sens.attrs["notes"])
    # on a grid (LRs repeated across seeds) with one LR per seed, values match the grid exactly
    sparse["lr"] = [1e-4, 1e-3, 1e-2, 1e-1] * 2
    sparse["best_acc"] = [_l1_cont(x) for x in sparse["lr"]]
    grid_sens = sensitivity_table(sparse)
    assert grid_sens.attrs["lr_mode"] == "grid" and grid_sens.iloc[0]["acc_diff"] == pytest.approx(-4.0)
    assert grid_sens.iloc[0]["acc_diff_how"] == "matched"
    assert grid_sens.iloc[0]["acc_range"] == pytest.approx(12)
    assert lr_curves(sparse)["n"].eq(1).all()


def test_spread_bootstrap_with_five_seeds():
    from analysis import spread

    vals = [1.0, 2.0, 3.0, 4.0, 10.0]
    s = spread(vals)
    assert s["mean"] == pytest.approx(4.0) and s["sd"] == pytest.approx(np.std(vals, ddof=1))
    assert min(vals) <= s["lo"] < s["mean"] < s["hi"] <= max(vals) and spread(vals) == s  # reproducible
    one = spread([5.0])
    assert math.isnan(one["sd"]) and (one["mean"], one["lo"], one["hi"], one["n"]) == (5.0, 5.0, 5.0, 1)


def test_paper_table_layout(grid, cont):
    from analysis import TableUnavailable, paper_table

    t = paper_table(grid.trials)
    assert list(t.mean.columns) == [0.5, 0.9]
    assert list(t.mean.index) == [("1e-1", "L1"), ("1e-1", "TPP"), ("1e-2", "L1"), ("1e-2", "TPP"),
                                  ("1e-3", "L1"), ("1e-3", "TPP"), ("1e-4", "L1"), ("1e-4", "TPP"),
                                  ("Δ (1e-3 − 1e-2)", "L1"), ("Δ (1e-3 − 1e-2)", "TPP")]
    assert t.mean.loc[("1e-1", "L1"), 0.9] == pytest.approx(30.0)
    assert t.sd.loc[("1e-1", "L1"), 0.9] == pytest.approx(40 / math.sqrt(2))
    assert t.mean.loc[("Δ (1e-3 − 1e-2)", "L1"), 0.5] == pytest.approx(-3.0)
    assert t.mean.loc[("Δ (1e-3 − 1e-2)", "TPP"), 0.9] == pytest.approx(0.0)
    assert int(t.n.loc[("1e-1", "TPP"), 0.5]) == 2  # the failed seed is not a cell value
    text = t.text()
    assert list(text.columns) == ["finetune LR", "method", "PR 0.5", "PR 0.9"]
    assert text.iloc[2].tolist() == ["1e-2", "L1", "90.00 ± 0.00", "74.00 ± 1.41"]
    assert text.iloc[8].tolist() == ["Δ (1e-3 − 1e-2)", "L1", "-3.00 ± 1.41", "-2.00 ± 4.24"]
    md = t.to_markdown().splitlines()
    assert md[0] == "| finetune LR | method | PR 0.5 | PR 0.9 |" and len(md) >= 12
    csv = pd.read_csv(pd.io.common.StringIO(t.to_csv()))
    assert list(csv.columns[:4]) == ["finetune LR", "method", "0.5 mean", "0.5 std"] and len(csv) == 10
    with pytest.raises(TableUnavailable, match="continuously"):
        paper_table(cont.trials)


def test_importance_ranks_lr_first_when_accuracy_depends_on_lr_only(cont):
    from analysis import importance_table, lr_share

    imp = importance_table(cont.trials)
    for ev in ("PED-ANOVA", "fANOVA"):
        l1 = imp[(imp["method"] == "l1") & (imp["evaluator"] == ev)].set_index("param")
        assert l1.loc["lr", "rank"] == 1, (ev, l1)
        tpp = imp[(imp["method"] == "tpp") & (imp["evaluator"] == ev)].set_index("param")
        assert tpp.loc["pr", "rank"] == 1, (ev, tpp)
        assert set(tpp.index) == {"lr", "pr", "growth", "seed"} and set(l1.index) == {"lr", "pr", "seed"}
    share = lr_share(imp).set_index("method")
    assert share.loc["l1", "variance_fraction"] > 0.9 and share.loc["tpp", "variance_fraction"] < 0.05


def test_trainability_relation(grid):
    from analysis import sensitivity_table, trainability_relation

    rel = trainability_relation(sensitivity_table(grid.trials))
    # JSV ascending: l1/0.9 (0.004), l1/0.5 (0.02), tpp/0.9 (0.9), tpp/0.5 (1.1); acc std over LR (seed
    # means): 20.2, 3.86, 1.12, 1.00 descending -> a perfect inverse rank relation
    assert rel["n"] == 4 and rel["spearman"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------- figures and report

def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000, path


def test_figures_all_kinds_and_skips(cont, store, tmp_path):
    from analysis import load_study, make_figures

    figs = make_figures(cont, tmp_path / "cont")
    assert set(figs.paths) == {"acc_vs_lr", "heatmap_lr_pr", "sensitivity_vs_pr", "growth",
                               "jsv_vs_sensitivity"}
    assert figs.notes == ["figure 'finetune_curves' skipped: no per-epoch finetune/test_acc histories "
                          "were loaded"]
    for p in figs.paths.values():
        _assert_png(p)
    live = make_figures(load_study("live", store[0]), tmp_path / "live")
    assert set(live.paths) == {"acc_vs_lr", "finetune_curves"}
    assert any("one pruning ratio" in n for n in live.notes) and not any("failed" in n for n in live.notes)


def test_report_end_to_end_logged_to_parent_run(store, tmp_path):
    from mlflow import MlflowClient

    from analysis import build_report

    uri, ids, _ = store
    messages: list[str] = []
    path = build_report("grid", uri, tmp_path / "rep", progress=messages.append)
    assert path == tmp_path / "rep" / "report.html"
    page = path.read_text()
    assert ("At PR 0.9, TPP's accuracy varies by 3.0 points across LRs 1e-4…1e-1 versus 44.5 for L1." in page)
    assert "TPP is less LR-sensitive than L1 (smaller accuracy range over the LRs) at 2 of 2 pruning" in page
    assert "1 of 32 finished trials diverged" in page and "name: grid" in page  # config from the artifact
    assert page.count("data:image/png;base64,") == 5 and "figure 'growth' skipped" in page
    figures = sorted((tmp_path / "rep" / "figures").glob("*.png"))
    assert [p.stem for p in figures] == ["acc_vs_lr", "finetune_curves", "heatmap_lr_pr",
                                         "jsv_vs_sensitivity", "sensitivity_vs_pr"]
    for p in figures:
        _assert_png(p)
    for name in ("paper_table.csv", "paper_table.md", "sensitivity.csv", "sensitivity.md", "importance.csv",
                 "divergence.csv", "trials.csv", "summary.md"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(ids["grid"], "report")}
    assert {"report/report.html", "report/figures", "report/paper_table.md"} <= logged
    assert len(client.list_artifacts(ids["grid"], "report/figures")) == 5
    assert any(m.startswith("report: ") for m in messages)


def test_report_on_unfinished_studies_never_crashes(store, tmp_path):
    from analysis import build_report

    live = build_report("live", store[0], tmp_path / "live", log=False).read_text()
    assert "<b>Incomplete study:</b> the study run is still RUNNING" in live
    assert "1 trial(s) still running" in live and "1 of 4 planned trials not started yet" in live
    assert "The study holds 2 finished trial(s) of 4 planned" in live
    assert "figure 'heatmap_lr_pr' skipped: the study has one pruning ratio" in live
    empty = build_report("empty", store[0], tmp_path / "empty", log=False).read_text()
    assert "No finished trials yet: nothing to measure." in empty
    assert "0 of 8 planned trials finished" in empty


def _cli(*args: str, env_uri: str | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "tpp-analyze"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "analysis.cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if env_uri:
        env["MLFLOW_TRACKING_URI"] = env_uri
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_report_and_bad_input(store, tmp_path):
    uri = store[0]
    ok = _cli("cont", "--out", str(tmp_path / "out"), "--no-log", "--window", "1e-3,1e-2", env_uri=uri)
    assert ok.returncode == 0, ok.stderr
    assert f"report: {tmp_path / 'out' / 'report.html'}" in ok.stdout and "loading study 'cont'" in ok.stdout
    page = (tmp_path / "out" / "report.html").read_text()
    assert "interpolated in log-LR" in page and "paper table: the study sampled the LR continuously" in page
    for args, field in [(("cont", "--lrs", "1e-3"), "--lrs"), (("cont", "--window", "1e-2,1e-3"), "--window"),
                        (("cont", "--lrs", "a,b"), "--lrs")]:
        bad = _cli(*args, "--tracking-uri", uri)
        assert bad.returncode == 2 and bad.stderr.startswith(f"tpp-analyze: error: {field}: "), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    no_uri = _cli("cont")
    assert no_uri.returncode == 2
    assert no_uri.stderr.startswith("tpp-analyze: error: --tracking-uri: none given")
    absent = _cli("cont", "--tracking-uri", f"sqlite:///{tmp_path}/absent.db")
    assert absent.returncode == 2 and "--tracking-uri: no MLflow database" in absent.stderr
    unknown = _cli("nope", "--tracking-uri", uri)
    assert unknown.returncode == 2 and "available studies: cont, empty, grid, live" in unknown.stderr
    helped = _cli("--help")
    assert helped.returncode == 0 and "--window" in helped.stdout and "--no-log" in helped.stdout
