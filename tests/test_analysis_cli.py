"""tpp-analyze: finding a study from its folder (--storage), the default output folder, the flags, and
one-line errors with exit code 2 for bad input -- on a real MLflow store and study.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_analysis_store import Member, ladder, new_store, write_study


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A studies folder as tpp-study leaves it: studies/tiny/{study.json, mlflow.db}."""
    root = tmp_path_factory.mktemp("studies")
    folder = root / "tiny"
    folder.mkdir()
    uri, client = new_store(folder)
    members = [Member(m, 0.5, lr, s, 80.0 + (5 if m == "tpp" else 0) - abs(k - 1) * (1 if m == "tpp" else 4),
                      growth=1e-3 if m == "tpp" else None)
               for m in ("l1", "tpp") for s in (0, 1) for k, lr in enumerate(ladder(1e-3, 1e-1, 1))]
    pid = write_study(client, "tiny", members, root=folder)
    (folder / "study.json").write_text(json.dumps({"name": "tiny", "status": "completed", "tracking_uri": uri,
                                                   "parent_run_id": pid}))
    return root, uri, pid


def _main(*args: str) -> int:
    from analysis.cli import main

    return main(list(args))


def test_storage_finds_the_store_and_writes_into_the_study_folder(studies, capsys):
    from mlflow import MlflowClient

    root, uri, pid = studies
    assert _main("tiny", "--storage", str(root)) == 0
    out = capsys.readouterr().out
    report = root / "tiny" / "report" / "report.html"
    assert f"report: {report.resolve()}" in out and "loading study 'tiny' from " + uri in out
    page = report.read_text()
    assert "PR 0.5 (TPP growth 1e-3 vs L1): LR regret, the primary measure, is" in page
    logged = {a.path for a in MlflowClient(uri).list_artifacts(pid, "report")}
    assert {"report/report.html", "report/groups.csv", "report/figures"} <= logged


def test_a_moved_study_folder_still_finds_its_database(studies, tmp_path, capsys):
    root, _, _ = studies
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "tiny", moved / "tiny", ignore=shutil.ignore_patterns("report"))
    meta = json.loads((moved / "tiny" / "study.json").read_text())
    meta["tracking_uri"] = "sqlite:///studies/tiny/mlflow.db"  # relative, as a config with ./studies writes
    (moved / "tiny" / "study.json").write_text(json.dumps(meta))
    assert _main("tiny", "--storage", str(moved), "--no-log", "--quiet") == 0
    assert capsys.readouterr().out.strip() == str((moved / "tiny" / "report" / "report.html").resolve())


def test_tracking_uri_and_compare_still_work(studies, tmp_path, capsys):
    _, uri, _ = studies
    out = tmp_path / "rep"
    assert _main("tiny", "--tracking-uri", uri, "--out", str(out), "--compare", "l1,tpp", "--no-log",
                 "--metric", "best_acc", "--delta", "2", "--lrs", "1e-3,1e-1", "--sensitivity", "window") == 0
    summary = (out / "summary.md").read_text()
    assert ("Paired comparison with TPP (same LR ladder and seeds; accuracy: best_acc; primary sensitivity "
            "measure: robust window at δ = 2 points, chosen before the analysis with --sensitivity"
            in summary)
    assert "PR 0.5 (L1 vs TPP growth 1e-3): robust window at δ = 2 points, the primary measure, is" in summary
    assert "Paper's Acc. diff = acc(1e-3) − acc(1e-1) of best_acc" in summary
    capsys.readouterr()


@pytest.mark.parametrize("args, start", [
    (("--lrs", "1e-3"), "--lrs: expected two positive learning rates"),
    (("--lrs", "1e-3,1e-3"), "--lrs: expected two different learning rates"),
    (("--delta", "-1"), "--delta: expected a positive number of accuracy points"),
    (("--sensitivity", "auc"), "--sensitivity: got 'auc'; accepted: regret, window, range"),
    (("--group-by", "nosuch"), "--group-by: 'nosuch' is not a parameter of this study's runs; accepted: "),
    (("--metric", "top5"), "--metric: got 'top5'; accepted: auto, test_acc_at_best_val, best_acc, last_acc"),
    (("--compare", "tpp"), "--compare: expected TREATMENT,BASELINE"),
    (("--methods", "tpp,,l1"), "--methods: expected method names separated by commas"),
    (("--baseline", "greg"),
     "--baseline: 'greg' is not a method of this study with finished runs (its methods: l1, tpp)"),
    (("--methods", "scratch"), "--methods: 'scratch' is not a method of this study"),
])
def test_bad_input_is_one_line_and_exit_2(studies, args, start, capsys):
    root, _, _ = studies
    assert _main("tiny", "--storage", str(root), "--no-log", "--out", str(root / "x"), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tpp-analyze: error: {start}") and len(err.strip().splitlines()) == 1, err


def test_where_is_the_study_errors(studies, tmp_path, capsys, monkeypatch):
    root, _, _ = studies
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _main("nope", "--storage", str(root)) == 2
    assert capsys.readouterr().err.strip() == (f"tpp-analyze: error: --storage: no study.json at {root}/nope/"
                                               f"study.json (studies under {root}: tiny)")
    assert _main("tiny") == 2
    assert capsys.readouterr().err.startswith(
        "tpp-analyze: error: --tracking-uri: none given (pass --storage DIR or --tracking-uri URI, or set "
        "MLFLOW_TRACKING_URI)")
    assert _main("tiny", "--tracking-uri", f"sqlite:///{tmp_path}/absent.db") == 2
    assert "--tracking-uri: no MLflow database" in capsys.readouterr().err
    assert _main("nope", "--tracking-uri", studies[1]) == 2
    assert "available studies: tiny" in capsys.readouterr().err


def test_the_installed_command(studies, tmp_path):
    script = Path(sys.executable).parent / "tpp-analyze"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "analysis.cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert helped.returncode == 0
    for flag in ("--storage", "--baseline", "--methods", "--compare", "--metric", "--delta", "--lrs",
                 "--group-by"):
        assert flag in helped.stdout, flag
    bad = subprocess.run([*cmd, "tiny", "--storage", str(studies[0]), "--delta", "x"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr == ("tpp-analyze: error: --delta: expected a positive number of accuracy points, "
                          "got 'x'\n")


def test_an_interrupted_report_leaves_the_previous_one_whole(studies, tmp_path, monkeypatch, capsys):
    """#27: the report is built in a temporary folder and moved into place whole; a run that stops midway
    (here: the figures raise) leaves the earlier report untouched and no half-written folder; a --out that
    holds other files is refused (it would be replaced)."""
    import analysis.report as report

    _, uri, _ = studies
    out = tmp_path / "rep"
    assert _main("tiny", "--tracking-uri", uri, "--out", str(out), "--no-log", "--quiet") == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "make_figures", boom)
    with pytest.raises(KeyboardInterrupt):
        _main("tiny", "--tracking-uri", uri, "--out", str(out), "--no-log", "--quiet", "--delta", "3")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folder left
    monkeypatch.undo()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert _main("tiny", "--tracking-uri", uri, "--out", str(other), "--no-log") == 2
    assert "--out: " in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep me"
