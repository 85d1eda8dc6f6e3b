"""The methods a run can use, by name: the built-ins, those registered in code, and plug-ins found
through the Python entry point group `tpp_study.methods` (so a package installed on a cluster's
nodes adds methods without editing anything).

An entry point names a `Method`, a callable returning one (or a list of them), or a module whose
import registers methods (and criteria) itself. Plug-ins are loaded on first use of the registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from tpp.methods.base import Method, SelectFn

ENTRY_POINT_GROUP = "tpp_study.methods"

_REGISTRY: dict[str, Method] = {}
_BUILTIN: set[str] = set()
_discovered = False


def register_method(method: Method | str | None = None, **fields: Any) -> Any:
    """Register a method; two forms.

    `register_method(Method(...))` registers it and returns it. As a decorator on a selection
    function, `@register_method("name", description=..., params=..., stage=..., ...)` registers
    `Method(name, select=<the function>, **fields)` and returns the function. Registering an existing
    name replaces it, except the built-in names.
    """
    if isinstance(method, Method):
        if fields:
            raise TypeError("register_method(Method(...)) takes no other arguments")
        return _add(method)
    if not isinstance(method, str):
        raise TypeError("register_method takes a Method, or a name (as a decorator on a selection function)")
    name = method

    def deco(select: SelectFn) -> SelectFn:
        rest = {k: v for k, v in fields.items() if k != "description"}
        _add(Method(name, fields.get("description", select.__doc__ or name), select=select, **rest))
        return select

    return deco


def _add(method: Method, builtin: bool = False) -> Method:
    if method.name in _BUILTIN and not builtin:
        raise ValueError(f"method: {method.name!r} is a built-in method; register yours under another name")
    _REGISTRY[method.name] = method
    if builtin:
        _BUILTIN.add(method.name)
    return method


def register_builtin(method: Method) -> Method:
    return _add(method, builtin=True)


def _load(value: Any, where: str) -> None:
    if isinstance(value, Method):
        _add(value)
    elif isinstance(value, ModuleType):
        pass  # importing it registered what it defines
    elif callable(value):
        made = value()
        for m in made if isinstance(made, (list, tuple)) else [made]:
            if not isinstance(m, Method):
                raise TypeError(f"it returned {type(m).__name__}, not a tpp.methods.Method")
            _add(m)
    else:
        raise TypeError(f"it is a {type(value).__name__}, not a Method, a factory of one or a module")


_failed: dict[str, str] = {}  # entry point name: why it failed to load
_FROM_ENTRY_POINTS: set[str] = set()  # method names that plug-ins registered


def discover_methods() -> list[str]:
    """(Re-)load the plug-ins of the entry point group; returns the entry point names that loaded.

    Called on first use of the registry; call it again after installing a plug-in in a running
    process. A plug-in that fails to load does not stop the others (or the built-ins): asking for
    a method that is not there names it and why, in one line.
    """
    global _discovered
    _discovered = True
    _failed.clear()
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        before = dict(_REGISTRY)
        try:
            _load(ep.load(), ep.value)
        except Exception as e:  # anything a plug-in's import raises
            _failed[ep.name] = f"{ep.value}: {type(e).__name__}: {e}".replace("\n", " ")
            continue
        finally:
            _FROM_ENTRY_POINTS.update(n for n, m in _REGISTRY.items() if before.get(n) is not m)
        found.append(ep.name)
    return found


def registered_in_code() -> list[Method]:
    """The methods this program registered itself (neither built in nor from a plug-in's entry point).

    Processes that run its work without running the program -- Ray workers -- know only the built-ins
    and the plug-ins; these must be handed to them (`adopt`)."""
    _ensure_discovered()
    return [m for n, m in _REGISTRY.items() if n not in _BUILTIN and n not in _FROM_ENTRY_POINTS]


def adopt(methods: list[Method]) -> None:
    """Register methods another process registered in code (see `registered_in_code`)."""
    _ensure_discovered()
    for m in methods:
        if _REGISTRY.get(m.name) is not m:
            _add(m)


def _ensure_discovered() -> None:
    if not _discovered:
        discover_methods()


def get_method(name: str) -> Method:
    """The method called `name`, or a ValueError listing the accepted names."""
    _ensure_discovered()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method: got {name!r}; accepted: {accepted_methods()}") from None


def accepted_methods() -> str:
    """The method names, and the plug-ins that failed to load with why (for one-line errors)."""
    _ensure_discovered()
    failed = "".join(f"; the plug-in {ep!r} of entry point group {ENTRY_POINT_GROUP} failed to load ({why})"
                     for ep, why in _failed.items())
    return ", ".join(_REGISTRY) + failed


def list_methods() -> list[str]:
    _ensure_discovered()
    return list(_REGISTRY)


class _Methods(Mapping[str, Method]):
    """Read-only {name: Method} view of the registry (plug-ins included)."""

    def __getitem__(self, name: str) -> Method:
        return get_method(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list_methods())

    def __len__(self) -> int:
        return len(list_methods())

    def __contains__(self, name: object) -> bool:
        return name in list_methods()


METHODS: Mapping[str, Method] = _Methods()
