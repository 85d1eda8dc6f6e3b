"""Data set registry: name -> loader, and `load_data`, the one way the rest of the project gets data.

Loaders are plain functions `loader(root=None, **kwargs) -> DataBundle`. The registry checks kwargs
against the loader's signature (so a typo in a study config fails before any work is done), picks the
default root, and gives every set the balanced `subset`/`test_subset` kwargs.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tpp.data.bundle import DataBundle
from tpp.data.errors import DataError

Loader = Callable[..., Any]
# Handled here for every set (unless a loader takes them itself): balanced, seeded subsets.
SUBSET_KWARGS = ("subset", "test_subset", "subset_seed")
ROOT_ENV = "TPP_DATA_ROOT"


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    own: tuple[str, ...]  # kwargs the loader itself takes (root excluded)
    takes_root: bool

    @property
    def accepted(self) -> list[str]:
        return list(self.own) + [k for k in SUBSET_KWARGS if k not in self.own]


_DATA: dict[str, _Entry] = {}


def register_data(name: str, loader: Loader | None = None, *, kwargs: Sequence[str] | None = None):
    """Register `loader(root=None, **kwargs) -> DataBundle` under `name`; usable as a decorator.

    The accepted kwargs are the loader's named parameters; a loader taking `**kwargs` names the extra
    ones it accepts in `kwargs`. Registering an existing name replaces it (notebooks re-run cells).
    """
    def add(fn: Loader) -> Loader:
        params = inspect.signature(fn).parameters.values()
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        named = [p.name for p in params if p.name != "root" and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        extra = [k for k in (kwargs or ()) if k not in named]
        if extra and not var_kw:
            raise ValueError(f"register_data({name!r}): kwargs {extra} are not parameters of the loader "
                             "and it takes no **kwargs")
        takes_root = var_kw or any(p.name == "root" for p in params)
        _DATA[name] = _Entry(fn, tuple(named + extra), takes_root)
        return fn

    return add if loader is None else add(loader)


def list_data() -> list[str]:
    """The registered data set names, sorted."""
    return sorted(_DATA)


def _entry(name: str) -> _Entry:
    if name not in _DATA:
        raise DataError(f"unknown data set {name!r}; accepted: {', '.join(list_data())}")
    return _DATA[name]


def loader_kwargs(name: str) -> list[str]:
    """The kwargs `load_data(name, ...)` accepts besides `root` (the loader's own, then the subset ones)."""
    return _entry(name).accepted


def default_root(root: str | os.PathLike | None = None) -> str:
    """`root`, else $TPP_DATA_ROOT, else ./data — as an absolute path, so messages say where exactly."""
    if root is None:
        root = os.environ.get(ROOT_ENV) or "data"
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def load_data(name: str, root: str | os.PathLike | None = None, **kwargs: Any) -> DataBundle:
    """Load data set `name` from `root` (see `default_root`); nothing is ever downloaded.

    `subset=N` / `test_subset=M` keep a class-balanced subset drawn with `subset_seed` (default 0).
    Unknown kwargs and missing or malformed files raise DataError saying what is accepted/expected.
    """
    entry = _entry(name)
    accepted = entry.accepted
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DataError(f"{name!r}: unknown kwarg(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    generic = {k: kwargs.pop(k) for k in SUBSET_KWARGS if k in kwargs and k not in entry.own}
    for key in ("subset", "test_subset"):
        value = generic.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{name!r}: {key} must be an integer >= 1, got {value!r}")
    if entry.takes_root:
        kwargs["root"] = default_root(root)
    data = entry.loader(**kwargs)
    n_train, n_test = generic.get("subset"), generic.get("test_subset")
    if n_train is None and n_test is None:
        return data
    if not isinstance(data, DataBundle):
        raise DataError(f"{name!r}: subset/test_subset need the loader to return a DataBundle, "
                        f"got {type(data).__name__}")
    return data.subset(n_train, n_test, seed=int(generic.get("subset_seed") or 0))
