"""A short plain-language summary of what the numbers say, computed from the tables (never canned)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import StudyData
from analysis.measures import Prepared, fmt_lr, reference_growth, same_level
from analysis.tables import fmt_pr, method_label, method_sort_key


def _at_ref(sens: pd.DataFrame, ref: dict) -> pd.DataFrame:
    keep = [same_level(g, ref.get(m, np.nan)) for m, g in zip(sens["method"], sens["growth"], strict=True)]
    return sens[np.asarray(keep, dtype=bool)] if len(sens) else sens


def _row(sens: pd.DataFrame, method: str, pr: float):
    hit = sens[(sens["method"] == method) & np.isclose(sens["pr"], pr)]
    return hit.iloc[0] if len(hit) else None


def progress_line(data: StudyData) -> str:
    p = data.progress
    of = f" of {p.planned} planned" if p.planned is not None else ""
    line = (f"The study holds {p.finished} finished trial(s){of} ({p.completed} completed, {p.diverged} "
            f"diverged); {p.failed} failed (excluded from the measures)")
    if p.running:
        line += f"; {p.running} still running"
    if p.not_started:
        line += f"; {p.not_started} not started"
    return line + "."


def summarize(prep: Prepared, sens: pd.DataFrame, *, data: StudyData | None = None,
              importance_lr: pd.DataFrame | None = None, relation: dict | None = None,
              treatment: str = "tpp", baseline: str = "l1") -> list[str]:
    """Sentences for the report, each computed from the study's numbers."""
    lines: list[str] = []
    if data is not None:
        lines.append(progress_line(data))
    if sens.empty:
        lines.append("No finished trials yet: nothing to measure.")
        return lines
    ref = reference_growth(prep)
    s = _at_ref(sens, ref)
    methods = sorted(s["method"].unique(), key=method_sort_key)
    t_lab, b_lab = method_label(treatment), method_label(baseline)
    for m in methods:
        if prep.results.loc[prep.results["method"] == m, "growth"].nunique() > 1:
            lines.append(f"{method_label(m)} was run at several penalty growth rates; it is compared at "
                         f"growth {fmt_lr(ref[m])} (its most-studied level); the growth figure shows "
                         "the others.")
    lines += _sensitivity_lines(s, methods, treatment, baseline, t_lab, b_lab)
    lines += _diff_lines(s, sens.attrs, treatment, baseline, t_lab, b_lab)
    lines += _best_lines(s, methods)
    if importance_lr is not None and not importance_lr.empty:
        lines += _importance_lines(importance_lr, treatment, baseline)
    if relation is not None:
        lines += _relation_lines(relation)
    lines += _divergence_lines(prep)
    return lines


def _sensitivity_lines(s, methods, treatment, baseline, t_lab, b_lab) -> list[str]:
    lines = []
    prs = sorted(s["pr"].unique())
    if treatment in methods and baseline in methods:
        wins, compared = 0, 0
        shown = prs if len(prs) <= 4 else prs[-2:]
        for pr in prs:
            t, b = _row(s, treatment, pr), _row(s, baseline, pr)
            if t is None or b is None or not np.isfinite(t["acc_range"]) or not np.isfinite(b["acc_range"]):
                continue
            compared += 1
            wins += int(t["acc_range"] < b["acc_range"])
            if pr in shown:
                lo, hi = min(t["lr_min"], b["lr_min"]), max(t["lr_max"], b["lr_max"])
                lines.append(f"At PR {fmt_pr(pr)}, {t_lab}'s accuracy varies by {t['acc_range']:.1f} points "
                             f"across LRs {fmt_lr(lo)}…{fmt_lr(hi)} versus {b['acc_range']:.1f} for {b_lab}.")
        if compared:
            lines.append(f"{t_lab} is less LR-sensitive than {b_lab} (smaller accuracy range over the LRs) "
                         f"at {wins} of {compared} pruning ratio(s).")
        return lines
    for m in methods:
        for pr in prs[-2:]:
            r = _row(s, m, pr)
            if r is not None and np.isfinite(r["acc_range"]):
                lines.append(f"At PR {fmt_pr(pr)}, {method_label(m)}'s accuracy varies by "
                             f"{r['acc_range']:.1f} points across LRs "
                             f"{fmt_lr(r['lr_min'])}…{fmt_lr(r['lr_max'])}.")
    if lines:
        lines.append(f"The study lacks {t_lab if treatment not in methods else b_lab}, so no "
                     f"{t_lab}-versus-{b_lab} comparison is made.")
    return lines


def _diff_lines(s, attrs, treatment, baseline, t_lab, b_lab) -> list[str]:
    a, b = (fmt_lr(x) for x in attrs.get("lrs", (1e-3, 1e-2)))
    interp = (s["acc_diff_how"] == "interpolated").any()
    how = " (interpolated in log-LR: the LR was sampled continuously)" if interp else ""
    parts, smaller, compared = [], 0, 0
    for pr in sorted(s["pr"].unique()):
        t, bb = _row(s, treatment, pr), _row(s, baseline, pr)
        vals = [(lab, r) for lab, r in ((t_lab, t), (b_lab, bb))
                if r is not None and np.isfinite(r["acc_diff"])]
        if not vals:
            continue
        parts.append(f"PR {fmt_pr(pr)}: " + ", ".join(f"{lab} {r['acc_diff']:+.2f}" for lab, r in vals))
        if len(vals) == 2:
            compared += 1
            smaller += int(abs(t["acc_diff"]) < abs(bb["acc_diff"]))
    if not parts:
        return [f"Acc. diff = acc({a}) − acc({b}) is not available: no seed covered both LRs."]
    line = f"Acc. diff = acc({a}) − acc({b}){how}: " + "; ".join(parts[:4])
    line += "; …" if len(parts) > 4 else ""
    if compared:
        line += f". |Acc. diff| is smaller for {t_lab} at {smaller} of {compared} ratio(s)"
    return [line + "."]


def _best_lines(s, methods) -> list[str]:
    pr = max(s["pr"].dropna()) if s["pr"].notna().any() else np.nan
    parts = []
    for m in methods:
        r = _row(s, m, pr) if np.isfinite(pr) else None
        if r is not None:
            sd = f" ± {r['best_acc_sd']:.2f}" if np.isfinite(r["best_acc_sd"]) else ""
            parts.append(f"{method_label(m)} {r['best_acc']:.2f}{sd}% (at LR {fmt_lr(r['best_lr'])})")
    if not parts:
        return []
    return [f"Best accuracy at the highest pruning ratio studied (PR {fmt_pr(pr)}): "
            + ", ".join(parts) + "."]


def _importance_lines(lr_imp: pd.DataFrame, treatment: str, baseline: str) -> list[str]:
    first = {treatment: 0, baseline: 1}
    rows = lr_imp.sort_values("method", key=lambda c: c.map(lambda m: (first.get(m, 2), method_sort_key(m))))
    rows = list(rows.itertuples())
    parts = [(f"{100 * r.variance_fraction:.0f}%", method_label(r.method)) for r in rows
             if np.isfinite(r.variance_fraction)]
    ranks = [f"#{int(r.pedanova_rank)} for {method_label(r.method)}" for r in rows
             if np.isfinite(r.pedanova_rank)]
    if not parts and not ranks:
        return []
    if parts:
        line = (f"Under {parts[0][1]}, the finetuning LR explains {parts[0][0]} of the accuracy variance"
                + (", versus " + ", ".join(f"{p} under {m}" for p, m in parts[1:]) if len(parts) > 1 else "")
                + " (fANOVA main effect, over all of each method's trials)")
    else:
        line = "fANOVA could not score the LR"
    if ranks:
        line += "; PED-ANOVA ranks the LR " + ", ".join(ranks) + " among the parameters"
    return [line + "."]


def _relation_lines(rel: dict) -> list[str]:
    rho = rel.get("spearman", np.nan)
    if not np.isfinite(rho):
        return []
    if rho <= -0.3:
        meaning = "groups that keep more trainability after removal are less LR-sensitive"
    elif rho >= 0.3:
        meaning = "higher trainability after removal goes with more LR sensitivity here"
    else:
        meaning = "no clear relation between trainability after removal and LR sensitivity"
    return [f"Across {rel['n']} (method, PR, growth) groups, the rank correlation between the mean Jacobian "
            f"singular value after removal and the accuracy std over LRs is ρ = {rho:+.2f}: {meaning}."]


def _divergence_lines(prep: Prepared) -> list[str]:
    res = prep.results
    n_div = int(res["diverged"].sum())
    if not n_div:
        return ["No trial diverged."]
    parts = []
    for m, g in res[res["diverged"]].groupby("method"):
        lo, hi = g["lr_raw"].min(), g["lr_raw"].max()
        span = fmt_lr(lo) if np.isclose(lo, hi) else f"{fmt_lr(lo)}…{fmt_lr(hi)}"
        parts.append(f"{method_label(m)} {len(g)} (LR {span})")
    return [f"{n_div} of {len(res)} finished trials diverged (they count with the accuracy they reached): "
            + ", ".join(parts) + "."]
