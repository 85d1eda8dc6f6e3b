"""LR-sensitivity measures per group (method x PR x growth x recipe), summarised over seeds.

Each numeric measure is computed per curve (analysis.curves) and then given as the mean over seeds with
an interval (analysis.stats.interval: 95% bootstrap CI with >= 5 seeds, the min-max range with 2-4).
LR-valued measures are never averaged: they are reported as LRs that ran -- the stable LR in every seed
(the minimum over seeds), the most common best LR, and the per-seed lists.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from analysis.curves import PROFILE_DELTAS, curve_table, robust_window, runs_of, window_col
from analysis.points import CONTROL, PREDICTORS, Prepared, sort_groups
from analysis.stats import interval

SEED_MEASURES = ("best_acc", "lr_regret", "window_decades", *(window_col(d) for d in PROFILE_DELTAS),
                 "stable_range", "stable_std", "acc_diff", "diverged_share")
PROFILE_POINTS = 41  # tolerances per group in the robustness profile


def lr_list(values) -> str:
    """LRs as a ';'-separated list in full precision (CSV cells the tests and readers parse back)."""
    return ";".join(f"{v:.6g}" if np.isfinite(v) else "none" for v in values)


def _mode_lr(values: list[float]) -> float:
    """The most common LR among the seeds' best LRs, NaN when several are equally common."""
    counts = Counter(v for v in values if np.isfinite(v)).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return np.nan
    return float(counts[0][0])


def lr_effect(points: pd.DataFrame) -> tuple[float, int]:
    """The LR main effect of one group: the population std, over the ladder LRs at which no seed diverged
    and every seed ran, of the seed-mean accuracy at that LR (points); and how many LRs it used."""
    n_seeds = points["seed"].nunique()
    by_lr = points.groupby("lr").agg(n=("seed", "nunique"), div=("diverged", "any"), acc=("acc", "mean"))
    use = by_lr[(by_lr["n"] == n_seeds) & ~by_lr["div"]]
    if len(use) < 2:
        return np.nan, len(use)
    return float(use["acc"].std(ddof=0)), len(use)


def group_table(prep: Prepared, curves: pd.DataFrame | None = None, *,
                lrs: tuple[float, float] = (1e-3, 1e-2), delta: float = 1.0) -> pd.DataFrame:
    """One row per group: for each per-seed measure (``best_acc``, ``window_decades``, ``stable_range``,
    ``stable_std``, ``acc_diff``, ``diverged_share``) the mean over seeds and ``_lo``/``_hi``/``_n``;
    ``interval`` (bootstrap95 | range | single); ``lr_stable_max`` (the largest LR stable in every seed,
    NaN when some seed has none) with ``lr_stable_max_seeds``; ``best_lr_mode`` and ``best_lr_seeds``;
    ``window_open_n`` (seeds whose window reaches an end of the ladder: a lower bound; likewise
    ``window_at_<δ>_open_n`` for the windows at δ = 1, 2, 5 points);
    ``acc_diff_how``; ``lr_effect_sd`` / ``lr_effect_n``; ``lr_min``/``lr_max``/``n_lrs`` (LRs that ran)."""
    curves = curve_table(prep, lrs=lrs, delta=delta) if curves is None else curves
    rows = []
    for group, c in curves.groupby("group", sort=False):
        c = c.sort_values("seed")
        first = c.iloc[0]
        row = {k: first[k] for k in prep.keys}
        row.update(group=group, metric=prep.metric, delta=delta, n_seeds=len(c),
                   seeds=";".join(str(s) for s in c["seed"]), n_members=int(c["n_members"].sum()),
                   n_diverged=int(c["n_diverged"].sum()))
        kinds = set()
        for m in SEED_MEASURES:
            iv = interval(c[m])
            row.update({m: iv.mean, f"{m}_lo": iv.lo, f"{m}_hi": iv.hi, f"{m}_n": iv.n})
            if m == "best_acc":
                kinds.add(iv.kind)
        row["interval"] = kinds.pop()
        row["diverged_members_share"] = row["n_diverged"] / row["n_members"]
        stable = c["lr_stable_max"].to_numpy(float)
        row["lr_stable_max"] = float(stable.min()) if np.isfinite(stable).all() else np.nan
        row["lr_stable_max_seeds"] = lr_list(stable)
        row["best_lr_mode"] = _mode_lr(list(c["best_lr"]))
        row["best_lr_seeds"] = lr_list(c["best_lr"])
        row["window_open_n"] = int((c["window_open"].fillna("") != "").sum())
        for d in PROFILE_DELTAS:
            row[window_col(d) + "_open_n"] = int((c[window_col(d) + "_open"].fillna("") != "").sum())
        hows = set(c["acc_diff_how"])
        row["acc_diff_how"] = hows.pop() if len(hows) == 1 else "mixed"
        pts = prep.points[prep.points["group"] == group]
        row["lr_effect_sd"], row["lr_effect_n"] = lr_effect(pts)
        row.update(lr_min=float(pts["lr"].min()), lr_max=float(pts["lr"].max()),
                   n_lrs=int(pts["lr"].nunique()))
        for p in (*PREDICTORS, *CONTROL):
            row[p] = float(c[p].mean()) if c[p].notna().any() else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    return sort_groups(table, prep.keys) if len(table) else table


def lr_points(prep: Prepared, *, n_grid: int = 25) -> pd.DataFrame:
    """Accuracy at each LR per group, over seeds: ``n`` seeds, ``n_diverged`` (seeds whose member there
    diverged), ``acc`` (mean of what every seed reached, diverged ones included) with ``lo``/``hi`` and
    ``interval``, ``acc_stable`` (mean over the non-diverged seeds) and ``how``: "ran" on a ladder; with
    scattered LRs "interpolated" on `n_grid` log-spaced LRs, each seed inside its own non-diverged range."""
    cols = [*prep.keys, "group", "lr", "how", "n", "n_diverged", "acc", "lo", "hi", "interval", "acc_stable",
            "metric"]
    rows = []
    for group in prep.groups()["group"]:
        g = prep.points[prep.points["group"] == group]
        first = g.iloc[0]
        base = {k: first[k] for k in prep.keys}
        if prep.lr_axis.mode == "ladder":
            for lr, at in g.groupby("lr", sort=True):
                iv = interval(at["acc"])
                ok = at.loc[~at["diverged"], "acc"]
                rows.append({**base, "group": group, "lr": float(lr), "how": "ran", "n": len(at),
                             "n_diverged": int(at["diverged"].sum()), "acc": iv.mean, "lo": iv.lo,
                             "hi": iv.hi, "interval": iv.kind,
                             "acc_stable": float(ok.mean()) if len(ok) else np.nan, "metric": prep.metric})
            continue
        grid = np.logspace(np.log10(prep.lr_axis.levels[0]), np.log10(prep.lr_axis.levels[-1]), n_grid)
        per_seed = []
        for _, c in g.groupby("seed"):
            c = c[~c["diverged"]].sort_values("lr")
            x, y = np.log10(c["lr"].to_numpy(float)), c["acc"].to_numpy(float)
            inside = (np.log10(grid) >= (x.min() if len(x) else np.inf) - 1e-9) & (
                np.log10(grid) <= (x.max() if len(x) else -np.inf) + 1e-9)
            per_seed.append(np.where(inside, np.interp(np.log10(grid), x, y) if len(x) else np.nan, np.nan))
        arr = np.asarray(per_seed)
        for j, lr in enumerate(grid):
            iv = interval(arr[:, j])
            if iv.n:
                rows.append({**base, "group": group, "lr": float(lr), "how": "interpolated", "n": iv.n,
                             "n_diverged": np.nan, "acc": iv.mean, "lo": iv.lo, "hi": iv.hi,
                             "interval": iv.kind, "acc_stable": iv.mean, "metric": prep.metric})
    return pd.DataFrame(rows, columns=cols)


def profile_table(prep: Prepared, *, n: int = PROFILE_POINTS) -> pd.DataFrame:
    """The robustness profile per group: the robust-window width (decades) at `n` tolerances δ from 0 to
    the group's accuracy span (its largest best − worst over seeds, non-diverged LRs), one row per
    (group, δ) with the seed mean, its interval (``lo``/``hi``, ``interval``) and ``n_open`` (seeds whose
    window at that δ reaches an end of the ladder: a lower bound)."""
    cols = [*prep.keys, "group", "delta", "window", "lo", "hi", "n", "interval", "n_open"]
    rows = []
    for group in prep.groups()["group"]:
        g = prep.points[prep.points["group"] == group]
        curves = _seed_curves(g)
        spans = [float(np.ptp(a[~d])) for _, a, d in curves if (~d).any()]
        span = max(spans, default=0.0)
        deltas = np.linspace(0.0, span, n) if span > 0 else np.array([0.0])
        windows = [[robust_window(x, a, d, float(t)) for t in deltas] for x, a, d in curves]
        widths = np.array([[w.decades for w in ws] for ws in windows], dtype=float)
        opens = np.array([[w.open != "" for w in ws] for ws in windows])
        first = g.iloc[0]
        for j, t in enumerate(deltas):
            iv = interval(widths[:, j])
            rows.append({**{k: first[k] for k in prep.keys}, "group": group, "delta": float(t),
                         "window": iv.mean, "lo": iv.lo, "hi": iv.hi, "n": iv.n, "interval": iv.kind,
                         "n_open": int(opens[:, j].sum())})
    return pd.DataFrame(rows, columns=cols)


def _seed_curves(g: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(LRs, accuracies, diverged) of each seed's curve in `g`, by seed, each sorted by LR: numpy slices
    of the columns sorted once, not a pandas sort per seed."""
    g = g[g["seed"].notna()].sort_values(["seed", "lr"], kind="stable")
    lr, acc, div = g["lr"].to_numpy(float), g["acc"].to_numpy(float), g["diverged"].to_numpy(bool)
    return [(lr[a:b], acc[a:b], div[a:b]) for a, b in runs_of(g["seed"].to_numpy())]
