"""Tables: the paper's layout (rows method x LR, columns PR, last rows Acc. diff) and readable versions
of the measure tables, as Markdown and CSV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.measures import (
    Prepared,
    fmt_lr,
    fmt_num,
    fmt_pm,
    lr_curves,
    prepare,
    same_level,
    sensitivity_table,
)

METHOD_ORDER = ["scratch", "l1", "greg", "orthp", "tpp-nobn", "tpp-korth", "tpp"]
METHOD_LABELS = {"l1": "L1", "tpp": "TPP", "greg": "GReg-1", "tpp-nobn": "TPP w/o BN reg.",
                 "tpp-korth": "TPP (kernel orth.)", "orthp": "L1+OrthP", "scratch": "Scratch"}


class TableUnavailable(ValueError):
    """The study cannot give this table (e.g. LR sampled continuously: the paper table needs a grid)."""


def method_label(method: str, growth: float = np.nan, show_growth: bool = False) -> str:
    label = METHOD_LABELS.get(method, method)
    if show_growth and growth is not None and np.isfinite(growth):
        label += f" (growth {fmt_lr(growth)})"
    return label


def method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def fmt_pr(pr: float) -> str:
    return f"{pr:g}" if pr is not None and np.isfinite(pr) else "–"


@dataclass
class PaperTable:
    """The paper's table: ``mean``/``sd``/``n`` indexed by (finetune LR, method) rows, PR columns; the
    last rows are Acc. diff = acc(lrs[0]) - acc(lrs[1]) per method (seed-paired)."""

    mean: pd.DataFrame
    sd: pd.DataFrame
    n: pd.DataFrame
    metric: str
    lrs: tuple[float, float]

    def text(self, digits: int = 2) -> pd.DataFrame:
        """Cells as 'mean ± std' strings (signed for the Acc. diff rows)."""
        out = pd.DataFrame(index=self.mean.index, columns=self.mean.columns, dtype=object)
        for (lr_label, method) in self.mean.index:
            signed = lr_label.startswith("Δ")
            for pr in self.mean.columns:
                out.loc[(lr_label, method), pr] = fmt_pm(self.mean.loc[(lr_label, method), pr],
                                                         self.sd.loc[(lr_label, method), pr], digits, signed)
        out = out.reset_index()
        out.columns = ["finetune LR", "method", *[f"PR {fmt_pr(p)}" for p in self.mean.columns]]
        return out

    def to_markdown(self, digits: int = 2) -> str:
        a, b = fmt_lr(self.lrs[0]), fmt_lr(self.lrs[1])
        return (markdown_table(self.text(digits))
                + f"\n\nCells: {self.metric} (%), mean ± std over seeds. Δ rows: Acc. diff = acc({a}) − "
                  f"acc({b}), per seed, then mean ± std.\n")

    def to_csv(self, path: str | Path | None = None) -> str:
        """Wide CSV in the paper's layout with numeric columns '<PR> mean', '<PR> std', '<PR> n'."""
        frame = self.mean.index.to_frame(index=False)
        frame.columns = ["finetune LR", "method"]
        for pr in self.mean.columns:
            frame[f"{fmt_pr(pr)} mean"] = self.mean[pr].to_numpy()
            frame[f"{fmt_pr(pr)} std"] = self.sd[pr].to_numpy()
            frame[f"{fmt_pr(pr)} n"] = self.n[pr].to_numpy()
        text = frame.to_csv(index=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def paper_table(trials: pd.DataFrame | Prepared, *, metric: str = "best_acc",
                lrs: tuple[float, float] = (1e-3, 1e-2), rel_tol: float = 0.01,
                lr_mode: str = "auto", methods: list[str] | None = None) -> PaperTable:
    """The paper's table (rows method x LR, LRs descending; columns PR; cells mean ± std over seeds;
    last rows Acc. diff per method). Raises TableUnavailable unless the study holds a grid of LRs."""
    prep = trials if isinstance(trials, Prepared) else prepare(trials, metric, rel_tol=rel_tol,
                                                                lr_mode=lr_mode)
    if prep.results.empty:
        raise TableUnavailable("paper table: the study has no finished trials with an accuracy yet")
    if prep.lr_axis.mode != "grid":
        raise TableUnavailable("paper table: the study sampled the LR continuously (no grid of LRs); "
                               "see the sensitivity table for Acc. diff by interpolation")
    curves = lr_curves(prep)
    sens = sensitivity_table(prep, lrs=lrs)
    if methods is not None:
        curves = curves[curves["method"].isin(methods)]
        sens = sens[sens["method"].isin(methods)]
    prs = sorted(curves["pr"].dropna().unique())
    uniq = sens[["method", "growth"]].drop_duplicates()  # (NaN growth rows count as one)
    groups = sorted(zip(uniq["method"], uniq["growth"].astype(float), strict=True),
                    key=lambda mg: (method_sort_key(mg[0]), -1 if not np.isfinite(mg[1]) else mg[1]))
    multi = {m for m in {mg[0] for mg in groups} if sum(mg[0] == m for mg in groups) > 1}
    index, means, sds, ns = [], [], [], []
    for lr in sorted(curves["lr"].unique(), reverse=True):
        for m, g in groups:
            sub = curves[(curves["method"] == m) & curves["growth"].map(lambda x, g=g: same_level(x, g))
                         & np.isclose(curves["lr"], lr)]
            if sub.empty:
                continue
            index.append((fmt_lr(lr), method_label(m, g, m in multi)))
            cells = {pr: sub[np.isclose(sub["pr"], pr)] for pr in prs}
            means.append([c["mean"].iloc[0] if len(c) else np.nan for c in cells.values()])
            sds.append([c["sd"].iloc[0] if len(c) else np.nan for c in cells.values()])
            ns.append([c["n"].iloc[0] if len(c) else 0 for c in cells.values()])
    diff_label = f"Δ ({fmt_lr(lrs[0])} − {fmt_lr(lrs[1])})"
    for m, g in groups:
        sub = sens[(sens["method"] == m) & sens["growth"].map(lambda x, g=g: same_level(x, g))]
        cells = {pr: sub[np.isclose(sub["pr"], pr)] for pr in prs}
        index.append((diff_label, method_label(m, g, m in multi)))
        means.append([c["acc_diff"].iloc[0] if len(c) else np.nan for c in cells.values()])
        sds.append([c["acc_diff_sd"].iloc[0] if len(c) else np.nan for c in cells.values()])
        ns.append([c["acc_diff_n"].iloc[0] if len(c) else 0 for c in cells.values()])
    idx = pd.MultiIndex.from_tuples(index, names=["finetune LR", "method"])
    cols = pd.Index(prs, name="pr")
    return PaperTable(pd.DataFrame(means, idx, cols, dtype=float), pd.DataFrame(sds, idx, cols, dtype=float),
                      pd.DataFrame(ns, idx, cols).astype(int), prep.metric, tuple(lrs))


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


def sensitivity_text(sens: pd.DataFrame) -> pd.DataFrame:
    """The sensitivity table with readable column names and 'mean ± std' cells."""
    lrs = sens.attrs.get("lrs", (1e-3, 1e-2))
    window = sens.attrs.get("window", (np.nan, np.nan))
    rows = []
    for r in sens.sort_values(["pr", "method"], key=_sort_key).itertuples(index=False):
        rows.append({
            "method": method_label(r.method), "PR": fmt_pr(r.pr),
            "growth": fmt_lr(r.growth), "seeds": r.n_seeds, "LRs": r.n_lrs,
            "best acc (%)": fmt_pm(r.best_acc, r.best_acc_sd), "best LR": fmt_lr(r.best_lr),
            "acc range over LR": fmt_pm(r.acc_range, r.acc_range_sd),
            "acc std over LR": fmt_pm(r.acc_std, r.acc_std_sd),
            f"Acc. diff ({fmt_lr(lrs[0])} − {fmt_lr(lrs[1])})": fmt_pm(r.acc_diff, r.acc_diff_sd, signed=True)
            + (" (interp.)" if r.acc_diff_how == "interpolated" else ""),
            f"mean acc {fmt_lr(window[0])}…{fmt_lr(window[1])}": fmt_pm(r.robust, r.robust_sd),
            "diverged": f"{r.n_diverged}/{r.n_trials}", "failed": r.n_failed,
            "JSV after removal": fmt_num(r.jsv_after_removal, 4),
        })
    return pd.DataFrame(rows)


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "method":
        return col.map(lambda m: method_sort_key(m)[0])
    return col


def importance_text(imp: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, parameter): each evaluator's importance with its rank, and fANOVA's share of
    the accuracy variance explained."""
    rows = []
    for (method, param), g in imp.groupby(["method", "param"], sort=False):
        row = {"method": method_label(method), "parameter": param}
        for ev in ("PED-ANOVA", "fANOVA"):
            hit = g[g["evaluator"] == ev]
            row[f"{ev} importance (rank)"] = (f"{hit['importance'].iloc[0]:.3f} (#{int(hit['rank'].iloc[0])})"
                                               if len(hit) else "–")
        fa = g[g["evaluator"] == "fANOVA"]["variance_fraction"]
        ok = len(fa) and np.isfinite(fa.iloc[0])
        row["variance explained (fANOVA)"] = f"{100 * fa.iloc[0]:.1f}%" if ok else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def divergence_text(div: pd.DataFrame) -> pd.DataFrame:
    """Diverged / finished trials per (method, PR, growth) row and LR column."""
    if div.empty:
        return pd.DataFrame({"diverged": ["no finished trials"]})
    d = div.copy()
    d["LR"] = [fmt_lr(a) if np.isclose(a, b) else f"{fmt_lr(a)}…{fmt_lr(b)}"
               for a, b in zip(d["lr_low"], d["lr_high"], strict=True)]
    d["cell"] = [f"{k}/{n}" for k, n in zip(d["n_diverged"], d["n"], strict=True)]
    keys = [c for c in ("method", "pr", "growth") if c in d]
    order = d.drop_duplicates("LR").sort_values("lr")["LR"].tolist()
    rows = []
    for key, g in d.groupby(keys, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        labels = dict(zip(keys, key, strict=True))
        row = {"method": method_label(labels["method"]) if "method" in labels else "all"}
        if "pr" in labels:
            row["PR"] = fmt_pr(labels["pr"])
        if "growth" in labels:
            row["growth"] = fmt_lr(labels["growth"])
        cells = dict(zip(g["LR"], g["cell"], strict=True))
        row.update({f"LR {lr}": cells.get(lr, "") for lr in order})
        rows.append(row)
    return pd.DataFrame(rows)
