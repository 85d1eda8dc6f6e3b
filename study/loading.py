"""Reading a study config: the YAML (UTF-8, no repeated keys), overrides, validation with one-line errors
that name the field, and the check that every member's settings are ones tpp accepts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from study.config import StudyConfig, StudyConfigError, _PathError
from study.design import check_runnable

# Top-level keyword overrides of `study.run(...)` that live deeper in the config.
OVERRIDE_ALIASES = {"tracking_uri": ("mlflow", "tracking_uri"), "experiment": ("mlflow", "experiment"),
                    "address": ("ray", "address"), "num_cpus": ("ray", "num_cpus")}


MAX_CONFIG_BYTES = 256 * 1024  # a study config is a page of YAML; a 50 MB one took minutes to refuse


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key repeated in one mapping is an error (safe_load keeps the last silently)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        """No YAML aliases: `*name` repeats a node without copying it, and nested ones make a few lines
        expand to billions of values (the "billion laughs"); a study config never needs them."""
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise StudyConfigError("", f"YAML alias at line {mark.line + 1} (*name); accepted: a config "
                                   "without anchors and aliases (write the values out)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise StudyConfigError(str(key), f"repeated key (lines {seen[key]} and {line}); "
                                       "accepted: each key once per mapping")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML mapping in `path`: UTF-8 text, no repeated keys; else a one-line StudyConfigError."""
    if not path.is_file():
        raise StudyConfigError("", f"no study config at {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise StudyConfigError("", f"{path} is {path.stat().st_size:,} bytes; accepted: a study config under "
                               f"{MAX_CONFIG_BYTES // 1024} KB")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StudyConfigError("", f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset "
                               f"{e.start}); accepted: a UTF-8 YAML file") from None
    if "\x00" in text:
        raise StudyConfigError("", f"{path} holds a NUL byte at offset {text.index(chr(0))}; accepted: a "
                               "UTF-8 YAML text file")
    loader = _UniqueKeyLoader(text)  # what yaml.safe_load does, with the repeated-key check
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise StudyConfigError("", f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def _loc_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("Range", "MethodCfg") or str(p).startswith(
                ("function-", "list[", "float", "int", "literal[", "union[")):
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
    if isinstance(ctx_error, StudyConfigError):  # raised with its full path (study.design checks)
        return ctx_error
    if isinstance(ctx_error, _PathError):
        base = _loc_path(loc)
        if ctx_error.path.startswith(("space.", "finetune.", "num_trials", "sampler", "objective.",
                                      "early_stopping.", "fixed.", "dense.")) and not base:
            return StudyConfigError(ctx_error.path, str(ctx_error))
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
    return StudyConfigError(path, msg)


def _set_path(d: dict[str, Any], dotted: tuple[str, ...], value: Any) -> None:
    for key in dotted[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise StudyConfigError(".".join(dotted), "cannot override inside a non-mapping")
    d[dotted[-1]] = value


def load_config(source: str | os.PathLike | Mapping[str, Any] | StudyConfig,
                **overrides: Any) -> StudyConfig:
    """Read (YAML path, a mapping, or a StudyConfig), apply overrides, validate.

    Overrides are top-level keys (`num_trials=4`, `storage=...`), aliases (`tracking_uri`, `experiment`,
    `address`, `num_cpus`) or dotted paths given as a dict under `set={"finetune.lr": [1e-3]}`.
    Raises StudyConfigError (one line, names the field) on any problem.
    """
    if isinstance(source, StudyConfig):
        raw: Any = source.as_input()
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raw = read_yaml(Path(source))
    if not isinstance(raw, dict):
        raise StudyConfigError("", "a study config is a YAML mapping of keys (name, model, data, ...)")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy with plain types
    dotted = overrides.pop("set", None) or {}
    for key, value in overrides.items():
        if value is not None:
            _set_path(raw, OVERRIDE_ALIASES.get(key, (key,)), value)
    for key, value in dotted.items():
        _set_path(raw, tuple(key.split(".")), value)
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise _first_error(e) from None
    except _PathError as e:
        raise StudyConfigError(e.path, str(e)) from None
    check_runnable(cfg)  # every member's settings are ones tpp accepts (one line naming the field)
    return cfg
