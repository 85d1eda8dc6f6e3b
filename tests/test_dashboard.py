"""The MLflow dashboard of a study: the logged data that makes MLflow 3.17's UI open on the study's runs
with useful columns and charts, and -- where Debian's Chromium is installed -- the printed URL opened in
a real headless browser.

What MLflow 3.17's UI reads (its JS bundle; see the notes above `EXPERIMENT_TAGS` in
study/dashboard.py): the URL parameter `workflowType=machine_learning` (else the browser's
localStorage, default GenAI) decides the training-runs layout; a saved view is an experiment tag
`mlflow.sharedViewState.<key>` opened by `viewStateShareKey=<key>`; the parallel-coordinates chart drops
a run that lacks a selected param, and a numeric column drops the runs whose value is not a number.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_study_run import child_runs, client, free_port, local_ray, tiny  # noqa: F401 (local_ray: fixture)

import study
from study.dashboard import (
    EXPERIMENT_TAGS,
    NOTE_TAG,
    VIEW_TAG_PREFIX,
    _dashboard,
    runs_page_url,
    runs_route,
    study_note,
    view_key,
)
from study.loading import load_config
from study.record import data_digest
from study.schema import DENSE_MODEL_TAG
from study.store import StudyFolder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NUMERIC = ("pr", "lr", "log10_lr", "seed", "has_penalty")
MEASURED = ("test_acc", "val_acc", "train_loss", "jsv_mean", "reg")


def _number(v) -> bool:
    """JavaScript's `!isNaN(Number(v))` for MLflow's param strings and metric numbers."""
    if isinstance(v, (int, float)):
        return not math.isnan(v)
    try:
        return not math.isnan(float(v)) and v.strip().lower() not in ("inf", "-inf", "infinity")
    except (TypeError, ValueError):
        return False


def parallel_rows(runs: list, params: list[str], metrics: list[str]) -> list[str]:
    """The runs MLflow 3.17's parallel-coordinates chart draws (a port of its filter, module 57990 of
    the UI bundle): runs lacking a selected value go; a column where at least half the runs are numbers
    keeps only those; otherwise the runs of the first 30 distinct strings."""
    rows = [{"id": r.info.run_id, **{p: r.data.params.get(p) for p in params},
             **{m: r.data.metrics.get(m) for m in metrics}} for r in runs]
    rows = [r for r in rows if all(r[k] is not None for k in params + metrics)]
    for key in params + metrics:
        numeric = [r for r in rows if _number(r[key])]
        if len(numeric) >= len(rows) / 2:
            rows = numeric
            continue
        seen: set[str] = set()
        kept = []
        for r in rows:
            if len(seen) == 30 and str(r[key]) in seen:
                kept.append(r)
            elif len(seen) < 30 and not _number(r[key]):
                seen.add(str(r[key]))
                kept.append(r)
        rows = kept
    return [r["id"] for r in rows]


@pytest.fixture(scope="module")
def dash(local_ray, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    storage = tmp_path_factory.mktemp("dash")
    cfg = tiny("dash", description="Dashboard study: *L1* vs TPP, two LRs.", finetune__lr=[1e-2, 3e-2])
    res = study.run(cfg, storage=str(storage))
    assert res.status == "completed"
    return res


def _view(exp, name: str) -> dict:
    envelope = json.loads(exp.tags[VIEW_TAG_PREFIX + view_key(name)])
    assert set(envelope) == {"name", "createdAt", "updatedAt", "state"}  # MLflow's saved-view envelope
    assert envelope["name"] == f"tpp study {name}" and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])


def test_logged_data_makes_the_dashboard_work(dash):
    c = client(dash.tracking_uri)
    exp = c.get_experiment(dash.experiment_id)
    folder = StudyFolder(dash.path)
    cfg = load_config(folder.config_path)
    runs = child_runs(dash)
    assert len(runs) == dash.num_runs == 8

    # the printed URL: the runs page, training workflow, on the study's saved view
    url = f"http://127.0.0.1:5000/#/experiments/{dash.experiment_id}/runs?workflowType=machine_learning" \
          f"&viewStateShareKey=tpp-dash"
    assert url == runs_page_url("http://127.0.0.1:5000", dash.experiment_id, "dash")
    assert f"then open {url}" in dash.summary()
    assert "MLFLOW_DISABLE_TELEMETRY=true" in dash.mlflow_ui_command  # the UI's server phones no one

    # experiment: its kind (read by MLflow releases before 3.17), the saved view, a note linking to it
    for k, v in EXPERIMENT_TAGS.items():
        assert exp.tags[k] == v
    assert f"[dash]({runs_route(dash.experiment_id, 'dash')})" in exp.tags[NOTE_TAG]
    assert len(exp.tags[VIEW_TAG_PREFIX + view_key("dash")]) < 20000  # MLflow's tag limit
    view = _view(exp, "dash")
    assert view["searchFilter"] == "tags.`tpp.study` = 'dash' and tags.`tpp.role` = 'trial'"
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`best_acc`", False)  # best first
    assert view["runsHiddenMode"] == "SHOW_ALL"
    columns = view["selectedColumns"]
    assert columns[:6] == ["params.`method_label`", "params.`pr`", "params.`growth`", "params.`log10_lr`",
                           "params.`lr`", "params.`seed`"]
    assert {"metrics.`best_acc`", "tags.`tpp.status`", "attributes.`Dataset`"} <= set(columns)
    assert set(view["columnWidths"]) <= set(view["columnOrder"])  # MLflow sizes only ordered columns
    for col in columns:  # every column shows something: the params and metrics exist on the runs
        kind, key = re.fullmatch(r"(\w+)\.`(.+)`", col).groups()
        if kind == "params" and key != "growth":
            assert all(key in r.data.params for r in runs), col
        elif kind == "metrics" and key in ("best_acc", "acc_after_removal", "last_acc"):
            assert all(key in r.data.metrics for r in runs), col
    parallel, scatter = view["compareRunCharts"]
    assert parallel["type"] == "PARALLEL" and scatter["type"] == "SCATTER"
    assert {ch["metricSectionId"] for ch in view["compareRunCharts"]} == {s["uuid"] for s in
                                                                          view["compareRunSections"]}
    # every trial is plottable: MLflow's own filter keeps all of them (growth would drop the L1 runs)
    ids = {r.info.run_id for r in runs}
    assert set(parallel_rows(runs, parallel["selectedParams"], parallel["selectedMetrics"])) == ids
    with_penalty = {r.info.run_id for r in runs if r.data.params["has_penalty"] == "1"}
    assert set(parallel_rows(runs, ["growth", "log10_lr"], ["best_acc"])) == with_penalty != ids
    assert scatter["xaxis"] == {"key": "log10_lr", "type": "PARAM"}
    assert all(_number(r.data.params["log10_lr"]) and "best_acc" in r.data.metrics for r in runs)

    # members: searched values as numbers, growth only with a penalty, names led by the LR
    for r in runs:
        p = r.data.params
        assert not [k for k, v in p.items() if v.strip().lower() in ("none", "nan", "null", "")], p
        assert all(_number(p[k]) for k in NUMERIC), p
        # what every member shares is not repeated as params: it is in the one `run_config` param
        assert "epochs" not in p and json.loads(p["run_config"])["epochs"] == cfg.finetune.epochs
        assert p["has_penalty"] in ("0", "1") and ("growth" in p) == (p["has_penalty"] == "1")
        assert "growth" not in p or _number(p["growth"])
        assert float(p["log10_lr"]) == pytest.approx(math.log10(float(p["lr"])), abs=1e-4)
        assert r.info.run_name.startswith("lr=")
        assert r.data.tags["tpp.dense_digest"] == folder.read_meta().dense_digest

    # parent: the config's description and the best trial
    parent = c.get_run(dash.parent_run_id)
    best = parent.data.tags["tpp.best_run_id"]
    assert best in ids
    note = parent.data.tags[NOTE_TAG]
    assert note.startswith("Dashboard study: *L1* vs TPP, two LRs.")
    if "**Best run:**" in note:  # the driver writes `study_note` once the best run is known
        assert f"](#/experiments/{dash.experiment_id}/runs/{best}?workflowType=machine_learning)" in note
    # the end of a study prints the study run's page, in the training layout
    assert (f"Study run: http://127.0.0.1:5000/#/experiments/{dash.experiment_id}/runs/{dash.parent_run_id}"
            "?workflowType=machine_learning") in dash.summary()

    # the data set as an MLflow dataset input of the parent and of every member
    from tpp.checkpoint import load_dense

    dense = load_dense(folder.dense_path)
    for r in [parent, *runs]:
        (inp,) = c.get_run(r.info.run_id).inputs.dataset_inputs
        ds = inp.dataset
        assert (ds.name, ds.digest, ds.source_type) == ("synthetic", data_digest(cfg), "code")
        assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "train"}
        features = json.loads(json.loads(ds.schema)["mlflow_tensorspec"]["features"])
        assert features[0]["tensor-spec"]["shape"] == [-1, *dense.spec.input_shape]
        assert json.loads(ds.profile)["num_classes"] == dense.spec.num_classes

    # the dense model as an MLflow logged model made by the parent run, an input of every member
    model_id = parent.data.tags[DENSE_MODEL_TAG]
    model = c.get_logged_model(model_id)
    assert model.source_run_id == dash.parent_run_id and model.name == "dense-mlp"
    assert model.tags["tpp.dense_digest"] == folder.read_meta().dense_digest
    assert model.tags["tpp.dense_acc"] == f"{dense.metrics['dense_acc']:.4g}"  # rounded where shown as text
    assert model.params["model"] == "mlp" and str(model.status) == "READY"
    assert [o.model_id for o in parent.outputs.model_outputs] == [model_id]
    for r in runs:
        assert [m.model_id for m in c.get_run(r.info.run_id).inputs.model_inputs] == [model_id]

    # constant per-stage values (the prune stage's fixed LR) are params, not flat curves: a curve may be
    # flat only where it is a measurement (a diverged or stuck member's accuracy)
    assert all("reg_lr" in json.loads(r.data.params["run_config"]) for r in runs)
    for r in runs:
        for key in (k for k in r.data.metrics if "/" in k):
            values = {m.value for m in c.get_metric_history(r.info.run_id, key)}
            assert len(values) > 1 or key.endswith(MEASURED), (r.info.run_name, key)


def test_dashboard_tags_are_idempotent_and_keep_a_users_note(tmp_path):
    """Starting a second study in the experiment adds its view and link; a note the user wrote stays."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = c.create_experiment("shared")
    for name in ("a", "b.c"):
        folder = StudyFolder(tmp_path / name)
        folder.path.mkdir()
        cfg = load_config(tiny(name), storage=str(tmp_path))
        folder.config_path.write_text(cfg.to_yaml())
        _dashboard(c, exp_id, folder.path)
        _dashboard(c, exp_id, folder.path)
    tags = c.get_experiment(exp_id).tags
    assert sorted(k for k in tags if k.startswith(VIEW_TAG_PREFIX)) == [
        VIEW_TAG_PREFIX + k for k in ("tpp-a", "tpp-a--groups", "tpp-b-c", "tpp-b-c--groups")]
    assert "[a](#/experiments/" in tags[NOTE_TAG] and "viewStateShareKey=tpp-b-c)" in tags[NOTE_TAG]
    assert tags[NOTE_TAG].count("([every group](") == 2  # the group views are linked, not taken for studies
    c.set_experiment_tag(exp_id, NOTE_TAG, "my notes")
    _dashboard(c, exp_id, tmp_path / "a")
    assert c.get_experiment(exp_id).tags[NOTE_TAG] == "my notes"


def test_study_note_links_the_best_run_and_the_view():
    note = study_note("L1 vs TPP.", "7", "s", {"run_id": "abc", "run_name": "lr=1e-2 tpp pr=0.5 s0",
                                                "metric": "best_acc", "value": 93.05555555})
    assert note == ("L1 vs TPP.\n\n**Best run:** [lr=1e-2 tpp pr=0.5 s0]"
                    "(#/experiments/7/runs/abc?workflowType=machine_learning) -- "
                    "best_acc 93.06\n\n[All runs of this study, best first]"
                    "(#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=tpp-s) · "
                    "[Every group's LR curve and measures]"
                    "(#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=tpp-s--groups) "
                    "(one summary run per group, written by `tpp-analyze`)")


# ---------------------------------------------------------------------------------------------- browser
def _dom(url: str, out: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot, from headless Chromium that may resolve
    no host but 127.0.0.1."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--window-size=2000,1100",
             "--virtual-time-budget=30000"]
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*flags, f"--user-data-dir={profile}", f"--screenshot={out}", url],
                       capture_output=True, timeout=120, check=False)
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([*flags, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True,
                              text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium) for the "
                                              "headless-browser check of the MLflow UI")
def test_printed_url_opens_the_runs_table_in_a_real_browser(dash, tmp_path):
    port = free_port()
    db = dash.tracking_uri.removeprefix("sqlite:///")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        printed = re.search(r"then open (\S+)", dash.summary()).group(1)
        url = printed.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        dom = _dom(url, tmp_path / "runs.png")
        names = [r.info.run_name for r in child_runs(dash)]
        assert all(f">{n}<" in dom for n in names), "the runs table does not list the study's runs"
        assert "tpp study dash" in dom  # the saved view is the one open
        for col in ("params.`method_label`", "params.`log10_lr`", "metrics.`best_acc`"):
            assert f'col-id="{col}"' in dom, col  # columns from the view, not MLflow's defaults
        # the training workflow, not the GenAI overview a fresh browser gets without the URL parameter
        assert "Model training" in dom and "Token Usage" not in dom
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_each_member_run_carries_the_tpp_run_command_that_reruns_it(dash, tmp_path):
    import shlex

    runs = [r for r in child_runs(dash) if r.data.params["method"] == "tpp"]
    run = runs[0]
    command = run.data.tags["tpp.rerun"]
    assert f"```\n{command}\n```" in run.data.tags[NOTE_TAG]  # also on the run page, as its description
    argv = shlex.split(command)
    assert argv[:2] == ["tpp", "run"] and argv[argv.index("--dense") + 1].endswith("dash/dense.pt")
    proc = subprocess.run([str(Path(sys.executable).with_name("tpp")), *argv[1:], "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = json.loads(proc.stdout.strip().splitlines()[-1])
    # the member alone: its config and (up to the float drift of lockstep vs one by one) its results
    assert alone["config"]["lr"] == float(run.data.params["lr"]) and alone["config"]["seed"] == 0
    for key in ("acc_after_removal", "best_acc"):
        assert alone[key] == pytest.approx(run.data.metrics[key], abs=1.0), key


def test_the_group_view_charts_every_group_from_its_summary_runs(dash, tmp_path):
    """tpp-analyze writes one summary run per group under the study run (the few runs MLflow's charts
    can show at once), the group view selects exactly them, their values are the report's tables, and a
    second report with nothing changed rewrites nothing; the member runs and the study's counts are
    untouched."""
    import numpy as np
    import pandas as pd

    from analysis.cli import main as analyze
    from analysis.group_runs import RUN_COLOR_TAG
    from analysis.load import load_study
    from study.dashboard import group_view, group_view_key
    from study.schema import GROUP_CURVE, GROUP_MEASURES, GROUP_X

    storage = str(Path(dash.path).parent)
    out = tmp_path / "report"
    assert analyze(["dash", "--storage", storage, "--out", str(out), "--quiet"]) == 0
    c = client(dash.tracking_uri)
    exp = c.get_experiment(dash.experiment_id)
    state = json.loads(json.loads(exp.tags[VIEW_TAG_PREFIX + group_view_key("dash")])["state"])
    assert state == group_view(load_config(StudyFolder(dash.path).config_path))
    groups = c.search_runs([dash.experiment_id], state["searchFilter"])
    table = pd.read_csv(out / "groups.csv")
    lr_points = pd.read_csv(out / "lr_points.csv")
    assert sorted(r.info.run_name for r in groups) == sorted(table["group"]) and len(groups) == 4
    for r in groups:
        g = table[table["group"] == r.info.run_name].iloc[0]
        assert r.data.tags["mlflow.parentRunId"] == dash.parent_run_id and r.info.status == "FINISHED"
        assert r.data.params["method_label"] == g["method"] and float(r.data.params["pr"]) == g["pr"]
        assert ("growth" in r.data.params) == (g["method"] == "tpp")
        for m in GROUP_MEASURES:
            if np.isfinite(g[m]):
                assert r.data.metrics[m] == pytest.approx(g[m]), m
        curve = {h.step: h.value for h in c.get_metric_history(r.info.run_id, GROUP_CURVE)}
        x = {h.step: h.value for h in c.get_metric_history(r.info.run_id, GROUP_X)}
        pts = lr_points[(lr_points["group"] == g["group"]) & lr_points["acc"].notna()].sort_values("lr")
        assert sorted(curve) == sorted(x) and len(curve) == len(pts)
        assert [x[s] for s in sorted(x)] == pytest.approx(np.log10(pts["lr"]).tolist())
        assert [curve[s] for s in sorted(curve)] == pytest.approx(pts["acc"].tolist())
    colours = {r.data.params["method_label"]: r.data.tags[RUN_COLOR_TAG] for r in groups}
    assert len(set(colours.values())) == 2 and all(re.fullmatch("#[0-9a-f]{6}", v) for v in colours.values())
    # every group is drawn: the parallel chart's filter keeps them all, the line chart's keys exist
    parallel = next(ch for ch in state["compareRunCharts"] if ch["type"] == "PARALLEL")
    assert len(parallel_rows(groups, parallel["selectedParams"][:2], parallel["selectedMetrics"])) == 4
    line = next(ch for ch in state["compareRunCharts"] if ch["type"] == "LINE")
    assert (line["metricKey"], line["selectedXAxisMetricKey"]) == (GROUP_CURVE, GROUP_X)
    # the printed links, the study's counts and the members the report reads are unchanged
    assert runs_page_url("http://127.0.0.1:5000", dash.experiment_id, "dash", groups=True) in dash.summary()
    assert len(load_study("dash", dash.tracking_uri, histories=None).trials) == dash.num_runs
    assert study.collect(StudyFolder(dash.path)).counts == dash.counts
    # again, nothing changed: every group run is kept (no duplicate, no rewrite)
    assert analyze(["dash", "--storage", storage, "--out", str(out)]) == 0
    again = c.search_runs([dash.experiment_id], state["searchFilter"])
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in groups)
