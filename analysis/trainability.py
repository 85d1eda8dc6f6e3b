"""Do measurements taken right after removal, before any finetuning, predict the finetuning outcome?

Kendall's tau (with a bootstrap CI) across curves -- one pruned model finetuned over the LR ladder --
between each predictor (mean Jacobian singular value, accuracy and loss after removal) and each outcome
(robust-window width, best accuracy). Pooled over methods and PRs ("all"), and within each PR, since the
PR moves predictors and outcomes together.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.points import PREDICTORS
from analysis.stats import kendall

OUTCOMES = ("window_decades", "best_acc")
NAMES = {"jsv_after_removal_mean": "JSV mean after removal",
         "jsv_retained": "JSV retained (after removal / unpruned control)",
         "acc_after_removal": "accuracy after removal",
         "loss_after_removal": "loss after removal", "window_decades": "robust window (decades)",
         "best_acc": "best accuracy"}
COLUMNS = ["predictor", "outcome", "stratum", "pr", "n", "tau", "lo", "hi", "p"]


def trainability_table(curves: pd.DataFrame, *, n_boot: int = 2000) -> pd.DataFrame:
    """One row per (predictor, outcome, stratum): n curves, tau, its 95% CI and p. Predictors a study did
    not log are left out."""
    rows = []
    strata = [("all", np.nan, curves)] + [(f"pr={pr:g}", pr, c) for pr, c in curves.groupby("pr", sort=True)]
    for x in PREDICTORS:
        if x not in curves or not curves[x].notna().any():
            continue
        for y in OUTCOMES:
            for name, pr, c in strata:
                t = kendall(c[x], c[y], n_boot=n_boot)
                rows.append({"predictor": x, "outcome": y, "stratum": name, "pr": pr, "n": t.n, "tau": t.tau,
                             "lo": t.lo, "hi": t.hi, "p": t.p})
    return pd.DataFrame(rows, columns=COLUMNS)
