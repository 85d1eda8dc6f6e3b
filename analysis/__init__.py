"""Analysis of a tpp-study from what it logged to MLflow: LR-sensitivity measures, the paper's table,
hyperparameter importance, figures and an HTML report (`tpp-analyze`).

Names are imported lazily so that `import analysis` (and the CLI's argument checks) stay fast; e.g.::

    from analysis import load_study, sensitivity_table, paper_table
    data = load_study("quick", "sqlite:////abs/studies/quick/mlflow.db")
    sens = sensitivity_table(data.trials, lrs=(1e-3, 1e-2))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": ["StudyData", "Progress", "StudyNotFoundError", "load_study", "list_studies"],
    "measures": ["prepare", "Prepared", "LrAxis", "sensitivity_table", "lr_curves", "divergence_table",
                 "trainability_relation", "reference_growth", "spread", "fmt_lr"],
    "importance": ["importance_table", "build_optuna_study", "lr_share"],
    "tables": ["paper_table", "PaperTable", "TableUnavailable", "markdown_table", "sensitivity_text"],
    "figures": ["make_figures", "FigureSet"],
    "summary": ["summarize"],
    "report": ["build_report"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"analysis.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
