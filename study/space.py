"""The search space: which (method, pr, lr, growth, seed) each trial runs, and its full RunConfig.

Two kinds of samplers:

* designs -- `grid` (the exact factorial over lists) and `qmc` (a scrambled Sobol design) -- are fixed
  before the study starts; Optuna records each trial's point through `study.design_sampler`. For
  `qmc` every categorical choice (method, a listed pr/lr/growth level, the seed) is one Sobol
  coordinate floored to an integer index, so the design balances the choices; Optuna's own
  QMCSampler would draw the first trial from its random independent sampler (and, before Optuna 5,
  every categorical), losing that balance.
* adaptive -- `tpe`, `gp` -- Optuna proposes each trial from the results so far.

`growth` is conditional: only methods with a penalty (`tpp.methods.uses_growth`) get one; the others
log it as "none". The searcher's define-by-run function is a picklable object because Ray Tune
pickles the searcher into its experiment checkpoint (resume).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from study.config import Range, StudyConfig

if TYPE_CHECKING:
    from study.design_sampler import DesignSampler
    from tpp.config import RunConfig

DESIGN_SAMPLERS = ("grid", "qmc")


@dataclass(frozen=True)
class TrialPoint:
    """The searched values of one trial (growth is None for methods without a penalty)."""

    method: str
    pr: float
    lr: float
    growth: float | None
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "pr": self.pr, "lr": self.lr, "growth": self.growth, "seed": self.seed}


def _uses_growth(method: str) -> bool:
    from tpp.methods import uses_growth

    return uses_growth(method)


def _regularizes(method: str) -> bool:
    from tpp.methods import get_method

    return get_method(method).regularize


def _levels(values: Any) -> list[float]:
    return list(values)


def grid_cells(cfg: StudyConfig) -> list[TrialPoint]:
    """Every cell of the factorial; growth levels multiply only the methods that use growth."""
    sp = cfg.space
    cells = []
    for method in cfg.methods:
        growths: list[float | None] = _levels(sp.growth) if _uses_growth(method) else [None]
        for pr, growth, lr, seed in itertools.product(_levels(sp.pr), growths, _levels(sp.lr), sp.seeds):
            cells.append(TrialPoint(method, float(pr), float(lr), None if growth is None else float(growth),
                                    int(seed)))
    return cells


def grid_size(cfg: StudyConfig) -> int:
    sp = cfg.space
    n_growth = len(sp.growth) if isinstance(sp.growth, list) else 1
    per = len(sp.pr) * len(sp.lr) * len(sp.seeds)  # type: ignore[arg-type]
    return sum(per * (n_growth if _uses_growth(m) else 1) for m in cfg.methods)


def _from_unit(u: float, values: Any, log: bool) -> float:
    """Map a coordinate in [0, 1) to a listed level (integer index) or into a range."""
    if isinstance(values, Range):
        if log:
            return math.exp(math.log(values.low) + u * (math.log(values.high) - math.log(values.low)))
        return values.low + u * (values.high - values.low)
    return float(values[min(int(u * len(values)), len(values) - 1)])


def qmc_design(cfg: StudyConfig) -> list[TrialPoint]:
    """`num_trials` points of a scrambled Sobol sequence over (method, pr, lr, growth, seed).

    Each dimension is always present (Sobol needs a fixed dimension); a method without a penalty
    simply ignores its growth coordinate.
    """
    from scipy.stats import qmc

    sp = cfg.space
    n = cfg.trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "balance properties need n = 2^m": fine, we take a prefix
        u = qmc.Sobol(d=5, scramble=True, seed=cfg.sampler_seed).random(n)
    points = []
    for row in u:
        method = cfg.methods[min(int(row[0] * len(cfg.methods)), len(cfg.methods) - 1)]
        growth = _from_unit(row[3], sp.growth, log=True) if _uses_growth(method) and sp.growth else None
        seed = int(sp.seeds[min(int(row[4] * len(sp.seeds)), len(sp.seeds) - 1)])
        points.append(TrialPoint(method, _from_unit(row[1], sp.pr, log=False),
                                 _from_unit(row[2], sp.lr, log=True), growth, seed))
    return points


def design(cfg: StudyConfig) -> list[TrialPoint] | None:
    """The fixed list of trials for design samplers, in the order they start; None for adaptive ones."""
    if cfg.sampler == "grid":
        return start_order(cfg, grid_cells(cfg))
    if cfg.sampler == "qmc":
        return start_order(cfg, qmc_design(cfg))
    return None


def start_order(cfg: StudyConfig, points: list[TrialPoint]) -> list[TrialPoint]:
    """The trials that compute a prune stage first, slowest penalty schedule first; then the rest.

    A fixed design's order changes no result, only the wall time: a trial that needs a prune stage
    another running trial is computing waits for it with its slot idle, and a long trial started
    last keeps one slot busy while the others idle. Starting the long trials first (each prune key's
    first trial; with reuse off, every penalty trial) and the short ones (those reusing a stage, the
    methods without a penalty) after avoids both.
    """
    first: list[TrialPoint] = []
    rest: list[TrialPoint] = []
    keys: set[tuple[Any, ...]] = set()
    for p in points:
        key = (p.method, p.pr, p.growth, p.seed)
        if _regularizes(p.method) and (not cfg.prune_reuse or key not in keys):
            keys.add(key)
            first.append(p)
        else:
            rest.append(p)
    first.sort(key=lambda p: p.growth if p.growth is not None else math.inf)  # fewer steps per growth
    return first + rest


class DefineByRun:
    """Optuna define-by-run space: suggests method, pr, lr, growth (conditional), seed.

    Categorical levels are suggested as categories (readable in optuna-dashboard). For design
    samplers the n-th call takes the n-th design point (handed to Optuna by `sampler`, a
    `DesignSampler`), so Optuna records exactly what runs.
    """

    def __init__(self, cfg: StudyConfig, sampler: DesignSampler | None = None):
        """`sampler`: for the design samplers (grid, qmc) only, the study's Optuna sampler."""
        sp = cfg.space
        self.methods = list(cfg.methods)
        self.pr, self.lr, self.growth, self.seeds = sp.pr, sp.lr, sp.growth, list(sp.seeds)
        # GP cannot model a conditional space; TPE (group=True) and designs can.
        self.conditional_growth = cfg.sampler != "gp"
        self.design = design(cfg) if sampler is not None else None
        self.sampler, self.next = sampler, 0

    @staticmethod
    def _suggest(trial: Any, name: str, values: Any, log: bool) -> float:
        if isinstance(values, Range):
            return float(trial.suggest_float(name, values.low, values.high, log=log))
        return float(trial.suggest_categorical(name, [float(v) for v in values]))

    def __call__(self, trial: Any) -> dict[str, Any]:
        if self.design is not None:
            assert self.sampler is not None
            if self.next >= len(self.design):
                raise RuntimeError(f"the design has {len(self.design)} points; "
                                   f"trial {self.next + 1} was asked for")
            self.sampler.point = self.design[self.next].as_dict()
            self.next += 1
        method = trial.suggest_categorical("method", self.methods)
        pr = self._suggest(trial, "pr", self.pr, log=False)
        lr = self._suggest(trial, "lr", self.lr, log=True)
        growth = None
        if self.growth is not None and (_uses_growth(method) or not self.conditional_growth):
            growth = self._suggest(trial, "growth", self.growth, log=True)
        seed = int(trial.suggest_categorical("seed", self.seeds))
        if not _uses_growth(method):
            growth = None
        # Returned constants land in the Tune trial config as the decoded point.
        return TrialPoint(method, pr, lr, growth, seed).as_dict()


def point_from_config(config: dict[str, Any]) -> TrialPoint:
    """The trial's point from its Tune config (the define-by-run output)."""
    growth = config.get("growth")
    return TrialPoint(str(config["method"]), float(config["pr"]), float(config["lr"]),
                      None if growth is None or not _uses_growth(str(config["method"])) else float(growth),
                      int(config["seed"]))


def point_id(point: TrialPoint) -> str:
    """A file-name-safe id of the point: trials of the same point (same seed) compute the same result."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(point.as_dict(), sort_keys=True).encode()).hexdigest()[:20]


def run_config(cfg: StudyConfig, point: TrialPoint) -> RunConfig:
    """The full tpp RunConfig of a trial: study-wide settings + fixed + the trial's point."""
    from tpp.config import RunConfig

    d: dict[str, Any] = dict(cfg.fixed)
    d.update(model=cfg.model.name, model_kwargs=dict(cfg.model.kwargs), data=cfg.data.name,
             data_root=str(_abs(cfg.data.root)) if cfg.data.root else None, data_kwargs=dict(cfg.data.kwargs),
             method=point.method, pr=point.pr, lr=point.lr, seed=point.seed, epochs=cfg.finetune.epochs,
             schedule=cfg.finetune.schedule)
    if cfg.finetune.milestones is not None:
        d["milestones"] = tuple(cfg.finetune.milestones)
    if point.growth is not None:
        d["growth"] = point.growth
    if cfg.dense.epochs is not None:
        d["dense_epochs"] = cfg.dense.epochs
        if cfg.dense.lr is not None:
            d["dense_lr"] = cfg.dense.lr
    return RunConfig.from_dict(d)


def _abs(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))


def logged_params(run_cfg: RunConfig, point: TrialPoint) -> dict[str, str]:
    """The trial's MLflow params: the full RunConfig, growth "none" where the method has no penalty."""
    import json

    out = {}
    for k, v in run_cfg.to_dict().items():
        out[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else str(v)
    if point.growth is None:
        out["growth"] = "none"
    return out


def short(x: float) -> str:
    """3.2e-3 style: compact, readable in run names."""
    mant, exp = f"{x:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def run_name(point: TrialPoint) -> str:
    """e.g. `tpp pr=0.9 g=1e-3 lr=3.2e-3 s0` (no g= for methods without a penalty)."""
    g = f" g={short(point.growth)}" if point.growth is not None else ""
    return f"{point.method} pr={point.pr:.3g}{g} lr={short(point.lr)} s{point.seed}"
