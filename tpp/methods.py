"""The pruning methods a run can use, by name.

Each method is a recipe of the same building blocks (L1 selection, an optional growing penalty with
optional gram and BatchNorm terms, physical removal, an optional re-initialisation), so comparing two
methods changes exactly the parts that differ between them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """How a method prunes: what its prune stage does before and after removal."""

    name: str
    description: str
    regularize: bool = False  # run the growing-penalty stage before removal
    gram: bool = False  # add the gram-matrix (trainability) term to the loss
    bn: bool = False  # also penalise the pruned channels' BatchNorm gamma/beta
    target: str = "gram"  # gram-term target: "gram" (TPP) or "identity" (kernel orthogonality)
    reinit: str | None = None  # after removal: None, "orthp" (QR isometry) or "scratch" (random init)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("l1", "L1-norm selection, removal at once, finetune (Li et al. 2017)"),
        Method("tpp", "Trainability Preserving Pruning: growing L2 + gram penalty incl. BatchNorm",
               regularize=True, gram=True, bn=True),
        Method("greg", "GReg-1: the growing L2 penalty on pruned filters, no gram term", regularize=True),
        Method("tpp-nobn", "TPP without the BatchNorm regularisation (ablation)", regularize=True, gram=True),
        Method("tpp-korth", "TPP with a kernel-orthogonality target (identity) instead of the gram target",
               regularize=True, gram=True, bn=True, target="identity"),
        Method("orthp", "L1 removal, then exact isometry re-initialisation by QR (linear MLPs)",
               reinit="orthp"),
        Method("scratch", "the pruned architecture trained from random initialisation", reinit="scratch"),
    ]
}


def get_method(name: str) -> Method:
    """The method called `name`, or a ValueError listing the accepted names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; accepted: {', '.join(METHODS)}") from None


def uses_growth(name: str) -> bool:
    """Whether the penalty growth rate means anything for this method (it has a regularisation stage)."""
    return get_method(name).regularize


def list_methods() -> list[str]:
    return list(METHODS)
