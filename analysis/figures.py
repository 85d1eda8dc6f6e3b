"""Figures (matplotlib, Agg; no pyplot state) that read without the paper: titles, units, log LR axes.

Each figure is skipped with a note when the study lacks the data for it (one PR, no growth levels, no
histories...); a figure never stops the report. Where one curve per method is drawn, a method studied at
several growth rates is shown at its most-studied growth (the growth figure shows them all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from analysis.load import StudyData
from analysis.measures import (
    Prepared,
    fmt_lr,
    lr_curves,
    prepare,
    reference_growth,
    same_level,
    sensitivity_table,
    trainability_relation,
)
from analysis.tables import fmt_pr, method_label, method_sort_key

COLORS = {"l1": "tab:red", "tpp": "tab:blue", "greg": "tab:orange", "scratch": "tab:gray",
          "orthp": "tab:green", "tpp-nobn": "tab:purple", "tpp-korth": "tab:brown"}
_EXTRA = ["tab:olive", "tab:cyan", "tab:pink", "black"]


class _Skip(Exception):
    """The study lacks what this figure needs; the message says what."""


@dataclass
class FigureSet:
    """PNG paths and captions by figure name, and notes on the figures that were skipped."""

    paths: dict[str, Path] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Ctx:
    name: str
    prep: Prepared
    sens: pd.DataFrame
    curves: pd.DataFrame
    ref: dict
    epochs: pd.DataFrame | None
    treatment: str
    baseline: str

    def methods(self, frame: pd.DataFrame) -> list[str]:
        return sorted(frame["method"].unique(), key=method_sort_key)

    def at_ref(self, frame: pd.DataFrame) -> pd.DataFrame:
        keep = [same_level(g, self.ref.get(m, np.nan)) for m, g in zip(frame["method"], frame["growth"],
                                                                       strict=True)]
        return frame[np.asarray(keep, dtype=bool)] if len(frame) else frame

    def label(self, method: str) -> str:
        g = self.ref.get(method, np.nan)
        several = self.prep.results.loc[self.prep.results["method"] == method, "growth"].nunique() > 1
        return method_label(method, g, several)


def color(method: str) -> str:
    if method in COLORS:
        return COLORS[method]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]


def make_figures(data: StudyData | pd.DataFrame, out_dir: str | Path, *, epochs: pd.DataFrame | None = None,
                 metric: str = "best_acc", lrs: tuple[float, float] = (1e-3, 1e-2),
                 window: tuple[float, float] | None = None, treatment: str = "tpp", baseline: str = "l1",
                 rel_tol: float = 0.01, lr_mode: str = "auto", dpi: int = 110) -> FigureSet:
    """Write every figure the study has data for as PNG into `out_dir`; returns paths, captions, notes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(data, StudyData):
        name, trials, epochs = data.name, data.trials, data.epochs if epochs is None else epochs
    else:
        name, trials = "study", data
    result = FigureSet()
    try:
        prep = prepare(trials, metric, rel_tol=rel_tol, lr_mode=lr_mode)
    except ValueError as exc:
        result.notes.append(f"no figures: {exc}")
        return result
    if prep.results.empty:
        result.notes.append("no figures: the study has no finished trials yet")
        return result
    sens = sensitivity_table(prep, lrs=lrs, window=window)
    ctx = _Ctx(name, prep, sens, lr_curves(prep), reference_growth(prep), epochs, treatment, baseline)
    for fig_name, fn in FIGURES.items():
        try:
            fig, caption = fn(ctx)
        except _Skip as skip:
            result.notes.append(f"figure '{fig_name}' skipped: {skip}")
            continue
        except Exception as exc:  # noqa: BLE001 - a figure must never stop the report; say what broke
            result.notes.append(f"figure '{fig_name}' failed: {type(exc).__name__}: {exc}")
            continue
        path = out / f"{fig_name}.png"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        result.paths[fig_name] = path
        result.captions[fig_name] = caption
    return result


# -------------------------------------------------------------------------------------------- figures

def _grid(n: int, max_cols: int = 4, w: float = 4.4, h: float = 3.6):
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _band(ax, x, mean, lo, hi, col, label, marker):
    ax.plot(x, mean, color=col, marker=marker, ms=4, lw=1.8, label=label)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.sum() >= 2 and np.any(hi[ok] > lo[ok]):
        ax.fill_between(x[ok], lo[ok], hi[ok], color=col, alpha=0.18, lw=0)


def _seed_note(ctx: _Ctx) -> str:
    n = int(ctx.prep.results["seed"].nunique())
    if ctx.prep.pooled:
        return f"{n} seeds pooled: too few LRs per seed for a band"
    if n >= 5:
        return f"band: 95% bootstrap CI over {n} seeds"
    return f"band: ±1 std over {n} seeds" if n > 1 else "one seed (no band)"


def fig_acc_vs_lr(ctx: _Ctx):
    curves = ctx.at_ref(ctx.curves)
    if curves["lr"].nunique() < 2:
        raise _Skip("the study has one LR only (needs at least two)")
    prs = sorted(curves["pr"].unique())
    fig, axes = _grid(len(prs))
    res = ctx.at_ref(ctx.prep.results)
    grid = ctx.prep.lr_axis.mode == "grid"
    for ax, pr in zip(axes, prs, strict=True):
        for m in ctx.methods(curves):
            c = curves[(curves["method"] == m) & np.isclose(curves["pr"], pr)].sort_values("lr")
            if c.empty:
                continue
            boot = ctx.prep.results["seed"].nunique() >= 5
            lo = (c["lo"] if boot else c["mean"] - c["sd"]).to_numpy()
            hi = (c["hi"] if boot else c["mean"] + c["sd"]).to_numpy()
            _band(ax, c["lr"].to_numpy(), c["mean"].to_numpy(), lo, hi, color(m), ctx.label(m),
                  "o" if grid else None)
            pts = res[(res["method"] == m) & np.isclose(res["pr"], pr)]
            ok, div = pts[~pts["diverged"]], pts[pts["diverged"]]
            ax.scatter(ok["lr_raw"], ok["acc"], s=10, color=color(m), alpha=0.35, lw=0)
            ax.scatter(div["lr_raw"], div["acc"], s=28, color=color(m), marker="x")
        ax.set_xscale("log")
        ax.set_title(f"pruning ratio {fmt_pr(pr)}")
        ax.set_xlabel("finetuning LR (log scale)")
        ax.set_ylabel(f"test accuracy, {ctx.prep.metric} (%)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    if ctx.prep.results["diverged"].any():
        handles.append(Line2D([], [], color="k", marker="x", ls="none"))
        labels.append("diverged trial")
    axes[0].legend(handles, labels, fontsize=8, loc="best")
    fig.suptitle(f"{ctx.name}: accuracy vs finetuning LR ({_seed_note(ctx)}; dots: single trials)")
    return fig, ("Accuracy after finetuning against the finetuning LR, one panel per pruning ratio. "
                 "A flat curve means the method is insensitive to the LR.")


def _lr_levels(ctx: _Ctx, res: pd.DataFrame, n_bins: int = 6) -> pd.Series:
    if ctx.prep.lr_axis.mode == "grid":
        return res["lr"]
    lo, hi = np.log10(res["lr"].min()), np.log10(res["lr"].max())
    edges = np.linspace(lo, hi, n_bins + 1)
    centers = 10 ** ((edges[:-1] + edges[1:]) / 2)
    idx = np.clip(np.searchsorted(edges, np.log10(res["lr"]), side="right") - 1, 0, n_bins - 1)
    return pd.Series(centers[idx], index=res.index)


def fig_heatmap(ctx: _Ctx):
    res = ctx.at_ref(ctx.prep.results).copy()
    if res["pr"].nunique() < 2:
        raise _Skip("the study has one pruning ratio (the LR × PR heatmap needs at least two)")
    res["lr_level"] = _lr_levels(ctx, res)
    if res["lr_level"].nunique() < 2:
        raise _Skip("the study has one LR only (needs at least two)")
    # Seed-balanced cell means: average each seed first, then the seeds.
    cell = (res.groupby(["method", "lr_level", "pr", "seed"])["acc"].mean()
            .groupby(["method", "lr_level", "pr"]).mean())
    lrs, prs = sorted(res["lr_level"].unique()), sorted(res["pr"].unique())
    methods = ctx.methods(res)
    mats = {m: np.array([[cell.get((m, lr, pr), np.nan) for pr in prs] for lr in lrs]) for m in methods}
    panels = list(methods)
    diff = None
    if ctx.treatment in mats and ctx.baseline in mats:
        diff = mats[ctx.treatment] - mats[ctx.baseline]
        panels.append("diff")
    fig, axes = _grid(len(panels), max_cols=3, w=4.6, h=4.0)
    allv = np.concatenate([v[np.isfinite(v)] for v in mats.values()])
    vmin, vmax = float(allv.min()), float(allv.max())
    for ax, p in zip(axes, panels, strict=True):
        if p == "diff":
            lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
            im = ax.imshow(diff, origin="lower", aspect="auto", cmap="RdBu", vmin=-lim or -1, vmax=lim or 1)
            t_lab, b_lab = method_label(ctx.treatment), method_label(ctx.baseline)
            title = f"{t_lab} − {b_lab} (blue: {t_lab} better)"
            cbar_label, mat = "accuracy difference (points)", diff
        else:
            im = ax.imshow(mats[p], origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
            title, cbar_label, mat = ctx.label(p), "test accuracy (%)", mats[p]
        if mat.size <= 120:
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    if np.isfinite(mat[i, j]):
                        r, g, b, _ = im.cmap(im.norm(mat[i, j]))
                        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # pick a readable text colour
                        ax.text(j, i, f"{mat[i, j]:.1f}", ha="center", va="center", fontsize=8,
                                color="white" if dark else "black")
        ax.set_xticks(range(len(prs)), [fmt_pr(v) for v in prs])
        ax.set_yticks(range(len(lrs)), [fmt_lr(v) for v in lrs])
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("finetuning LR" + (" (bin centre)" if ctx.prep.lr_axis.mode != "grid" else ""))
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.85)
    fig.suptitle(f"{ctx.name}: accuracy ({ctx.prep.metric}, seed mean) over LR × pruning ratio")
    note = "" if diff is not None else (f" (no difference panel: needs both {ctx.treatment} and "
                                        f"{ctx.baseline} in the study)")
    return fig, "Seed-mean accuracy for each finetuning LR and pruning ratio, per method" + note + "."


def fig_sensitivity_vs_pr(ctx: _Ctx):
    sens = ctx.at_ref(ctx.sens)
    if sens["pr"].nunique() < 2:
        raise _Skip("the study has one pruning ratio (needs at least two)")
    if not np.isfinite(sens["acc_std"]).any():
        raise _Skip("no group has two or more LRs")
    fig, axes = _grid(2, w=5.0)
    for ax, (col, ylabel) in zip(axes, [("acc_std", "accuracy std over LRs (points)"),
                                        ("acc_range", "accuracy range over LRs (points)")],
                                 strict=True):
        for m in ctx.methods(sens):
            s = sens[sens["method"] == m].sort_values("pr")
            ax.errorbar(s["pr"], s[col], yerr=s[f"{col}_sd"].fillna(0), color=color(m), marker="o",
                        capsize=3, label=ctx.label(m))
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{ctx.name}: LR sensitivity vs pruning ratio (lower = less sensitive; error bars: std "
                 "over seeds)")
    return fig, ("How much the accuracy varies across the finetuning LRs studied, per pruning ratio. "
                 "Lower means the method is less sensitive to the finetuning LR.")


def fig_growth(ctx: _Ctx):
    sens = ctx.sens[np.isfinite(ctx.sens["growth"].astype(float))]
    multi = [m for m in ctx.methods(sens) if sens.loc[sens["method"] == m, "growth"].nunique() >= 2]
    if not multi:
        raise _Skip("no method was studied at two or more penalty growth rates")
    fig, axes = _grid(2, w=5.0)
    window = ctx.sens.attrs.get("window", (np.nan, np.nan))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 2)), "P")]
    prs = sorted(sens["pr"].unique())
    for m in multi:
        s = sens[sens["method"] == m]
        for pr in sorted(s["pr"].unique()):
            ls, mk = styles[prs.index(pr) % len(styles)]
            g = s[np.isclose(s["pr"], pr)].sort_values("growth")
            lab = f"{method_label(m)}, PR {fmt_pr(pr)}"
            axes[0].errorbar(g["growth"], g["robust"], yerr=g["robust_sd"].fillna(0), color=color(m),
                             ls=ls, marker=mk, capsize=3, label=lab)
            if np.isfinite(g["time_prune_s"]).any():
                axes[1].plot(g["growth"], g["time_prune_s"], color=color(m), ls=ls, marker=mk, label=lab)
    if not axes[1].lines:
        axes[1].text(0.5, 0.5, "no time_prune_s logged", ha="center", va="center",
                     transform=axes[1].transAxes)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("penalty growth rate (added per update, log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"mean accuracy over LRs {fmt_lr(window[0])}…{fmt_lr(window[1])} (%)")
    axes[1].set_ylabel("regularization (prune-stage) time (s)")
    axes[0].set_title("accuracy vs growth rate")
    axes[1].set_title("regularization cost vs growth rate")
    times = sens["time_prune_s"][np.isfinite(sens["time_prune_s"]) & (sens["time_prune_s"] > 0)]
    if len(times) and times.max() > 20 * times.min():
        axes[1].set_yscale("log")
        axes[1].set_ylabel("regularization (prune-stage) time (s, log scale)")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left",
                   bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{ctx.name}: the penalty growth rate trades accuracy for regularization time")
    return fig, ("Left: accuracy averaged over the finetuning LRs, by penalty growth rate. Right: the time "
                 "spent in the regularization stage (a faster growth rate is cheaper).")


def fig_jsv_vs_sensitivity(ctx: _Ctx):
    s = ctx.sens[np.isfinite(ctx.sens["jsv_after_removal"].astype(float))
                 & np.isfinite(ctx.sens["acc_std"].astype(float))]
    if len(s) < 2:
        raise _Skip("needs jsv_after_removal_mean and an accuracy std over LR for at least two groups")
    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = fig.subplots()
    for m in ctx.methods(s):
        g = s[s["method"] == m]
        ax.scatter(g["jsv_after_removal"], g["acc_std"], color=color(m), s=40, label=method_label(m))
        for r in g.itertuples(index=False):
            extra = f", g {fmt_lr(r.growth)}" if np.isfinite(r.growth) and g["growth"].nunique() > 1 else ""
            ax.annotate(f"PR {fmt_pr(r.pr)}{extra}", (r.jsv_after_removal, r.acc_std), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if (s["jsv_after_removal"] > 0).all():
        ax.set_xscale("log")
    rel = trainability_relation(s)
    rho = f"Spearman ρ = {rel['spearman']:.2f}, n = {rel['n']}" if np.isfinite(rel["spearman"]) else \
        f"n = {rel['n']}"
    ax.set_xlabel("mean Jacobian singular value right after removal (log scale)")
    ax.set_ylabel("accuracy std over LRs (points)")
    ax.set_title(f"{ctx.name}: trainability vs LR sensitivity ({rho})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig, ("Each point is a (method, pruning ratio, growth) group: trainability right after removal "
                 "(isometry means singular values near 1) against the accuracy spread over finetuning LRs.")


def fig_finetune_curves(ctx: _Ctx):
    ep = ctx.epochs
    if ep is None or ep.empty or "test_acc" not in ep or not (ep["stage"] == "finetune").any():
        raise _Skip("no per-epoch finetune/test_acc histories were loaded")
    res = ctx.at_ref(ctx.prep.results)
    if res["lr"].nunique() < 2:
        raise _Skip("the study has one LR only (needs at least two)")
    ep = ep[(ep["stage"] == "finetune") & ep["test_acc"].notna()][["run_id", "epoch", "test_acc"]]
    prs = sorted(res["pr"].unique())
    if len(prs) > 3:
        prs = [prs[0], prs[len(prs) // 2], prs[-1]]
    fig = Figure(figsize=(10.0, 3.4 * len(prs)), layout="constrained")
    axes = fig.subplots(len(prs), 2, squeeze=False)
    for row, pr in zip(axes, prs, strict=True):
        sub = res[np.isclose(res["pr"], pr)]
        for col, (ax, pick) in enumerate(zip(row, ("min", "max"), strict=True)):
            for m in ctx.methods(sub):
                g = sub[sub["method"] == m]
                chosen = g.loc[g.groupby("seed")["lr_raw"].idxmin() if pick == "min"
                               else g.groupby("seed")["lr_raw"].idxmax()]
                curves = ep[ep["run_id"].isin(chosen["run_id"])].pivot_table(
                    index="epoch", columns="run_id", values="test_acc")
                if curves.empty:
                    continue
                x = curves.index.to_numpy(dtype=float)
                mean, sd = curves.mean(axis=1).to_numpy(), curves.std(axis=1).to_numpy()
                lr = float(10 ** np.log10(chosen["lr_raw"]).mean())
                _band(ax, x, mean, mean - sd, mean + sd, color(m), f"{ctx.label(m)} (LR {fmt_lr(lr)})", None)
            ax.set_title(f"PR {fmt_pr(pr)}, {'lowest' if col == 0 else 'highest'} LR studied", fontsize=10)
            ax.set_xlabel("finetuning epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    if not any(ax.lines for ax in axes.ravel()):
        raise _Skip("the finished trials have no finetune/test_acc history")
    fig.suptitle(f"{ctx.name}: finetuning curves at the lowest vs highest LR ({_seed_note(ctx)})")
    return fig, ("Test accuracy during finetuning for the lowest and the highest LR studied "
                 "(per seed, the trial with the lowest / highest LR).")


FIGURES = {
    "acc_vs_lr": fig_acc_vs_lr,
    "heatmap_lr_pr": fig_heatmap,
    "sensitivity_vs_pr": fig_sensitivity_vs_pr,
    "growth": fig_growth,
    "jsv_vs_sensitivity": fig_jsv_vs_sensitivity,
    "finetune_curves": fig_finetune_curves,
}
