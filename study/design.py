"""What a study runs: prune points, the finetune members every prune point is crossed with, and units.

* A *prune point* is one (method, pr, growth, seed): one pruned model. Fixed designs list them up
  front -- `grid` crosses listed levels, `qmc` spreads ranged dimensions with a scrambled Sobol
  sequence -- and always cross methods with seeds and PRs, so method differences are paired.
* A *member* is one finetune configuration (the LR ladder crossed with any other finetune axes);
  every prune point of a design is finetuned at every member: paired LR ladders.
* A *unit* is one Tune trial: a `finetune` unit trains members of one prune point (all of them unless
  `finetune.per_trial` splits them); a `prune` unit computes several prune stages at once (lockstep)
  into the study's prune cache so the finetune units that need them start from a ready model.

Adaptive samplers (tpe, gp) have no design: Optuna proposes one (prune point, member) per trial.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from study.config import MAX_MEMBERS, Range, StudyConfig, StudyConfigError, _section_of, levels

if TYPE_CHECKING:
    from tpp.config import RunConfig


@dataclass(frozen=True)
class PrunePoint:
    """One pruned model of a study: `method` is the label shown (a MethodCfg's), growth None without a
    penalty."""

    method: str
    pr: float
    growth: float | None
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    """One Tune trial of a design: `prune` (stages of `points` into the cache) or `finetune` (members
    of `points[0]`)."""

    kind: str
    points: tuple[int, ...]
    members: tuple[int, ...] = ()

    def config(self, plan: Plan) -> dict[str, Any]:
        """The trial's Tune config: self-describing (what it runs), plus readable columns."""
        out: dict[str, Any] = {"kind": self.kind, "points": list(self.points), "members": list(self.members)}
        if self.kind == "finetune":
            out.update(plan.points[self.points[0]].as_dict())
        return out


def method_cfg(cfg: StudyConfig, label: str):
    return next(m for m in cfg.methods if m.shown == label)


def has_penalty(cfg: StudyConfig, label: str) -> bool:
    from tpp.methods import get_method

    return get_method(method_cfg(cfg, label).name).regularize


# --------------------------------------------------------------------------------------------- members
def members(cfg: StudyConfig, lrs: list[float] | None = None) -> list[dict[str, Any]]:
    """Finetune settings of every member: the LR ladder crossed with each finetune axis, warmup only
    for the schedules that have one (tpp.schedules.WARMUP_SCHEDULES), onecycle only with one >= 1."""
    from tpp.schedules import WARMUP_SCHEDULES

    axes = {"lr": lrs if lrs is not None else levels(cfg.finetune.lr), **cfg.finetune.axes()}
    warmups = axes.get("warmup_epochs", [0])
    out: list[dict[str, Any]] = []
    for combo in itertools.product(*axes.values()):
        m = dict(zip(axes, combo, strict=True))
        if m.get("schedule", "step") not in WARMUP_SCHEDULES and "warmup_epochs" in m:
            m["warmup_epochs"] = 0
        if m.get("schedule") == "onecycle" and not m.get("warmup_epochs") and any(warmups):
            continue  # onecycle is defined by its warmup: it takes the listed warmups >= 1 only
        if "milestones" in m:
            m["milestones"] = tuple(m["milestones"])
        if m not in out:
            out.append(m)
    return out


def varying(cfg: StudyConfig) -> list[str]:
    """The finetune settings that differ between members besides the LR (shown in run names)."""
    return [k for k, v in cfg.finetune.axes().items() if len(v) > 1]


# ---------------------------------------------------------------------------------------------- points
def _sobol(n: int, d: int, seed: int) -> list[list[float]]:
    from scipy.stats import qmc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "balance properties need n = 2^m": fine, we take a prefix
        return qmc.Sobol(d=d, scramble=True, seed=seed).random(n).tolist()


def _spread(u: float, r: Range, log: bool) -> float:
    if log:
        return float(f"{math.exp(math.log(r.low) + u * (math.log(r.high) - math.log(r.low))):.6g}")
    return float(f"{r.low + u * (r.high - r.low):.6g}")


def _prune_levels(cfg: StudyConfig) -> list[tuple[float, float | None]]:
    """The (pr, growth) pairs every method is crossed with: listed levels, or Sobol points over ranges."""
    sp = cfg.space
    if cfg.sampler == "grid":
        return [(pr, g) for pr in levels(sp.pr) for g in (levels(sp.growth) or [None])]
    ranged = [d for d in ("pr", "growth") if isinstance(getattr(sp, d), Range)]
    assert cfg.num_trials is not None
    u = _sobol(cfg.num_trials, len(ranged), cfg.sampler_seed)
    spread = [{d: _spread(row[i], getattr(sp, d), log=d == "growth") for i, d in enumerate(ranged)}
              for row in u]
    listed = {d: levels(getattr(sp, d)) or [None] for d in ("pr", "growth") if d not in ranged}
    out = []
    for s in spread:
        for combo in itertools.product(*listed.values()):
            v = {**s, **dict(zip(listed, combo, strict=True))}
            out.append((v["pr"], v["growth"]))
    return out


def points(cfg: StudyConfig) -> list[PrunePoint]:
    """Every prune point of a fixed design: methods x (pr, growth) levels x seeds, growth dropped for
    methods without a penalty (and the duplicates that leaves)."""
    out: list[PrunePoint] = []
    pairs = _prune_levels(cfg)
    for m in cfg.methods:
        penalty = has_penalty(cfg, m.shown)
        for (pr, g), seed in itertools.product(pairs, cfg.space.seeds):
            p = PrunePoint(m.shown, float(pr), float(g) if penalty and g is not None else None, int(seed))
            if p not in out:
                out.append(p)
    return out


def size(cfg: StudyConfig) -> tuple[int, int]:
    """(prune points, members per point) of a design, counted without building it (for qmc an upper
    bound: methods without a penalty may share PRs)."""
    n_members = (len(levels(cfg.finetune.lr)) or 1) * math.prod(len(v) for v in cfg.finetune.axes().values())
    if not cfg.is_design:
        return cfg.num_trials or 0, 1
    sp = cfg.space
    n_points = 0
    for m in cfg.methods:
        dims = [sp.pr] + ([sp.growth] if has_penalty(cfg, m.shown) and sp.growth is not None else [])
        n = math.prod(len(levels(d)) for d in dims if not isinstance(d, Range))
        n_points += n * (cfg.num_trials or 1 if any(isinstance(d, Range) for d in dims) else 1)
    return n_points * len(sp.seeds), n_members


def check_runnable(cfg: StudyConfig) -> None:
    """Refuse a design too large to run, and any member whose settings tpp rejects (one line each)."""
    n_points, n_members = size(cfg)
    if n_points * n_members > MAX_MEMBERS:
        raise StudyConfigError("finetune" if n_members > 1 else "space",
                               f"the design has {n_points} prune points x {n_members} members = "
                               f"{n_points * n_members} runs; accepted: at most {MAX_MEMBERS}")
    pr = levels(cfg.space.pr)[0] if levels(cfg.space.pr) else cfg.space.pr.low
    growth = None if cfg.space.growth is None else (levels(cfg.space.growth) or [cfg.space.growth.low])[0]
    lrs = levels(cfg.finetune.lr) or [cfg.finetune.lr.low]
    for i, m in enumerate(cfg.methods):
        point = PrunePoint(m.shown, pr, growth if has_penalty(cfg, m.shown) else None, cfg.space.seeds[0])
        for member in members(cfg, lrs[:1]):
            try:
                run_config(cfg, point, member)
            except (TypeError, ValueError) as e:
                key = str(e).split(":", 1)[0]
                raise StudyConfigError(_path_of(key, i, m), str(e).split(":", 1)[-1].strip()) from None


def _path_of(key: str, method_index: int, method: Any) -> str:
    if key in method.settings:
        return f"methods[{method_index}].{key}"
    section = _section_of(key)
    if section == "dense":
        return f"dense.{key.removeprefix('dense_')}"
    if section in ("finetune", "data", "space"):
        return f"{section}.{key}"
    return f"fixed.{key}"


# ----------------------------------------------------------------------------------------- run configs
def run_config(cfg: StudyConfig, point: PrunePoint, member: dict[str, Any]) -> RunConfig:
    """The full tpp RunConfig of one member of one prune point."""
    from tpp.config import RunConfig

    m = method_cfg(cfg, point.method)
    single = {k: v[0] for k, v in cfg.finetune.axes().items() if len(v) == 1}
    d: dict[str, Any] = {**cfg.fixed, **m.settings, **cfg.dense.settings(), **single, **member}
    d.update(model=cfg.model.name, model_kwargs=dict(cfg.model.kwargs), data=cfg.data.name,
             data_root=cfg.data.root, data_kwargs=dict(cfg.data.kwargs), val_fraction=cfg.data.val_fraction,
             method=m.name, pr=point.pr, seed=point.seed)
    if point.growth is not None:
        d["growth"] = point.growth
    return RunConfig.from_dict(d)


def dense_run_config(cfg: StudyConfig) -> RunConfig:
    """The RunConfig the dense stage runs with (model, data, dense settings; the point does not matter)."""
    first = cfg.methods[0]
    point = PrunePoint(first.shown, 0.5, None, cfg.dense.seed)
    lrs = levels(cfg.finetune.lr) or [cfg.finetune.lr.low]
    return run_config(cfg, point, members(cfg, lrs[:1])[0])


def member_id(point: PrunePoint, run_cfg: RunConfig) -> str:
    """Stable id of one member: its method label and every setting of every stage but I/O."""
    d = run_cfg.section("model", "data", "dense", "prune", "finetune")
    key = json.dumps({"method": point.method, **d}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def short(x: float) -> str:
    """3.2e-3 style: compact, readable in run names."""
    mant, exp = f"{x:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


SHORT_NAMES = {"epochs": "ep", "weight_decay": "wd", "warmup_epochs": "wu", "batch_size": "bs"}


def run_name(point: PrunePoint, run_cfg: RunConfig, shown: list[str] = ()) -> str:
    """e.g. `lr=3.2e-3 tpp pr=0.9 g=1e-3 s0` -- the LR first (the UI truncates names), then the
    prune point, then the other finetune settings that vary in the study (`shown`)."""
    parts = [f"lr={short(run_cfg.lr)}", point.method, f"pr={point.pr:.3g}"]
    if point.growth is not None:
        parts.append(f"g={short(point.growth)}")
    parts.append(f"s{point.seed}")
    for key in shown:
        value = getattr(run_cfg, key)
        text = value if isinstance(value, str) else short(value) if isinstance(value, float) else str(value)
        parts.append(text if key == "schedule" else f"{SHORT_NAMES.get(key, key)}={text}")
    return " ".join(parts)


def logged_params(point: PrunePoint, run_cfg: RunConfig) -> dict[str, str]:
    """A member's MLflow params: the full RunConfig (None-valued settings left out, growth only where
    the method has a penalty), numbers as numbers, plus `method_label`, `has_penalty`, `log10_lr`."""
    out = {}
    for k, v in run_cfg.to_dict().items():
        if v is None or (k == "growth" and point.growth is None):
            continue
        out[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else str(v)
    out.update(method_label=point.method, has_penalty="1" if point.growth is not None else "0",
               log10_lr=f"{math.log10(run_cfg.lr):.4f}")
    return out


# -------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """A fixed design: its prune points, members, and units in the order they should start."""

    points: list[PrunePoint]
    members: list[dict[str, Any]]
    units: list[Unit]

    @property
    def num_runs(self) -> int:
        return sum(len(u.members) for u in self.units if u.kind == "finetune")


def plan(cfg: StudyConfig, slots: int = 1, max_lockstep: int = 16, train_samples: int = 0) -> Plan:
    """The design's units. Prune stages of methods with a penalty go into `prune` units -- batches of
    one method's stages computed together (lockstep), balanced over `slots` concurrent trials by their
    iteration counts -- when lockstep is on or several finetune units share a stage; the longest units
    start first, then the finetune units (ready once their stage is cached)."""
    pts, mems = points(cfg), members(cfg)
    per = cfg.finetune.per_trial or len(mems)
    chunks = [tuple(range(i, min(i + per, len(mems)))) for i in range(0, len(mems), per)]
    work = {i: _prune_iterations(cfg, p, train_samples) for i, p in enumerate(pts)}
    shared = [i for i, p in enumerate(pts) if work[i] and (cfg.lockstep or len(chunks) > 1)]
    cap = max_lockstep if cfg.lockstep else 1
    by_method: dict[str, list[int]] = {}  # one method per lockstep batch (tpp.lockstep.prune_lockstep)
    for i in shared:
        by_method.setdefault(pts[i].method, []).append(i)
    batches = [b for group in by_method.values() for b in _balance(group, work, slots, cap)]
    prune_units = [Unit("prune", b) for b in sorted(batches, key=lambda b: -max(work[i] for i in b))]
    finetune = [Unit("finetune", (i,), c) for i in sorted(range(len(pts)), key=lambda i: -work[i])
                for c in chunks]
    return Plan(pts, mems, prune_units + finetune)


def _prune_iterations(cfg: StudyConfig, point: PrunePoint, train_samples: int) -> int:
    """Iterations of the point's regularisation stage (0 for methods without one) on `train_samples`
    training samples (a stage sized in passes over the data depends on it)."""
    if point.growth is None:
        return 0
    return run_config(cfg, point, members(cfg)[0]).penalty_schedule(train_samples).total_iters


def _balance(items: list[int], work: dict[int, int], slots: int, cap: int) -> list[tuple[int, ...]]:
    """Longest-processing-time packing of `items` into >= `slots` batches of at most `cap` items.

    A lockstep batch costs about its longest member's iterations, so equal lengths go together: items
    are taken longest first and each joins the open batch with the least work."""
    if not items:
        return []
    n = max(slots, math.ceil(len(items) / cap))
    batches: list[list[int]] = [[] for _ in range(min(n, len(items)))]
    load = [0] * len(batches)
    for i in sorted(items, key=lambda i: -work[i]):
        open_ = [b for b in range(len(batches)) if len(batches[b]) < cap]
        b = min(open_, key=lambda b: load[b])
        batches[b].append(i)
        load[b] += work[i]
    return [tuple(b) for b in sorted(batches, key=lambda b: -max(work[i] for i in b)) if b]


# ------------------------------------------------------------------------------------ adaptive search
class DefineByRun:
    """Optuna define-by-run space of the adaptive samplers: method, pr, growth (conditional), seed, lr
    and each finetune axis with several values. Picklable (Tune saves the searcher with its state)."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg

    @staticmethod
    def _suggest(trial: Any, name: str, values: Any, log: bool) -> float:
        if isinstance(values, Range) and not values.per_decade:
            return float(trial.suggest_float(name, values.low, values.high, log=log))
        return float(trial.suggest_categorical(name, levels(values)))

    def __call__(self, trial: Any) -> dict[str, Any]:
        cfg = self.cfg
        method = trial.suggest_categorical("method", [m.shown for m in cfg.methods])
        pr = self._suggest(trial, "pr", cfg.space.pr, log=False)
        growth = None
        # GP cannot model a conditional space (it always gets growth); TPE (group=True) can.
        if cfg.space.growth is not None and (has_penalty(cfg, method) or cfg.sampler == "gp"):
            growth = self._suggest(trial, "growth", cfg.space.growth, log=True)
        seed = int(trial.suggest_categorical("seed", list(cfg.space.seeds)))
        member = {"lr": self._suggest(trial, "lr", cfg.finetune.lr, log=True)}
        for key, values in cfg.finetune.axes().items():
            member[key] = trial.suggest_categorical(key, values) if len(values) > 1 else values[0]
        point = PrunePoint(method, pr, growth if has_penalty(cfg, method) else None, seed)
        return {"kind": "member", **point.as_dict(), "member": member}


def trial_runs(cfg: StudyConfig, config: dict[str, Any]) -> tuple[list[PrunePoint], list[tuple[int, dict]]]:
    """(prune points, [(point index, member settings)]) a trial's Tune config describes."""
    if config["kind"] == "member":
        growth = config.get("growth")
        point = PrunePoint(config["method"], float(config["pr"]), None if growth is None else float(growth),
                           int(config["seed"]))
        return [point], [(0, dict(config["member"]))]
    pts, mems = points(cfg), members(cfg)
    chosen = [pts[i] for i in config["points"]]
    return chosen, [(0, mems[j]) for j in config["members"]]


def describe(cfg: StudyConfig, slots: int = 1, train_samples: int | None = None) -> str:
    """`tpp-study plan`: the design as a table, the prune stages to compute, the work, balance notes."""
    from collections import Counter

    from study.progress import table_text

    if not cfg.is_design:
        n = cfg.num_trials or 0
        return (f"{cfg.name}: sampler {cfg.sampler} proposes {n} single-member trials adaptively over "
                f"methods {', '.join(m.shown for m in cfg.methods)} (no fixed design: methods are not paired "
                "at equal LRs and seeds; for an LR-sensitivity map use grid or qmc)")
    p = plan(cfg, slots, train_samples=train_samples or 0)
    lrs = sorted({m["lr"] for m in p.members})
    rows = Counter((pt.method, pt.pr, "-" if pt.growth is None else short(pt.growth)) for pt in p.points)
    seeds = len(cfg.space.seeds)
    table = [["method", "pr", "growth", "seeds", "members", "runs"]]
    table += [[m, f"{pr:.3g}", g, str(seeds), str(len(p.members)), str(n * len(p.members))]
              for (m, pr, g), n in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]
    stages = [_prune_iterations(cfg, pt, train_samples or 0) for pt in p.points]
    penalty = [s for s in stages if s]
    epochs = sum(run_config(cfg, p.points[0], m).epochs for m in p.members) * len(p.points)
    reg_batch = run_config(cfg, p.points[0], p.members[0]).reg_batch_size
    reg_per_epoch = math.ceil(max(train_samples or 1, 1) / reg_batch)
    lines = [f"{cfg.name}: {cfg.sampler} design, {len(p.points)} prune points x {len(p.members)} members = "
             f"{p.num_runs} runs in {len(p.units)} trials "
             f"({sum(u.kind == 'prune' for u in p.units)} of them prune units, lockstep "
             + ("auto: decided at the start, on with GPUs, on CPUs for the models measured faster so)"
                if cfg.lockstep == "auto" else f"{'on' if cfg.lockstep else 'off'})"), table_text(table),
             f"members: {len(lrs)} LRs ({short(lrs[0])} ... {short(lrs[-1])})"
             + (f" x {', '.join(varying(cfg))}" if varying(cfg) else "") + ", the same for every prune point",
             f"prune stages to compute: {len(penalty)} with a penalty stage "
             f"({sum(penalty):,} regularisation iterations, the longest {max(penalty, default=0):,}"
             + (f" = {max(penalty) / reg_per_epoch:,.1f} passes over the {train_samples:,} training samples "
                f"at batch {reg_batch}" if penalty and train_samples else "")
             + ("; at most: the magnitude-ratio early stop (reg_mag_ratio_limit) may end the growth sooner"
                if penalty and run_config(cfg, p.points[0], p.members[0]).reg_mag_ratio_limit else "")
             + f"), {len(stages) - len(penalty)} without one",
             f"finetuning: {epochs:,} member-epochs"
             + (f" of {math.ceil(train_samples / run_config(cfg, p.points[0], p.members[0]).batch_size)} "
                f"iterations each" if train_samples else ""),
             "balance: every method is crossed with the same PRs and seeds, every prune point with the same "
             "members: method differences are paired"]
    if seeds < 6:
        lines.append(f"note: {seeds} seed(s): a paired sign-flip test over seeds cannot reach p < 0.05 below "
                     "6 seeds, so the report's verdict will call differences ties")
    return "\n".join(lines)


def work(cfg: StudyConfig, train_samples: int, cache_dir: Any, dense_digest: str,
         runs_left: int) -> tuple[float, float]:
    """(training iterations of one member-epoch, iterations of the work left): `runs_left` members'
    finetuning and the prune stages not in the cache yet -- what the progress ETA divides by its rate."""
    from study.prune_cache import PruneCache
    from tpp.run import prune_key

    pts = points(cfg) if cfg.is_design else []
    mems = members(cfg) if cfg.is_design else [{"lr": (levels(cfg.finetune.lr) or [cfg.finetune.lr.low])[0]}]
    first = run_config(cfg, pts[0] if pts else PrunePoint(cfg.methods[0].shown, 0.5, None, 0), mems[0])
    per_epoch = math.ceil(max(train_samples, 1) / first.batch_size)
    epochs = sum(run_config(cfg, pts[0], m).epochs for m in mems) / len(mems) if pts else first.epochs
    cache = PruneCache(cache_dir)
    prune = sum(_prune_iterations(cfg, p, train_samples) for p in pts if p.growth is not None
                and not cache.has(prune_key(run_config(cfg, p, mems[0]), dense_digest)))
    return float(per_epoch), prune + runs_left * epochs * per_epoch
