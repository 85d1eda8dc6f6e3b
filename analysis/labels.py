"""Display names, report order and colours of methods and groups (one place, so text and figures agree)."""

from __future__ import annotations

from collections.abc import Sequence

from analysis.fmt import fmt_level, fmt_pr

METHOD_ORDER = ["scratch", "l1", "l1+fpgm", "greg", "orthp", "tpp-nobn", "tpp-korth", "tpp"]
METHOD_LABELS = {"l1": "L1", "tpp": "TPP", "greg": "GReg-1", "tpp-nobn": "TPP w/o BN reg.",
                 "tpp-korth": "TPP (kernel orth.)", "orthp": "L1+OrthP", "scratch": "Scratch"}
COLORS = {"l1": "tab:red", "tpp": "tab:blue", "greg": "tab:orange", "scratch": "tab:gray",
          "orthp": "tab:green", "tpp-nobn": "tab:purple", "tpp-korth": "tab:brown"}
# methods without a colour of their own (plug-ins, criterion variants) take these in the order a report
# first draws them: no two methods of one report share a colour (up to 12 such methods)
_EXTRA = ["tab:olive", "tab:cyan", "tab:pink", "black", "gold", "navy", "lime", "maroon", "teal", "violet",
          "darkgoldenrod", "slategray"]
_ASSIGNED: dict[str, str] = {}
KEY_NAMES = {"pr": "PR", "growth": "growth", "schedule": "schedule", "epochs": "epochs",
             "weight_decay": "weight decay", "warmup_epochs": "warmup epochs", "momentum": "momentum",
             "batch_size": "batch size"}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def color(method: str) -> str:
    if method in COLORS:
        return COLORS[method]
    return _ASSIGNED.setdefault(method, _EXTRA[len(_ASSIGNED) % len(_EXTRA)])


def levels_text(row, keys: Sequence[str], *, skip: Sequence[str] = ("method",)) -> str:
    """'PR 0.9, growth 1e-3, epochs 30' for the keys of a group row (growth omitted when absent)."""
    parts = []
    for k in keys:
        if k in skip:
            continue
        v = row[k]
        if k == "growth" and fmt_level(k, v) == "none":
            continue
        parts.append(f"PR {fmt_pr(v)}" if k == "pr" else f"{KEY_NAMES.get(k, k)} {fmt_level(k, v)}")
    return ", ".join(parts)


def group_title(row, keys: Sequence[str], skip: Sequence[str] = ("pr",)) -> str:
    """'TPP (growth 1e-3)' -- the method and its levels but those in `skip`, for legends and table rows."""
    extra = levels_text(row, keys, skip=("method", *skip))
    return method_label(row["method"]) + (f" ({extra})" if extra else "")
