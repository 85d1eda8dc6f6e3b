"""From a study's member runs to the points every measure reads: one row per (group, seed, LR).

- **Accuracy metric**: ``test_acc_at_best_val`` when the study held out a validation split (no selection
  on the test set), else ``best_acc`` (the paper's convention: max test accuracy over epochs); or named.
- **Group keys**: every searched dimension except the LR and the seed -- method, pr, growth and, when they
  vary, the finetuning recipe (schedule, epochs, weight_decay, warmup_epochs, momentum, batch_size). A
  (group, seed) pair is one accuracy-vs-LR *curve*.
- **LR axis**: a *ladder* (the same LRs repeated across curves; LRs within 1% are one ladder point) or
  *scattered* (adaptive samplers: every member its own LR; values at a named LR are interpolated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.fmt import fmt_lr
from analysis.load import FINISHED, StudyData

METRICS = {
    "best_acc": "max test accuracy over finetuning epochs (the paper's convention; the epoch is chosen on "
                "the test set, so it is optimistic)",
    "test_acc_at_best_val": "test accuracy at the epoch with the best accuracy on a held-out validation "
                            "split of the training data (no selection on the test set)",
    "last_acc": "test accuracy after the last finetuning epoch (no selection)",
}
SHORT = {"best_acc": "max test acc over epochs (paper; test-selected)",
         "test_acc_at_best_val": "test acc at best-validation epoch", "last_acc": "last-epoch test acc"}
BASE_KEYS = ("method", "pr", "growth")
RECIPE_KEYS = ("schedule", "epochs", "weight_decay", "warmup_epochs", "momentum", "batch_size")
# measured right after removal; jsv_retained = JSV after removal / the unpruned control's (tpp.run)
PREDICTORS = ("jsv_after_removal_mean", "jsv_retained", "acc_after_removal", "loss_after_removal")
CONTROL = ("control_jsv_mean", "control_acc", "prune_train_acc")
BUDGET = ("iters_prune", "iters_finetune", "iters_total")
SPEED = ("speedup", "speedup_measured_b1", "speedup_measured_batch")  # FLOPs, and measured latency ratios
CARRIED = (*PREDICTORS, *CONTROL, *BUDGET, *SPEED, *METRICS)
_NOT_PARAMS = {"lr", "log10_lr", "seed", "method", "growth", "pr", "has_penalty"}
_LABEL = {"pr": "pr", "growth": "growth", "weight_decay": "wd", "warmup_epochs": "warmup"}


@dataclass(frozen=True)
class LrAxis:
    """mode "ladder": `levels` is the ladder shared by the curves; "scattered": every LR that ran."""

    mode: str
    levels: tuple[float, ...]
    rel_tol: float

    @property
    def per_decade(self) -> float:
        """Ladder points per decade (from the median log10 step); NaN when scattered or < 2 levels."""
        if self.mode != "ladder" or len(self.levels) < 2:
            return np.nan
        return float(1.0 / np.median(np.diff(np.log10(self.levels))))

    def describe(self) -> str:
        lo, hi = (fmt_lr(self.levels[0]), fmt_lr(self.levels[-1])) if self.levels else ("–", "–")
        if self.mode == "ladder":
            return f"a ladder of {len(self.levels)} LRs from {lo} to {hi}"
        return f"LRs scattered by the sampler ({len(self.levels)} values, {lo}…{hi})"


@dataclass
class Prepared:
    """``points``: one row per (group, seed, LR) -- group keys, ``group`` (a label), ``seed``, ``lr``
    (the ladder LR), ``acc`` (the chosen metric), ``diverged`` (every member there diverged), ``n_members``,
    ``n_diverged`` (members) and the carried metrics (predictors, iteration counts, each accuracy metric)
    as means.
    ``members``: the finished member rows. ``excluded``: members not measured, by status."""

    points: pd.DataFrame
    members: pd.DataFrame
    keys: list[str]
    recipe: list[str]
    lr_axis: LrAxis
    metric: str
    excluded: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def metric_text(self) -> str:
        return METRICS.get(self.metric, self.metric)

    @property
    def n_seeds(self) -> int:
        return int(self.points["seed"].nunique()) if len(self.points) else 0

    def groups(self) -> pd.DataFrame:
        """One row per group: the keys and its label, in report order (method, then the keys)."""
        if self.points.empty:
            return pd.DataFrame(columns=[*self.keys, "group"])
        g = self.points.drop_duplicates("group")[[*self.keys, "group"]]
        return sort_groups(g, self.keys)


def sort_groups(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    from analysis.labels import method_sort_key

    order = frame.assign(_m=frame["method"].map(method_sort_key)).sort_values(
        ["_m", *[k for k in keys if k != "method"]], na_position="first", kind="stable")
    return order.drop(columns="_m").reset_index(drop=True)


def group_label(method: str, values: dict) -> str:
    """e.g. 'tpp pr=0.9 growth=0.001 epochs=30' (no growth for methods without a penalty)."""
    parts = [str(method)]
    for k, v in values.items():
        if k == "method" or v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        parts.append(f"{_LABEL.get(k, k)}={v:.4g}" if isinstance(v, (int, float, np.number)) else f"{k}={v}")
    return " ".join(parts)


def choose_metric(members: pd.DataFrame, metric: str) -> tuple[str, list[str]]:
    """`metric` ("auto": test_acc_at_best_val when every completed member has it, else best_acc)."""
    if metric != "auto":
        if metric not in members:
            raise ValueError(f"metric: {metric!r} was not logged by this study; logged accuracy metrics: "
                             + (", ".join(m for m in METRICS if m in members) or "none"))
        return metric, []
    done = members[members["status"] == "completed"]
    col = "test_acc_at_best_val"
    if col in done and len(done) and done[col].notna().all():
        return col, []
    if col in done and done[col].notna().any():
        return "best_acc", [f"only some members logged {col}; using best_acc ({METRICS['best_acc']})"]
    return "best_acc", ["the study held out no validation split (data.val_fraction = 0): every table uses "
                        f"best_acc, the {METRICS['best_acc']}"]


def _cluster(values: Sequence[float], rel_tol: float) -> list[list[float]]:
    clusters: list[list[float]] = []
    for v in sorted(float(x) for x in values if np.isfinite(x)):
        if clusters and abs(v - clusters[-1][0]) <= rel_tol * abs(clusters[-1][0]):
            clusters[-1].append(v)
        else:
            clusters.append([v])
    return clusters


def _levels(values: pd.Series, *, log: bool, max_levels: int, n_bins: int, name: str,
            notes: list[str]) -> pd.Series:
    """Keep a few distinct values as levels; bin a continuously sampled knob into `n_bins` bins."""
    num = pd.to_numeric(values, errors="coerce")
    reps = [c[0] for c in _cluster(num.unique(), 1e-6)]
    if len(reps) <= max_levels:
        return num
    lo, hi = min(reps), max(reps)
    edges = np.logspace(np.log10(lo), np.log10(hi), n_bins + 1) if log else np.linspace(lo, hi, n_bins + 1)
    centers = np.sqrt(edges[:-1] * edges[1:]) if log else (edges[:-1] + edges[1:]) / 2
    notes.append(f"{name} was sampled continuously ({len(reps)} values): grouped into {n_bins} "
                 f"{'log-' if log else ''}equal bins, labelled by their centres")
    idx = np.clip(np.searchsorted(edges, num.to_numpy(), side="right") - 1, 0, n_bins - 1)
    return pd.Series(np.where(np.isfinite(num), centers[idx], np.nan), index=values.index)


def _accuracy(df: pd.DataFrame, metric: str) -> pd.Series:
    """The member's accuracy; a diverged member lacking it counts with what it reached before diverging."""
    acc = df[metric].astype(float) if metric in df else pd.Series(np.nan, index=df.index)
    div = df["status"] == "diverged"
    for alt in ("last_acc", "best_acc", "acc_after_removal"):
        if alt in df and alt != metric:
            acc = acc.where(~(div & acc.isna()), df[alt].astype(float))
    return acc


def _recipe_keys(res: pd.DataFrame, extra: Sequence[str]) -> list[str]:
    keys = []
    for k in (*RECIPE_KEYS, *extra):
        if k in res and k not in keys and res[k].nunique(dropna=False) > 1:
            keys.append(k)
    return keys


def _ladder(lr_raw: pd.Series, curve: pd.Series, rel_tol: float, mode: str) -> tuple[str, list[float], dict]:
    """Decide ladder vs scattered; the ladder LR of each raw LR (the most common raw value in its cluster)."""
    clusters = _cluster(lr_raw.unique(), rel_tol)
    to_rep: dict[float, float] = {}
    for c in clusters:
        counts = lr_raw[lr_raw.isin(c)].value_counts()
        rep = float(counts.index[0])
        to_rep.update({v: rep for v in c})
    reps = sorted(set(to_rep.values()))
    if mode == "auto":
        hits = pd.DataFrame({"rep": lr_raw.map(to_rep), "curve": curve}).groupby("rep")["curve"].nunique()
        steps = np.diff(np.log10(reps)) if len(reps) >= 3 else np.array([])
        even = len(steps) > 0 and np.ptp(steps) <= 0.02 * np.median(steps)
        mode = "ladder" if (len(hits) and hits.median() >= 2) or even else "scattered"
    return mode, reps, to_rep


def prepare(data: StudyData | pd.DataFrame, metric: str = "auto", *, rel_tol: float = 0.01,
            lr_mode: str = "auto", group_by: Sequence[str] = (), max_levels: int = 12,
            n_bins: int = 4) -> Prepared:
    """Finished members -> per-(group, seed, LR) points; see the module docstring.

    `lr_mode`: auto | ladder | scattered. `group_by`: extra parameters to group by (beyond method, pr,
    growth and the recipe keys that vary). Failed, interrupted and running members are counted in
    ``excluded``, never measured."""
    if lr_mode not in ("auto", "ladder", "scattered"):
        raise ValueError(f"lr_mode: got {lr_mode!r}; accepted: auto, ladder, scattered")
    trials = data.trials if isinstance(data, StudyData) else data
    params = data.param_names if isinstance(data, StudyData) else list(trials.attrs.get("params", []))
    if trials.empty:
        return Prepared(_points(trials, list(BASE_KEYS)), trials, list(BASE_KEYS), [],
                        LrAxis("scattered", (), rel_tol), "best_acc" if metric == "auto" else metric)
    need = [c for c in ("method", "status", "lr") if c not in trials]
    if need:
        raise ValueError(f"trials: missing column(s) {', '.join(need)} (is this a tpp-study?)")
    unknown = [k for k in group_by if k not in trials]
    if unknown:
        raise ValueError(f"group_by: {unknown[0]!r} is not a parameter of this study's runs; accepted: "
                         + ", ".join(sorted(p for p in params if p in trials)))
    df = trials.copy()
    for col in ("pr", "growth"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    df["seed"] = df.get("seed", 0)
    df["lr"] = pd.to_numeric(df["lr"], errors="coerce")
    res, excluded, notes = _finished(df)
    metric, more = choose_metric(res, metric)
    notes += more
    res["acc"] = _accuracy(res, metric)
    bad = res["acc"].isna() | ~np.isfinite(res["lr"]) | (res["lr"] <= 0)
    if bad.any():
        notes.append(f"{int(bad.sum())} finished member(s) have no {metric} or no LR and are left out")
        res = res[~bad]
    res["diverged"] = res["status"] == "diverged"
    for col, log in (("pr", False), ("growth", True)):
        res[col] = _levels(res[col], log=log, max_levels=max_levels, n_bins=n_bins, name=col, notes=notes)
    recipe = _recipe_keys(res, group_by)
    for k in recipe:
        if pd.api.types.is_numeric_dtype(res[k]):
            res[k] = _levels(res[k], log=k == "weight_decay" and bool((res[k] > 0).all()),
                             max_levels=max_levels, n_bins=n_bins, name=k, notes=notes)
    keys = [*BASE_KEYS, *recipe]
    res["group"] = [group_label(r["method"], {k: r[k] for k in keys})
                    for r in res[keys].to_dict("records")] if len(res) else []
    res["lr_raw"] = res["lr"]
    res = res.reset_index(drop=True)
    curve = res["group"] + " seed=" + res["seed"].astype(str)
    mode, reps, to_rep = _ladder(res["lr_raw"], curve, rel_tol, lr_mode) if len(res) else (lr_mode, [], {})
    if mode == "ladder":
        res["lr"] = res["lr_raw"].map(to_rep)
    axis = LrAxis("scattered" if mode == "auto" else mode,
                  tuple(reps) if mode == "ladder" else tuple(sorted(res["lr"].unique())), rel_tol)
    notes += _hidden_params(res, params, keys)
    points = _points(res, keys)
    if axis.mode == "ladder" and len(points):
        notes += _ladder_gaps(points, axis)
    dup = int((points["n_members"] > 1).sum()) if len(points) else 0
    if dup:
        notes.append(f"{dup} (group, seed, LR) point(s) hold more than one finished member: their accuracy "
                     "is the mean over the non-diverged ones")
    return Prepared(points, res, keys, recipe, axis, metric, excluded, notes)


def _finished(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int], list[str]]:
    """The finished member runs, one per member (a member re-run after a resume keeps its latest finished
    run), and the members never finished, counted by status."""
    done = df["status"].isin(FINISHED)
    res = df[done]
    notes = []
    if "member_id" in df:
        res = res.sort_values("start_time", kind="stable") if "start_time" in res else res
        dup = res["member_id"].notna() & res["member_id"].duplicated(keep="last")
        if dup.any():
            notes.append(f"{int(dup.sum())} member(s) have more than one finished run: the latest is "
                         "measured")
            res = res[~dup]
        rest = df[~done & ~df["member_id"].isin(res["member_id"])]
    else:
        rest = df[~done]
    excluded = {k: int(v) for k, v in rest["status"].value_counts().items()}
    return res.copy(), excluded, notes


def _points(res: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    cols = [*keys, "group", "seed", "lr", "acc", "diverged", "n_members", "n_diverged", *CARRIED]
    if res.empty:
        return pd.DataFrame(columns=cols)
    res = res.copy()
    res["acc_ok"] = res["acc"].where(~res["diverged"])
    carried = [c for c in CARRIED if c in res]
    agg = {"acc": ("acc", "mean"), "acc_ok": ("acc_ok", "mean"), "diverged": ("diverged", "all"),
           "n_members": ("acc", "size"), "n_diverged": ("diverged", "sum"),
           **{c: (c, "mean") for c in carried}}
    pts = res.groupby([*keys, "group", "seed", "lr"], dropna=False, sort=False).agg(**agg).reset_index()
    pts["acc"] = pts["acc_ok"].where(~pts["diverged"], pts["acc"])
    for c in CARRIED:
        if c not in pts:
            pts[c] = np.nan
    return pts.drop(columns="acc_ok")[cols].sort_values(["group", "seed", "lr"], ignore_index=True)


def _ladder_gaps(points: pd.DataFrame, axis: LrAxis) -> list[str]:
    lo, hi = axis.levels[0], axis.levels[-1]
    counts = points.groupby(["group", "seed"])["lr"].nunique()
    short = int((counts < len(axis.levels)).sum())
    if not short:
        return []
    return [f"{short} of {len(counts)} curves miss some of the {len(axis.levels)} ladder LRs "
            f"({fmt_lr(lo)}…{fmt_lr(hi)}): their members failed, were interrupted or have not run; "
            "measures use the LRs present"]


def _hidden_params(res: pd.DataFrame, params: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Parameters that vary inside one (group, seed, LR) cell are averaged over: say so."""
    cand = [p for p in params if p in res and p not in _NOT_PARAMS and p not in keys]
    if not cand or res.empty:
        return []
    cells = res.groupby([*keys, "seed", "lr"], dropna=False)
    varying = [p for p in cand if (cells[p].nunique(dropna=False) > 1).any()]
    varying = [p for p in varying if not p.endswith("_id") and p not in ("run_name",)]
    if not varying:
        return []
    return [f"parameter(s) {', '.join(varying)} vary among members of one (group, seed, LR) point and are "
            "averaged over; pass --group-by to measure them separately"]
