"""Figures (matplotlib Agg, no pyplot state), drawn from the same tables the report shows.

Each figure is skipped with a note when the study lacks what it needs; a figure never stops the report.
A *series* is a group without its PR (method, growth, recipe): one line per series, one panel per PR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from analysis.fmt import finite, fmt_level, fmt_lr, fmt_pr
from analysis.labels import KEY_NAMES, color, group_title, levels_text, method_label
from analysis.points import SHORT, Prepared
from analysis.trainability import NAMES, OUTCOMES

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_STYLES = ["-", "--", ":", "-."]
# A method's series (its growth rates, recipe levels) take shades of the method's colour: mixed with black
# or white by these amounts, so every (method, growth) has a colour of its own and its method's hue.
_SHADES = [(None, 0.0), ("black", 0.45), ("white", 0.45), ("black", 0.7), ("white", 0.7)]
LR_TICKS = FuncFormatter(lambda v, _pos: fmt_lr(v))  # 1e-3, 2.2e-2: never 6x10^-2
MAX_BAR_ROWS = 60  # per-seed window bars drawn at full height and labelled, per panel


def _shade(base: str, k: int) -> tuple[float, float, float]:
    to, amount = _SHADES[k % len(_SHADES)]
    rgb = np.array(to_rgb(base))
    if to is None:
        return tuple(rgb)
    return tuple(rgb + (np.array(to_rgb(to)) - rgb) * amount)


class _Skip(Exception):
    """The study lacks what this figure needs; the message says what."""


@dataclass
class FigureSet:
    """PNG paths and captions by figure name, and notes on the figures that were skipped."""

    paths: dict[str, Path] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Tables:
    """Everything a figure may read: the prepared points and the report's tables."""

    name: str
    prep: Prepared
    curves: pd.DataFrame
    groups: pd.DataFrame
    lr_points: pd.DataFrame
    profile: pd.DataFrame
    comparison: pd.DataFrame
    tau: pd.DataFrame
    epochs: pd.DataFrame | None
    delta: float

    @property
    def strata_keys(self) -> list[str]:
        """Keys that make a panel: the PR and the recipe levels."""
        return [k for k in self.prep.keys if k not in ("method", "growth")]

    @property
    def series_keys(self) -> list[str]:
        return [k for k in self.prep.keys if k != "pr"]

    def series_of(self, frame: pd.DataFrame) -> pd.Series:
        return pd.Series([group_title(r, self.prep.keys) for _, r in frame.iterrows()], index=frame.index,
                         dtype=object)

    def style(self, row: pd.Series) -> dict:
        """A group's look in every figure: the colour is its method's hue shaded by its growth level (TPP
        growth 1e-3 and 1e-2 never share a colour, and keep theirs in every panel); the line style and
        marker follow its finetuning-recipe level."""
        method = row["method"]
        mine = self.groups[self.groups["method"] == method]
        growths = sorted({float(g) for g in mine["growth"] if finite(g)})
        g = float(row["growth"]) if finite(row["growth"]) else None
        k = growths.index(g) if g in growths else 0
        recipe = self.prep.recipe
        combos = (sorted({tuple(map(str, r)) for r in self.groups[recipe].itertuples(index=False)})
                  if recipe else [])
        j = combos.index(tuple(str(row[c]) for c in recipe)) if recipe else 0
        return {"color": _shade(color(method), k), "ls": _STYLES[j % len(_STYLES)],
                "marker": _MARKERS[j % len(_MARKERS)]}

    def series_handles(self, frame: pd.DataFrame) -> list[Line2D]:
        """One legend entry per series present in `frame`, in its look."""
        out = []
        for s, r in frame.assign(_s=self.series_of(frame)).groupby("_s", sort=False):
            st = self.style(r.iloc[0])
            out.append(Line2D([], [], color=st["color"], ls=st["ls"], marker=st["marker"], label=s))
        return out

    def band_note(self) -> str:
        n = self.prep.n_seeds
        if n >= 5:
            return f"band: 95% bootstrap CI over {n} seeds"
        return f"band: min–max over {n} seeds" if n > 1 else "one seed (no band)"


def make_figures(tables: Tables, out_dir: str | Path, *, dpi: int = 110) -> FigureSet:
    """Write every figure the study has data for as PNG into `out_dir`; returns paths, captions, notes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = FigureSet()
    if tables.curves.empty:
        result.notes.append("no figures: the study has no finished member runs yet")
        return result
    for fig_name, fn in FIGURES.items():
        try:
            fig, caption = fn(tables)
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


def _grid(n: int, max_cols: int = 3, w: float = 4.8, h: float = 3.8):
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _strata(t: Tables, frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = t.strata_keys
    out = []
    for _, rows in frame.groupby(keys, sort=True, dropna=False):
        out.append((levels_text(rows.iloc[0], keys), rows))
    return out


# -------------------------------------------------------------------------------------------- figures

def fig_acc_vs_lr(t: Tables):
    pts = t.lr_points
    if pts["lr"].nunique() < 2:
        raise _Skip("the study has one LR only (needs at least two)")
    strata = _strata(t, pts)
    ncols = min(len(strata), 3)
    nrows = math.ceil(len(strata) / ncols)
    n_bars = max(int(t.curves.groupby(t.curves["pr"])["group"].size().max()), 1)
    shown = min(n_bars, MAX_BAR_ROWS)  # beyond it the bars get thinner, not the figure taller
    fig = Figure(figsize=(4.9 * ncols, (3.3 + 0.09 * shown) * nrows + 0.6), layout="constrained")
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3.3, 0.35 + 0.09 * shown] * nrows)
    bar_lw = 3 * shown / n_bars
    ladder = t.prep.lr_axis.mode == "ladder"
    first = None
    for k, (title, rows) in enumerate(strata):
        ax = fig.add_subplot(grid[2 * (k // ncols), k % ncols])
        bars = fig.add_subplot(grid[2 * (k // ncols) + 1, k % ncols], sharex=ax)
        first = first or ax
        rows = rows.assign(_s=t.series_of(rows))
        y, ticks = 0, []
        for s, r in rows.groupby("_s", sort=False):
            r = r.sort_values("lr")
            st = t.style(r.iloc[0])
            ax.plot(r["lr"], r["acc"], color=st["color"], ls=st["ls"],
                    marker=st["marker"] if ladder else None, ms=4, lw=1.6, label=s)
            if (r["hi"] > r["lo"]).any():
                ax.fill_between(r["lr"], r["lo"], r["hi"], color=st["color"], alpha=0.15, lw=0)
            group = r["group"].iloc[0]
            div = t.prep.points[(t.prep.points["group"] == group) & t.prep.points["diverged"]]
            ax.scatter(div["lr"], div["acc"], marker="x", s=40, color=st["color"], zorder=5)
            cur = t.curves[t.curves["group"] == group]
            rows_y = y - np.arange(len(cur))
            lo, hi = (pd.to_numeric(cur[c], errors="coerce").to_numpy(float)
                      for c in ("window_edge_lo", "window_edge_hi"))
            has = np.isfinite(lo)
            bars.add_collection(LineCollection(  # one artist per series, not one per seed
                [[(10 ** a, v), (10 ** b, v)] for a, b, v in zip(lo[has], hi[has], rows_y[has], strict=True)],
                colors=[st["color"]], linewidths=bar_lw, capstyle="butt"))
            ticks += [(v, f"s{seed}") for v, seed in zip(rows_y, cur["seed"], strict=True)]
            y -= len(cur)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_ylabel(f"{SHORT.get(t.prep.metric, t.prep.metric)} (%)")
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelbottom=False)
        bars.set_ylim(y - 0.5, 0.5)
        every = math.ceil(len(ticks) / MAX_BAR_ROWS)  # at most MAX_BAR_ROWS labels: every k-th seed's
        bars.set_yticks([v for v, _ in ticks[::every]], [lab for _, lab in ticks[::every]], fontsize=5)
        bars.set_ylabel("window\nper seed", fontsize=7)
        ax.xaxis.set_major_formatter(LR_TICKS)
        ax.xaxis.set_minor_formatter(NullFormatter())
        bars.grid(alpha=0.3, which="both", axis="x")
        bars.set_xlabel("finetuning LR (log scale)" + ("; markers: the ladder" if ladder else ""))
    handles, labels = first.get_legend_handles_labels()
    handles += [Line2D([], [], color="k", marker="x", ls="none"), Line2D([], [], color="k", lw=3)]
    labels += ["diverged (that seed)", f"robust window of one seed (accuracy within {t.delta:g} points of "
               "that seed's best; one row per seed, s0, s1, ...)"]
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=min(4, len(labels)))
    fig.suptitle(f"{t.name}: accuracy vs finetuning LR ({t.band_note()})")
    return fig, ("Accuracy after finetuning against the finetuning LR, one panel per pruning ratio: the seed "
                 "mean at each LR that ran, the band over seeds, × where a seed diverged; below each panel, "
                 f"one bar per seed (labelled s0, s1, ...; past {MAX_BAR_ROWS} seeds every k-th) spanning "
                 f"its robust window (accuracy within {t.delta:g} points of that seed's best). Each (method, "
                 "growth) has its own colour and line style in every figure.")


def fig_heatmap(t: Tables):
    pts = t.lr_points
    if pts["lr"].nunique() < 2:
        raise _Skip("the study has one LR only (needs at least two)")
    pts = pts.assign(_s=t.series_of(pts))
    series = list(dict.fromkeys(pts["_s"]))
    prs = sorted(pts["pr"].unique())
    lrs = sorted(pts["lr"].unique())
    recipe = [k for k in t.strata_keys if k != "pr"]
    if recipe:
        raise _Skip("the recipe varies: see the accuracy-vs-LR panels per recipe level")

    def matrix(s: str, col: str = "acc") -> np.ndarray:
        r = pts[pts["_s"] == s]
        cell = {(lr, pr): v for lr, pr, v in zip(r["lr"], r["pr"], r[col], strict=True)}
        return np.array([[cell.get((lr, pr), np.nan) for pr in prs] for lr in lrs], dtype=float)

    diffs = []
    cmp = t.comparison[t.comparison["measure"] == "acc_at_lr"]
    for (gm, gb), _ in cmp.groupby(["group", "baseline_group"], sort=False):
        sm = t.series_of(t.groups[t.groups["group"] == gm]).iloc[0]
        sb = t.series_of(t.groups[t.groups["group"] == gb]).iloc[0]
        if (sm, sb) not in diffs:
            diffs.append((sm, sb))
    panels = [("acc", s) for s in series] + [("diff", d) for d in diffs]
    fig, axes = _grid(len(panels), w=max(3.2, 0.9 * len(prs) + 2.4), h=max(3.4, 0.32 * len(lrs) + 1.6))
    vals = pts["acc"].to_numpy(float)
    vmin, vmax = np.nanmin(vals), np.nanmax(vals)
    diff_mats = [matrix(p[0]) - matrix(p[1]) for _, p in panels if isinstance(p, tuple)]
    finite_diffs = [np.abs(m[np.isfinite(m)]) for m in diff_mats if np.isfinite(m).any()]
    lim = float(max(x.max() for x in finite_diffs)) if finite_diffs else 1.0  # one range for every diff
    for ax, (kind, p) in zip(axes, panels, strict=True):
        if kind == "acc":
            mat, div = matrix(p), matrix(p, "n_diverged")
            im = ax.imshow(mat, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
            ax.set_title(p, fontsize=9)
            label = "accuracy (%)"
        else:
            mat = matrix(p[0]) - matrix(p[1])
            div = matrix(p[0], "n_diverged") + matrix(p[1], "n_diverged")
            im = ax.imshow(mat, origin="lower", aspect="auto", cmap="RdBu", vmin=-(lim or 1), vmax=lim or 1)
            ax.set_title(f"{p[0]} − {p[1]}\n(blue: {p[0].split(' (')[0]} higher)", fontsize=9)
            label = "difference (points)"
        if mat.size <= 160:
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    if np.isfinite(mat[i, j]):
                        r, g, b, _ = im.cmap(im.norm(mat[i, j]))
                        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                        mark = "†" if finite(div[i, j]) and div[i, j] > 0 else ""
                        ax.text(j, i, f"{mat[i, j]:.1f}{mark}", ha="center", va="center", fontsize=7,
                                color="white" if dark else "black")
        ax.set_xticks(range(len(prs)), [fmt_pr(v) for v in prs])
        ax.set_yticks(range(len(lrs)), [fmt_lr(v) for v in lrs])
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("finetuning LR" + ("" if t.prep.lr_axis.mode == "ladder" else " (interpolated)"))
        fig.colorbar(im, ax=ax, label=label, shrink=0.85)
    fig.suptitle(f"{t.name}: seed-mean {SHORT.get(t.prep.metric, t.prep.metric)} over LR × PR (†: a seed "
                 "diverged there)")
    return fig, ("Seed-mean accuracy at every LR of the ladder and every pruning ratio, per method, and the "
                 "paired difference to the baseline (same LR, same seeds; every difference panel shares one "
                 "symmetric colour range). † marks cells where a seed diverged.")


def fig_window_vs_pr(t: Tables):
    g = t.groups.assign(_s=t.series_of(t.groups))
    fig, axes = _grid(4, max_cols=4, w=4.3)
    panels = [("lr_regret", "LR regret (points lost to a blind LR pick)"),
              ("window_decades", f"robust window (decades within {t.delta:g} points of the best)"),
              ("stable_range", "accuracy range in the stable LRs (points)"),
              ("lr_stable_max", "largest stable LR (each seed; line: every seed)")]
    censored = False
    for ax, (col, ylabel) in zip(axes, panels, strict=True):
        for s, r in g.groupby("_s", sort=False):
            r = r.sort_values("pr")
            st = t.style(r.iloc[0])
            if col == "lr_stable_max":
                ax.plot(r["pr"], r[col], color=st["color"], ls=st["ls"], marker=st["marker"], label=s)
                for pr, seeds in zip(r["pr"], r["lr_stable_max_seeds"], strict=True):
                    vals = [float(v) for v in str(seeds).split(";") if v != "none"]
                    ax.scatter([pr] * len(vals), vals, color=st["color"], s=12, alpha=0.5)
                ax.set_yscale("log")
                shown = sorted({float(v) for x in g["lr_stable_max_seeds"] for v in str(x).split(";")
                                if v != "none"})
                ax.set_yticks(shown, [fmt_lr(v) for v in shown])
                ax.yaxis.set_minor_formatter(NullFormatter())
                continue
            err = np.vstack([r[col] - r[f"{col}_lo"], r[f"{col}_hi"] - r[col]]).clip(min=0)
            ax.errorbar(r["pr"], r[col], yerr=err, color=st["color"], ls=st["ls"], marker=st["marker"],
                        capsize=3, label=s)
            if col == "window_decades":  # a window reaching the ladder's end is a lower bound: open, ↑
                low = r[r["window_open_n"] > 0]
                censored |= len(low) > 0
                ax.scatter(low["pr"], low[col], marker=st["marker"], s=70, facecolors="white",
                           edgecolors=st["color"], zorder=5)
                for pr, v in zip(low["pr"], low[col], strict=True):
                    ax.annotate("", (pr, v + 0.15), (pr, v), arrowprops={"arrowstyle": "->",
                                                                         "color": st["color"]})
        ax.set_xticks(sorted(g["pr"].unique()))
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    iv = "95% bootstrap CI" if t.prep.n_seeds >= 5 else f"min–max over {t.prep.n_seeds} seeds"
    fig.suptitle(f"{t.name}: LR sensitivity vs pruning ratio (error bars: {iv}; lower regret, wider window = "
                 "less sensitive)")
    return fig, ("From the left: the LR regret (the mean accuracy lost by picking the LR blindly from the "
                 "ladder; lower = less sensitive, no tolerance), the robust LR window (wider = less "
                 "sensitive" + ("; open markers with an arrow: some seed's window reaches an end of the "
                                "ladder, so the value is a lower bound" if censored else "") + "), how much "
                 "the accuracy moves inside the stable LR range, and the largest LR that did not diverge.")


def fig_profile(t: Tables):
    prof = t.profile
    if prof.empty or prof["delta"].nunique() < 2:
        raise _Skip("no curve spans more than one accuracy level")
    strata = _strata(t, prof)
    fig, axes = _grid(len(strata), w=4.8, h=3.6)
    for ax, (title, rows) in zip(axes, strata, strict=True):
        for s, r in rows.assign(_s=t.series_of(rows)).groupby("_s", sort=False):
            r = r.sort_values("delta")
            st = t.style(r.iloc[0])
            ax.plot(r["delta"], r["window"], color=st["color"], ls=st["ls"], lw=1.6, label=s)
            if (r["hi"] > r["lo"]).any():
                ax.fill_between(r["delta"], r["lo"], r["hi"], color=st["color"], alpha=0.15, lw=0)
        for d in (1, 2, 5):
            ax.axvline(d, color="gray", lw=0.6, ls=":")
        ax.set_title(title)
        ax.set_xlabel("tolerance δ (accuracy points below each seed's best)")
        ax.set_ylabel("robust LR window (decades)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{t.name}: robustness profile, the robust window at every tolerance ({t.band_note()})")
    return fig, ("The robust LR window as a function of the tolerance δ, from 0 to the group's accuracy "
                 "span: "
                 "higher and further left is less sensitive to the LR. The LR regret is the area above a "
                 "curve (up to the ladder's width), so it summarises every δ at once; dotted lines: the δ = "
                 "1, 2, 5 points of the tables.")


def fig_trainability(t: Tables):
    tau = t.tau[t.tau["stratum"] == "all"]
    preds = list(dict.fromkeys(tau["predictor"]))
    if not preds or not np.isfinite(tau["tau"].astype(float)).any():
        raise _Skip("needs predictors after removal and at least three curves with varying outcomes")
    fig = Figure(figsize=(4.2 * len(preds), 3.6 * len(OUTCOMES)), layout="constrained")
    axes = fig.subplots(len(OUTCOMES), len(preds), squeeze=False)
    prs = sorted(t.curves["pr"].unique())
    for i, y in enumerate(OUTCOMES):
        for j, x in enumerate(preds):
            ax = axes[i, j]
            for _, c in t.curves.assign(_s=t.series_of(t.curves)).groupby("_s", sort=False):
                st = t.style(c.iloc[0])
                for pr, cc in c.groupby("pr"):
                    ax.scatter(cc[x], cc[y], color=st["color"],
                               marker=_MARKERS[prs.index(pr) % len(_MARKERS)],
                               s=22, alpha=0.8)
            r = tau[(tau["predictor"] == x) & (tau["outcome"] == y)].iloc[0]
            txt = (f"τ = {r['tau']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}], n = {int(r['n'])}"
                   if finite(r["tau"]) else f"τ undefined, n = {int(r['n'])}")
            ax.set_title(txt, fontsize=9)
            if x == "jsv_after_removal_mean" and (t.curves[x] > 0).all():
                ax.set_xscale("log")
            ax.set_xlabel(NAMES[x] + (" (%)" if x == "acc_after_removal" else ""))
            ax.set_ylabel(NAMES[y] + (" (%)" if y == "best_acc" else ""))
            ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=h.get_color(), marker="o", ls="none", label=h.get_label())
               for h in t.series_handles(t.curves)]
    handles += [Line2D([], [], color="gray", marker=_MARKERS[k % len(_MARKERS)], ls="none",
                       label=f"PR {fmt_pr(p)}") for k, p in enumerate(prs)]
    axes[0, 0].legend(handles=handles, fontsize=7)
    fig.suptitle(f"{t.name}: do measurements right after removal predict the finetuning outcome? "
                 "(one point per pruned model; Kendall τ, 95% bootstrap CI)")
    return fig, ("Each point is one pruned model (a curve: group and seed): its trainability right after "
                 "removal against its robust LR window and best accuracy. τ is pooled over methods and PRs; "
                 "the table has it within each PR.")


def fig_finetune_curves(t: Tables):
    ep = t.epochs
    if ep is None or ep.empty or "test_acc" not in ep or not (ep["stage"] == "finetune").any():
        raise _Skip("no per-epoch finetune/test_acc histories were loaded")
    if t.prep.lr_axis.mode != "ladder":
        raise _Skip("needs an LR ladder (the lowest and highest LR shared by every curve)")
    ends = (t.prep.lr_axis.levels[0], t.prep.lr_axis.levels[-1])
    mem = t.prep.members
    ep = ep[(ep["stage"] == "finetune") & ep["test_acc"].notna()]
    prs = sorted(mem["pr"].unique())
    prs = [prs[0], prs[len(prs) // 2], prs[-1]] if len(prs) > 3 else prs
    fig = Figure(figsize=(10.0, 3.3 * len(prs)), layout="constrained")
    axes = fig.subplots(len(prs), 2, squeeze=False)
    for row, pr in zip(axes, prs, strict=True):
        for ax, lr in zip(row, ends, strict=True):
            sub = mem[np.isclose(mem["pr"], pr) & np.isclose(mem["lr"], lr)]
            for s, g in sub.assign(_s=t.series_of(sub)).groupby("_s", sort=False):
                st = t.style(g.iloc[0])
                c = ep[ep["run_id"].isin(g["run_id"])].pivot_table(index="epoch", columns="run_id",
                                                                  values="test_acc")
                if c.empty:
                    continue
                x = c.index.to_numpy(float)
                ax.plot(x, c.mean(axis=1), color=st["color"], ls=st["ls"], label=f"{s}, {c.shape[1]} seeds")
                ax.fill_between(x, c.min(axis=1), c.max(axis=1), color=st["color"], alpha=0.15, lw=0)
            end = "lowest" if lr == ends[0] else "highest"
            ax.set_title(f"PR {fmt_pr(pr)}, LR {fmt_lr(lr)} (the ladder's {end})", fontsize=10)
            ax.set_xlabel("finetuning epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    if not any(ax.lines for ax in axes.ravel()):
        raise _Skip("the finished members have no finetune/test_acc history")
    fig.suptitle(f"{t.name}: test accuracy during finetuning at the lowest and highest LR of the ladder "
                 "(band: min–max over seeds)")
    return fig, "Test accuracy per finetuning epoch at both ends of the LR ladder."


def fig_recipe(t: Tables):
    """#15: the robust window and Acc. diff against each varied finetuning dimension (and growth)."""
    g = t.groups
    dims = [k for k in ("growth", *t.prep.recipe)
            if any(r[k].nunique() >= 2 for _, r in g.groupby("method"))]
    if not dims:
        raise _Skip("no growth or finetuning-recipe dimension has two or more levels")
    fig, axes = _grid(2 * len(dims), max_cols=2, w=5.2)
    for k, dim in enumerate(dims):
        levels = sorted(g[dim].dropna().unique(), key=lambda v: (isinstance(v, str), v))
        # one line per level of every other varied dimension: a line joins only groups that differ
        # in `dim` alone; those levels tell the lines apart by their style and legend
        others = [o for o in dims if o != dim]
        combos = sorted({tuple(map(str, row)) for row in g[others].itertuples(index=False)})
        for ax, col, ylabel in ((axes[2 * k], "window_decades", "robust window (decades)"),
                                (axes[2 * k + 1], "acc_diff", "Acc. diff (points)")):
            for key, r in g.dropna(subset=[dim]).groupby(["method", "pr", *others], sort=False, dropna=False):
                m, pr, rest = key[0], key[1], key[2:]
                if r[dim].nunique() < 2:
                    continue
                r = r.assign(_x=[levels.index(v) for v in r[dim]]).sort_values("_x")
                err = np.vstack([r[col] - r[f"{col}_lo"], r[f"{col}_hi"] - r[col]]).clip(min=0)
                st = t.style(r.iloc[0])
                ax.errorbar(r["_x"], r[col], yerr=err, color=st["color"], capsize=3,
                            marker=_MARKERS[sorted(g["pr"].unique()).index(pr) % len(_MARKERS)],
                            linestyle=_STYLES[combos.index(tuple(map(str, rest))) % len(_STYLES)],
                            label=f"{method_label(m)}, " + levels_text(r.iloc[0], ["pr", *others]))
            ax.set_xticks(range(len(levels)), [fmt_level(dim, v) for v in levels])
            ax.set_xlabel(KEY_NAMES.get(dim, dim))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    names = " and ".join(["the penalty growth"] * ("growth" in dims)
                         + ["the finetuning recipe"] * any(d != "growth" for d in dims))
    fig.suptitle(f"{t.name}: robust window and Acc. diff against {names}")
    return fig, (f"How the robust LR window and the paper's Acc. diff change with {names}; a line joins "
                 "groups that differ in that dimension alone.")


def fig_budget(t: Tables):
    c = t.curves
    if "iters_total" not in c or c["iters_total"].nunique() < 2:
        raise _Skip("the members' total iterations (iters_prune + iters_finetune) do not vary")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    prs = sorted(c["pr"].unique())
    for ser, r in c.assign(_s=t.series_of(c)).groupby("_s", sort=False):
        st = t.style(r.iloc[0])
        for pr, rr in r.groupby("pr"):
            ax.scatter(rr["iters_total"], rr["best_acc"], color=st["color"],
                       marker=_MARKERS[prs.index(pr) % len(_MARKERS)], label=f"{ser}, PR {fmt_pr(pr)}")
    ax.set_xscale("log")
    ax.set_xlabel("total iterations of its members that ran to the end (prune + finetune, log scale)")
    ax.set_ylabel(f"best {SHORT.get(t.prep.metric, t.prep.metric)} over the ladder (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"{t.name}: accuracy vs compute budget (one point per curve)", fontsize=10)
    return fig, ("Best accuracy over the LR ladder against the iterations spent pruning and finetuning, "
                 "counted over each curve's members that ran to the end (a diverged member stops early and "
                 "would pull the mean below the budget every completed run had).")


def fig_speed(t: Tables):
    c = t.curves
    axes_of = [(k, label) for k, label in (("speedup", "FLOPs speed-up"),
                                           ("speedup_measured_batch", "measured speed-up, training batch"),
                                           ("speedup_measured_b1", "measured speed-up, batch 1"))
               if k in c and c[k].notna().any()]
    if not axes_of:
        raise _Skip("the runs log no speed-up (FLOPs or measured latency)")
    fig, axes = _grid(len(axes_of), max_cols=3, w=4.6, h=3.8)
    prs = sorted(c["pr"].unique())
    for ax, (key, label) in zip(axes, axes_of, strict=True):
        for ser, r in c.assign(_s=t.series_of(c)).groupby("_s", sort=False):
            st = t.style(r.iloc[0])
            for pr, rr in r.groupby("pr"):
                marker = _MARKERS[prs.index(pr) % len(_MARKERS)]
                ax.scatter(rr[key], rr["best_acc"], color=st["color"], marker=marker,
                           label=f"{ser}, PR {fmt_pr(pr)}")
        ax.set_xlabel(f"{label} (x)")
        ax.set_ylabel(f"best {SHORT.get(t.prep.metric, t.prep.metric)} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{t.name}: accuracy against what pruning saved (one point per curve)", fontsize=10)
    return fig, ("Best accuracy over the LR ladder against the FLOPs speed-up and the speed-up measured on "
                 "the runs' own device (dense / pruned latency; FLOPs overstate it for small layers).")


FIGURES = {
    "acc_vs_lr": fig_acc_vs_lr,
    "robustness_profile": fig_profile,
    "heatmap_lr_pr": fig_heatmap,
    "window_vs_pr": fig_window_vs_pr,
    "trainability": fig_trainability,
    "recipe": fig_recipe,
    "budget": fig_budget,
    "speed": fig_speed,
    "finetune_curves": fig_finetune_curves,
}
