"""The study config: one YAML file that says what to compare, over which space, on what resources.

Validated up front with pydantic (unknown keys are errors) so that a typo fails in a second with one
line naming the field and what it accepts -- before Ray, MLflow or any folder is touched. Names of
models, data sets and methods are checked against the tpp registries, so a user-registered model is
accepted as soon as it is registered.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SAMPLERS = ("qmc", "grid", "tpe", "gp")
OBJECTIVES = ("best_acc", "last_acc", "acc_after_removal")
# RunConfig fields the study sets itself; everything else may be fixed under `fixed:`.
CONTROLLED = ("model", "model_kwargs", "data", "data_root", "data_kwargs", "method", "pr", "lr", "growth",
              "seed", "epochs", "schedule", "milestones", "dense_epochs", "dense_lr")
# Top-level keyword overrides of `study.run(...)` that live deeper in the config.
OVERRIDE_ALIASES = {"tracking_uri": ("mlflow", "tracking_uri"), "experiment": ("mlflow", "experiment"),
                    "address": ("ray", "address"), "num_cpus": ("ray", "num_cpus")}


class StudyConfigError(ValueError):
    """A study config is invalid; `str()` is one line: `<field path>: <what is wrong>; accepted: ...`."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_of(value: str, accepted: list[str] | tuple[str, ...], what: str) -> str:
    if value not in accepted:
        raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")
    return value


class Range(_Strict):
    """A continuous range; `lr` and `growth` are sampled on a log scale, `pr` linearly."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range low={self.low:g} >= high={self.high:g}; "
                             "accepted: low < high")
        return self


Values = Range | list[float]


def _parse_values(v: Any, name: str) -> Any:
    """Accept `{low, high}` or a non-empty list; anything else fails naming both forms."""
    if isinstance(v, Mapping):
        return v
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"empty list; accepted: a non-empty list of {name} values or {{low, high}}")
        return list(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [v]
    raise ValueError(f"got {v!r}; accepted: a list of {name} values or a range {{low: L, high: H}}")


def _bounds(values: Values) -> list[float]:
    return [values.low, values.high] if isinstance(values, Range) else list(values)


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

    factory = registry._entry(name).factory
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("num_classes", "input_shape")
            and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


class DataCfg(_Strict):
    name: str
    root: str | None = None  # relative paths are taken from the current directory
    kwargs: dict[str, Any] = Field(default_factory=dict)

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


class DenseCfg(_Strict):
    """Either a trained checkpoint, or how to train the dense model (once per study)."""

    checkpoint: str | None = None
    epochs: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _exactly_one(self) -> DenseCfg:
        if (self.checkpoint is None) == (self.epochs is None):
            raise ValueError("give exactly one of checkpoint: PATH or epochs: N (with lr)")
        if self.checkpoint is not None and self.lr is not None:
            raise ValueError("lr only applies when training the dense model (epochs: N)")
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise _PathError("checkpoint", f"dense checkpoint {self.checkpoint!r} is not a file "
                             f"(relative to {os.getcwd()})")
        return self


class SpaceCfg(_Strict):
    """The searched dimensions. `growth` only applies to methods with a penalty (tpp, greg, ...)."""

    lr: Values
    pr: Values
    growth: Values | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("lr", "pr", "growth", mode="before")
    @classmethod
    def _shape(cls, v: Any, info) -> Any:
        return None if v is None and info.field_name == "growth" else _parse_values(v, info.field_name)

    @field_validator("lr", "growth")
    @classmethod
    def _positive(cls, v: Values | None, info) -> Values | None:
        if v is not None and any(not (x > 0 and math.isfinite(x)) for x in _bounds(v)):
            raise ValueError(f"{info.field_name} must be > 0; got {_bounds(v)}; accepted: numbers > 0")
        return v

    @field_validator("pr")
    @classmethod
    def _ratio(cls, v: Values) -> Values:
        if any(not 0 < x < 1 for x in _bounds(v)):
            raise ValueError(f"pruning ratios must lie in (0, 1); got {_bounds(v)}")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate seeds in {v}; accepted: distinct integers")
        return v


class FinetuneCfg(_Strict):
    epochs: int = Field(ge=1)
    schedule: str = "step"
    milestones: list[float] | None = None  # fractions of epochs where a step schedule drops 10x

    @field_validator("schedule")
    @classmethod
    def _known(cls, v: str) -> str:
        from tpp.schedules import SCHEDULES

        return _one_of(v, SCHEDULES, "schedule")

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0 < m < 1 for m in v):
            raise ValueError(f"milestones are fractions of the epochs in (0, 1); got {v}")
        return v


class ObjectiveCfg(_Strict):
    metric: str = "best_acc"
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
    """ASHA: stops weak trials early. Off by default: stopping low-LR trials (which converge slower)
    early biases exactly the LR-sensitivity map a study is meant to measure."""

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
    methods: list[str] = Field(min_length=1)
    space: SpaceCfg
    finetune: FinetuneCfg
    fixed: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal["qmc", "grid", "tpe", "gp"] = "qmc"
    sampler_seed: int = 0
    num_trials: int | None = Field(default=None, ge=1)
    objective: ObjectiveCfg = Field(default_factory=ObjectiveCfg)
    resources: ResourcesCfg = Field(default_factory=ResourcesCfg)
    max_concurrent: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=1, ge=0)  # retries of a crashed trial (e.g. a lost node)
    checkpoint_every: int = Field(default=1, ge=1)  # finetune epochs between trial checkpoints
    # ...but not more often than this: a checkpoint of a sub-second epoch costs more than redoing it
    checkpoint_min_interval_s: float = Field(default=10.0, ge=0)
    prune_reuse: bool = True  # share one prune stage among trials with the same prune key (off: benchmarks)
    early_stopping: EarlyStoppingCfg = Field(default_factory=EarlyStoppingCfg)
    storage: str = "./studies"
    mlflow: MlflowCfg = Field(default_factory=MlflowCfg)
    ray: RayCfg = Field(default_factory=RayCfg)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from tpp.methods import list_methods

        for i, m in enumerate(v):
            if m not in list_methods():
                raise _PathError(f"[{i}]", f"unknown method {m!r}; accepted: {', '.join(list_methods())}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate methods in {v}")
        return v

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, v: dict[str, Any]) -> dict[str, Any]:
        from tpp.config import RunConfig

        settable = [f.name for f in dataclasses.fields(RunConfig) if f.name not in CONTROLLED]
        for key in v:
            if key not in settable:
                where = " (set it in its own section)" if key in CONTROLLED else ""
                raise ValueError(f"{key}: not a fixed run setting{where}; accepted: {', '.join(settable)}")
        try:
            RunConfig.from_dict(dict(v))
        except (TypeError, ValueError) as e:
            raise ValueError(str(e).splitlines()[0]) from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        from tpp.methods import uses_growth

        if any(uses_growth(m) for m in self.methods) and self.space.growth is None:
            grow = [m for m in self.methods if uses_growth(m)]
            raise _PathError("space.growth", f"required: method(s) {', '.join(grow)} use a penalty growth "
                             "rate; accepted: a list of values or {low, high}")
        if self.sampler == "grid":
            for dim in ("lr", "pr", "growth"):
                if isinstance(getattr(self.space, dim), Range):
                    raise _PathError(f"space.{dim}", "the grid sampler needs a list of values, got a range")
            from study.space import grid_size

            size = grid_size(self)
            if self.num_trials is not None and self.num_trials != size:
                raise _PathError("num_trials", f"the grid has {size} cells and runs each once; accepted: "
                                 f"{size} or leave num_trials out")
        elif self.num_trials is None:
            raise _PathError("num_trials",
                             f"required for sampler {self.sampler!r}; accepted: an integer >= 1")
        return self

    # ---------------------------------------------------------------------------------- derived
    @property
    def trials(self) -> int:
        """How many trials the study runs (the grid size for the grid sampler)."""
        if self.sampler == "grid":
            from study.space import grid_size

            return grid_size(self)
        assert self.num_trials is not None
        return self.num_trials

    def storage_dir(self) -> Path:
        return Path(self.storage).expanduser().absolute()

    def study_dir(self) -> Path:
        return self.storage_dir() / self.name

    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.study_dir() / 'mlflow.db'}"

    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _PathError(ValueError):
    """Raised inside a model validator to point at a field other than the model itself."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


# -------------------------------------------------------------------------------------------- loading
def _loc_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("Range", "list[float]", "function-after[_ordered(), Range]") or str(p).startswith(
                ("function-", "list[", "float", "int", "literal[")):
            continue  # union member labels pydantic puts in the location
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys accepted at a config location (for 'unknown key' messages)."""
    model: Any = StudyConfig
    for p in loc:
        field = model.model_fields.get(p) if isinstance(p, str) else None
        if field is None:
            break
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _first_error(e: ValidationError) -> StudyConfigError:
    errs = e.errors(include_url=False)
    # Several errors for one field come from union members (a range vs a list): report the most telling.
    shape = ("list_type", "model_type", "dict_type", "float_type", "float_parsing", "model_attributes_type")

    def rank(err: Any) -> int:
        return 0 if err["type"] == "extra_forbidden" else 3 if err["type"] in shape else \
            2 if err["type"] == "missing" else 1

    err = min(errs, key=rank)
    loc, msg = tuple(err["loc"]), str(err["msg"])
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _PathError):
        base = _loc_path(loc)
        sep = "" if not base or ctx_error.path.startswith("[") else "."
        return StudyConfigError(base + sep + ctx_error.path, str(ctx_error))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "extra_forbidden":
        path, key = _loc_path(loc[:-1]), loc[-1]
        accepted = ", ".join(_fields_at(loc[:-1]))
        return StudyConfigError(_loc_path(loc), f"unknown key {key!r}" + (f" in {path}" if path else "")
                                + f"; accepted: {accepted}")
    if err["type"] == "missing":
        return StudyConfigError(_loc_path(loc), "required key is missing")
    path = _loc_path(loc)
    if path == "fixed" and ":" in msg and not msg.startswith("got"):
        key, _, rest = msg.partition(":")
        return StudyConfigError(f"fixed.{key.strip()}", rest.strip())
    more = len({_loc_path(tuple(x["loc"])) for x in errs}) - 1
    return StudyConfigError(path, msg + (f" (and {more} more error(s))" if more > 0 else ""))


def _set_path(d: dict[str, Any], dotted: tuple[str, ...], value: Any) -> None:
    for key in dotted[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise StudyConfigError(".".join(dotted), "cannot override inside a non-mapping")
    d[dotted[-1]] = value


def load_config(source: str | os.PathLike | Mapping[str, Any] | StudyConfig,
                **overrides: Any) -> StudyConfig:
    """Read (YAML path, YAML text via a mapping, or a StudyConfig), apply overrides, validate.

    Overrides are top-level keys (`num_trials=4`, `storage=...`), aliases (`tracking_uri`, `experiment`,
    `address`, `num_cpus`) or dotted paths given as a dict under `set={"space.lr": [1e-3]}`.
    Raises StudyConfigError (one line, names the field) on any problem.
    """
    if isinstance(source, StudyConfig):
        raw: Any = source.model_dump(mode="json")
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise StudyConfigError("", f"no study config at {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise StudyConfigError("", f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise StudyConfigError("", "a study config is a YAML mapping of keys (name, model, data, ...)")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy with plain types
    dotted = overrides.pop("set", None) or {}
    for key, value in overrides.items():
        if value is None:
            continue
        _set_path(raw, OVERRIDE_ALIASES.get(key, (key,)), value)
    for key, value in dotted.items():
        _set_path(raw, tuple(key.split(".")), value)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise _first_error(e) from None
    except _PathError as e:
        raise StudyConfigError(e.path, str(e)) from None
