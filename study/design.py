"""What a study runs: prune points, the finetune members every prune point is crossed with, and units.

* A *prune point* is one (method, pr, growth, seed): one pruned model. Fixed designs list them up
  front -- `grid` crosses listed levels, `qmc` spreads ranged dimensions with a scrambled Sobol
  sequence -- and always cross methods with seeds and PRs, so method differences are paired.
* A *member* is one finetune configuration (the LR ladder crossed with any other finetune axes);
  every prune point of a design is finetuned at every member: paired LR ladders.
* A *unit* is one Tune trial: a `finetune` unit trains members of one prune point (all of them unless
  `finetune.per_trial` splits them); a `prune` unit computes several prune stages at once (lockstep)
  into the study's prune cache so the finetune units that need them start from a ready model.

The adaptive sampler (tpe) has no design: Optuna proposes one (prune point, member) per trial.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
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
    """Finetune settings of every member (`_members`); the design's own (no `lrs`) built once."""
    if lrs is not None:
        return _members(cfg, lrs)
    return [dict(m) for m in _cached(cfg, "members", lambda c: tuple(_members(c, None)))]


def _members(cfg: StudyConfig, lrs: list[float] | None = None) -> list[dict[str, Any]]:
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
    """Every prune point of a fixed design: methods x (pr, growth) levels x seeds (and the extra seeds of
    the groups space.extra_seeds names), growth dropped for methods without a penalty (and the
    duplicates that leaves)."""
    return list(_cached(cfg, "points", _points))


def _points(cfg: StudyConfig) -> tuple[PrunePoint, ...]:
    out: dict[PrunePoint, None] = {}  # ordered and O(1) per point (a list scan made designs O(n^2))
    pairs = _prune_levels(cfg)
    extra = cfg.space.extra_seeds
    for m in cfg.methods:
        penalty = has_penalty(cfg, m.shown)
        for pr, g in pairs:
            growth = float(g) if penalty and g is not None else None
            seeds = [*cfg.space.seeds, *(s for e in extra if e.matches(m.shown, pr, growth) for s in e.seeds)]
            for seed in seeds:
                out[PrunePoint(m.shown, float(pr), growth, int(seed))] = None
    return tuple(out)


_DESIGNS: dict[tuple[str, str], Any] = {}
# id -> (the config, its digest): a config object's digest once (80 us: a JSON dump of the whole config,
# looked up ~4 times a member in a study's driver). The config is held so its id stays its own.
_DIGESTS: dict[int, tuple[StudyConfig, str]] = {}


def _digest(cfg: StudyConfig) -> str:
    hit = _DIGESTS.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        if len(_DIGESTS) >= 64:  # a process sees a few configs; a test session, many
            _DIGESTS.pop(next(iter(_DIGESTS)))
        hit = _DIGESTS[id(cfg)] = (cfg, cfg.digest())
    return hit[1]


def _cached(cfg: StudyConfig, what: str, build: Any) -> Any:
    """A design's parts are built once per process and config (every trial start looks them up: the
    logger, the progress line and the worker each resolve trials against them)."""
    key = (_digest(cfg), what)
    if key not in _DESIGNS:
        _DESIGNS[key] = build(cfg)
    return _DESIGNS[key]


def size(cfg: StudyConfig) -> tuple[int, int]:
    """(prune points, members per point) of a design, counted without building it (for qmc an upper
    bound: methods without a penalty may share PRs)."""
    n_members = (len(levels(cfg.finetune.lr)) or 1) * math.prod(len(v) for v in cfg.finetune.axes().values())
    if not cfg.is_design:
        return cfg.num_trials or 0, 1
    sp = cfg.space
    if sp.extra_seeds:  # a grid: building it is cheap (linear), and exact
        return len(points(cfg)), n_members
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


def point_prune_key(cfg: StudyConfig, point: PrunePoint, dense: Any) -> str:
    """The prune key of a prune point (tpp.run.prune_key of its first member: members share the stage);
    `dense` is the DenseModel or its digest. The one place a study builds a prune key."""
    from tpp.run import prune_key

    return prune_key(run_config(cfg, point, members(cfg)[0] if cfg.is_design else
                                {"lr": (levels(cfg.finetune.lr) or [cfg.finetune.lr.low])[0]}), dense)


def dense_run_config(cfg: StudyConfig) -> RunConfig:
    """The RunConfig the dense stage runs with (model, data, dense settings; the point does not matter)."""
    first = cfg.methods[0]
    point = PrunePoint(first.shown, 0.5, None, cfg.dense.seed)
    lrs = levels(cfg.finetune.lr) or [cfg.finetune.lr.low]
    return run_config(cfg, point, members(cfg, lrs[:1])[0])


def member_param_keys(cfg: StudyConfig) -> frozenset[str] | None:
    """The RunConfig fields that differ between the members of a fixed design (and the prune point's
    method, pr, seed, lr, growth, always): what a member run logs as its own params. The rest is the same
    for every member: it is on the study run (its config), and in each member's `run_config` param.
    None for an adaptive sampler (its trials may set any searched field): every field is logged."""
    if not cfg.is_design:
        return None
    return _cached(cfg, "param_keys", _member_param_keys)


def _member_param_keys(cfg: StudyConfig) -> frozenset[str]:
    pts, mems = points(cfg), members(cfg)
    # a field varies by prune point (method and its settings, pr, growth, seed) or by member (the
    # finetune axes): one config per method's first point, and one per member of the first point
    firsts = {p.method: p for p in reversed(pts)}.values()
    configs = [run_config(cfg, p, mems[0]).to_dict() for p in firsts]
    configs += [run_config(cfg, pts[0], m).to_dict() for m in mems]
    varying = {k for k in configs[0] if any(c.get(k) != configs[0][k] for c in configs)}
    return frozenset(varying | {"method", "pr", "growth", "seed", "lr"})


def member_id(point: PrunePoint, run_cfg: RunConfig) -> str:
    """Stable id of one member: its method label and every setting of every stage but I/O."""
    d = run_cfg.section("model", "data", "dense", "prune", "finetune")
    key = json.dumps({"method": point.method, **d}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def member_ids(cfg: StudyConfig) -> set[str]:
    """The ids of every member of a fixed design (what an extension must keep, and adds to)."""
    return {member_id(p, run_config(cfg, p, m)) for p in points(cfg) for m in members(cfg)}


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


def plan(cfg: StudyConfig, slots: int = 1, max_lockstep: int | None = None, train_samples: int = 0) -> Plan:
    """The design's units. Prune stages of methods with a penalty go into `prune` units -- batches of
    one method's stages computed together (lockstep), balanced over `slots` concurrent trials by their
    iteration counts -- when lockstep is on or several finetune units share a stage; the longest units
    start first, then the finetune units (ready once their stage is cached)."""
    pts, mems = points(cfg), members(cfg)
    per = cfg.finetune.per_trial or len(mems)
    chunks = [tuple(range(i, min(i + per, len(mems)))) for i in range(0, len(mems), per)]
    iterations: dict[PrunePoint, int] = {}  # a stage's length does not depend on its seed
    work = {}
    for i, p in enumerate(pts):
        level = replace(p, seed=0)
        if level not in iterations:
            iterations[level] = _prune_iterations(cfg, p, train_samples)
        work[i] = iterations[level]
    shared = [i for i, p in enumerate(pts) if work[i] and (cfg.lockstep or len(chunks) > 1)]
    from tpp.lockstep import MAX_MEMBERS

    cap = (max_lockstep or MAX_MEMBERS) if cfg.lockstep else 1
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
    lightest = [(0, b) for b in range(len(batches))]  # open batches as (load, index): a heap
    for i in sorted(items, key=lambda i: -work[i]):
        load, b = heapq.heappop(lightest)
        batches[b].append(i)
        if len(batches[b]) < cap:
            heapq.heappush(lightest, (load + work[i], b))
    return [tuple(b) for b in sorted(batches, key=lambda b: -max(work[i] for i in b)) if b]


# ------------------------------------------------------------------------------------ adaptive search


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


@dataclass
class TrialRuns:
    """The members a trial trains: their prune point, RunConfigs, ids, and which of them carries the
    prune stage's own record (its curves; tag tpp.reuse=computed, the others `reused`): in a design,
    the point's first member; with an adaptive sampler (None) the trial that computed the stage."""

    point: PrunePoint
    configs: list[Any]
    ids: list[str]
    first: list[bool] | None


# The last trial resolved: ((config digest, trial id), its Tune config, TrialRuns). The driver's logger and
# progress callbacks resolve each trial one after the other (~0.5 ms a member each at 5k members).
_last_resolved: list[Any] = [None]


def resolve(cfg: StudyConfig, config: dict[str, Any], trial_id: str) -> TrialRuns:
    """What a trial's Tune config runs (the driver's logger calls this too).

    A design's member is identified by its settings alone (planned once; a resumed study finds it
    again); an adaptive sampler's by its trial too, since Optuna may propose the same point twice.
    """
    key, last = (_digest(cfg), trial_id), _last_resolved[0]
    if last is not None and last[0] == key and last[1] == config:
        return last[2]
    points, runs = trial_runs(cfg, config)
    point = points[0]
    configs = [run_config(cfg, point, m) for _, m in runs]
    ids = [member_id(point, rc) + ("" if cfg.is_design else f"-{trial_id}") for rc in configs]
    first = [m == members(cfg)[0] for _, m in runs] if cfg.is_design else None
    out = TrialRuns(point, configs, ids, first)
    _last_resolved[0] = (key, copy.deepcopy(config), out)
    return out
