"""The study config: one YAML file that says what to compare, over which space, on what resources.

Validated up front with pydantic (unknown keys are errors) so that a typo fails in a second with one
line naming the field and what it accepts -- before Ray, MLflow or any folder is touched. Which run
setting goes where follows the stage each `tpp.RunConfig` field declares: `dense:` takes the dense
stage's settings, `finetune:` every finetune-stage setting (each a value or a list of values to
cross: the members of a trial), `fixed:` the remaining prune-stage and I/O settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

SAMPLERS = ("qmc", "grid", "tpe")
DESIGNS = ("grid", "qmc")  # fixed designs; tpe is adaptive (Optuna proposes each trial)
OBJECTIVES = ("auto", "best_acc", "last_acc", "test_acc_at_best_val", "acc_after_removal")
# What each objective is, said wherever a study shows its best run (progress, status, the MLflow view).
OBJECTIVE_TEXT = {"test_acc_at_best_val": "test accuracy at the best-validation epoch (no selection on the "
                                          "test set)",
                  "best_acc": "max test accuracy over finetuning epochs (the paper's; the epoch is chosen on "
                              "the test set)",
                  "last_acc": "test accuracy after the last finetuning epoch",
                  "acc_after_removal": "test accuracy right after removal, before finetuning"}
SPACE_FIELDS = ("method", "pr", "growth", "seed")  # prune-stage fields a study searches (`space:`)
MAX_MEMBERS = 200_000  # a design larger than this cannot be run (nor built in memory)


class StudyConfigError(ValueError):
    """A study config is invalid; `str()` is one line: `<field path>: <what is wrong>; accepted: ...`."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class _PathError(ValueError):
    """Raised inside a validator to point at a field other than the one being validated."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_of(value: str, accepted: list[str] | tuple[str, ...], what: str) -> str:
    if value not in accepted:
        raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")
    return value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Range(_Strict):
    """A continuous range {low, high}; with `per_decade` (LRs) a log-spaced ladder over it."""

    low: float
    high: float
    per_decade: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range low={self.low:g} >= high={self.high:g}; "
                             "accepted: low < high")
        return self

    def ladder(self) -> list[float]:
        """Log-spaced values from low to high, both included, `per_decade` per factor of ten."""
        assert self.per_decade is not None
        n = max(1, round(math.log10(self.high / self.low) * self.per_decade)) + 1
        step = math.log10(self.high / self.low) / (n - 1)
        return [float(f"{self.low * 10 ** (i * step):.6g}") for i in range(n)]


Values = Range | list[float]


def _values(v: Any, name: str, ladder: bool = False) -> Any:
    """A scalar, a non-empty list of numbers, or {low, high[, per_decade]}; else one clear line."""
    forms = "a number, a list of numbers, or {low: L, high: H" + (", per_decade: N}" if ladder else "}")
    if isinstance(v, Mapping):
        return v
    if _is_number(v):
        return [v]
    if isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v):
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate values in {list(v)}; accepted: distinct {name} values")
        return list(v)
    raise ValueError(f"got {v!r}; accepted: {forms}")


def levels(values: Values | None) -> list[float]:
    """The listed values, or the ladder of a range with `per_decade`; [] for a plain range or None."""
    if values is None:
        return []
    if isinstance(values, Range):
        return values.ladder() if values.per_decade else []
    return [float(v) for v in values]


def bounds(values: Values) -> list[float]:
    return [values.low, values.high] if isinstance(values, Range) else [float(v) for v in values]


class ModelCfg(_Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from tpp.models import list_models

        return _one_of(v, list_models(), "model")

    @model_validator(mode="after")
    def _kwargs(self) -> ModelCfg:
        accepted = _model_kwargs(self.name)
        unknown = sorted(set(self.kwargs) - set(accepted)) if accepted is not None else []
        if unknown:
            raise _PathError("kwargs", f"unknown model kwarg(s) {', '.join(unknown)} for {self.name}; "
                             f"accepted: {', '.join(accepted) or '(none)'}")
        return self


def _model_kwargs(name: str) -> list[str] | None:
    """The factory kwargs a registered model accepts (None: it takes **kwargs, anything goes)."""
    import inspect

    from tpp.models import registry

    params = inspect.signature(registry._entry(name).factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("num_classes", "input_shape")
            and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


class DataCfg(_Strict):
    name: str
    root: str | None = None  # relative paths are taken from the current directory
    kwargs: dict[str, Any] = Field(default_factory=dict)
    val_fraction: float = Field(default=0.0, ge=0, lt=1)  # held out to choose the epoch on (0: none)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from tpp.data import list_data

        return _one_of(v, list_data(), "data set")

    @model_validator(mode="after")
    def _check(self) -> DataCfg:
        from tpp.data import loader_kwargs

        accepted = loader_kwargs(self.name)
        unknown = sorted(set(self.kwargs) - set(accepted))
        if unknown:
            raise _PathError("kwargs", f"unknown data kwarg(s) {', '.join(unknown)} for {self.name}; "
                             f"accepted: {', '.join(accepted) or '(none)'}")
        if self.root is not None and not os.path.exists(self.root):
            raise _PathError("root", f"data root {self.root!r} does not exist (relative to {os.getcwd()})")
        return self


class DenseCfg(BaseModel):
    """Either a trained checkpoint, or how to train the dense model (once per study): `epochs` and any
    other dense-stage setting without its `dense_` prefix (lr, batch_size, momentum, weight_decay)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    checkpoint: str | None = None
    epochs: int | None = Field(default=None, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _exactly_one(self) -> DenseCfg:
        from tpp.config import fields_of

        accepted = [f.removeprefix("dense_") for f in fields_of("dense")]
        for key in self.model_extra or {}:
            if key not in accepted:
                raise _PathError(key, f"unknown key {key!r} in dense; accepted: checkpoint, seed, "
                                 f"{', '.join(accepted)}")
        if (self.checkpoint is None) == (self.epochs is None):
            raise ValueError("give exactly one of checkpoint: PATH or epochs: N (with lr)")
        if self.checkpoint is not None and self.model_extra:
            raise ValueError(f"{', '.join(self.model_extra)} only apply when training the dense model "
                             "(epochs: N)")
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise _PathError("checkpoint", f"dense checkpoint {self.checkpoint!r} is not a file "
                             f"(relative to {os.getcwd()})")
        return self

    def settings(self) -> dict[str, Any]:
        """The dense-stage RunConfig fields this section sets."""
        out = {f"dense_{k}": v for k, v in (self.model_extra or {}).items()}
        if self.epochs is not None:
            out["dense_epochs"] = self.epochs
        return out


class MethodCfg(_Strict):
    """A method to compare: a registered method `name`, shown as `label`, with prune-stage settings of
    its own (e.g. another selection criterion) on top of `fixed:`."""

    name: str
    label: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from tpp.methods import list_methods

        return _one_of(v, list_methods(), "method")

    @property
    def shown(self) -> str:
        return self.label or self.name


def _distinct(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds in {seeds}; accepted: distinct integers")
    return seeds


Seeds = Annotated[list[int], AfterValidator(_distinct)]


class ExtraSeeds(_Strict):
    """More seeds for some prune groups of a grid: those of `method` (a label) at `pr` and `growth`, each
    any level when left out (a growth matches only methods with a penalty). Seeds-until-decided writes
    these for the comparisons still undecided, so a decided comparison costs no further runs."""

    method: str | None = None
    pr: float | None = None
    growth: float | None = None
    seeds: Seeds = Field(min_length=1)

    def matches(self, method: str, pr: float, growth: float | None) -> bool:
        def same(want: float | None, got: float | None) -> bool:
            return want is None or (got is not None and math.isclose(want, got, rel_tol=1e-9))

        return self.method in (None, method) and same(self.pr, pr) and same(self.growth, growth)


class SpaceCfg(_Strict):
    """The searched prune-stage dimensions. `growth` only applies to methods with a penalty;
    `extra_seeds` gives some prune groups of a grid more seeds than `seeds`."""

    pr: Values
    growth: Values | None = None
    seeds: Seeds = Field(default_factory=lambda: [0], min_length=1)
    extra_seeds: list[ExtraSeeds] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, d: Any) -> Any:
        if isinstance(d, Mapping) and "lr" in d:
            raise _PathError("lr", "the finetuning LR moved to finetune.lr (the LR ladder every prune "
                             "group is finetuned at); accepted here: pr, growth, seeds")
        return d

    @field_validator("pr", "growth", mode="before")
    @classmethod
    def _shape(cls, v: Any, info) -> Any:
        return None if v is None and info.field_name == "growth" else _values(v, info.field_name)

    @field_validator("growth")
    @classmethod
    def _positive(cls, v: Values | None) -> Values | None:
        if v is not None and any(not x > 0 for x in bounds(v)):
            raise ValueError(f"growth must be > 0; got {bounds(v)}; accepted: numbers > 0")
        return v

    @field_validator("pr")
    @classmethod
    def _ratio(cls, v: Values) -> Values:
        if any(not 0 < x < 1 for x in bounds(v)):
            raise ValueError(f"pruning ratios must lie in (0, 1); got {bounds(v)}")
        return v



class FinetuneCfg(BaseModel):
    """Every finetune-stage setting (tpp.config), each a value or a list of values: the members of a
    prune group are their cross product. `lr` may be a ladder {low, high, per_decade}; `per_trial`
    caps how many members one trial trains (default: all of its prune group)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    lr: Values
    per_trial: int | None = Field(default=None, ge=1)

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        return _values(v, "lr", ladder=True)

    @field_validator("lr")
    @classmethod
    def _positive(cls, v: Values) -> Values:
        if any(not x > 0 for x in bounds(v)):
            raise ValueError(f"learning rates must be > 0; got {bounds(v)}; accepted: numbers > 0")
        return v

    @model_validator(mode="after")
    def _known(self) -> FinetuneCfg:
        from tpp.config import fields_of

        accepted = [f for f in fields_of("finetune") if f != "lr"]
        for key, value in (self.model_extra or {}).items():
            if key not in accepted:
                raise _PathError(key, f"unknown key {key!r} in finetune; accepted: lr, per_trial, "
                                 f"{', '.join(accepted)}")
            if isinstance(value, list) and not value:
                raise _PathError(key, "empty list; accepted: a value or a non-empty list of values")
        return self

    def axes(self) -> dict[str, list[Any]]:
        """{finetune field: its values} for every field set here except lr (milestones is one value)."""
        out = {}
        for key, value in (self.model_extra or {}).items():
            multi = isinstance(value, list) and (key != "milestones" or isinstance(value[0], list))
            out[key] = list(value) if multi else [value]
        return out


class ObjectiveCfg(_Strict):
    """What "best" means for the study (its sort, best run, progress line). `auto`: the test accuracy at
    the best-validation epoch when the study holds out a validation split (no choice on the test set),
    else best_acc."""

    metric: str = "auto"
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        return _one_of(v, OBJECTIVES, "objective metric")


class ResourcesCfg(_Strict):
    """Per trial. `gpu` is a fraction so several trials share one GPU; `auto`: 0.25 if GPUs exist, else 0."""

    cpus: float = Field(default=1.0, gt=0)
    gpu: float | Literal["auto"] = "auto"

    @field_validator("gpu", mode="before")
    @classmethod
    def _fraction(cls, v: Any) -> float | str:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 8:
            raise ValueError(f"got {v!r}; accepted: a GPU fraction per trial >= 0 (e.g. 0.25), or auto")
        return float(v)


class EarlyStoppingCfg(_Strict):
    """ASHA: stops weak trials early (adaptive samplers only). Off by default: stopping low-LR trials
    (which converge slower) early biases exactly the LR-sensitivity map a study is meant to measure."""

    asha: bool = False
    grace_period: int = Field(default=2, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1)


class MlflowCfg(_Strict):
    tracking_uri: str | None = None  # default: sqlite:///<study folder>/mlflow.db
    experiment: str | None = None  # default: the study name


class RayCfg(_Strict):
    address: str | None = None  # None: embedded local Ray (or RAY_ADDRESS); "auto" / "ray://..." a cluster
    num_cpus: int | None = Field(default=None, ge=1)  # CPUs of the embedded local Ray (default: all)


class StudyConfig(_Strict):
    """A whole study. See study/configs/*.yaml for annotated examples."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    model: ModelCfg
    data: DataCfg
    dense: DenseCfg
    methods: list[MethodCfg] = Field(min_length=1)
    space: SpaceCfg
    finetune: FinetuneCfg
    fixed: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal["qmc", "grid", "tpe"] = "grid"
    sampler_seed: int = 0
    num_trials: int | None = Field(default=None, ge=1, le=MAX_MEMBERS)
    objective: ObjectiveCfg = Field(default_factory=ObjectiveCfg)
    resources: ResourcesCfg = Field(default_factory=ResourcesCfg)
    max_concurrent: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=1, ge=0)  # retries of a crashed trial (e.g. a lost node)
    checkpoint_every: int = Field(default=1, ge=1)  # finetune epochs between trial checkpoints
    # ...but not more often than this: a checkpoint of a sub-second epoch costs more than redoing it
    checkpoint_min_interval_s: float = Field(default=10.0, ge=0)
    min_free_mb: float = Field(default=200.0, ge=0)  # stop cleanly (resumable) below this free disk space
    # train same-shaped members (and prune stages) as one vectorised model: true, false, or auto (decided
    # when the study starts: with GPUs always, on CPUs for models measured faster so, tpp.lockstep)
    lockstep: bool | Literal["auto"] = "auto"
    early_stopping: EarlyStoppingCfg = Field(default_factory=EarlyStoppingCfg)
    storage: str = "./studies"
    mlflow: MlflowCfg = Field(default_factory=MlflowCfg)
    ray: RayCfg = Field(default_factory=RayCfg)

    @field_validator("methods", mode="before")
    @classmethod
    def _method_entries(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out = []
        for i, m in enumerate(v):
            if isinstance(m, str):
                out.append({"name": m})
            elif isinstance(m, Mapping):
                extra = {k: x for k, x in m.items() if k not in ("name", "label")}
                out.append({"name": m.get("name"), "label": m.get("label"), "settings": extra})
            else:
                raise _PathError(f"[{i}]", f"got {m!r}; accepted: a method name or {{name: ..., label: ..., "
                                 "<prune setting>: ...}")
        return out

    @field_validator("methods")
    @classmethod
    def _labels(cls, v: list[MethodCfg]) -> list[MethodCfg]:
        from tpp.config import fields_of

        allowed = set(fields_of("prune")) - set(SPACE_FIELDS)
        for i, m in enumerate(v):
            bad = sorted(set(m.settings) - allowed)
            if bad:
                raise _PathError(f"[{i}].{bad[0]}", f"not a prune-stage setting a method can set; accepted: "
                                 f"{', '.join(sorted(allowed))}")
            if m.settings and not m.label:
                raise _PathError(f"[{i}].label", "required when a method sets its own settings (it names "
                                 "the method in tables and MLflow); accepted: a short name, e.g. l1-fpgm")
        shown = [m.shown for m in v]
        if len(set(shown)) != len(shown):
            raise ValueError(f"duplicate methods in {shown}; accepted: distinct names or labels")
        return v

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key not in fixed_fields():
                where = _section_of(key)
                hint = f" (set it in {where})" if where else ""
                raise ValueError(f"{key}: not a fixed run setting{hint}; accepted: "
                                 f"{', '.join(fixed_fields())}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        from tpp.methods import get_method

        penalty = [m.shown for m in self.methods if get_method(m.name).regularize]
        if penalty and self.space.growth is None:
            raise _PathError("space.growth", f"required: method(s) {', '.join(penalty)} use a penalty growth "
                             "rate; accepted: a list of values or {low, high}")
        ranged = [d for d in ("pr", "growth") if isinstance(getattr(self.space, d), Range)]
        if self.sampler in DESIGNS:
            if isinstance(self.finetune.lr, Range) and not self.finetune.lr.per_decade:
                raise _PathError("finetune.lr", "a design finetunes every prune group at the same LRs: give "
                                 "a ladder {low, high, per_decade: N} or a list")
            if self.sampler == "grid" and ranged:
                raise _PathError(f"space.{ranged[0]}", "the grid sampler crosses listed levels; accepted: a "
                                 "list, or sampler: qmc to spread a range")
            if self.sampler == "grid" and self.num_trials is not None:
                raise _PathError("num_trials", "the grid runs every cell once; leave num_trials out "
                                 "(`tpp-study plan` shows the size)")
            if self.sampler == "qmc" and not ranged:
                raise _PathError("sampler", "qmc spreads ranged prune dimensions and space.pr/growth are "
                                 "lists; accepted: sampler: grid, or a range {low, high}")
            if self.sampler == "qmc" and self.num_trials is None:
                raise _PathError("num_trials", "required for sampler 'qmc': the number of space-filling "
                                 "points over the ranged prune dimensions; accepted: an integer >= 1")
            if self.early_stopping.asha:
                raise _PathError("early_stopping.asha", "ASHA stops single trials; designs train each prune "
                                 "group's members together; accepted: false, or sampler tpe")
            self._check_extra_seeds()
        else:
            if self.num_trials is None:
                raise _PathError("num_trials", f"required for sampler {self.sampler!r}; accepted: an "
                                 "integer >= 1")
            if self.finetune.per_trial not in (None, 1):
                raise _PathError("finetune.per_trial", f"sampler {self.sampler!r} proposes every member "
                                 "itself; accepted: 1 or leave it out")
        if self.objective.metric == "test_acc_at_best_val" and not self.data.val_fraction:
            raise _PathError("objective.metric", "test_acc_at_best_val needs data.val_fraction > 0")
        if self.objective.metric == "auto":  # resolved once: the saved config names the metric
            metric = "test_acc_at_best_val" if self.data.val_fraction else "best_acc"
            object.__setattr__(self, "objective", self.objective.model_copy(update={"metric": metric}))
        return self

    def _check_extra_seeds(self) -> None:
        """Each entry of space.extra_seeds names levels the grid has (a typo would silently add nothing)."""
        labels = [m.shown for m in self.methods]
        for i, e in enumerate(self.space.extra_seeds):
            where = f"space.extra_seeds[{i}]"
            if self.sampler != "grid":
                raise _PathError(where, "extra seeds name grid levels; accepted: sampler grid")
            if e.method is not None and e.method not in labels:
                raise _PathError(f"{where}.method", f"got {e.method!r}; accepted: {', '.join(labels)}")
            for dim in ("pr", "growth"):
                want, have = getattr(e, dim), levels(getattr(self.space, dim))
                if want is not None and not any(math.isclose(want, x, rel_tol=1e-9) for x in have):
                    raise _PathError(f"{where}.{dim}", f"got {want:g}; accepted: a level of space.{dim} "
                                     f"({', '.join(f'{x:g}' for x in have) or 'none'})")

    # ---------------------------------------------------------------------------------- derived
    @property
    def is_design(self) -> bool:
        return self.sampler in DESIGNS

    def storage_dir(self) -> Path:
        return Path(self.storage).expanduser().absolute()

    def study_dir(self) -> Path:
        return self.storage_dir() / self.name

    def tracking_uri(self) -> str:
        from study.store import StudyFolder

        return self.mlflow.tracking_uri or StudyFolder(self.study_dir()).default_tracking_uri

    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    def digest(self) -> str:
        """A digest of the whole config (what a process caches its design under)."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.as_input(), sort_keys=True).encode()).hexdigest()[:16]

    def as_input(self) -> dict[str, Any]:
        """The config in the form a YAML file gives it (what `load_config` reads back unchanged)."""
        raw = self.model_dump(mode="json")
        raw["methods"] = [m["name"] if not (m["label"] or m["settings"]) else
                          {"name": m["name"], "label": m["label"], **m["settings"]} for m in raw["methods"]]
        extra = raw["space"].pop("extra_seeds")  # only when used: a config without them digests as before
        if extra:
            raw["space"]["extra_seeds"] = [{k: v for k, v in e.items() if v is not None} for e in extra]
        return raw

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_input(), sort_keys=False)


def fixed_fields() -> list[str]:
    """The RunConfig fields `fixed:` may set: prune-stage and I/O settings without their own section."""
    from tpp.config import fields_of

    return [f for f in fields_of("prune", "run") if f not in SPACE_FIELDS and f != "data_root"]


def _section_of(key: str) -> str | None:
    from tpp.config import fields_of

    if key in SPACE_FIELDS:
        return "methods" if key == "method" else "space"
    for section in ("finetune", "dense", "data", "model"):  # each section takes its stage's settings
        if key in fields_of(section):
            return section
    return "data.root" if key == "data_root" else None


# -------------------------------------------------------------------------------------------- loading


