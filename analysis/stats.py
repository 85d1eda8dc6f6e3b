"""The statistics the report rests on, each reproducible (fixed RNG) and honest about small n.

- interval: the mean over seeds with an interval -- a 95% percentile bootstrap CI with >= 5 values; with
  2-4 values the min-max range (a bootstrap of so few points is too narrow to mean anything); none for 1.
- sign_flip_p: the exact two-sided paired permutation (sign-flip) test of a mean difference.
- kendall: Kendall's tau-b with a bootstrap CI over the units and scipy's p-value.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_BOOT = 5  # fewer values than this: the interval is the min-max range
N_BOOT = 10_000
ALPHA = 0.05
EXACT_MAX = 16  # up to 2**16 sign vectors are enumerated; above that, Monte Carlo


@dataclass(frozen=True)
class Interval:
    """mean over n values and its interval; kind: bootstrap95 | range | single | none."""

    mean: float
    lo: float
    hi: float
    n: int
    kind: str

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def _clean(values: Sequence[float]) -> np.ndarray:
    v = np.asarray([float(x) for x in values if x is not None], dtype=float)
    return v[np.isfinite(v)]


def interval(values: Sequence[float], *, ci: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean and interval of `values` (NaNs dropped); see the module docstring for the kind used."""
    v = _clean(values)
    n = len(v)
    if n == 0:
        return Interval(np.nan, np.nan, np.nan, 0, "none")
    mean = float(v.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1, "single")
    if n < MIN_BOOT:
        return Interval(mean, float(v.min()), float(v.max()), n, "range")
    lo, hi = np.quantile(resample_counts(n, n_boot, seed) @ v / n, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return Interval(mean, float(lo), float(hi), n, "bootstrap95")


@functools.lru_cache(maxsize=8)
def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each of n units is drawn in each of n_boot bootstrap resamples (rows; the draws of
    ``default_rng(seed).integers(0, n, size=(n_boot, n))``). A report bootstraps every group and LR over
    the same seeds with the same RNG, so the draws are made once per n and each interval is one
    matrix-vector product instead of drawing and gathering n_boot x n values (BENCHMARKS.md §9). Read-only."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    out = counts.reshape(n_boot, n).astype(float)
    out.flags.writeable = False
    return out


def sign_flip_p(diffs: Sequence[float], *, n_mc: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of a paired mean difference under random sign flips: the share of the 2**n flips
    whose |mean| is at least the observed one (exact for n <= 16, else Monte Carlo with a fixed RNG).
    NaN with no pairs. With n pairs the smallest attainable p is 2 / 2**n (see `p_floor`)."""
    d = _clean(diffs)
    n = len(d)
    if n == 0:
        return np.nan
    obs = abs(d.mean())
    tol = 1e-9 * max(1.0, float(np.abs(d).max()))
    if n <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d / n) >= obs - tol))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_mc, n))
    hits = int(np.sum(np.abs(signs @ d / n) >= obs - tol))
    return (hits + 1) / (n_mc + 1)


def p_floor(n: int) -> float:
    """The smallest two-sided p the sign-flip test can give with n pairs."""
    return 2.0 / 2**n if n >= 1 else np.nan


def min_pairs(alpha: float = ALPHA) -> int:
    """How many pairs the sign-flip test needs before p < alpha is possible at all."""
    return next(n for n in itertools.count(1) if p_floor(n) < alpha)


@dataclass(frozen=True)
class Tau:
    tau: float
    lo: float
    hi: float
    p: float
    n: int


def kendall(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, seed: int = 0) -> Tau:
    """Kendall's tau-b between x and y over the finite pairs, a 95% percentile bootstrap CI (resampling
    the pairs; resamples where tau is undefined are skipped) and scipy's p-value. NaN below 3 pairs."""
    from scipy.stats import kendalltau

    xy = np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
    xy = xy[np.isfinite(xy).all(axis=1)]
    n = len(xy)
    if n < 3 or len(np.unique(xy[:, 0])) < 2 or len(np.unique(xy[:, 1])) < 2:
        return Tau(np.nan, np.nan, np.nan, np.nan, n)
    res = kendalltau(xy[:, 0], xy[:, 1])
    # A resample holds pair i w_i times, so its tau-b sums are quadratic forms in w: the numerator
    # sum_kl sx[i_k, i_l] sy[i_k, i_l] = w' (sx * sy) w, and the pairs untied in x, w' |sx| w, are all pairs
    # less those within a group of equal x: (sum w)^2 - sum_g (sum_g w)^2. Integers throughout, so equal to
    # summing the resampled sign matrices (tests/test_analysis_stats.py). The one matrix product runs in
    # float32, exact here: its entries are integers of magnitude at most sum w = n < 2^24; the products and
    # sums after it are taken in float64.
    if n >= 2**24:
        raise ValueError(f"x, y: {n} pairs; the bootstrap is exact up to {2**24 - 1}")
    w = resample_counts(n, n_boot, seed)
    sxy = np.sign(xy[:, 0][:, None] - xy[:, 0][None, :]) * np.sign(xy[:, 1][:, None] - xy[:, 1][None, :])
    w32 = w.astype(np.float32)
    num = np.einsum("bi,bi->b", (w32 @ sxy.astype(np.float32)).astype(float), w)
    den = np.sqrt(_untied(w, xy[:, 0]) * _untied(w, xy[:, 1]))
    boots = num[den > 0] / den[den > 0]
    lo, hi = np.quantile(boots, [0.025, 0.975]) if len(boots) else (np.nan, np.nan)
    return Tau(float(res.statistic), float(lo), float(hi), float(res.pvalue), n)


def _untied(w: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per resample (rows of w), the ordered pairs of units whose `values` differ:
    sum_ij w_i w_j [v_i != v_j]."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    per_group = np.add.reduceat(w[:, order], starts, axis=1) if len(starts) < len(v) else w
    return w.sum(axis=1) ** 2 - (per_group**2).sum(axis=1)
