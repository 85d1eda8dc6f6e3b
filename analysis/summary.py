"""The verdict block and the summary: sentences built only from the tables the report writes (groups,
curves, comparison, trainability, members), with the rounding of analysis.fmt, so a test can read every
number back from the CSVs. The templates are fixed; change them together with
tests/test_analysis_summary.py, which parses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.fmt import finite, fmt_acc, fmt_dec, fmt_lr, fmt_p, fmt_share
from analysis.labels import KEY_NAMES, group_title, levels_text, method_label
from analysis.load import Progress
from analysis.points import METRICS, Prepared
from analysis.stats import ALPHA, MIN_BOOT, min_pairs, p_floor
from analysis.trainability import NAMES

IVL = {"bootstrap95": "95% CI", "range": "range over seeds"}
SENS_WORDS = {"less sensitive": "{m} is less sensitive to the LR",
              "more sensitive": "{m} is more sensitive to the LR",
              "tie": "no detectable difference in LR sensitivity"}
ACC_WORDS = {"higher": "{m} is more accurate", "lower": "{m} is less accurate",
             "tie": "no detectable difference in best accuracy"}


def primary_name(measure: str, delta: float) -> str:
    """How a verdict names its primary sensitivity measure."""
    return {"lr_regret": "LR regret", "stable_range": "accuracy range over the stable LRs",
            "window_decades": f"robust window at δ = {_points(delta)}"}[measure]


def _unit(measure: str) -> tuple[str, object]:
    return ("decades", fmt_dec) if measure == "window_decades" else ("points", fmt_acc)


@dataclass
class Summary:
    verdict: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def _points(delta: float) -> str:
    return f"{delta:g} point" + ("" if delta == 1 else "s")


def _ge(value: str, open_n: int) -> str:
    return ("≥" if open_n else "") + value


def _where(row: pd.Series, keys: list[str], groups: pd.DataFrame) -> str:
    """'PR 0.9 (TPP growth 1e-3 vs L1)', recipe levels after the PR."""
    g = groups[groups["group"] == row["group"]].iloc[0]
    b = groups[groups["group"] == row["baseline_group"]].iloc[0]
    recipe = levels_text(g, keys, skip=("method", "pr", "growth"))
    head = levels_text(g, ["pr"]) + (f", {recipe}" if recipe else "")

    def who(r):
        grow = levels_text(r, ["growth"])
        return method_label(r["method"]) + (f" {grow}" if grow else "")

    return f"{head} ({who(g)} vs {who(b)})"


def verdict_lines(prep: Prepared, groups: pd.DataFrame, comparison: pd.DataFrame, *, baseline: str,
                  delta: float, alpha: float = ALPHA) -> list[str]:
    """One sentence per compared (method group, baseline group), after the lines saying how to read them.
    The sensitivity part rests on the comparison's primary measure alone (``primary`` rows)."""
    b_lab = method_label(baseline)
    seed_rows = comparison[comparison["primary"].astype(bool) | (comparison["measure"] == "best_acc")]
    if seed_rows.empty or not comparison["primary"].astype(bool).any():
        others = sorted(set(groups["method"]) - {baseline})
        why = ("the study has no other method" if not others
               else "no group of another method matches one of it")
        return [f"No paired comparison with {b_lab}: {why}."]
    measure = str(comparison.loc[comparison["primary"].astype(bool), "measure"].iloc[0])
    lines = [f"Paired comparison with {b_lab} (same LR ladder and seeds; accuracy: {prep.metric}; primary "
             f"sensitivity measure: {primary_name(measure, delta)}, chosen before the analysis with "
             f"--sensitivity; the other measures are descriptive, in the comparison table): a direction is "
             f"stated only when the exact sign-flip test gives p < {alpha:g} and the interval excludes 0. "
             f"Both must hold: an interval can exclude 0 while p cannot fall below 2/2^n with n seeds, so a "
             f"claim needs at least {min_pairs(alpha)} seeds."]
    if measure == "window_decades":
        lines.append("A window marked ≥ reaches an end of the LR ladder: it is a lower bound (a ladder "
                     "extended past that end measures it).")
    ns = sorted({int(n) for n in seed_rows["n"] if n >= 1})
    if ns and ns[0] < MIN_BOOT:
        n_txt = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        line = (f"n = {n_txt} seeds: intervals are wide (the min–max over seeds is shown instead of a "
                "bootstrap CI)")
        if p_floor(ns[-1]) >= alpha:
            line += (f"; with {ns[-1]} seeds the smallest p the test can give is {fmt_p(p_floor(ns[-1]))}, "
                     f"so no difference can be declared (that takes ≥ {min_pairs(alpha)} seeds)")
        lines.append(line + ".")
    for _, rows in seed_rows.groupby(["group", "baseline_group"], sort=False):
        lines.append(_verdict(rows.set_index("measure"), measure, prep.keys, groups, delta))
    return lines


def _verdict(r: pd.DataFrame, measure: str, keys: list[str], groups: pd.DataFrame, delta: float) -> str:
    w, a = r.loc[measure], r.loc["best_acc"]
    where = _where(w, keys, groups)
    m_lab, b_lab = method_label(w["method"]), method_label(w["baseline"])
    name, (unit, fmt) = primary_name(measure, delta), _unit(measure)
    n = int(w["n"])
    if n == 0:
        return f"{where}: cannot compare: {m_lab} and {b_lab} share no seed with a finished curve."
    wm, wb = fmt(w["method_mean"]), fmt(w["baseline_mean"])
    if measure == "window_decades":
        wm, wb = _ge(wm, w["method_open"]), _ge(wb, w["baseline_open"])
    if n == 1:
        return (f"{where}: only 1 shared seed ({name} {wm} vs {wb} {unit}; best accuracy "
                f"{fmt_acc(a['method_mean'])}% vs {fmt_acc(a['baseline_mean'])}%): one seed supports no "
                "claim.")
    return (f"{where}: {name}, the primary measure, is {wm} {unit} for {m_lab} vs {wb} for {b_lab} "
            f"(difference {fmt(w['diff'], True)} {unit}, {IVL[w['interval']]} {fmt(w['lo'], True)} to "
            f"{fmt(w['hi'], True)}, p = {fmt_p(w['p'])}, {n} seeds): "
            f"{SENS_WORDS[w['sensitivity']].format(m=m_lab)}; best accuracy {fmt_acc(a['method_mean'])}% vs "
            f"{fmt_acc(a['baseline_mean'])}% (difference {fmt_acc(a['diff'], True)} points, "
            f"{IVL[a['interval']]} {fmt_acc(a['lo'], True)} to {fmt_acc(a['hi'], True)}, "
            f"p = {fmt_p(a['p'])}): {ACC_WORDS[a['outcome']].format(m=m_lab)}.")


# ------------------------------------------------------------------------------------------- summary

def progress_line(p: Progress) -> str:
    of = f" of {p.planned} planned" if p.planned is not None else ""
    unmeasured = ", ".join(f"{k} {name}" for k, name in ((p.failed, "failed"), (p.interrupted, "interrupted"),
                                                          (p.running, "still running")) if k)
    return (f"The study holds {p.finished} finished member runs{of} ({p.completed} completed, {p.diverged} "
            f"diverged)" + (f"; {unmeasured} (not measured)." if unmeasured else "; none failed."))


def design_line(prep: Prepared, curves: pd.DataFrame) -> str:
    ax = prep.lr_axis
    n_groups, n_seeds, n_curves = curves["group"].nunique(), curves["seed"].nunique(), len(curves)
    lo, hi = fmt_lr(ax.levels[0]), fmt_lr(ax.levels[-1])
    if ax.mode == "ladder":
        short = int((curves["n_lrs"] < len(ax.levels)).sum())
        tail = (f"{short} of {n_curves} curves miss ladder LRs" if short
                else "every curve ran the full ladder")
        per = f" ({ax.per_decade:.0f} per decade)" if finite(ax.per_decade) else ""
        return (f"LR: a ladder of {len(ax.levels)} LRs from {lo} to {hi}{per}, {n_groups} groups × {n_seeds} "
                f"seeds = {n_curves} curves; {tail}.")
    return (f"LR: scattered by the sampler ({len(ax.levels)} distinct LRs from {lo} to {hi}), {n_groups} "
            f"groups, {n_curves} curves: values between the LRs that ran are interpolated in log10 LR.")


def metric_line(prep: Prepared) -> str:
    line = (f"Accuracy in every table but the paper table: {prep.metric} = "
            f"{METRICS.get(prep.metric, prep.metric)}.")
    if prep.metric != "best_acc":
        line += (" The paper table uses best_acc (max test accuracy over epochs, the paper's convention), so "
                 "its Acc. diff rows differ from the Acc. diff below, which uses " + prep.metric + ".")
    return line


def _group_clause(g: pd.Series, keys: list[str], shown: list[str]) -> str:
    stable = (f"stable up to LR {fmt_lr(g['lr_stable_max'])} in every seed" if finite(g["lr_stable_max"])
              else "no LR is stable in every seed")
    seeds = ", ".join(fmt_lr(float(v)) if v != "none" else "none" for v in str(g["best_lr_seeds"]).split(";"))
    window = _ge(fmt_dec(g["window_decades"]), g["window_open_n"])
    return (f"{group_title(g, keys, shown)}: {stable} ({fmt_share(g['diverged_members_share'])} of members "
            f"diverged); best {fmt_acc(g['best_acc'])}% (best LR per seed: {seeds}); robust window {window} "
            f"decades; LR regret {fmt_acc(g['lr_regret'])} points; accuracy range in the stable range "
            f"{fmt_acc(g['stable_range'])} points; LR main "
            f"effect {fmt_acc(g['lr_effect_sd'])} points.")


def pr_lines(groups: pd.DataFrame, keys: list[str]) -> list[str]:
    """One line per PR (and recipe): every group's stable range, best accuracy, window, spread, LR effect."""
    lines = []
    by = [k for k in keys if k not in ("method", "growth")]
    for _, rows in groups.groupby(by, sort=True, dropna=False):
        head = levels_text(rows.iloc[0], by)
        lines.append(f"{head} — " + " ".join(_group_clause(g, keys, by) for _, g in rows.iterrows()))
    return lines


def acc_diff_line(groups: pd.DataFrame, keys: list[str], lrs: tuple[float, float]) -> str:
    hows = set(groups["acc_diff_how"])
    how = ("exact ladder points" if hows == {"exact"}
           else "interpolated in log10 LR" if hows == {"interpolated"}
           else "exact where the LR ran, interpolated between ladder points otherwise; – where an LR is "
                "outside the ladder or diverged")
    by = [k for k in keys if k not in ("method", "growth")]
    parts = []
    for _, rows in groups.groupby(by, sort=True, dropna=False):
        vals = ", ".join(f"{group_title(g, keys, by)} {fmt_acc(g['acc_diff'], True)}"
                         for _, g in rows.iterrows())
        parts.append(f"{levels_text(rows.iloc[0], by)}: {vals}")
    metric = str(groups["metric"].iloc[0])
    return (f"Paper's Acc. diff = acc({fmt_lr(lrs[0])}) − acc({fmt_lr(lrs[1])}) of {metric}, mean over seeds "
            f"({how}): " + "; ".join(parts) + ".")


def tau_line(tau: pd.DataFrame) -> list[str]:
    t = tau[tau["stratum"] == "all"]
    t = t[np.isfinite(t["tau"].astype(float))]
    if t.empty:
        return ["Before vs after finetuning: too few curves, or no variation, for a Kendall τ."]
    parts = []
    for x, rows in t.groupby("predictor", sort=False):
        vals = ", ".join(f"vs {NAMES[r['outcome']]} {fmt_num2(r['tau'])} ({fmt_num2(r['lo'])} to "
                         f"{fmt_num2(r['hi'])})" for _, r in rows.iterrows())
        parts.append(f"{NAMES[x]} {vals}")
    k = int(((t["lo"] > 0) | (t["hi"] < 0)).sum())
    return [f"Before vs after finetuning (Kendall τ over {int(t['n'].max())} curves, 95% CI): "
            + "; ".join(parts) + f". The CI excludes 0 for {k} of {len(t)} pairs. Pooled over methods and "
            "PRs (which move both); the table has τ within each PR."]


def fmt_num2(x: float) -> str:
    return f"{x:+.2f}" if finite(x) else "–"


def which_accuracy_line(curves: pd.DataFrame) -> list[str]:
    parts = [f"{fmt_acc(curves[f'top_{m}'].mean())}% by {m}" for m in METRICS
             if f"top_{m}" in curves and curves[f"top_{m}"].notna().any()]
    if len(parts) < 2:
        return []
    return ["Which accuracy: the best over the LR ladder, mean over curves, is " + ", ".join(parts)
            + " (best_acc picks its epoch on the test set)."]


def divergence_line(prep: Prepared) -> str:
    pts = prep.points
    n_div, n = int(pts["n_diverged"].sum()), int(pts["n_members"].sum())
    if not n_div:
        return f"No member diverged ({n} finished)."
    parts = []
    for m, rows in pts[pts["n_diverged"] > 0].groupby("method", sort=False):
        lrs = ", ".join(fmt_lr(v) for v in sorted(rows["lr"].unique()))
        parts.append(f"{method_label(m)} {int(rows['n_diverged'].sum())} (at LR {lrs})")
    return f"{n_div} of {n} finished members diverged: " + ", ".join(parts) + "."


def summarize(prep: Prepared, progress: Progress, groups: pd.DataFrame, curves: pd.DataFrame,
              comparison: pd.DataFrame, tau: pd.DataFrame, *, baseline: str, lrs: tuple[float, float],
              delta: float, alpha: float = ALPHA) -> Summary:
    """The verdict block and the summary lines of the report."""
    if groups.empty:
        return Summary([], [progress_line(progress), "No finished member runs yet: nothing to measure."])
    lines = [progress_line(progress), design_line(prep, curves), metric_line(prep),
             *pr_lines(groups, prep.keys), acc_diff_line(groups, prep.keys, lrs), *tau_line(tau),
             *which_accuracy_line(curves), divergence_line(prep)]
    if prep.recipe:
        names = ", ".join(KEY_NAMES.get(k, k) for k in prep.recipe)
        lines.insert(2, f"Finetuning recipe varies ({names}): every measure is per recipe level.")
    verdict = verdict_lines(prep, groups, comparison, baseline=baseline, delta=delta, alpha=alpha)
    return Summary(verdict, lines)
