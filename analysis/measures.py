"""LR-sensitivity measures per (method, pruning ratio, growth rate), with their spread across seeds.

Every measure is computed per seed on that seed's accuracy-vs-LR curve, then summarised over seeds
(mean, sample std, and a 95% bootstrap CI of the mean when there are >= 5 seeds; mean +- std otherwise).
Diverged trials are results (their accuracy is what they reached); failed trials are excluded and counted.

LR handling: a study either holds a *grid* of LRs (few distinct values, repeated across trials) or
sampled the LR *continuously*. LRs are matched with a relative tolerance; with continuous sampling, the
accuracy at a named LR is interpolated linearly in log10(LR) within each seed's sampled range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import FINISHED

GROUP = ["method", "pr", "growth"]
MEASURES = ["best_acc", "acc_range", "acc_std", "acc_diff", "robust"]
SENSITIVITY_COLUMNS = [
    *GROUP, "n_trials", "n_seeds", "n_lrs", "lr_min", "lr_max",
    *[f"{m}{s}" for m in MEASURES for s in ("", "_sd", "_lo", "_hi")],
    "best_lr", "acc_diff_n", "acc_diff_how", "spread", "n_diverged", "diverged_share", "n_failed",
    "jsv_after_removal", "time_prune_s",
]


@dataclass(frozen=True)
class LrAxis:
    """How the study covered the LR: "grid" (levels = the grid) or "continuous" (levels = every LR seen)."""

    mode: str
    levels: tuple[float, ...]
    rel_tol: float

    def describe(self) -> str:
        if self.mode == "grid":
            return f"a grid of {len(self.levels)} LRs ({', '.join(fmt_lr(v) for v in self.levels)})"
        lo, hi = (self.levels[0], self.levels[-1]) if self.levels else (math.nan, math.nan)
        return f"LRs sampled continuously ({len(self.levels)} values, {fmt_lr(lo)}…{fmt_lr(hi)})"


@dataclass
class Prepared:
    """Finished trials ready for the measures: an ``acc`` column, grouping levels, the LR axis, notes."""

    results: pd.DataFrame
    failed: pd.DataFrame
    lr_axis: LrAxis
    metric: str
    notes: list[str] = field(default_factory=list)
    pooled: bool = False  # seeds pooled into one curve per group (a design with ~1 LR per seed and group)


# ------------------------------------------------------------------------------------------- formatting

def fmt_lr(x: float) -> str:
    """1e-3 -> '1e-3', 0.0031623 -> '3.2e-3' (compact, as in the paper)."""
    if x is None or not np.isfinite(x) or x <= 0:
        return "–"
    exp = math.floor(math.log10(x) + 1e-9)
    mant = x / 10**exp
    m = f"{mant:.1f}".rstrip("0").rstrip(".")
    if m == "10":
        m, exp = "1", exp + 1
    return f"{m}e{exp}" if m != "1" else f"1e{exp}"


def fmt_num(x: float, digits: int = 2, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_pm(mean: float, sd: float, digits: int = 2, signed: bool = False) -> str:
    """'93.81 ± 0.12' (just the mean when the std is undefined, e.g. one seed)."""
    if mean is None or not np.isfinite(mean):
        return "–"
    s = fmt_num(mean, digits, signed)
    return f"{s} ± {sd:.{digits}f}" if sd is not None and np.isfinite(sd) else s


# ---------------------------------------------------------------------------------------------- helpers

def cluster_values(values: Sequence[float], rel_tol: float) -> list[float]:
    """Sorted representatives of `values` merged when within `rel_tol` of the cluster's first value."""
    reps: list[float] = []
    for v in sorted(float(x) for x in values if x is not None and np.isfinite(x)):
        if not reps or abs(v - reps[-1]) > rel_tol * abs(reps[-1]):
            reps.append(v)
    return reps


def _nearest(value: float, reps: Sequence[float], log: bool = False) -> float:
    """The representative closest to `value` (in log space for LRs)."""
    if not np.isfinite(value) or not reps:
        return value
    arr = np.asarray(reps, dtype=float)
    dist = np.abs(np.log(arr) - np.log(value)) if log else np.abs(arr - value)
    return float(arr[np.argmin(dist)])


def same_level(a: float, b: float) -> bool:
    """Equality of grouping levels where NaN (no growth rate) equals NaN."""
    a_nan = a is None or (isinstance(a, float) and math.isnan(a))
    b_nan = b is None or (isinstance(b, float) and math.isnan(b))
    if a_nan or b_nan:
        return a_nan and b_nan
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)


def spread(values: Sequence[float], n_boot: int = 2000, ci: float = 0.95, min_boot: int = 5) -> dict:
    """Mean, sample std and an interval over seeds: bootstrap percentile CI of the mean with >= `min_boot`
    seeds (resampling seeds with a fixed RNG, so reports are reproducible), else mean +- std."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return {"mean": np.nan, "sd": np.nan, "lo": np.nan, "hi": np.nan, "n": 0}
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if n > 1 else np.nan
    if n >= min_boot:
        idx = np.random.default_rng(0).integers(0, n, size=(n_boot, n))
        means = v[idx].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    elif n > 1:
        lo, hi = mean - sd, mean + sd
    else:
        lo = hi = mean
    return {"mean": mean, "sd": sd, "lo": float(lo), "hi": float(hi), "n": n}


def _levels(values: pd.Series, *, log: bool, max_levels: int, n_bins: int, name: str,
            notes: list[str]) -> pd.Series:
    """Keep a few distinct values as levels; bin a continuously sampled knob into `n_bins` bins."""
    finite = values[np.isfinite(values.astype(float))]
    reps = cluster_values(finite.unique(), 1e-6)
    if len(reps) <= max_levels:
        return values.map(lambda v: _nearest(v, reps) if np.isfinite(v) else np.nan)
    lo, hi = min(reps), max(reps)
    if log:
        edges = np.logspace(np.log10(lo), np.log10(hi), n_bins + 1)
        centers = np.sqrt(edges[:-1] * edges[1:])
    else:
        edges = np.linspace(lo, hi, n_bins + 1)
        centers = (edges[:-1] + edges[1:]) / 2
    notes.append(f"{name} was sampled continuously ({len(reps)} values): grouped into {n_bins} "
                 f"{'log-' if log else ''}equal bins, labelled by their centres")

    def to_bin(v: float) -> float:
        if not np.isfinite(v):
            return np.nan
        i = int(np.clip(np.searchsorted(edges, v, side="right") - 1, 0, n_bins - 1))
        return float(centers[i])

    return values.map(to_bin)


def _accuracy(df: pd.DataFrame, metric: str) -> pd.Series:
    """The trial's accuracy; a diverged trial without it counts with what it reached before diverging."""
    acc = df[metric].astype(float) if metric in df else pd.Series(np.nan, index=df.index)
    diverged = df["status"] == "diverged"
    for alt in ("last_acc", "acc_after_removal"):
        if alt in df and alt != metric:
            acc = acc.where(~(diverged & acc.isna()), df[alt].astype(float))
    return acc


def prepare(trials: pd.DataFrame, metric: str = "best_acc", *, rel_tol: float = 0.01,
            lr_mode: str = "auto", max_levels: int = 8, n_bins: int = 4,
            max_lr_levels: int = 12, pool_seeds: bool | None = None) -> Prepared:
    """Finished trials with ``acc``, grouping levels (PR / growth binned only when sampled
    continuously) and the study's LR axis. `lr_mode`: "auto", "grid" or "continuous".

    `pool_seeds` (None: automatic): a space-filling design may give most (group, seed) pairs a single
    LR, so no per-seed curve exists; the seeds of a group are then pooled into one curve (no spread
    across seeds), and a note says so."""
    if lr_mode not in ("auto", "grid", "continuous"):
        raise ValueError(f"lr_mode: got {lr_mode!r}; accepted: auto, grid, continuous")
    notes: list[str] = []
    need = [c for c in ("method", "status", "lr") if c not in trials]
    if need:
        raise ValueError(f"trials: missing column(s) {', '.join(need)} (is this a tpp-study?)")
    df = trials.copy()
    for col in ("pr", "growth", "seed"):
        if col not in df:
            df[col] = np.nan if col != "seed" else 0
    for col in ("pr", "growth", "lr"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    failed = df[df["status"] == "failed"].copy()
    res = df[df["status"].isin(FINISHED)].copy()
    res["acc"] = _accuracy(res, metric)
    no_acc = res["acc"].isna() | res["lr"].isna()
    if no_acc.any():
        notes.append(f"{int(no_acc.sum())} finished trial(s) have no {metric} or LR and are left out")
        res = res[~no_acc]
    res["diverged"] = res["status"] == "diverged"
    for frame in (res, failed):
        frame["pr_raw"], frame["growth_raw"] = frame["pr"], frame["growth"]
    both = pd.concat([res, failed])
    for col, log in (("pr", False), ("growth", True)):
        lv = _levels(both[col], log=log, max_levels=max_levels, n_bins=n_bins, name=col, notes=notes)
        res[col] = lv.iloc[:len(res)].to_numpy()
        failed[col] = lv.iloc[len(res):].to_numpy()
    reps = cluster_values(res["lr"].unique(), rel_tol)
    mode = lr_mode
    if mode == "auto":
        mode = "grid" if 0 < len(reps) <= max_lr_levels and len(reps) < len(res) else "continuous"
    res["lr_raw"] = res["lr"]
    if mode == "grid":
        res["lr"] = res["lr"].map(lambda v: _nearest(v, reps, log=True))
    axis = LrAxis(mode, tuple(reps if mode == "grid" else sorted(res["lr"].unique())), rel_tol)
    if pool_seeds is None:
        per_seed = res.groupby([*GROUP, "seed"], dropna=False)["lr"].nunique()
        pool_seeds = bool(len(per_seed)) and float(per_seed.median()) < 2 and res["seed"].nunique() > 1
        if pool_seeds:
            notes.append(f"most (method, PR, growth, seed) cells hold a single LR (median "
                         f"{per_seed.median():g}): seeds are pooled into one accuracy-vs-LR curve per group, "
                         "so there is no spread across seeds")
    return Prepared(res.reset_index(drop=True), failed.reset_index(drop=True), axis, metric, notes,
                    pooled=bool(pool_seeds))


# ------------------------------------------------------------------------------------ per-seed measures

def seed_curves(group: pd.DataFrame, pooled: bool = False) -> dict:
    """seed -> (lrs ascending, accuracies); trials repeated at one (seed, LR) are averaged. `pooled`:
    one curve ("pooled") of all seeds' trials, averaged per LR."""
    if pooled:
        s = group.groupby("lr")["acc"].mean().sort_index()
        return {"pooled": (s.index.to_numpy(dtype=float), s.to_numpy(dtype=float))}
    curves = {}
    for seed, g in group.groupby("seed", dropna=False, sort=True):
        s = g.groupby("lr")["acc"].mean().sort_index()
        curves[seed] = (s.index.to_numpy(dtype=float), s.to_numpy(dtype=float))
    return curves


def acc_at(lrs: np.ndarray, accs: np.ndarray, target: float, rel_tol: float,
           interpolate: bool) -> tuple[float, str]:
    """Accuracy at `target` LR: a matching point, else (if allowed) log-LR interpolation inside the range."""
    hit = np.abs(lrs / target - 1.0) <= rel_tol
    if hit.any():
        return float(accs[hit].mean()), "matched"
    if interpolate and len(lrs) >= 2 and lrs[0] <= target <= lrs[-1]:
        return float(np.interp(np.log10(target), np.log10(lrs), accs)), "interpolated"
    return np.nan, "missing"


def window_mean(lrs: np.ndarray, accs: np.ndarray, low: float, high: float, rel_tol: float,
                continuous: bool) -> tuple[float, bool]:
    """Mean accuracy over LRs in [low, high]; returns (value, clipped-to-the-sampled-range).

    Grid: the mean of the grid points inside the window. Continuous: the average of the piecewise-linear
    log-LR interpolant over the window (uniform in log LR), so dense sampling does not weigh more."""
    if not continuous:
        inside = (lrs >= low * (1 - rel_tol)) & (lrs <= high * (1 + rel_tol))
        return (float(accs[inside].mean()) if inside.any() else np.nan), False
    a, b = max(low, lrs[0]), min(high, lrs[-1])
    clipped = a > low * (1 + rel_tol) or b < high * (1 - rel_tol)
    if a > b:
        return np.nan, True
    if math.isclose(a, b):
        return float(np.interp(np.log10(a), np.log10(lrs), accs)), clipped
    x = np.log10(lrs)
    xa, xb = np.log10(a), np.log10(b)
    knots = np.concatenate([[xa], x[(x > xa) & (x < xb)], [xb]])
    y = np.interp(knots, x, accs)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(knots)) / (xb - xa)), clipped


def _seed_measures(lrs, accs, *, lrs_diff, window, rel_tol, continuous) -> dict:
    a, how_a = acc_at(lrs, accs, lrs_diff[0], rel_tol, continuous)
    b, how_b = acc_at(lrs, accs, lrs_diff[1], rel_tol, continuous)
    robust, clipped = window_mean(lrs, accs, *window, rel_tol, continuous)
    i = int(np.argmax(accs))
    hows = {how_a, how_b}
    how = "missing" if "missing" in hows else "interpolated" if "interpolated" in hows else "matched"
    return {
        "best_acc": float(accs[i]), "best_lr": float(lrs[i]),
        "acc_range": float(accs.max() - accs.min()) if len(accs) > 1 else np.nan,
        "acc_std": float(accs.std(ddof=0)) if len(accs) > 1 else np.nan,
        "acc_diff": a - b, "how": how, "robust": robust, "clipped": clipped,
    }


def sensitivity_table(trials: pd.DataFrame | Prepared, *, metric: str = "best_acc",
                      lrs: tuple[float, float] = (1e-3, 1e-2), window: tuple[float, float] | None = None,
                      rel_tol: float = 0.01, lr_mode: str = "auto", n_boot: int = 2000,
                      ci: float = 0.95) -> pd.DataFrame:
    """One row per (method, pr, growth): how much the accuracy depends on the finetuning LR.

    Columns (each measure: seed mean, then ``_sd`` std over seeds, ``_lo``/``_hi`` its interval):
    ``best_acc`` and ``best_lr`` (the LR maximising the seed-mean curve on a grid; the geometric mean of
    the seeds' best LRs when continuous); ``acc_range`` and ``acc_std`` (max - min and population std of
    accuracy over the LRs studied); ``acc_diff`` = acc(lrs[0]) - acc(lrs[1]) (the paper's "Acc. diff");
    ``robust`` = mean accuracy over the LR `window` (default: the whole range studied);
    ``diverged_share``, ``n_failed``, ``jsv_after_removal`` and ``time_prune_s`` (group means).
    ``attrs["notes"]`` says how LRs were matched or interpolated.
    """
    prep = trials if isinstance(trials, Prepared) else prepare(trials, metric, rel_tol=rel_tol,
                                                                lr_mode=lr_mode)
    res, notes = prep.results, list(prep.notes)
    continuous = prep.lr_axis.mode == "continuous"
    if window is None:
        window = (float(res["lr"].min()), float(res["lr"].max())) if len(res) else (np.nan, np.nan)
    rows, hows, clipped_any = [], set(), False
    for key, g in res.groupby(GROUP, dropna=False, sort=True):
        curves = seed_curves(g, prep.pooled)
        per_seed = [_seed_measures(x, y, lrs_diff=lrs, window=window, rel_tol=prep.lr_axis.rel_tol,
                                   continuous=continuous) for x, y in curves.values()]
        row = dict(zip(GROUP, key, strict=True))
        row.update(n_trials=len(g), n_seeds=int(g["seed"].nunique()), n_lrs=int(g["lr"].nunique()),
                   lr_min=float(g["lr"].min()), lr_max=float(g["lr"].max()))
        for m in MEASURES:
            s = spread([p[m] for p in per_seed], n_boot=n_boot, ci=ci)
            row.update({m: s["mean"], f"{m}_sd": s["sd"], f"{m}_lo": s["lo"], f"{m}_hi": s["hi"]})
            if m == "acc_diff":
                row["acc_diff_n"] = s["n"]
        row["best_lr"] = _best_lr(g, per_seed, continuous)
        how = {p["how"] for p in per_seed}
        row["acc_diff_how"] = ("missing" if how == {"missing"} else "partly missing" if "missing" in how
                               else "interpolated" if "interpolated" in how else "matched")
        hows |= how
        clipped_any |= any(p["clipped"] for p in per_seed)
        row["spread"] = "pooled seeds" if prep.pooled else "bootstrap95" if len(curves) >= 5 else "std"
        fail = prep.failed
        row["n_failed"] = int(sum(m == key[0] and same_level(p, key[1]) and same_level(gr, key[2])
                                  for m, p, gr in zip(fail["method"], fail["pr"], fail["growth"],
                                                      strict=True)))
        row["n_diverged"] = int(g["diverged"].sum())
        row["diverged_share"] = float(g["diverged"].mean())
        for col, out in (("jsv_after_removal_mean", "jsv_after_removal"), ("time_prune_s", "time_prune_s")):
            row[out] = float(g[col].mean()) if col in g else np.nan
        rows.append(row)
    table = pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)
    a, b = fmt_lr(lrs[0]), fmt_lr(lrs[1])
    if "interpolated" in hows:
        notes.append(f"Acc. diff = acc({a}) − acc({b}): LR was sampled continuously, so accuracy at "
                     f"{a} and {b} is interpolated linearly in log10(LR) per seed where not measured")
    if "missing" in hows:
        notes.append(f"Acc. diff = acc({a}) − acc({b}) is missing where a seed did not cover both LRs")
    if clipped_any:
        notes.append(f"robustness window {fmt_lr(window[0])}…{fmt_lr(window[1])} extends beyond some "
                     "seeds' sampled LRs; their average covers only the sampled part")
    table.attrs.update(notes=notes, lr_mode=prep.lr_axis.mode, lrs=tuple(lrs), window=tuple(window),
                       metric=prep.metric)
    return table


def _best_lr(g: pd.DataFrame, per_seed: list[dict], continuous: bool) -> float:
    if continuous:
        return float(10 ** np.mean([np.log10(p["best_lr"]) for p in per_seed]))
    seed_means = g.groupby(["seed", "lr"], dropna=False)["acc"].mean().groupby(level="lr").mean()
    return float(seed_means.idxmax())


# ------------------------------------------------------------------------------------ curves and shares

def lr_curves(trials: pd.DataFrame | Prepared, *, metric: str = "best_acc", rel_tol: float = 0.01,
              lr_mode: str = "auto", n_points: int = 30) -> pd.DataFrame:
    """Accuracy vs LR per (method, pr, growth): mean / sd / n over seeds at each LR.

    Grid: at each grid LR. Continuous: on `n_points` log-spaced LRs, each seed interpolated in log LR
    inside its own sampled range (no extrapolation)."""
    prep = trials if isinstance(trials, Prepared) else prepare(trials, metric, rel_tol=rel_tol,
                                                                lr_mode=lr_mode)
    rows = []
    for key, g in prep.results.groupby(GROUP, dropna=False, sort=True):
        curves = seed_curves(g, prep.pooled)
        if prep.lr_axis.mode == "grid":
            grid = np.array(sorted(g["lr"].unique()))
            vals = [[y[np.isclose(x, lr)].mean() if np.isclose(x, lr).any() else np.nan for lr in grid]
                    for x, y in curves.values()]
        else:
            grid = np.logspace(np.log10(g["lr"].min()), np.log10(g["lr"].max()), n_points)
            vals = [[np.interp(np.log10(lr), np.log10(x), y) if x[0] <= lr <= x[-1] else np.nan
                     for lr in grid] for x, y in curves.values()]
        arr = np.asarray(vals, dtype=float)
        for j, lr in enumerate(grid):
            s = spread(arr[:, j])
            if s["n"]:
                rows.append({**dict(zip(GROUP, key, strict=True)), "lr": float(lr), "mean": s["mean"],
                             "sd": s["sd"], "lo": s["lo"], "hi": s["hi"], "n": s["n"]})
    return pd.DataFrame(rows, columns=[*GROUP, "lr", "mean", "sd", "lo", "hi", "n"])


def divergence_table(trials: pd.DataFrame | Prepared, *, by: Sequence[str] = ("method", "pr", "growth"),
                     metric: str = "best_acc", rel_tol: float = 0.01, lr_mode: str = "auto",
                     bins_per_decade: int = 2) -> pd.DataFrame:
    """Share of diverged trials by LR (grid LRs, or log bins of 1/`bins_per_decade` decade when
    continuous), within each `by` group. Failed trials are counted separately, never as diverged."""
    prep = trials if isinstance(trials, Prepared) else prepare(trials, metric, rel_tol=rel_tol,
                                                                lr_mode=lr_mode)
    res = prep.results.copy()
    by = list(by)
    if prep.lr_axis.mode == "grid":
        res["lr_low"] = res["lr_high"] = res["lr"]
    else:
        k = np.floor(np.log10(res["lr"]) * bins_per_decade + 1e-9)
        res["lr_low"], res["lr_high"] = 10 ** (k / bins_per_decade), 10 ** ((k + 1) / bins_per_decade)
        res["lr"] = np.sqrt(res["lr_low"] * res["lr_high"])
    out = (res.groupby([*by, "lr", "lr_low", "lr_high"], dropna=False, sort=True)
           .agg(n=("diverged", "size"), n_diverged=("diverged", "sum")).reset_index())
    out["n_diverged"] = out["n_diverged"].astype(int)
    out["diverged_share"] = out["n_diverged"] / out["n"]
    return out


def reference_growth(prep: Prepared) -> dict[str, float]:
    """Per method, the growth level with the most finished trials (ties: the smallest growth), used
    where a figure shows one curve per method."""
    ref = {}
    for method, g in prep.results.groupby("method", sort=False):
        counts = g["growth"].value_counts(dropna=False)
        best = counts[counts == counts.max()].index
        finite = [v for v in best if np.isfinite(v)]
        ref[method] = min(finite) if finite else np.nan
    return ref


def trainability_relation(sens: pd.DataFrame, *, x: str = "jsv_after_removal",
                          y: str = "acc_std") -> dict:
    """Rank correlation (Spearman) between trainability after removal and LR sensitivity across the
    (method, pr, growth) groups, and the Pearson correlation of log10 JSV with the sensitivity."""
    if x not in sens or y not in sens:
        return {"n": 0, "spearman": np.nan, "pearson_log": np.nan}
    d = sens[[x, y]].astype(float).replace([np.inf, -np.inf], np.nan).dropna()
    n = len(d)
    if n < 3 or d[x].nunique() < 2 or d[y].nunique() < 2:
        return {"n": n, "spearman": np.nan, "pearson_log": np.nan}
    rx, ry = d[x].rank().to_numpy(), d[y].rank().to_numpy()
    spearman = float(np.corrcoef(rx, ry)[0, 1])
    pos = d[d[x] > 0]
    pearson = (float(np.corrcoef(np.log10(pos[x]), pos[y])[0, 1])
               if len(pos) >= 3 and pos[x].nunique() > 1 else np.nan)
    return {"n": n, "spearman": spearman, "pearson_log": pearson}
