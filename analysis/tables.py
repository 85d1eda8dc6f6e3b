"""Tables for people: the paper's layout (rows LR x method, columns PR, last rows Acc. diff) and readable
versions of the measure tables, as Markdown and HTML. The CSVs next to the report hold the full-precision
numbers; these only round and label them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.curves import PROFILE_DELTAS, window_col
from analysis.fmt import finite, fmt_acc, fmt_dec, fmt_lr, fmt_num, fmt_p, fmt_pr, fmt_share
from analysis.labels import group_title, levels_text, method_label
from analysis.trainability import NAMES


def _iv(mean: float, lo: float, hi: float, fmt=fmt_acc, signed: bool = False) -> str:
    """'86.0 [85.0, 87.0]' (just the mean when there is no interval)."""
    if not finite(mean):
        return "–"
    text = fmt(mean, signed) if signed else fmt(mean)
    if finite(lo) and finite(hi) and not (np.isclose(lo, mean) and np.isclose(hi, mean)):
        text += f" [{fmt(lo, signed) if signed else fmt(lo)}, {fmt(hi, signed) if signed else fmt(hi)}]"
    return text


def _lrs(cell: str) -> str:
    return ", ".join("none" if v == "none" else fmt_lr(float(v)) for v in str(cell).split(";"))


@dataclass
class PaperTable:
    """The paper's table: ``mean``/``sd``/``n`` indexed by (finetune LR, method) rows, PR columns; the
    last rows are Acc. diff = acc(lrs[0]) - acc(lrs[1]) per method (per seed, then mean ± std)."""

    mean: pd.DataFrame
    sd: pd.DataFrame
    n: pd.DataFrame
    metric: str
    lrs: tuple[float, float]

    def text(self, digits: int = 2) -> pd.DataFrame:
        out = self.mean.copy().astype(object)
        for idx in self.mean.index:
            signed = idx[0].startswith("Δ")
            for pr in self.mean.columns:
                m, s = self.mean.loc[idx, pr], self.sd.loc[idx, pr]
                out.loc[idx, pr] = "–" if not finite(m) else (
                    fmt_num(m, digits, signed) + (f" ± {s:.{digits}f}" if finite(s) else ""))
        out = out.reset_index()
        out.columns = ["finetune LR", "method", *[f"PR {fmt_pr(p)}" for p in self.mean.columns]]
        return out

    def to_markdown(self) -> str:
        a, b = fmt_lr(self.lrs[0]), fmt_lr(self.lrs[1])
        return (markdown_table(self.text()) + f"\n\nCells: {self.metric} (%), mean ± std over seeds. Δ rows: "
                f"Acc. diff = acc({a}) − acc({b}) per seed, then mean ± std.\n")

    def to_csv(self, path: str | Path) -> None:
        frame = self.mean.index.to_frame(index=False)
        frame.columns = ["finetune LR", "method"]
        for pr in self.mean.columns:
            frame[f"{fmt_pr(pr)} mean"] = self.mean[pr].to_numpy()
            frame[f"{fmt_pr(pr)} std"] = self.sd[pr].to_numpy()
            frame[f"{fmt_pr(pr)} n"] = self.n[pr].to_numpy()
        frame.to_csv(path, index=False)


def paper_table(curves: pd.DataFrame, groups: pd.DataFrame, keys: list[str]) -> PaperTable:
    """The paper's table from per-curve ``acc_a``/``acc_b``/``acc_diff`` (compute the curves with the
    paper's metric, best_acc). An LR row is marked "(interpolated)" when any seed was interpolated there."""
    lr_a, lr_b = float(curves["lr_a"].iloc[0]), float(curves["lr_b"].iloc[0])
    prs = sorted(groups["pr"].dropna().unique())
    titles = list(dict.fromkeys(group_title(g, keys) for _, g in groups.iterrows()))
    curves = curves.assign(_title=[group_title(r, keys) for _, r in curves.iterrows()])
    index, means, sds, ns = [], [], [], []
    rows = [(lr_b, "acc_b", "acc_b_how"), (lr_a, "acc_a", "acc_a_how")]
    for lr, col, how in sorted(rows, key=lambda r: -r[0]):
        interp = (curves[how] == "interpolated").any()
        label = fmt_lr(lr) + (" (interpolated)" if interp else "")
        for t in titles:
            _add(index, means, sds, ns, (label, t), curves[curves["_title"] == t], col, prs)
    for t in titles:
        _add(index, means, sds, ns, (f"Δ ({fmt_lr(lr_a)} − {fmt_lr(lr_b)})", t),
             curves[curves["_title"] == t], "acc_diff", prs)
    idx = pd.MultiIndex.from_tuples(index, names=["finetune LR", "method"])
    cols = pd.Index(prs, name="pr")
    return PaperTable(pd.DataFrame(means, idx, cols, dtype=float), pd.DataFrame(sds, idx, cols, dtype=float),
                      pd.DataFrame(ns, idx, cols).astype(int), str(curves["metric"].iloc[0]), (lr_a, lr_b))


def _add(index, means, sds, ns, label, c, col, prs) -> None:
    index.append(label)
    vals = [c.loc[np.isclose(c["pr"], pr), col].dropna() for pr in prs]
    means.append([v.mean() if len(v) else np.nan for v in vals])
    sds.append([v.std(ddof=1) if len(v) > 1 else np.nan for v in vals])
    ns.append([len(v) for v in vals])


# ---------------------------------------------------------------------------------------- plain tables

def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return fmt_num(v, 4) if np.isfinite(v) else "–"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def groups_text(groups: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The per-group measures, rounded, with their intervals in brackets."""
    rows = []
    for _, g in groups.iterrows():
        rows.append({
            "method": group_title(g, keys), "PR": fmt_pr(g["pr"]), "seeds": int(g["n_seeds"]),
            "stable up to LR (every seed)":
                fmt_lr(g["lr_stable_max"]) if finite(g["lr_stable_max"]) else "none",
            "stable up to, per seed": _lrs(g["lr_stable_max_seeds"]),
            "diverged": f"{int(g['n_diverged'])}/{int(g['n_members'])} "
                        f"({fmt_share(g['diverged_members_share'])})",
            "best acc (%)": _iv(g["best_acc"], g["best_acc_lo"], g["best_acc_hi"]),
            "best LR per seed": _lrs(g["best_lr_seeds"]),
            "LR regret (points)": _iv(g["lr_regret"], g["lr_regret_lo"], g["lr_regret_hi"]),
            "robust window (decades)": ("≥" if g["window_open_n"] else "")
            + _iv(g["window_decades"], g["window_decades_lo"], g["window_decades_hi"], fmt_dec),
            "window at δ = 1 / 2 / 5 points (decades)": " / ".join(
                ("≥" if g[f"{window_col(d)}_open_n"] else "") + fmt_dec(g[window_col(d)])
                for d in PROFILE_DELTAS),
            "range in stable LRs (points)":
                _iv(g["stable_range"], g["stable_range_lo"], g["stable_range_hi"]),
            "std in stable LRs (points)": _iv(g["stable_std"], g["stable_std_lo"], g["stable_std_hi"]),
            "LR main effect (points)": fmt_acc(g["lr_effect_sd"]),
            "Acc. diff (points)": _iv(g["acc_diff"], g["acc_diff_lo"], g["acc_diff_hi"], signed=True)
            + ("" if g["acc_diff_how"] == "exact" else f" ({g['acc_diff_how']})"),
            "JSV mean after removal": fmt_num(g["jsv_after_removal_mean"], 3),
            "unpruned control's JSV": fmt_num(g["control_jsv_mean"], 3),
            "JSV retained": fmt_num(g["jsv_retained"], 3),
        })
    return pd.DataFrame(rows)


def _baseline_title(r: pd.Series) -> str:
    growth = r["baseline_growth"]
    return method_label(r["baseline"]) + (f" (growth {fmt_lr(growth)})" if finite(growth) else "")


COMPARED = {"lr_regret": "LR regret (points)", "window_decades": "robust window (decades)",
            "best_acc": "best acc (points)", "stable_range": "range in stable LRs (points)"}


def _same_as(cmp: pd.DataFrame, r: pd.Series) -> str:
    """Why a row repeats another measure's numbers exactly, when it genuinely does (not a copy bug)."""
    if r["measure"] != "stable_range":
        return ""
    other = cmp[(cmp["group"] == r["group"]) & (cmp["baseline_group"] == r["baseline_group"])
                & (cmp["measure"] == "best_acc")]
    same = not other.empty and all(np.isclose(other.iloc[0][c], r[c], equal_nan=True)
                                   for c in ("diff", "lo", "hi"))
    if not same:
        return ""
    return ("equals the best-acc difference: in every seed both curves' lowest stable accuracy is the same "
            "(range = best − lowest)")


def comparison_text(cmp: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per compared pair and seed-level measure: the means (≥ for windows that are lower bounds), the
    paired difference, interval, p, outcome; the primary sensitivity measure marked, notes on rows that
    genuinely repeat another's numbers."""
    rows = []
    for _, r in cmp[cmp["measure"].isin(list(COMPARED))].iterrows():
        fmt = fmt_dec if r["measure"] == "window_decades" else fmt_acc
        ge = r["measure"] == "window_decades"
        rows.append({"PR / recipe": levels_text(r, [k for k in keys if k not in ("method", "growth")]),
                     "method": group_title(r, keys), "baseline": _baseline_title(r),
                     "measure": COMPARED[r["measure"]] + (" — primary" if r["primary"] else ""),
                     "seeds": int(r["n"]),
                     "method mean": ("≥" if ge and r["method_open"] else "") + fmt(r["method_mean"]),
                     "baseline mean": ("≥" if ge and r["baseline_open"] else "") + fmt(r["baseline_mean"]),
                     "difference [interval]": _iv(r["diff"], r["lo"], r["hi"], fmt, signed=True),
                     "interval": r["interval"], "p": fmt_p(r["p"]),
                     "outcome": r["sensitivity"] or r["outcome"], "note": _same_as(cmp, r)})
    return pd.DataFrame(rows)


def lr_comparison_text(cmp: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Paired accuracy difference at each LR: rows = compared pairs, columns = LRs, 'diff (p)' cells."""
    at = cmp[cmp["measure"] == "acc_at_lr"]
    if at.empty:
        return pd.DataFrame()
    rows = []
    for _, r in at.groupby(["group", "baseline_group"], sort=False):
        row = {"PR / recipe": levels_text(r.iloc[0], [k for k in keys if k not in ("method", "growth")]),
               "method − baseline": f"{group_title(r.iloc[0], keys)} − {_baseline_title(r.iloc[0])}"}
        for _, x in r.iterrows():
            mark = "†" if x["method_diverged"] or x["baseline_diverged"] else ""
            row[f"LR {fmt_lr(x['lr'])}"] = f"{fmt_acc(x['diff'], True)}{mark} (p {fmt_p(x['p'])})"
        rows.append(row)
    return pd.DataFrame(rows)


def lr_points_text(points: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Seed-mean accuracy at each LR: rows = groups, columns = LRs; † where some seed diverged there."""
    if points.empty:
        return pd.DataFrame()
    rows = []
    for _, r in points.groupby("group", sort=False):
        row = {"method": group_title(r.iloc[0], keys), "PR": fmt_pr(r.iloc[0]["pr"])}
        for _, x in r.iterrows():
            mark = "†" if finite(x["n_diverged"]) and x["n_diverged"] else ""
            row[f"LR {fmt_lr(x['lr'])}"] = fmt_acc(x["acc"]) + mark
        rows.append(row)
    return pd.DataFrame(rows)


def _tau(x: float) -> str:
    return f"{x:+.2f}"


def tau_text(tau: pd.DataFrame) -> pd.DataFrame:
    rows = [{"before finetuning": NAMES[r["predictor"]], "outcome": NAMES[r["outcome"]],
             "curves": r["stratum"],
             "n": int(r["n"]), "Kendall τ [95% CI]": _iv(r["tau"], r["lo"], r["hi"], _tau),
             "p": fmt_p(r["p"])} for _, r in tau.iterrows()]
    return pd.DataFrame(rows)
