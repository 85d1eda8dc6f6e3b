"""Pruning methods by name: the built-ins and your own, on one interface (see `tpp.methods.base`).

    from tpp.methods import Method, Param, register_method

    @register_method("my-select", description="...", params={"k": Param(2, "...", minimum=1)})
    def my_select(ctx):            # ctx: PruneContext -> {group root: bool mask over units, True = pruned}
        ...

Plug-ins in a package are found through the entry point group `tpp_study.methods`.
"""

from tpp.methods import builtin  # noqa: F401  (registers the built-ins)
from tpp.methods.base import Method, Param, PenaltyHooks, PruneContext, StageResult
from tpp.methods.builtin import (
    FilterPenalty,
    WeightPenalty,
    filter_penalty,
    select_by_criterion,
    weight_penalty,
)
from tpp.methods.registry import (
    ENTRY_POINT_GROUP,
    METHODS,
    discover_methods,
    get_method,
    list_methods,
    register_method,
)
from tpp.methods.stage import penalty_stage, run_penalty_loop

__all__ = [
    "ENTRY_POINT_GROUP", "METHODS", "FilterPenalty", "Method", "Param", "PenaltyHooks", "PruneContext",
    "StageResult", "WeightPenalty", "discover_methods", "filter_penalty", "get_method", "list_methods",
    "penalty_stage", "register_method", "run_penalty_loop", "select_by_criterion",
    "weight_penalty",
]
