"""The report: one self-contained HTML page (figures as base64 PNG, tables, a computed summary, the study
config) plus CSV/Markdown tables in an out folder, logged to the study's parent run under ``report/``."""

from __future__ import annotations

import base64
import html
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures import make_figures
from analysis.importance import importance_table, lr_share
from analysis.load import StudyData, client_for, load_study
from analysis.measures import (
    divergence_table,
    fmt_lr,
    prepare,
    sensitivity_table,
    trainability_relation,
)
from analysis.summary import summarize
from analysis.tables import (
    TableUnavailable,
    divergence_text,
    importance_text,
    markdown_table,
    paper_table,
    sensitivity_text,
)

ARTIFACT_DIR = "report"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table.tbl{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.tbl td,table.tbl th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
table.tbl th{background:#f3f3f3}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
.meta{color:#666;font-size:.9em}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.summary li{margin:.3em 0}.warn{color:#8a4b00}
"""

_DEFINITIONS = [
    ("best accuracy / best LR", "the highest accuracy over the LRs studied and the LR that gives it"),
    ("accuracy range / std over LR",
     "max − min and the (population) std of accuracy across the LRs, per seed"),
    ("Acc. diff", "acc(LR a) − acc(LR b) for the same seed, as in the paper (default 1e-3 − 1e-2)"),
    ("mean accuracy over a window",
     "robustness: the accuracy averaged over an LR window (uniform in log LR)"),
    ("spread", "mean ± std over seeds; with ≥ 5 seeds, intervals are 95% bootstrap CIs of the mean"),
    ("diverged / failed", "diverged trials are results with the accuracy they reached; failed trials are "
     "excluded and counted"),
]


def build_report(study: str | StudyData, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                 *, lrs: tuple[float, float] = (1e-3, 1e-2), window: tuple[float, float] | None = None,
                 metric: str = "best_acc", treatment: str = "tpp", baseline: str = "l1", log: bool = True,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build the report of `study` (a name, parent run id or a loaded StudyData) into `out_dir`
    (default ``reports/<study>``); log it to the parent run under ``report/`` unless `log` is False.
    Returns the path of ``report.html``."""
    say = progress or (lambda _msg: None)
    if isinstance(study, StudyData):
        data = study
    else:
        say(f"loading study {study!r} from {tracking_uri or 'MLFLOW_TRACKING_URI'}")
        data = load_study(study, tracking_uri, histories=["finetune/test_acc"])
    p = data.progress
    say(f"  {p.total} trials: {p.completed} completed, {p.diverged} diverged, {p.failed} failed, "
        f"{p.running} running" + (f" (planned {p.planned})" if p.planned is not None else ""))
    for line in data.missing():
        say(f"  missing: {line}")
    out = Path(out_dir) if out_dir is not None else Path("reports") / data.name
    out.mkdir(parents=True, exist_ok=True)

    say("computing measures")
    notes = list(data.notes)
    sections: dict[str, str] = {}
    if p.finished:
        prep = prepare(data.trials, metric)
        sens = sensitivity_table(prep, lrs=lrs, window=window)
        div = divergence_table(prep)
        imp = importance_table(prep)
        rel = trainability_relation(sens)
        notes += list(prep.notes) + [n for n in sens.attrs.get("notes", []) if n not in prep.notes]
        notes += imp.attrs.get("notes", [])
        lines = summarize(prep, sens, data=data, importance_lr=lr_share(imp) if len(imp) else None,
                          relation=rel, treatment=treatment, baseline=baseline)
        sections["Paper table"] = _paper_section(prep, lrs, out, notes)
        sections["LR sensitivity per method, PR and growth"] = _write_table(
            out, "sensitivity", sens, sensitivity_text(sens))
        sections["Hyperparameter importance"] = (
            _write_table(out, "importance", imp, importance_text(imp)) if len(imp) else
            "<p>Not enough finished trials per method for an importance analysis.</p>")
        sections["Divergence by LR"] = _write_table(out, "divergence", div, divergence_text(div))
        window_used = sens.attrs.get("window")
        say(f"  {len(sens)} (method, PR, growth) groups; LR: {prep.lr_axis.describe()}")
    else:
        from analysis.summary import progress_line

        lines = [progress_line(data), "No finished trials yet: nothing to measure."]
        window_used = window
    data.trials.to_csv(out / "trials.csv", index=False)

    say("drawing figures")
    figs = make_figures(data, out / "figures", metric=metric, lrs=lrs, window=window,
                        treatment=treatment, baseline=baseline)
    notes += figs.notes
    say(f"  {len(figs.paths)} figure(s) written" + (f", {len(figs.notes)} skipped" if figs.notes else ""))

    (out / "summary.md").write_text("\n".join(f"- {line}" for line in lines) + "\n")
    page = _html(data, lines, figs, sections, notes, metric=metric, lrs=lrs, window=window_used)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    say(f"report: {path.resolve()}")
    if log:
        try:
            client, _ = client_for(data.tracking_uri)
            client.log_artifacts(data.parent_run_id, str(out), artifact_path=ARTIFACT_DIR)
        except Exception as exc:  # noqa: BLE001 - the report on disk is still good; say why it is not logged
            msg = f"could not log the report to study run {data.parent_run_id}: {type(exc).__name__}: {exc}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            say(f"warning: {msg}")
        else:
            say(f"logged to run {data.parent_run_id} under {ARTIFACT_DIR}/ "
                "(see the study run in the MLflow UI)")
    return path


def _paper_section(prep, lrs, out: Path, notes: list[str]) -> str:
    try:
        table = paper_table(prep, lrs=lrs)
    except TableUnavailable as exc:
        notes.append(str(exc))
        return f"<p>{html.escape(str(exc))}</p>"
    table.to_csv(out / "paper_table.csv")
    (out / "paper_table.md").write_text(table.to_markdown())
    a, b = fmt_lr(lrs[0]), fmt_lr(lrs[1])
    return (table.text().to_html(index=False, classes="tbl", border=0)
            + f"<p class='meta'>Cells: {html.escape(prep.metric)} (%), mean ± std over seeds. Δ rows: the "
              f"paper's Acc. diff = acc({a}) − acc({b}) per seed, then mean ± std.</p>")


def _write_table(out: Path, name: str, numeric: pd.DataFrame, text: pd.DataFrame) -> str:
    numeric.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(markdown_table(text) + "\n")
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


def _html(data: StudyData, lines, figs, sections, notes, *, metric, lrs, window) -> str:
    def e(text) -> str:  # element text: quotes need no escaping and stay readable in the source
        return html.escape(str(text), quote=False)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    missing = data.missing()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>LR sensitivity report: {e(data.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>How much does the result depend on the finetuning LR? Study <code>{e(data.name)}</code></h1>",
        f"<p class='meta'>MLflow {e(data.tracking_uri)} · experiment {e(data.experiment_name)} · study run "
        f"{e(data.parent_run_id)} ({e(data.parent_status)}) · accuracy metric <code>{e(metric)}</code> · "
        f"Acc. diff LRs {fmt_lr(lrs[0])} vs {fmt_lr(lrs[1])}"
        + (f" · window {fmt_lr(window[0])}…{fmt_lr(window[1])}" if window and np.isfinite(window[0]) else "")
        + f" · generated {now}</p>",
        "<h2>Summary</h2><ul class='summary'>" + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul>",
    ]
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
    parts.append("<h2>Definitions</h2><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>"
                                                       for k, v in _DEFINITIONS) + "</ul>")
    if notes:
        items = "".join(f"<li>{e(n)}</li>" for n in dict.fromkeys(notes))
        parts.append(f"<h2>Notes</h2><ul>{items}</ul>")
    parts.append("<h2>Study configuration</h2>" + _config_html(data))
    parts.append("</body></html>")
    return "\n".join(parts)
