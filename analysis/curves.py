"""The measures of one accuracy-vs-LR curve (one group, one seed), as pure functions of its points.

A curve is its points sorted by LR: ``lrs``, ``accs`` and ``diverged`` (the member's status). Divergence
is measured as divergence and never as sensitivity: a diverged point is left out of the best accuracy,
the robust window and the accuracy spread, and breaks a window's contiguity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.points import BUDGET, CONTROL, METRICS, PREDICTORS, SPEED, Prepared

_TOL = 1e-9
PROFILE_DELTAS = (1.0, 2.0, 5.0)  # the robust window at these tolerances is tabulated (points)


@dataclass(frozen=True)
class Window:
    """The robust LR window: width in decades (δ-crossings interpolated), its edges in log10 LR, the
    lowest/highest ladder LRs inside it (LRs that ran), how many points it holds, and whether it runs
    into an end of the curve (then the width is a lower bound)."""

    decades: float
    lo: float
    hi: float
    lr_lo: float
    lr_hi: float
    n: int
    open_lo: bool
    open_hi: bool

    @property
    def open(self) -> str:
        return {(True, True): "both", (True, False): "low", (False, True): "high"}.get(
            (self.open_lo, self.open_hi), "")


NO_WINDOW = Window(np.nan, np.nan, np.nan, np.nan, np.nan, 0, False, False)


def best(lrs: np.ndarray, accs: np.ndarray, diverged: np.ndarray) -> tuple[float, float]:
    """(best accuracy, the LR giving it) over the non-diverged points; the lowest such LR on ties."""
    ok = ~diverged
    if not ok.any():
        return np.nan, np.nan
    i = int(np.flatnonzero(ok)[np.argmax(accs[ok])])
    return float(accs[i]), float(lrs[i])


def stable_range(lrs: np.ndarray, diverged: np.ndarray) -> tuple[float, float]:
    """(lr_stable_max, lr_diverge_min): the largest LR such that it and every smaller LR did not diverge
    (NaN when the smallest LR diverged), and the smallest LR that diverged (NaN when none did)."""
    hit = np.flatnonzero(diverged)
    if not len(hit):
        return float(lrs[-1]), np.nan
    k = int(hit[0])
    return (float(lrs[k - 1]) if k > 0 else np.nan), float(lrs[k])


def stable_spread(lrs: np.ndarray, accs: np.ndarray, lr_stable_max: float) -> tuple[float, float]:
    """(max − min, population std) of the accuracy over the stable range (LRs <= lr_stable_max); NaN
    with fewer than two stable LRs."""
    if not np.isfinite(lr_stable_max):
        return np.nan, np.nan
    a = accs[lrs <= lr_stable_max * (1 + _TOL)]
    if len(a) < 2:
        return np.nan, np.nan
    return float(a.max() - a.min()), float(a.std(ddof=0))


def robust_window(lrs: np.ndarray, accs: np.ndarray, diverged: np.ndarray, delta: float) -> Window:
    """The widest contiguous run of non-diverged points with accuracy >= best − `delta`.

    Each edge is extended to the δ-crossing, interpolated linearly in log10 LR towards the next point
    outside (when that point ran and did not diverge); at an end of the curve, or next to a diverged
    point, the edge stays at the last point inside. A single point with no crossing is 0 decades.
    Ties between equally wide runs go to the one holding the best point, then to the lower LRs."""
    ok = ~diverged
    if not ok.any():
        return NO_WINDOW
    x = np.log10(lrs)
    top = float(accs[ok].max())
    t = top - delta
    inside = ok & (accs >= t - _TOL)
    i_best = int(np.flatnonzero(ok & (accs >= top - _TOL))[0])
    found: list[tuple[float, bool, Window]] = []
    n, i = len(x), 0
    while i < n:
        if not inside[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and inside[j + 1]:
            j += 1
        lo, hi = x[i], x[j]
        if i > 0 and ok[i - 1]:
            lo = x[i - 1] + (t - accs[i - 1]) / (accs[i] - accs[i - 1]) * (x[i] - x[i - 1])
        if j < n - 1 and ok[j + 1]:
            hi = x[j] + (accs[j] - t) / (accs[j] - accs[j + 1]) * (x[j + 1] - x[j])
        w = Window(float(hi - lo), float(lo), float(hi), float(lrs[i]), float(lrs[j]), j - i + 1,
                   i == 0, j == n - 1)
        found.append((w.decades, i <= i_best <= j, w))
        i = j + 1
    widest = max(d for d, _, _ in found)
    ties = [(has_best, w) for d, has_best, w in found if d >= widest - _TOL]
    return next((w for has_best, w in ties if has_best), ties[0][1])


def lr_regret(lrs: np.ndarray, accs: np.ndarray, diverged: np.ndarray) -> float:
    """The mean, over the LR range in log10 LR, of (best accuracy − accuracy), in accuracy points: what
    picking the LR blindly from the range loses on average. Trapezoid between the non-diverged points
    (sorted by LR), divided by the width of their range; NaN with fewer than two such points.

    For a curve with one peak this is the area above its robustness profile (the window width as a
    function of δ), divided by the range: it summarises every δ at once."""
    ok = ~diverged
    if ok.sum() < 2:
        return np.nan
    x, y = np.log10(lrs[ok]), accs[ok]
    width = float(x[-1] - x[0])
    if width <= 0:
        return np.nan
    gap = float(y.max()) - y
    return float(np.sum((gap[1:] + gap[:-1]) * np.diff(x)) / 2.0 / width)


def runs_of(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal neighbouring `values`: the curves of a frame sorted by curve."""
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]) if len(values) else np.array([], int)
    return list(zip(starts.tolist(), [*starts[1:].tolist(), len(values)], strict=True))


def acc_at(lrs: np.ndarray, accs: np.ndarray, diverged: np.ndarray, target: float,
           rel_tol: float) -> tuple[float, str]:
    """Accuracy at LR `target` and how it was obtained: "exact" (a point within `rel_tol`),
    "interpolated" (linear in log10 LR between the two points around it), or NaN with "outside" (beyond
    the curve's LRs) or "diverged" (the point, or one around it, diverged)."""
    hit = np.flatnonzero(np.abs(lrs / target - 1.0) <= rel_tol)
    if len(hit):
        k = int(hit[0])
        return (np.nan, "diverged") if diverged[k] else (float(accs[k]), "exact")
    if target < lrs[0] or target > lrs[-1]:
        return np.nan, "outside"
    k = int(np.searchsorted(lrs, target))
    if diverged[k - 1] or diverged[k]:
        return np.nan, "diverged"
    x = np.log10(lrs[k - 1:k + 1])
    return float(np.interp(np.log10(target), x, accs[k - 1:k + 1])), "interpolated"


def _how(a: str, b: str) -> str:
    if a == b == "exact":
        return "exact"
    if {a, b} <= {"exact", "interpolated"}:
        return "interpolated"
    return "diverged" if "diverged" in (a, b) else "outside"


def curve_table(prep: Prepared, *, lrs: tuple[float, float] = (1e-3, 1e-2),
                delta: float = 1.0) -> pd.DataFrame:
    """One row per curve (group, seed): every per-curve measure, the predictors measured after removal
    (mean over the curve's members: one pruned model per curve) and, per accuracy metric logged, its best
    value over the non-diverged LRs (``top_<metric>``)."""
    rows = []
    metrics = [m for m in METRICS if m in prep.points and prep.points[m].notna().any()]
    order = {g: i for i, g in enumerate(prep.groups()["group"])}  # report order: method, then levels
    pts = prep.points.assign(_o=prep.points["group"].map(order)).sort_values(["_o", "seed"], kind="stable")
    # per-curve means and maxima in three groupbys, not a pandas call per column and curve (NaN skipped;
    # a curve with none of a column, or no member that ran to the end, gets NaN as before)
    by = ["group", "seed"]
    ok_pts = pts[~pts["diverged"].astype(bool)]
    means = pts.groupby(by, sort=False)[[*PREDICTORS, *CONTROL, *SPEED]].mean().to_dict("index")
    ok_means = ok_pts.groupby(by, sort=False)[list(BUDGET)].mean().to_dict("index")
    tops = ok_pts.groupby(by, sort=False)[metrics].max().to_dict("index") if metrics else {}
    # the curves as slices of numpy columns (sorted by curve, then LR), not a pandas frame per curve
    pts = pts.sort_values(["_o", "seed", "lr"], kind="stable")
    col = {k: pts[k].to_numpy() for k in {*prep.keys, *by, "n_members", "n_diverged"}}
    lr_all, acc_all = pts["lr"].to_numpy(float), pts["acc"].to_numpy(float)
    div_all = pts["diverged"].to_numpy(bool)
    for start, end in runs_of(pts.groupby(by, sort=False).ngroup().to_numpy()):
        group, seed = col["group"][start], col["seed"][start]
        x, y, div = lr_all[start:end], acc_all[start:end], div_all[start:end]
        b_acc, b_lr = best(x, y, div)
        s_max, d_min = stable_range(x, div)
        s_range, s_std = stable_spread(x, y, s_max)
        w = robust_window(x, y, div, delta)
        fixed = {d: robust_window(x, y, div, d) for d in PROFILE_DELTAS}
        a, how_a = acc_at(x, y, div, lrs[0], prep.lr_axis.rel_tol)
        b, how_b = acc_at(x, y, div, lrs[1], prep.lr_axis.rel_tol)
        row = {k: col[k][start] for k in prep.keys}
        row.update(group=group, seed=seed, metric=prep.metric, delta=delta, n_lrs=end - start,
                   n_members=int(col["n_members"][start:end].sum()),
                   n_diverged=int(col["n_diverged"][start:end].sum()))
        row.update(diverged_share=row["n_diverged"] / row["n_members"], lr_stable_max=s_max,
                   lr_diverge_min=d_min, best_acc=b_acc, best_lr=b_lr, window_decades=w.decades,
                   window_lr_lo=w.lr_lo, window_lr_hi=w.lr_hi, window_n=w.n, window_open=w.open,
                   window_edge_lo=w.lo, window_edge_hi=w.hi, stable_range=s_range, stable_std=s_std,
                   lr_a=lrs[0], lr_b=lrs[1], acc_a=a, acc_b=b, acc_a_how=how_a, acc_b_how=how_b,
                   acc_diff=a - b, acc_diff_how=_how(how_a, how_b), lr_regret=lr_regret(x, y, div))
        for d, wd in fixed.items():
            row[window_col(d)] = wd.decades
            row[window_col(d) + "_open"] = wd.open
        row.update({p: float(v) for p, v in means[(group, seed)].items()})
        # the budget of the members that ran to the end (a diverged one stopped early)
        row.update({p: float(ok_means.get((group, seed), {}).get(p, np.nan)) for p in BUDGET})
        row.update({f"top_{m}": float(tops.get((group, seed), {}).get(m, np.nan)) for m in metrics})
        rows.append(row)
    cols = [*prep.keys, "group", "seed", "metric", "delta", "n_lrs", "n_members", "n_diverged",
            "diverged_share", "lr_stable_max", "lr_diverge_min", "best_acc", "best_lr", "window_decades",
            "window_lr_lo", "window_lr_hi", "window_n", "window_open", "window_edge_lo", "window_edge_hi",
            "stable_range", "stable_std", "lr_a", "lr_b", "acc_a", "acc_b", "acc_a_how", "acc_b_how",
            "acc_diff", "acc_diff_how", "lr_regret",
            *[c for d in PROFILE_DELTAS for c in (window_col(d), window_col(d) + "_open")],
            *PREDICTORS, *CONTROL, *BUDGET, *SPEED,
            *[f"top_{m}" for m in metrics]]
    return pd.DataFrame(rows, columns=cols)


def window_col(delta: float) -> str:
    """The column of the robust window at a fixed tolerance, e.g. ``window_at_2``."""
    return f"window_at_{delta:g}"
