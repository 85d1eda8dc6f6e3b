"""Hyperparameter importance per method: how much of the accuracy variance the finetuning LR explains.

The finished trials of one method become an in-memory Optuna study (``create_trial`` + ``add_trials``,
log-scale distributions for LR and growth), scored by Optuna's PED-ANOVA (its default evaluator) and by
fANOVA, whose un-normalised importance is the fraction of the accuracy variance a parameter's main
effect explains. Raw (unbinned) parameter values are used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.measures import Prepared, prepare

PARAMS = ("lr", "pr", "growth", "seed")
_RAW = {"lr": "lr_raw", "pr": "pr_raw", "growth": "growth_raw"}


def build_optuna_study(results: pd.DataFrame, params: Sequence[str] = PARAMS):
    """An in-memory Optuna study (maximize ``acc``) holding the given finished trials.

    Parameters that do not vary are left out (they explain nothing and break some evaluators)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for p in params:
        col = _RAW.get(p, p) if _RAW.get(p, p) in results else p
        if col not in results:
            continue
        v = pd.to_numeric(results[col], errors="coerce")
        finite = v[np.isfinite(v)]
        if finite.nunique() < 2:
            continue
        if p == "seed":
            dists[p] = (col, CategoricalDistribution(sorted(int(s) for s in finite.unique())))
        else:
            log = p in ("lr", "growth") and bool((finite > 0).all())
            dists[p] = (col, FloatDistribution(float(finite.min()), float(finite.max()), log=log))
    trials = []
    for _, row in results.iterrows():
        values, used = {}, {}
        for p, (col, dist) in dists.items():
            x = row[col]
            if x is None or not np.isfinite(float(x)):
                continue
            values[p] = int(x) if p == "seed" else float(x)
            used[p] = dist
        trials.append(optuna.trial.create_trial(params=values, distributions=used, value=float(row["acc"])))
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    return study, sorted(dists)


def importance_table(trials: pd.DataFrame | Prepared, *, metric: str = "best_acc",
                     params: Sequence[str] = PARAMS, min_trials: int = 6, seed: int = 0) -> pd.DataFrame:
    """Per method and evaluator (PED-ANOVA, fANOVA): each parameter's importance for the accuracy.

    Columns: method, evaluator, param, importance (normalised, sums to 1), variance_fraction (fANOVA
    only: share of accuracy variance explained by the parameter's main effect), rank (1 = most
    important), n_trials. Methods with fewer than `min_trials` finished trials are skipped (noted in
    ``attrs["notes"]``)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    prep = trials if isinstance(trials, Prepared) else prepare(trials, metric)
    rows, notes = [], []
    for method, g in prep.results.groupby("method", sort=True):
        if len(g) < min_trials:
            notes.append(f"importance: {method} has {len(g)} finished trials (< {min_trials}); skipped")
            continue
        if g["acc"].nunique() < 2:
            notes.append(f"importance: {method}'s accuracy is constant; nothing to explain")
            continue
        study, names = build_optuna_study(g, params)
        if not names:
            notes.append(f"importance: no parameter varies within {method}; skipped")
            continue
        evaluators = (("PED-ANOVA", PedAnovaImportanceEvaluator()),
                      ("fANOVA", FanovaImportanceEvaluator(seed=seed)))
        for label, ev in evaluators:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:  # evaluate once (fANOVA is the slow part) and normalise here, as Optuna does
                    raw = optuna.importance.get_param_importances(study, evaluator=ev, params=names,
                                                                  normalize=False)
                except (ValueError, RuntimeError) as exc:
                    notes.append(f"importance: {label} failed for {method}: {exc}")
                    continue
            total = float(sum(raw.values()))
            norm = {p: (float(v) / total if total > 0 else 0.0) for p, v in raw.items()}
            if label != "fANOVA":
                raw = {}
            ranked = sorted(names, key=lambda p: (-float(norm.get(p, 0.0)), p))
            for rank, p in enumerate(ranked, start=1):
                rows.append({"method": method, "evaluator": label, "param": p,
                             "importance": float(norm.get(p, 0.0)),
                             "variance_fraction": float(raw[p]) if p in raw else np.nan,
                             "rank": rank, "n_trials": len(g)})
    cols = ["method", "evaluator", "param", "importance", "variance_fraction", "rank", "n_trials"]
    table = pd.DataFrame(rows, columns=cols)
    table.attrs["notes"] = notes
    return table


def lr_share(importance: pd.DataFrame, param: str = "lr") -> pd.DataFrame:
    """Per method: the LR's fANOVA variance fraction and its PED-ANOVA importance and rank."""
    out = []
    for method, g in importance.groupby("method", sort=True):
        row = {"method": method}
        for label, key in (("fANOVA", "fanova"), ("PED-ANOVA", "pedanova")):
            hit = g[(g["evaluator"] == label) & (g["param"] == param)]
            row[f"{key}_importance"] = float(hit["importance"].iloc[0]) if len(hit) else np.nan
            row[f"{key}_rank"] = int(hit["rank"].iloc[0]) if len(hit) else np.nan
            if label == "fANOVA":
                row["variance_fraction"] = float(hit["variance_fraction"].iloc[0]) if len(hit) else np.nan
        out.append(row)
    return pd.DataFrame(out)
