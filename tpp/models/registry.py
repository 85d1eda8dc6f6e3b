"""Model registry: name -> factory, plus each model's default pruning preset.

A `ModelSpec` is everything needed to rebuild an architecture (it is saved in checkpoints and hashed
into prune-stage keys), so it must be JSON-able, comparable and hashable even though it holds a dict.
Users add their own networks with `@register_model("name", prune_preset={...})` on a factory
`factory(num_classes, input_shape, **kwargs) -> nn.Module`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# A preset maps a glob pattern over module names to a ratio: a float, or "pr" = the study's pruning ratio.
Preset = dict[str, str | float]
# A preset may also depend on the factory kwargs (e.g. the MLP's depth decides which layer is last).
PresetFn = Callable[..., Preset]
Factory = Callable[..., nn.Module]


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """The architecture of a model: registry name, classes, per-sample input shape, factory kwargs."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise what JSON round trips change (lists for tuples) so equal specs compare equal.
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "kwargs", dict(self.kwargs or {}))
        try:
            self._key()
        except TypeError as e:
            raise ValueError(f"ModelSpec.kwargs must be JSON-able, got {self.kwargs!r}: {e}") from None

    def _key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "kwargs": json.loads(json.dumps(self.kwargs))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        unknown = set(d) - {"name", "num_classes", "input_shape", "kwargs"}
        if unknown:
            raise ValueError(f"ModelSpec.from_dict: unknown key(s) {sorted(unknown)}")
        return cls(d["name"], d["num_classes"], tuple(d["input_shape"]), dict(d.get("kwargs") or {}))


@dataclass
class _Entry:
    factory: Factory
    preset: Preset | PresetFn | None
    coupling: str


_MODELS: dict[str, _Entry] = {}
COUPLING_CHOICES = ("auto", "none", "groups")


def register_model(name: str, prune_preset: Preset | PresetFn | None = None,
                   coupling: str = "none") -> Callable[[Factory], Factory]:
    """Decorator: register `factory(num_classes, input_shape, **kwargs) -> nn.Module` under `name`.

    `prune_preset` is {glob pattern over module names: ratio or "pr"}, or a callable taking the factory
    kwargs and returning such a dict (for architectures whose layer names depend on kwargs).
    `coupling` is what a run's `coupling: auto` means for this model: "none" (each pruned layer prunes
    its own filters, the paper's) or "groups" (pruned with every channel tied to them; needed when the
    preset's layers feed depthwise/grouped convolutions or residual sums).
    Registering an existing name replaces it (so notebooks can re-run their cells).
    """
    if coupling not in COUPLING_CHOICES[1:]:
        raise ValueError(f"register_model({name!r}): coupling must be none or groups, got {coupling!r}")

    def deco(factory: Factory) -> Factory:
        _MODELS[name] = _Entry(factory, prune_preset, coupling)
        return factory

    return deco


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(list_models())}")
    return _MODELS[name]


def list_models() -> list[str]:
    return sorted(_MODELS)


def _check_kwargs(name: str, factory: Factory, kwargs: dict[str, Any]) -> None:
    """Reject unknown factory kwargs with a message naming them (instead of a bare TypeError)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)
                and p.name not in ("num_classes", "input_shape")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r}: unknown kwarg(s) {', '.join(unknown)}; accepted: "
                         f"{', '.join(accepted) or '(none)'}")


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate the architecture of `spec` (random init; load weights separately)."""
    entry = _entry(spec.name)
    _check_kwargs(spec.name, entry.factory, spec.kwargs)
    return entry.factory(spec.num_classes, tuple(spec.input_shape), **spec.kwargs)


def model_prune_preset(name: str, **model_kwargs: Any) -> Preset:
    """The model's default {glob pattern: ratio | "pr"} of prunable layers ({} if it has none).

    `model_kwargs` (the ModelSpec kwargs) matter only to presets that depend on them, e.g. `mlp`, whose
    last (classifier) layer index is `depth - 1`; without them the factory defaults are assumed.
    """
    preset = _entry(name).preset
    if preset is None:
        return {}
    if callable(preset):
        preset = preset(**model_kwargs)
    return dict(preset)


def resolve_coupling(coupling: str, model: str) -> str:
    """A run's coupling mode: "none" or "groups" as given, or the model's default for "auto"."""
    if coupling not in COUPLING_CHOICES:
        raise ValueError(f"coupling: got {coupling!r}; accepted: {', '.join(COUPLING_CHOICES)}")
    return _entry(model).coupling if coupling == "auto" else coupling
