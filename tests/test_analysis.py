"""analysis/: every measure exactly, on real MLflow runs (SQLite) with hand-chosen values.

Studies in one store (written by test_analysis_store.write_study, schema v2):
- "grid": L1 and TPP x PR {0.5, 0.9} x LR ladder {1e-4, 1e-3, 1e-2, 1e-1} x seeds {0, 1}; one diverged
  member (L1, PR 0.9, seed 1, LR 1e-1), one failed member; every per-curve number below is worked by hand.
- "scat": LRs scattered (an adaptive sampler): L1's accuracy is linear in log10 LR, TPP's is flat.
- "recipe": the finetuning budget (epochs) varies, so it is a group key.
- "live": still running; "empty": started, no member yet.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_analysis_store import Member, new_store, write_study

LRS = [1e-4, 1e-3, 1e-2, 1e-1]
# (method, pr, seed) -> accuracy (test_acc_at_best_val) at each LR; l1/0.9/seed 1 diverged at 1e-1.
GRID = {
    ("l1", 0.5, 0): [80, 86, 90, 84], ("l1", 0.5, 1): [82, 88, 90, 80],
    ("l1", 0.9, 0): [60, 70, 75, 50], ("l1", 0.9, 1): [62, 74, 73, 10],
    ("tpp", 0.5, 0): [89, 90, 91, 90], ("tpp", 0.5, 1): [88, 91, 91, 89],
    ("tpp", 0.9, 0): [80, 82, 83, 81], ("tpp", 0.9, 1): [81, 83, 82, 80],
}
JSV = {("l1", 0.5): 0.02, ("l1", 0.9): 0.004, ("tpp", 0.5): 1.1, ("tpp", 0.9): 0.9}
CONFIG = "name: grid\nmethods: [l1, tpp]\n"


def _grid_members() -> list[Member]:
    out = []
    for (method, pr, seed), accs in GRID.items():
        for lr, acc in zip(LRS, accs, strict=True):
            div = (method, pr, seed, lr) == ("l1", 0.9, 1, 1e-1)
            out.append(Member(method, pr, lr, seed, float(acc), status="diverged" if div else "completed",
                              growth=1e-3 if method == "tpp" else None, jsv=JSV[(method, pr)],
                              acc_removal=70.0 if method == "tpp" else 20.0 + 10 * seed,
                              loss_removal=1.0 + pr))
    out.append(Member("tpp", 0.5, 1e-1, 2, 0.0, growth=1e-3, status="failed"))
    return out


def _l1_scat(lr: float) -> float:
    return 80.0 + 4.0 * (math.log10(lr) + 4.0)


def _scat_members() -> list[Member]:
    out, k = [], 0
    for pr in (0.5, 0.9):
        for seed in (0, 1):
            for method in ("l1", "tpp"):
                for e in np.array([-3.9, -2.9, -1.6, -1.1]) + 0.02 * k:
                    lr = float(10.0 ** e)
                    acc = _l1_scat(lr) if method == "l1" else 95.0 - 20 * pr
                    out.append(Member(method, pr, lr, seed, acc, growth=1e-3 if method == "tpp" else None,
                                      val=False))
                k += 1
    return out


def _recipe_members() -> list[Member]:
    out = []
    for epochs, top in ((3, 80.0), (6, 84.0)):
        for method in ("l1", "tpp"):
            for seed in (0, 1):
                for lr, drop in zip(LRS, [4.0, 0.0, 0.5, 6.0], strict=True):
                    out.append(Member(method, 0.5, lr, seed, top - drop + (2 if method == "tpp" else 0),
                                      growth=1e-3 if method == "tpp" else None, epochs=epochs))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri, client = new_store(root)
    ids = {
        "grid": write_study(client, "grid", _grid_members(), root=root, planned=33, config=CONFIG),
        "scat": write_study(client, "scat", _scat_members(), root=root),
        "recipe": write_study(client, "recipe", _recipe_members(), root=root),
        "live": write_study(client, "live", [
            Member("tpp", 0.5, 1e-3, 0, 90.0, growth=1e-3), Member("tpp", 0.5, 1e-2, 0, 91.0, growth=1e-3),
            Member("tpp", 0.5, 1e-1, 0, 70.0, growth=1e-3, status="running")],
            root=root, planned=4, running=True),
        "empty": write_study(client, "empty", [], root=root, planned=8, running=True),
    }
    return uri, ids, root


@pytest.fixture(scope="module")
def grid(store):
    from analysis import load_study

    return load_study("grid", store[0])


@pytest.fixture(scope="module")
def grid_res(grid):
    from analysis import analyze

    return analyze(grid, baseline="l1")


def _one(table: pd.DataFrame, **where) -> pd.Series:
    sel = np.ones(len(table), dtype=bool)
    for k, v in where.items():
        sel &= np.isclose(table[k], v) if isinstance(v, float) else (table[k] == v).to_numpy()
    hit = table[sel]
    assert len(hit) == 1, hit
    return hit.iloc[0]


# ------------------------------------------------------------------------------------- load and prepare

def test_load_tidy_tables(grid, store):
    t = grid.trials
    assert len(t) == 33 and grid.parent_run_id == store[1]["grid"]
    assert t["status"].value_counts().to_dict() == {"completed": 31, "diverged": 1, "failed": 1}
    assert t["lr"].dtype == float and t["seed"].dtype == np.int64 and t["pr"].dtype == float
    assert grid.config_text == CONFIG and grid.progress.planned == 33 and grid.progress.finished == 32
    assert grid.missing() == ["32 of 33 planned member runs finished",
                              "1 member run(s) failed (excluded from the measures)"]
    e = grid.epochs
    one = t[(t["status"] == "diverged")].iloc[0]
    curve = e[(e["run_id"] == one["run_id"]) & (e["stage"] == "finetune")].sort_values("epoch")
    assert curve["test_acc"].tolist() == [8.0, 9.0, 10.0] and curve["val_acc"].tolist() == [8.3, 9.3, 10.3]


def test_prepare_picks_the_honest_metric_and_the_ladder(grid):
    from analysis import prepare

    prep = prepare(grid)
    assert prep.metric == "test_acc_at_best_val" and prep.keys == ["method", "pr", "growth"]
    assert prep.lr_axis.mode == "ladder" and prep.lr_axis.levels == pytest.approx(tuple(LRS))
    assert prep.lr_axis.per_decade == pytest.approx(1.0)
    assert prep.excluded == {"failed": 1} and len(prep.points) == 32
    assert prep.points["n_members"].eq(1).all() and int(prep.points["diverged"].sum()) == 1
    assert prepare(grid, "best_acc").points["acc"].sum() == pytest.approx(prep.points["acc"].sum() + 32)
    with pytest.raises(ValueError, match="metric: 'nope' was not logged"):
        prepare(grid, "nope")


def test_unknown_study_lists_available(store):
    from analysis import StudyNotFoundError, load_study

    with pytest.raises(StudyNotFoundError) as err:
        load_study("nope", store[0])
    assert err.value.available == ["empty", "grid", "live", "recipe", "scat"]


def test_missing_store_is_an_error_not_a_new_db(tmp_path):
    from analysis import load_study

    with pytest.raises(ValueError, match="tracking_uri: no MLflow database"):
        load_study("grid", f"sqlite:///{tmp_path}/absent.db")
    assert not (tmp_path / "absent.db").exists()


# ------------------------------------------------------------------------------------ per-curve measures

# (method, pr, seed) -> window width in decades, worked by hand from GRID with δ = 1 (edges interpolated)
WINDOW = {("l1", 0.5, 0): 0.25 + 1 / 6, ("l1", 0.5, 1): 0.5 + 0.1, ("l1", 0.9, 0): 0.2 + 0.04,
          ("l1", 0.9, 1): 1 / 12 + 1.0, ("tpp", 0.5, 0): 2.0, ("tpp", 0.5, 1): 1 / 3 + 1 + 0.5,
          ("tpp", 0.9, 0): 1.5, ("tpp", 0.9, 1): 1.5}


def test_curve_measures_exact(grid_res):
    c = grid_res.curves
    assert len(c) == 8 and c["metric"].eq("test_acc_at_best_val").all()
    for (method, pr, seed), width in WINDOW.items():
        got = _one(c, method=method, pr=pr, seed=seed)["window_decades"]
        assert got == pytest.approx(width), (method, pr, seed)
    r = _one(c, method="l1", pr=0.5, seed=0)  # [80, 86, 90, 84]
    assert (r["best_acc"], r["best_lr"]) == (90.0, pytest.approx(1e-2)) and r["lr_stable_max"] == 0.1
    assert r["window_edge_lo"] == pytest.approx(-2.25) and r["window_edge_hi"] == pytest.approx(-2 + 1 / 6)
    assert (r["window_lr_lo"], r["window_lr_hi"], r["window_n"], r["window_open"]) == (
        pytest.approx(1e-2), pytest.approx(1e-2), 1, "")
    assert r["stable_range"] == 10.0 and r["stable_std"] == pytest.approx(math.sqrt(13))
    assert (r["acc_a"], r["acc_b"], r["acc_diff"], r["acc_diff_how"]) == (86.0, 90.0, -4.0, "exact")
    assert math.isnan(r["lr_diverge_min"]) and r["diverged_share"] == 0
    r = _one(c, method="l1", pr=0.9, seed=1)  # [62, 74, 73, 10 diverged]: best excludes the diverged point
    assert (r["best_acc"], r["best_lr"]) == (74.0, pytest.approx(1e-3))
    assert (r["lr_stable_max"], r["lr_diverge_min"], r["diverged_share"]) == (
        pytest.approx(1e-2), pytest.approx(1e-1), 0.25)
    assert r["window_edge_hi"] == pytest.approx(-2.0) and r["window_open"] == ""  # stops at a diverged LR
    assert r["stable_range"] == 12.0 and r["stable_std"] == pytest.approx(np.std([62, 74, 73]))
    assert r["acc_diff"] == 1.0 and r["jsv_after_removal_mean"] == pytest.approx(0.004)
    r = _one(c, method="tpp", pr=0.5, seed=0)  # [89, 90, 91, 90]: the window reaches the ladder's top
    assert r["window_open"] == "high" and r["window_edge_lo"] == pytest.approx(-3.0) and r["window_n"] == 3
    assert (r["top_best_acc"], r["top_test_acc_at_best_val"], r["top_last_acc"]) == (92.0, 91.0, 90.5)
    r = _one(c, method="tpp", pr=0.5, seed=1)  # [88, 91, 91, 89]: the tie goes to the lower LR
    assert r["best_lr"] == pytest.approx(1e-3)


def test_robust_window_edge_cases():
    from analysis import robust_window

    lrs = np.array([1e-4, 1e-3, 1e-2, 1e-1])
    none = np.zeros(4, dtype=bool)
    flat = robust_window(lrs, np.array([90.0, 90.0, 90.0, 90.0]), none, 1.0)
    assert flat.decades == pytest.approx(3.0) and flat.open == "both" and flat.n == 4
    lone = robust_window(lrs, np.array([50.0, 90.0, 50.0, 50.0]), np.array([True, False, True, False]), 1.0)
    assert lone.decades == 0.0 and lone.n == 1 and lone.open == ""  # both neighbours diverged
    two = robust_window(lrs, np.array([90.0, 80.0, 89.5, 89.5]), none, 1.0)  # two runs: the widest wins
    assert two.lr_lo == pytest.approx(1e-2) and two.decades == pytest.approx(0.5 / 9.5 + 1)
    assert two.open == "high"
    assert math.isnan(robust_window(lrs, np.full(4, 10.0), np.ones(4, dtype=bool), 1.0).decades)
    wide = robust_window(lrs, np.array([80.0, 86.0, 90.0, 84.0]), none, 5.0)  # δ is configurable
    assert wide.decades == pytest.approx(1 + 1 / 6 + 5 / 6) and wide.lr_lo == pytest.approx(1e-3)


def test_acc_at_exact_interpolated_outside_diverged():
    from analysis import acc_at

    lrs, accs = np.array([1e-4, 1e-3, 1e-2, 1e-1]), np.array([80.0, 86.0, 90.0, 10.0])
    div = np.array([False, False, False, True])
    assert acc_at(lrs, accs, div, 1.005e-3, 0.01) == (86.0, "exact")
    v, how = acc_at(lrs, accs, div, 3e-3, 0.01)
    assert how == "interpolated" and v == pytest.approx(86 + 4 * math.log10(3))
    assert acc_at(lrs, accs, div, 1e-5, 0.01)[1] == "outside"
    assert acc_at(lrs, accs, div, 3e-2, 0.01)[1] == "diverged"  # between 1e-2 and a diverged 1e-1
    assert acc_at(lrs, accs, div, 0.1, 0.01)[1] == "diverged"


# -------------------------------------------------------------------------------------- group measures

def test_group_measures_exact(grid_res):
    g = grid_res.groups
    assert g["group"].tolist() == ["l1 pr=0.5", "l1 pr=0.9", "tpp pr=0.5 growth=0.001",
                                   "tpp pr=0.9 growth=0.001"]
    r = _one(g, group="l1 pr=0.5")
    assert r["window_decades"] == pytest.approx((WINDOW[("l1", 0.5, 0)] + WINDOW[("l1", 0.5, 1)]) / 2)
    assert r["window_decades_lo"] == pytest.approx(0.25 + 1 / 6)
    assert r["window_decades_hi"] == pytest.approx(0.6)
    assert r["interval"] == "range" and r["n_seeds"] == 2 and r["seeds"] == "0;1"
    assert (r["acc_diff"], r["acc_diff_lo"], r["acc_diff_hi"]) == (-3.0, -4.0, -2.0)
    assert r["stable_std"] == pytest.approx((math.sqrt(13) + math.sqrt(17)) / 2)
    assert r["best_lr_mode"] == pytest.approx(1e-2) and r["best_lr_seeds"] == "0.01;0.01"
    r = _one(g, group="l1 pr=0.9")
    assert r["lr_stable_max"] == pytest.approx(1e-2) and r["lr_stable_max_seeds"] == "0.1;0.01"
    assert r["n_diverged"] == 1 and r["n_members"] == 8 and r["diverged_members_share"] == 1 / 8
    assert math.isnan(r["best_lr_mode"]) and r["best_lr_seeds"] == "0.01;0.001"  # no single most common LR
    assert r["best_acc"] == 74.5 and r["stable_range"] == pytest.approx((25 + 12) / 2)
    # LR main effect: LRs where every seed ran and none diverged (1e-4, 1e-3, 1e-2), seed means 61, 72, 74
    assert r["lr_effect_sd"] == pytest.approx(np.std([61, 72, 74])) and r["lr_effect_n"] == 3
    r = _one(g, group="tpp pr=0.5 growth=0.001")
    assert r["window_open_n"] == 1 and r["n_members"] == 8  # the failed seed-2 member is not measured
    assert r["jsv_after_removal_mean"] == pytest.approx(1.1)


def test_lr_points_and_heatmap_cells(grid_res):
    p = grid_res.lr_points
    assert len(p) == 16 and p["how"].eq("ran").all() and p["n"].eq(2).all()
    r = _one(p, group="l1 pr=0.9", lr=0.1)
    assert (r["acc"], r["n_diverged"], r["acc_stable"], r["lo"], r["hi"]) == (30.0, 1, 50.0, 10.0, 50.0)


def test_paired_comparison_exact(grid_res):
    cmp = grid_res.comparison
    w = _one(cmp, group="tpp pr=0.5 growth=0.001", measure="window_decades")
    d = [WINDOW[("tpp", 0.5, s)] - WINDOW[("l1", 0.5, s)] for s in (0, 1)]
    assert w["baseline_group"] == "l1 pr=0.5" and w["n"] == 2 and w["seeds"] == "0;1"
    assert (w["diff"], w["lo"], w["hi"]) == (pytest.approx(np.mean(d)), pytest.approx(min(d)),
                                             pytest.approx(max(d)))
    assert (w["p"], w["p_floor"], w["outcome"], w["method_open"]) == (0.5, 0.5, "tie", 1)
    b = _one(cmp, group="tpp pr=0.9 growth=0.001", measure="best_acc")
    assert (b["method_mean"], b["baseline_mean"], b["diff"], b["lo"], b["hi"]) == (83.0, 74.5, 8.5, 8.0, 9.0)
    at = _one(cmp, group="tpp pr=0.9 growth=0.001", measure="acc_at_lr", lr=0.1)
    assert (at["diff"], at["baseline_diverged"], at["n"]) == ((31 + 70) / 2, 1, 2)
    assert len(cmp[cmp["measure"] == "acc_at_lr"]) == 8 and set(cmp["baseline"]) == {"l1"}


def test_trainability_tau(grid_res):
    from scipy.stats import kendalltau

    tau = grid_res.tau
    c = grid_res.curves
    r = _one(tau, predictor="jsv_after_removal_mean", outcome="window_decades", stratum="all")
    assert r["n"] == 8
    assert r["tau"] == pytest.approx(kendalltau(c["jsv_after_removal_mean"], c["window_decades"])[0])
    assert r["lo"] <= r["tau"] <= r["hi"] and r["tau"] > 0.5
    within = tau[(tau["stratum"] == "pr=0.9") & (tau["predictor"] == "acc_after_removal")]
    assert within["n"].eq(4).all() and set(within["outcome"]) == {"window_decades", "best_acc"}


def test_paper_table_uses_best_acc(grid_res):
    from analysis import paper_table

    t = paper_table(grid_res.paper_curves, grid_res.paper_groups, grid_res.prep.keys)
    assert t.metric == "best_acc" and list(t.mean.columns) == [0.5, 0.9]
    assert list(t.mean.index) == [("1e-2", "L1"), ("1e-2", "TPP (growth 1e-3)"), ("1e-3", "L1"),
                                  ("1e-3", "TPP (growth 1e-3)"), ("Δ (1e-3 − 1e-2)", "L1"),
                                  ("Δ (1e-3 − 1e-2)", "TPP (growth 1e-3)")]
    assert t.mean.loc[("1e-2", "L1"), 0.5] == 91.0  # best_acc = test_acc_at_best_val + 1 in this store
    delta_l1 = ("Δ (1e-3 − 1e-2)", "L1")
    assert t.mean.loc[delta_l1, 0.5] == -3.0 and t.sd.loc[delta_l1, 0.5] == pytest.approx(math.sqrt(2))
    assert t.text().iloc[4].tolist() == ["Δ (1e-3 − 1e-2)", "L1", "-3.00 ± 1.41", "-2.00 ± 4.24"]


def test_interpolated_acc_diff_is_labelled(grid):
    from analysis import analyze

    res = analyze(grid, lrs=(3e-3, 1e-2), baseline="l1")
    r = _one(res.curves, method="l1", pr=0.5, seed=0)
    assert r["acc_diff_how"] == "interpolated" and r["acc_diff"] == pytest.approx(86 + 4 * math.log10(3) - 90)
    assert _one(res.groups, group="l1 pr=0.5")["acc_diff_how"] == "interpolated"
    res = analyze(grid, lrs=(3e-2, 1e-2), baseline="l1")  # 3e-2 lies between 1e-2 and a diverged 1e-1
    assert _one(res.curves, method="l1", pr=0.9, seed=1)["acc_diff_how"] == "diverged"
    assert _one(res.groups, group="l1 pr=0.9")["acc_diff_how"] == "mixed"


# ----------------------------------------------------------------------------- scattered LRs and recipes

def test_scattered_lrs_interpolate(store):
    from analysis import analyze, load_study

    res = analyze(load_study("scat", store[0], histories=None), baseline="l1")
    assert res.prep.lr_axis.mode == "scattered" and res.prep.metric == "best_acc"
    assert any("no validation split" in n for n in res.prep.notes)
    l1 = res.curves[res.curves["method"] == "l1"]
    # best_acc = acc + 1 here; linear in log10 LR (4 points a decade): the window is the top 0.25 decade
    assert np.allclose(l1["window_decades"], 0.25) and l1["window_open"].eq("high").all()
    assert np.allclose(l1["acc_diff"], -4.0) and l1["acc_diff_how"].eq("interpolated").all()
    tpp = res.curves[res.curves["method"] == "tpp"]
    assert np.allclose(tpp["window_decades"], 2.8) and tpp["window_open"].eq("both").all()
    pts = res.lr_points[res.lr_points["group"] == "l1 pr=0.5"]
    assert pts["how"].eq("interpolated").all()
    assert np.allclose(pts["acc"], [_l1_scat(x) + 1 for x in pts["lr"]])
    assert "scattered by the sampler" in res.summary.lines[1]


def test_recipe_dimension_is_a_group_key(store):
    from analysis import analyze, load_study

    res = analyze(load_study("recipe", store[0], histories=None), baseline="l1")
    assert res.prep.keys == ["method", "pr", "growth", "epochs"] and res.prep.recipe == ["epochs"]
    assert len(res.groups) == 4 and "l1 pr=0.5 epochs=6" in set(res.groups["group"])
    w = res.comparison[res.comparison["measure"] == "window_decades"]
    assert sorted(zip(w["group"], w["baseline_group"], strict=True)) == [
        ("tpp pr=0.5 growth=0.001 epochs=3", "l1 pr=0.5 epochs=3"),
        ("tpp pr=0.5 growth=0.001 epochs=6", "l1 pr=0.5 epochs=6")]
    assert any(line.startswith("Finetuning recipe varies (epochs)") for line in res.summary.lines)
    assert any(line.startswith("PR 0.5, epochs 6 — L1: ") for line in res.summary.lines)


def test_in_progress_and_empty_studies(store, tmp_path):
    from analysis import build_report, load_study

    d = load_study("live", store[0])
    p = d.progress
    assert (p.planned, p.total, p.finished, p.running, p.not_started) == (4, 3, 2, 1, 1)
    assert d.missing()[0] == "the study run is still RUNNING (results may change)"
    page = build_report("live", store[0], tmp_path / "live", baseline="tpp", log=False).read_text()
    assert "<b>Incomplete study:</b> the study run is still RUNNING" in page
    assert "No paired comparison with TPP: the study has no other method." in page
    empty = build_report("empty", store[0], tmp_path / "empty", log=False).read_text()
    assert "No finished member runs yet: nothing to measure." in empty
    assert "0 of 8 planned member runs finished" in empty


def test_a_member_run_twice_is_measured_once(tmp_path):
    from analysis import load_study, prepare

    uri, client = new_store(tmp_path)
    write_study(client, "rerun", [
        Member("l1", 0.5, 1e-3, 0, 70.0, status="interrupted", member_id="a"),
        Member("l1", 0.5, 1e-3, 0, 80.0, member_id="a"),  # resumed: finished in a second run
        Member("l1", 0.5, 1e-2, 0, 60.0, member_id="b"), Member("l1", 0.5, 1e-2, 0, 85.0, member_id="b"),
        Member("l1", 0.5, 1e-1, 0, 0.0, status="failed", member_id="c")], root=tmp_path)
    prep = prepare(load_study("rerun", uri, histories=None))
    assert prep.points["acc"].tolist() == [80.0, 85.0] and prep.points["n_members"].eq(1).all()
    assert prep.excluded == {"failed": 1}  # the interrupted run of member a finished later
    assert "1 member(s) have more than one finished run: the latest is measured" in prep.notes


def test_definitions_match_the_readme():
    from pathlib import Path

    from analysis.definitions import DEFINITIONS

    readme = (Path(__file__).parents[1] / "analysis" / "README.md").read_text()
    for name, text in DEFINITIONS:
        assert f"**{name}**: {text}" in readme, name


def test_every_method_of_a_report_gets_its_own_colour():
    from analysis.labels import COLORS, color

    methods = ["l1", "tpp", "l1-l2", "l1-fpgm", "l1-taylor", "l1-random", "l1-lamp", "tpp-fpgm", "tpp-random"]
    colours = [color(m) for m in methods]
    assert len(set(colours)) == len(methods) and colours[:2] == [COLORS["l1"], COLORS["tpp"]]
    assert [color(m) for m in methods] == colours  # stable once drawn


def test_recipe_figure_joins_only_groups_that_differ_in_its_dimension(tmp_path):
    """Two recipe dimensions vary (epochs x weight decay): a line of the epochs panel keeps the weight
    decay fixed, so no line visits an x twice, and each (method, weight decay) has its own line."""
    from analysis import analyze, load_study
    from analysis.figures import Tables, fig_recipe

    members = [Member(method, 0.5, lr, seed, 80.0 + epochs - 3 * (lr > 1e-2) + 1e3 * wd,
                      growth=1e-3 if method == "tpp" else None, epochs=epochs, weight_decay=wd)
               for epochs in (3, 6) for wd in (5e-4, 1e-4) for method in ("l1", "tpp") for seed in (0, 1)
               for lr in LRS]
    uri, client = new_store(tmp_path)
    write_study(client, "recipe2", members, root=tmp_path)
    data = load_study("recipe2", uri, histories=None)
    res = analyze(data, baseline="l1")
    assert res.prep.recipe == ["epochs", "weight_decay"]
    fig, _ = fig_recipe(Tables(data.name, res.prep, res.curves, res.groups, res.lr_points, res.profile,
                               res.comparison, res.tau, data.epochs, 0.5))
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 4  # (window, Acc. diff) x (epochs, weight decay)
    for ax in panels:
        lines = [c.lines[0] for c in ax.containers]  # each errorbar's data line (not its caps)
        assert len(lines) == 4, [c.get_label() for c in ax.containers]  # 2 methods x 2 levels of the other
        for ln in lines:
            x = list(ln.get_xdata())
            assert len(x) == len(set(x)) == 2, x
        labels = [c.get_label() for c in ax.containers]
        assert len(set(labels)) == 4, labels  # the other dimension's level is named in the legend
        assert all(("weight decay" in lab) != ("epochs" in lab) for lab in labels), labels


# ------------------------------------------------------------------------------------------- LR regret

def test_lr_regret_against_a_float64_loop_and_the_area_above_the_profile():
    """LR regret equals (1) the exact integral of the piecewise-linear gap to the best, written as a plain
    float64 loop, and (2) for a curve with one peak, the area above its robustness profile per decade of
    range (layer-cake: ∫ gap dx = ∫ (L - W(δ)) dδ), measured on a fine δ grid with analysis' own window."""
    from analysis.curves import lr_regret, robust_window

    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(4, 9))
        lrs = np.sort(10 ** rng.uniform(-4, -1, n))
        peak = int(rng.integers(0, n))
        # one peak: rising to it, falling after it
        accs = np.empty(n)
        accs[peak] = 90.0
        for i in range(peak - 1, -1, -1):
            accs[i] = accs[i + 1] - rng.uniform(0.5, 20)
        for i in range(peak + 1, n):
            accs[i] = accs[i - 1] - rng.uniform(0.5, 20)
        div = np.zeros(n, bool)
        x = np.log10(lrs)
        loop = 0.0
        for i in range(n - 1):
            loop += 0.5 * ((90.0 - accs[i]) + (90.0 - accs[i + 1])) * (x[i + 1] - x[i])
        got = lr_regret(lrs, accs, div)
        assert got == pytest.approx(loop / (x[-1] - x[0]), rel=1e-12)
        deltas = np.linspace(0, 90.0 - accs.min(), 4001)
        widths = np.array([robust_window(lrs, accs, div, float(d)).decades for d in deltas])
        width = x[-1] - x[0]
        area = np.trapezoid(width - widths, deltas)
        assert got == pytest.approx(area / width, rel=2e-3, abs=1e-3)


def test_lr_regret_leaves_out_diverged_points_and_pairs_over_shared_lrs():
    from analysis.compare import paired_regret
    from analysis.curves import lr_regret

    lrs = np.array([1e-4, 1e-3, 1e-2, 1e-1])
    accs = np.array([80.0, 90.0, 85.0, 10.0])
    div = np.array([False, False, False, True])
    # over 1e-4..1e-2 only: gaps 10, 0, 5 -> (5 + 2.5) / 2 decades
    assert lr_regret(lrs, accs, div) == pytest.approx((0.5 * 10 + 0.5 * 5) / 2)
    assert np.isnan(lr_regret(lrs[:1], accs[:1], div[:1]))
    pts = pd.DataFrame({"group": ["a"] * 4 + ["b"] * 4, "seed": 0, "lr": list(lrs) * 2,
                        "acc": [80.0, 90.0, 85.0, 70.0, 50.0, 60.0, 60.0, 10.0],
                        "diverged": [False, False, False, False, True, False, False, True]})
    a, b, n = paired_regret(pts, "a", "b", 0)  # shared non-diverged LRs: 1e-3 and 1e-2
    assert n == 2 and a == pytest.approx(2.5) and b == pytest.approx(0.0)


def test_a_study_of_one_method_gets_a_report_without_a_baseline(tmp_path):
    """The default baseline is L1 when the study has it, else its first method: a one-method study (the
    authors'-schedule MNIST cell) reports its measures and says there is nothing to compare."""
    from analysis import build_report

    members = [Member("tpp", 0.8, lr, seed, 80.0 + 5 * (lr == 1e-2) + seed, growth=1e-4)
               for lr in (1e-3, 1e-2) for seed in range(2)]
    uri, client = new_store(tmp_path)
    write_study(client, "solo", members, root=tmp_path)
    out = build_report("solo", uri, tmp_path / "rep", log=False).parent
    summary = (out / "summary.md").read_text()
    assert "No paired comparison with TPP: the study has no other method." in summary
    assert (out / "groups.csv").is_file() and "baseline tpp" in (out / "report.html").read_text()
