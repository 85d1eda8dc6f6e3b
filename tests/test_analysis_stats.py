"""analysis.stats: intervals over seeds, the exact sign-flip test and Kendall τ, against values worked by
hand or by an independent computation (itertools enumeration, scipy)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest


def _exact_p(d: list[float]) -> float:
    obs = abs(np.mean(d))
    flips = [abs(np.mean([s * x for s, x in zip(signs, d, strict=True)]))
             for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= obs - 1e-12 for f in flips) / len(flips)


def test_interval_kinds():
    from analysis import interval

    assert interval([]).kind == "none" and math.isnan(interval([math.nan]).mean)
    one = interval([5.0])
    assert (one.mean, one.lo, one.hi, one.n, one.kind) == (5.0, 5.0, 5.0, 1, "single")
    assert not one.excludes_zero()
    few = interval([1.0, 4.0, 2.0, math.nan])  # 2-4 values: the min-max range, NaNs dropped
    assert (few.mean, few.lo, few.hi, few.n, few.kind) == (pytest.approx(7 / 3), 1.0, 4.0, 3, "range")
    vals = [1.0, 2.0, 3.0, 4.0, 10.0]
    boot = interval(vals)
    assert boot.kind == "bootstrap95" and boot.mean == 4.0 and 1.0 < boot.lo < 4.0 < boot.hi < 10.0
    assert interval(vals) == boot  # fixed RNG: reproducible
    rng = np.random.default_rng(0)  # the same resampling, computed independently
    means = np.asarray(vals)[rng.integers(0, 5, size=(10_000, 5))].mean(axis=1)
    assert (boot.lo, boot.hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert interval([0.5, 1.0]).excludes_zero() and not interval([-0.5, 1.0]).excludes_zero()


@pytest.mark.parametrize("d", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [3.0, -1.0, 2.0, 0.5, -0.2],
                               [0.0, 0.0, 0.0], [2.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -0.1]])
def test_sign_flip_p_is_the_exact_enumeration(d):
    from analysis import sign_flip_p

    assert sign_flip_p(d) == pytest.approx(_exact_p(d))


def test_sign_flip_p_floor_and_large_n():
    from analysis import sign_flip_p
    from analysis.stats import min_pairs, p_floor

    assert sign_flip_p([1.0, 2.0]) == 0.5 == p_floor(2)  # 2 seeds can never give p < 0.05
    assert sign_flip_p([1.0] * 6) == 2 / 64 and min_pairs(0.05) == 6 and p_floor(5) == 2 / 32
    assert math.isnan(sign_flip_p([]))
    big = list(np.linspace(0.1, 2.0, 20))  # Monte Carlo above 16 pairs: all positive -> about 2 / 2**20
    assert sign_flip_p(big) == pytest.approx(1 / 100_001, abs=2e-5)


def test_kendall_matches_scipy_and_its_ci_covers_it():
    from scipy.stats import kendalltau

    from analysis import kendall

    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    t = kendall(x, y)
    ref = kendalltau(x, y)
    assert t.n == 40 and t.tau == pytest.approx(ref.statistic) and t.p == pytest.approx(ref.pvalue)
    assert t.lo < t.tau < t.hi and t.hi - t.lo < 0.6 and kendall(x, y) == t
    ties = kendall([1, 1, 2, 2, 3, 3], [1, 2, 2, 3, 3, 4])  # tau-b with ties, as scipy
    assert ties.tau == pytest.approx(kendalltau([1, 1, 2, 2, 3, 3], [1, 2, 2, 3, 3, 4]).statistic)
    assert math.isnan(kendall([1, 2], [1, 2]).tau) and math.isnan(kendall([1, 1, 1], [1, 2, 3]).tau)
    assert kendall([1, 2, 3, math.nan], [3, 2, 1, 0]).n == 3


@pytest.mark.parametrize("ties", [False, True])
def test_kendalls_bootstrap_interval_equals_scipys_tau_b_of_every_resample(ties):
    """The interval from the resamples' quadratic forms equals the one from scipy's tau-b of each resampled
    data set (the same resample indices), ties and repeated pairs included."""
    from scipy.stats import kendalltau

    from analysis import kendall

    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=25).astype(float) if ties else rng.normal(size=25)
    y = x + rng.normal(size=25)
    n_boot = 300
    idx = np.random.default_rng(11).integers(0, 25, size=(n_boot, 25))
    taus = [kendalltau(x[i], y[i]).statistic for i in idx]
    taus = np.array([t for t in taus if np.isfinite(t)])
    lo, hi = np.quantile(taus, [0.025, 0.975])
    got = kendall(x, y, n_boot=n_boot, seed=11)
    assert got.lo == pytest.approx(lo, abs=1e-12) and got.hi == pytest.approx(hi, abs=1e-12)


def test_resample_counts_are_the_draws_counted_and_intervals_the_resampled_means():
    """The cached counts are the RNG's draws counted per row; an interval from them equals the mean of the
    gathered resamples (the plain bootstrap) to rounding."""
    from analysis import interval
    from analysis.stats import resample_counts

    n, n_boot = 37, 500
    idx = np.random.default_rng(4).integers(0, n, size=(n_boot, n))
    counts = resample_counts(n, n_boot, 4)
    assert not counts.flags.writeable
    assert all((np.bincount(row, minlength=n) == c).all() for row, c in zip(idx, counts, strict=True))
    v = np.random.default_rng(9).normal(size=n) * 50
    means = v[np.random.default_rng(0).integers(0, n, size=(10_000, n))].mean(axis=1)
    got = interval(v)
    assert (got.lo, got.hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), rel=1e-13)


def test_kendalls_bootstrap_equals_the_float64_quadratic_forms_at_scale():
    """The float32 product and the tie-group counts give exactly the three float64 quadratic forms, with
    ties in both variables, at a size where float32 rounding would show if the product were not exact."""
    from analysis import kendall
    from analysis.stats import resample_counts

    rng = np.random.default_rng(8)
    n, n_boot = 700, 400
    x = rng.integers(0, 30, size=n).astype(float)
    y = np.round(x + rng.normal(size=n) * 8)
    w = resample_counts(n, n_boot, 2)
    sx, sy = np.sign(x[:, None] - x[None, :]), np.sign(y[:, None] - y[None, :])
    num = ((w @ (sx * sy)) * w).sum(axis=1)
    den = np.sqrt(((w @ (sx * sx)) * w).sum(axis=1) * ((w @ (sy * sy)) * w).sum(axis=1))
    lo, hi = np.quantile(num / den, [0.025, 0.975])
    got = kendall(x, y, n_boot=n_boot, seed=2)
    assert (got.lo, got.hi) == (lo, hi)
