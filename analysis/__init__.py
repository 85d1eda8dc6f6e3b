"""Analysis of a tpp-study from what it logged to MLflow: LR-sensitivity measures per group (stable LR range,
robust LR window, sensitivity inside the stable range, Acc. diff, best accuracy) with intervals over seeds,
paired method-vs-baseline comparisons, the trainability-vs-outcome Kendall τ, figures and an HTML report
(`tpp-analyze`). Definitions: analysis/README.md.

Names are imported lazily so that `import analysis` (and the CLI's argument checks) stay fast; e.g.::

    from analysis import load_study, analyze
    data = load_study("quick", "sqlite:////abs/studies/quick/mlflow.db")
    res = analyze(data, baseline="l1")      # res.groups, res.comparison, res.summary.verdict, ...
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": ["StudyData", "Progress", "StudyNotFoundError", "load_study", "list_studies"],
    "locate": ["tracking_uri_from_storage"],
    "points": ["prepare", "Prepared", "LrAxis", "METRICS"],
    "curves": ["curve_table", "robust_window", "stable_range", "stable_spread", "acc_at", "best", "Window"],
    "measures": ["group_table", "lr_points", "lr_effect"],
    "stats": ["interval", "sign_flip_p", "kendall", "Interval"],
    "compare": ["comparison_table"],
    "trainability": ["trainability_table"],
    "tables": ["paper_table", "PaperTable", "markdown_table"],
    "figures": ["make_figures", "FigureSet"],
    "summary": ["summarize", "Summary"],
    "report": ["build_report", "analyze", "Results"],
    "fmt": ["fmt_lr"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"analysis.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
