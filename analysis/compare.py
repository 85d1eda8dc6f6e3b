"""Paired comparisons: each method against a baseline method, at equal PR, recipe and seed (and LR).

Every method of a ladder study sees the same LRs and seeds, so a method difference is a paired
difference: per shared seed, method − baseline of the LR regret (both curves scored over the same LRs:
those where neither member of that seed diverged), the robust-window width, the best accuracy and the
accuracy spread in the stable range; per (LR, seed), the accuracy. One sensitivity measure is the
*primary* one, declared before looking (`SENSITIVITY`, LR regret by default): the verdict rests on it
alone, the others are descriptive. Each comes with the mean difference,
an interval over seeds (analysis.stats.interval) and the exact sign-flip p-value. A direction is stated
("higher"/"lower") only when p < alpha *and* the interval excludes 0; otherwise the outcome is "tie".

Growth: a method without a penalty (L1) has one group per PR; each growth level of a penalised method is
compared with it separately (and equal growth levels are paired when both methods have them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.curves import lr_regret
from analysis.points import Prepared
from analysis.stats import ALPHA, interval, p_floor, sign_flip_p

SEED_MEASURES = ("lr_regret", "window_decades", "best_acc", "stable_range")
# The sensitivity measures a verdict may rest on (`--sensitivity`), and which sign of method − baseline
# means "less sensitive to the LR".
SENSITIVITY = {"regret": "lr_regret", "window": "window_decades", "range": "stable_range"}
LESS_SENSITIVE_IF = {"lr_regret": "lower", "window_decades": "higher", "stable_range": "lower"}
COLUMNS = ["method", "baseline", "group", "baseline_group", "measure", "primary", "lr", "n", "seeds",
           "method_mean", "baseline_mean", "diff", "lo", "hi", "interval", "p", "p_floor", "outcome",
           "sensitivity", "method_open", "baseline_open", "method_diverged", "baseline_diverged", "n_lrs",
           "metric", "delta"]


def sensitivity_outcome(measure: str, outcome_: str) -> str:
    """"less sensitive" / "more sensitive" / "tie" for a sensitivity measure's outcome ("" otherwise)."""
    if measure not in LESS_SENSITIVE_IF:
        return ""
    if outcome_ not in ("higher", "lower"):
        return "tie" if outcome_ == "tie" else outcome_
    return "less sensitive" if outcome_ == LESS_SENSITIVE_IF[measure] else "more sensitive"


def outcome(iv, p: float, alpha: float = ALPHA) -> str:
    """"higher" / "lower" (method − baseline) only when p < alpha and the interval excludes 0."""
    if iv.n < 2:
        return "too few pairs" if iv.n == 1 else "no pairs"
    if np.isfinite(p) and p < alpha and iv.excludes_zero():
        return "higher" if iv.mean > 0 else "lower"
    return "tie"


def _nan_eq(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b or (isinstance(a, float) and isinstance(b, float) and np.isclose(a, b))


def baseline_groups(groups: pd.DataFrame, row: pd.Series, baseline: str, keys: Sequence[str]) -> pd.DataFrame:
    """The baseline's groups that `row` (a method's group) is compared with: equal on every key but
    method and growth; equal growth too when both have a growth level."""
    cand = groups[groups["method"] == baseline]
    for k in keys:
        if k in ("method", "growth"):
            continue
        cand = cand[[_nan_eq(v, row[k]) for v in cand[k]]]
    g = row["growth"]
    if np.isfinite(g) and np.isfinite(cand["growth"].astype(float)).any():
        cand = cand[np.isclose(cand["growth"].astype(float), g)]
    return cand


def comparison_table(prep: Prepared, curves: pd.DataFrame, *, baseline: str,
                     methods: Sequence[str] | None = None, alpha: float = ALPHA,
                     sensitivity: str = "regret") -> pd.DataFrame:
    """One row per (method group, baseline group, measure[, LR]); the group keys of the method's group
    are added as columns. `methods`: the methods compared with `baseline` (default: every other one);
    `sensitivity`: the primary sensitivity measure (regret | window | range), flagged ``primary``."""
    if sensitivity not in SENSITIVITY:
        raise ValueError(f"sensitivity: got {sensitivity!r}; accepted: {', '.join(SENSITIVITY)}")
    groups = prep.groups()
    todo = [m for m in (methods or groups["method"].unique()) if m != baseline]
    rows = []
    for _, g in groups[groups["method"].isin(todo)].iterrows():
        for _, b in baseline_groups(groups, g, baseline, prep.keys).iterrows():
            base = {**{k: g[k] for k in prep.keys}, "baseline_growth": b["growth"], "baseline": b["method"]}
            rows += _seed_rows(curves, g["group"], b["group"], base, alpha, prep, SENSITIVITY[sensitivity])
            if prep.lr_axis.mode == "ladder":
                rows += _lr_rows(prep.points, g["group"], b["group"], base, alpha, prep)
    cols = list(dict.fromkeys([*prep.keys, "baseline_growth", *COLUMNS]))
    return pd.DataFrame(rows, columns=cols)


def _row(base, gm, gb, measure, lr, seeds, xm, xb, alpha, prep, primary: str = "", **extra) -> dict:
    d = np.asarray(xm, float) - np.asarray(xb, float)
    iv = interval(d)
    p = sign_flip_p(d)
    out = outcome(iv, p, alpha)
    return {**base, "group": gm, "baseline_group": gb, "measure": measure, "primary": measure == primary,
            "lr": lr, "n": iv.n,
            "seeds": ";".join(str(s) for s in seeds),
            "method_mean": float(np.mean(xm)) if len(xm) else np.nan,
            "baseline_mean": float(np.mean(xb)) if len(xb) else np.nan, "diff": iv.mean, "lo": iv.lo,
            "hi": iv.hi, "interval": iv.kind, "p": p, "p_floor": p_floor(iv.n), "outcome": out,
            "sensitivity": sensitivity_outcome(measure, out), "metric": prep.metric, **extra}


def paired_regret(points: pd.DataFrame, gm: str, gb: str, seed) -> tuple[float, float, int]:
    """(method's, baseline's LR regret, LRs used) for one seed, both scored over the same LRs: those
    where both members ran and neither diverged."""
    pm = points[(points["group"] == gm) & (points["seed"] == seed)].set_index("lr")
    pb = points[(points["group"] == gb) & (points["seed"] == seed)].set_index("lr")
    common = sorted(lr for lr in pm.index.intersection(pb.index)
                    if not pm.at[lr, "diverged"] and not pb.at[lr, "diverged"])
    x = np.asarray(common, float)
    none = np.zeros(len(x), bool)
    return (lr_regret(x, pm.loc[common, "acc"].to_numpy(float), none),
            lr_regret(x, pb.loc[common, "acc"].to_numpy(float), none), len(common))


def _seed_rows(curves, gm, gb, base, alpha, prep, primary: str) -> list[dict]:
    cm = curves[curves["group"] == gm].set_index("seed")
    cb = curves[curves["group"] == gb].set_index("seed")
    seeds = sorted(set(cm.index) & set(cb.index))
    out = []
    for m in SEED_MEASURES:
        n_lrs = np.nan
        if m == "lr_regret" and prep.lr_axis.mode == "ladder":
            pairs = {s: paired_regret(prep.points, gm, gb, s) for s in seeds}
            ok = [s for s in seeds if np.isfinite(pairs[s][0]) and np.isfinite(pairs[s][1])]
            xm, xb = [pairs[s][0] for s in ok], [pairs[s][1] for s in ok]
            n_lrs = min((pairs[s][2] for s in ok), default=np.nan)
        else:  # scattered LRs share no ladder: each curve's own regret
            ok = [s for s in seeds if np.isfinite(cm.at[s, m]) and np.isfinite(cb.at[s, m])]
            xm, xb = [cm.at[s, m] for s in ok], [cb.at[s, m] for s in ok]
        out.append(_row(base, gm, gb, m, np.nan, ok, xm, xb, alpha, prep, primary, n_lrs=n_lrs,
                        method_open=int(sum(cm.at[s, "window_open"] != "" for s in ok)),
                        baseline_open=int(sum(cb.at[s, "window_open"] != "" for s in ok)),
                        method_diverged=int(sum(cm.at[s, "n_diverged"] for s in ok)),
                        baseline_diverged=int(sum(cb.at[s, "n_diverged"] for s in ok)),
                        delta=float(cm["delta"].iloc[0]) if len(cm) else np.nan))
    return out


def _lr_rows(points, gm, gb, base, alpha, prep) -> list[dict]:
    pm = points[points["group"] == gm].set_index(["lr", "seed"])
    pb = points[points["group"] == gb].set_index(["lr", "seed"])
    both = pm.index.intersection(pb.index)
    out = []
    for lr in sorted({lr for lr, _ in both}):
        seeds = sorted(s for x, s in both if x == lr)
        xm = [pm.at[(lr, s), "acc"] for s in seeds]
        xb = [pb.at[(lr, s), "acc"] for s in seeds]
        out.append(_row(base, gm, gb, "acc_at_lr", float(lr), seeds, xm, xb, alpha, prep, n_lrs=np.nan,
                        method_open=0, baseline_open=0,
                        method_diverged=int(sum(pm.at[(lr, s), "diverged"] for s in seeds)),
                        baseline_diverged=int(sum(pb.at[(lr, s), "diverged"] for s in seeds)), delta=np.nan))
    return out
