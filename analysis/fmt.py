"""How numbers are written in the report's text, one rule per kind of number (so the summary-consistency
test can read them back with the same precision): accuracies and points 1 decimal, decades 2 decimals,
LRs 2 significant digits, p-values 2 significant digits, shares as whole percents."""

from __future__ import annotations

import math

import numpy as np

ACC_DIGITS = 1  # accuracy (%) and accuracy differences (points)
DECADE_DIGITS = 2  # widths in decades of LR


def finite(x) -> bool:
    return x is not None and not isinstance(x, str) and bool(np.isfinite(x))


def fmt_lr(x: float) -> str:
    """1e-3 -> '1e-3', 0.0021544 -> '2.2e-3' (2 significant digits, as in the paper)."""
    if not finite(x) or x <= 0:
        return "–"
    exp = math.floor(math.log10(x) + 1e-9)
    mant = f"{x / 10**exp:.1f}".rstrip("0").rstrip(".")
    if mant == "10":
        mant, exp = "1", exp + 1
    return f"{mant}e{exp}"


def fmt_num(x: float, digits: int = ACC_DIGITS, signed: bool = False) -> str:
    if not finite(x):
        return "–"
    if round(x, digits) == 0:
        x = 0.0  # no "-0.0"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_acc(x: float, signed: bool = False) -> str:
    return fmt_num(x, ACC_DIGITS, signed)


def fmt_dec(x: float, signed: bool = False) -> str:
    return fmt_num(x, DECADE_DIGITS, signed)


def fmt_p(p: float) -> str:
    """'0.031', '0.5', '1' (2 significant digits); '< 0.001' below that."""
    if not finite(p):
        return "–"
    return "< 0.001" if p < 1e-3 else f"{p:.2g}"


def fmt_share(x: float) -> str:
    return f"{100 * x:.0f}%" if finite(x) else "–"


def fmt_pr(pr: float) -> str:
    return f"{pr:g}" if finite(pr) else "–"


def fmt_level(key: str, value) -> str:
    """A grouping level as text: LR-like values (growth, weight decay) in the compact LR style."""
    if isinstance(value, str):
        return value
    if not finite(value):
        return "none"
    if key in ("growth", "weight_decay"):
        return fmt_lr(value) if value > 0 else "0"
    return f"{value:g}"
