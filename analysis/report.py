"""The report: one self-contained HTML page (figures as base64 PNG, the verdict, the summary, tables, the
study config) plus the CSV tables every stated number comes from, logged to the study's parent run under
``report/``.

Files written next to ``report.html``: members.csv (every member run), points.csv (one row per group,
seed and LR: what every measure reads), curves.csv (one row per curve), groups.csv (per group, over
seeds), lr_points.csv (per group and LR), profile.csv (the robustness profile per group), comparison.csv
(paired differences), trainability.csv (Kendall τ), paper_table.csv/.md, summary.md, figures/*.png.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis.compare import comparison_table
from analysis.curves import curve_table
from analysis.definitions import DEFINITIONS
from analysis.figures import Tables, make_figures
from analysis.fmt import fmt_lr
from analysis.load import StudyData, client_for, load_study
from analysis.measures import group_table, lr_points, profile_table
from analysis.points import Prepared, prepare
from analysis.summary import Summary, summarize
from analysis.tables import (
    comparison_text,
    groups_text,
    lr_comparison_text,
    lr_points_text,
    markdown_table,
    paper_table,
    tau_text,
)
from analysis.trainability import trainability_table

ARTIFACT_DIR = "report"
HISTORIES = ["finetune/test_acc", "finetune/val_acc"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table.tbl{border-collapse:collapse;font-size:.82em;margin:.5em 0}
table.tbl td,table.tbl th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
table.tbl th{background:#f3f3f3}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
.meta{color:#666;font-size:.9em}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.verdict{background:#f4f8ff;border:1px solid #bcd;padding:.6em 1.2em;border-radius:4px}
.verdict li,.summary li{margin:.35em 0}.warn{color:#8a4b00}
"""


@dataclass
class Results:
    """Every table of one analysis, computed once and shared by the text, the figures and the CSVs."""

    prep: Prepared
    curves: pd.DataFrame
    groups: pd.DataFrame
    lr_points: pd.DataFrame
    profile: pd.DataFrame
    comparison: pd.DataFrame
    tau: pd.DataFrame
    paper_curves: pd.DataFrame
    paper_groups: pd.DataFrame
    summary: Summary


def default_baseline(prep: Prepared) -> str:
    """L1 when the study has it (the paper's baseline), else its first method in report order."""
    have = list(dict.fromkeys(prep.groups()["method"])) if not prep.points.empty else []
    return "l1" if "l1" in have or not have else have[0]


def check_methods(prep: Prepared, baseline: str, methods: Sequence[str] | None) -> None:
    """One-line errors for a baseline or method the study does not hold."""
    have = sorted(prep.points["method"].unique())
    listing = ", ".join(have) or "none finished"
    if baseline not in have:
        raise ValueError(f"baseline: {baseline!r} is not a method of this study with finished runs (its "
                         f"methods: {listing})")
    for m in methods or ():
        if m not in have:
            raise ValueError(f"methods: {m!r} is not a method of this study with finished runs (its methods: "
                             f"{listing})")


def analyze(data: StudyData, *, lrs: tuple[float, float] = (1e-3, 1e-2), metric: str = "auto",
            baseline: str | None = None, methods: Sequence[str] | None = None, delta: float = 1.0,
            group_by: Sequence[str] = (), sensitivity: str = "regret") -> Results:
    """All tables of the report for a loaded study (no files written). `sensitivity`: the primary
    sensitivity measure of the verdict (regret | window | range)."""
    prep = prepare(data, metric, group_by=group_by)
    baseline = baseline or default_baseline(prep)
    if prep.points.empty:
        empty = pd.DataFrame()
        return Results(prep, empty, empty, empty, empty, empty, empty, empty, empty,
                       summarize(prep, data.progress, empty, empty, empty, empty, baseline=baseline, lrs=lrs,
                                 delta=delta))
    check_methods(prep, baseline, methods)
    curves = curve_table(prep, lrs=lrs, delta=delta)
    groups = group_table(prep, curves, lrs=lrs, delta=delta)
    cmp = comparison_table(prep, curves, baseline=baseline, methods=methods, sensitivity=sensitivity)
    tau = trainability_table(curves)
    if prep.metric == "best_acc":
        paper_curves, paper_groups = curves, groups
    else:
        paper_prep = prepare(data, "best_acc", group_by=group_by)
        paper_curves = curve_table(paper_prep, lrs=lrs, delta=delta)
        paper_groups = group_table(paper_prep, paper_curves, lrs=lrs, delta=delta)
    summary = summarize(prep, data.progress, groups, curves, cmp, tau, baseline=baseline, lrs=lrs,
                        delta=delta)
    return Results(prep, curves, groups, lr_points(prep), profile_table(prep), cmp, tau, paper_curves,
                   paper_groups, summary)


def build_report(study: str | StudyData, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                 *, lrs: tuple[float, float] = (1e-3, 1e-2), metric: str = "auto",
                 baseline: str | None = None,
                 methods: Sequence[str] | None = None, delta: float = 1.0, group_by: Sequence[str] = (),
                 sensitivity: str = "regret", log: bool = True,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build the report of `study` (a name, parent run id or a loaded StudyData) into `out_dir`
    (default ``reports/<study>``); log it to the parent run under ``report/`` unless `log` is False.
    Returns the path of ``report.html``."""
    say = progress or (lambda _msg: None)
    if isinstance(study, StudyData):
        data = study
    else:
        say(f"loading study {study!r} from {tracking_uri or 'MLFLOW_TRACKING_URI'}")
        data = load_study(study, tracking_uri, histories=HISTORIES)
    p = data.progress
    say(f"  {p.total} member runs: {p.completed} completed, {p.diverged} diverged, {p.failed} failed, "
        f"{p.interrupted} interrupted, {p.running} running"
        + (f" (planned {p.planned})" if p.planned else ""))
    for line in data.missing():
        say(f"  missing: {line}")
    say("computing measures")
    res = analyze(data, lrs=lrs, metric=metric, baseline=baseline, methods=methods, delta=delta,
                  group_by=group_by, sensitivity=sensitivity)
    baseline = baseline or default_baseline(res.prep)
    final = Path(out_dir) if out_dir is not None else Path("reports") / data.name
    _check_out(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # written whole into a temporary folder next to it, then moved into place: an interrupted run leaves
    # the previous report as it was, never a mix of two runs' files
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _build(out, data, res, lrs=lrs, baseline=baseline, delta=delta, say=say)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    _move_into_place(out, final)
    path = final / "report.html"
    say(f"report: {path.resolve()}")
    if log:
        _log(data, final, say, res)
    return path


def _check_out(final: Path) -> None:
    """The output folder is replaced whole: refuse one that holds anything but an earlier report."""
    ours = (final / "summary.md").is_file() or (final / "report.html").is_file()
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not ours)):
        raise ValueError(f"out: {final} exists and is not a tpp-analyze report folder (it is replaced "
                         "whole); accepted: a new folder, or one a previous report was written to")


def _move_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _build(out: Path, data: StudyData, res: Results, *, lrs, baseline, delta, say) -> None:
    """Every file of the report into `out`."""
    notes = list(dict.fromkeys([*data.notes, *res.prep.notes, *_overfit_note(res.curves)]))
    if not res.curves.empty:
        say(f"  {len(res.groups)} groups, {len(res.curves)} curves; LR: {res.prep.lr_axis.describe()}; "
            f"accuracy: {res.prep.metric}")
    sections = _write_tables(out, data, res)
    say("drawing figures")
    figs = make_figures(Tables(data.name, res.prep, res.curves, res.groups, res.lr_points, res.profile,
                               res.comparison, res.tau, data.epochs, delta), out / "figures")
    notes += figs.notes
    say(f"  {len(figs.paths)} figure(s) written" + (f", {len(figs.notes)} skipped" if figs.notes else ""))
    (out / "summary.md").write_text("## Verdict\n\n" + "".join(f"- {x}\n" for x in res.summary.verdict)
                                    + "\n## Summary\n\n" + "".join(f"- {x}\n" for x in res.summary.lines))
    page = _html(data, res, figs, sections, notes, lrs=lrs, baseline=baseline, delta=delta)
    (out / "report.html").write_text(page, encoding="utf-8")


def _overfit_note(curves: pd.DataFrame) -> list[str]:
    """A warning when prune stages fit their training set (the overfit regime of issue #25)."""
    if curves.empty or "prune_train_acc" not in curves or not curves["prune_train_acc"].notna().any():
        return []
    n = int((curves["prune_train_acc"] >= 99.5).sum())
    if not n:
        return []
    of = int(curves["prune_train_acc"].notna().sum())
    return [f"{n} of {of} pruned models' prune stages ended at ≥ 99.5% training accuracy: the stage fits its "
            "training set, and from there cross-entropy only scales the network (and its Jacobian) up, "
            "pruned or not. Read their JSV after removal against the unpruned "
            "control (jsv_retained), or size the stage in passes over the data (reg_growth_epochs)."]


def _log(data: StudyData, out: Path, say, res: Results) -> None:
    """The report onto the study run, and one summary run per group under it (the dashboard's group view)."""
    from analysis.group_runs import group_contents, log_group_runs

    try:
        client, _ = client_for(data.tracking_uri)
        client.log_artifacts(data.parent_run_id, str(out), artifact_path=ARTIFACT_DIR)
        contents = group_contents(res.groups, res.lr_points, res.prep.keys) if len(res.groups) else {}
        written, kept = log_group_runs(client, data.experiment_id, data.parent_run_id, data.name, contents)
    except Exception as exc:  # noqa: BLE001 - the report on disk is still good; say why it is not logged
        msg = f"could not log the report to study run {data.parent_run_id}: {type(exc).__name__}: {exc}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        say(f"warning: {msg}")
    else:
        say(f"logged to run {data.parent_run_id} under {ARTIFACT_DIR}/ (see the study run in the MLflow UI), "
            f"with {len(contents)} group summary runs ({written} written, {kept} unchanged) for its group "
            "view")


def _write_tables(out: Path, data: StudyData, res: Results) -> dict[str, str]:
    """Write the CSVs (full precision) and return the HTML of the readable tables by section title."""
    data.trials.to_csv(out / "members.csv", index=False)
    if res.curves.empty:
        return {}
    keys = res.prep.keys
    for name, frame in (("points", res.prep.points), ("curves", res.curves), ("groups", res.groups),
                        ("lr_points", res.lr_points), ("profile", res.profile),
                        ("comparison", res.comparison), ("trainability", res.tau)):
        frame.to_csv(out / f"{name}.csv", index=False)
    metric = res.prep.metric
    acc = f"Accuracy: <code>{html.escape(metric)}</code> = {html.escape(res.prep.metric_text)}."
    paper = paper_table(res.paper_curves, res.paper_groups, keys)
    paper.to_csv(out / "paper_table.csv")
    (out / "paper_table.md").write_text(paper.to_markdown())
    a, b = fmt_lr(paper.lrs[0]), fmt_lr(paper.lrs[1])
    sections = {
        "Per group: stable range, robust window, best accuracy (groups.csv)":
            _table(out, "groups", groups_text(res.groups, keys))
            + f"<p class='meta'>{acc} Each cell: the mean over seeds [interval]; intervals: 95% bootstrap CI "
              "with ≥ 5 seeds, else the min–max over seeds. LRs are LRs that ran.</p>",
        "Paired comparisons (comparison.csv)":
            _table(out, "comparison_text", comparison_text(res.comparison, keys))
            + f"<p class='meta'>{acc} method − baseline per shared seed; p: exact sign-flip test; outcome "
              "higher/lower only when p < 0.05 and the interval excludes 0. The row marked primary is the "
              "measure the verdict rests on (--sensitivity); the others are descriptive. LR regret pairs "
              "both curves of a seed over the same LRs (where neither diverged); ≥ marks windows that reach "
              "an end of the ladder (lower bounds).</p>",
        "Paired accuracy difference at each LR (comparison.csv, measure acc_at_lr)":
            _table(out, "lr_comparison_text", lr_comparison_text(res.comparison, keys))
            + f"<p class='meta'>{acc} method − baseline at the same LR and seed, mean over seeds (p: "
              "sign-flip test); † where a member diverged there (its accuracy is what it reached).</p>",
        "Accuracy at each LR (lr_points.csv)":
            _table(out, "lr_points_text", lr_points_text(res.lr_points, keys))
            + f"<p class='meta'>{acc} Seed mean at each LR that ran; † where a seed diverged there.</p>",
        "Trainability before finetuning vs outcome (trainability.csv)":
            _table(out, "trainability_text", tau_text(res.tau))
            + f"<p class='meta'>{acc} Kendall τ-b across curves (one pruned model each), 95% bootstrap CI "
              "over curves; p from scipy.stats.kendalltau.</p>",
        "The paper's table (paper_table.csv)":
            paper.text().to_html(index=False, classes="tbl", border=0)
            + "<p class='meta'>Accuracy: <code>best_acc</code>, the maximum test accuracy over finetuning "
              "epochs (the paper's convention, selected on the test set). Cells: mean ± std over seeds. Δ "
              f"rows: the paper's Acc. diff = acc({a}) − acc({b}) per seed, then mean ± std.</p>",
    }
    return sections


def _table(out: Path, name: str, text: pd.DataFrame) -> str:
    if text.empty:
        return "<p>Nothing to show.</p>"
    (out / f"{name.removesuffix('_text')}.md").write_text(markdown_table(text) + "\n")
    return text.to_html(index=False, classes="tbl", border=0, na_rep="–")


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _config_html(data: StudyData) -> str:
    if data.config_text:
        return ("<p class='meta'>From the study run's <code>study_config.yaml</code> artifact.</p>"
                f"<pre>{html.escape(data.config_text)}</pre>")
    if data.parent_params:
        rows = pd.DataFrame(sorted(data.parent_params.items()), columns=["parameter", "value"])
        return ("<p class='meta'>No study_config.yaml artifact; the study run's parameters:</p>"
                + rows.to_html(index=False, classes="tbl", border=0))
    return "<p>The study run records no configuration.</p>"


def _html(data: StudyData, res: Results, figs, sections, notes, *, lrs, baseline, delta) -> str:
    def e(text) -> str:
        return html.escape(str(text), quote=False)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>LR sensitivity report: {e(data.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>How much does the result depend on the finetuning LR? Study <code>{e(data.name)}</code></h1>",
        f"<p class='meta'>MLflow {e(data.tracking_uri)} · experiment {e(data.experiment_name)} · study run "
        f"{e(data.parent_run_id)} ({e(data.parent_status)}) · accuracy <code>{e(res.prep.metric)}</code> · "
        f"baseline {e(baseline)} · δ = {delta:g} · Acc. diff LRs {fmt_lr(lrs[0])} vs {fmt_lr(lrs[1])} · "
        f"generated {now}</p>",
    ]
    if res.summary.verdict:
        parts.append("<h2>Verdict</h2><div class='verdict'><ul>"
                     + "".join(f"<li>{e(x)}</li>" for x in res.summary.verdict) + "</ul></div>")
    parts.append("<h2>Summary</h2><ul class='summary'>"
                 + "".join(f"<li>{e(x)}</li>" for x in res.summary.lines) + "</ul>")
    missing = data.missing()
    if missing:
        parts.append("<p class='warn'><b>Incomplete study:</b> " + e("; ".join(missing)) + ".</p>")
    parts.append("<h2>Figures</h2>")
    for name, path in figs.paths.items():
        parts.append(f"<figure><img alt='{html.escape(name)}' src='{_img(path)}'>"
                     f"<figcaption>{e(figs.captions.get(name, ''))}</figcaption></figure>")
    if not figs.paths:
        parts.append("<p>No figure could be drawn from this study yet.</p>")
    for title, body in sections.items():
        parts.append(f"<h2>{e(title)}</h2>{body}")
    parts.append("<h2>Definitions</h2><ul>"
                 + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in DEFINITIONS) + "</ul>")
    if notes:
        items = "".join(f"<li>{e(n)}</li>" for n in dict.fromkeys(notes))
        parts.append(f"<h2>Notes</h2><ul>{items}</ul>")
    parts.append("<h2>Study configuration</h2>" + _config_html(data) + "</body></html>")
    return "\n".join(parts)
