"""Wilson and bootstrap intervals against closed forms and known values."""

import math

import numpy as np
import pytest

from curvedit.evaluate.intervals import bootstrap_mean, bootstrap_ratio, wilson


def test_wilson_matches_published_values():
    # Wilson (1927) / Newcombe (1998) table: 81 of 263 -> 0.2553 .. 0.3662 at 95%
    interval = wilson(81, 263)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.2553, 0.3662)
    assert interval.value == pytest.approx(81 / 263) and interval.n == 263


def test_wilson_at_the_edges_stays_in_range_and_is_not_empty():
    zero, full = wilson(0, 10), wilson(10, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(3.8415 / (10 + 3.8415), rel=1e-4)  # z^2 / (n + z^2)
    assert full.high == 1.0 and full.low == pytest.approx(1 - 3.8415 / (10 + 3.8415), rel=1e-4)
    assert wilson(5, 10, confidence=0.5).high < wilson(5, 10).high


def test_wilson_refuses_impossible_counts():
    for k, n in ((3, 2), (-1, 4), (0, 0)):
        with pytest.raises(ValueError):
            wilson(k, n)


def test_bootstrap_mean_covers_the_normal_interval_of_a_large_sample():
    values = np.random.default_rng(1).normal(2.0, 1.0, size=4000)
    interval = bootstrap_mean(values, resamples=3000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert interval.value == pytest.approx(values.mean())
    assert interval.low == pytest.approx(values.mean() - half, abs=0.01)
    assert interval.high == pytest.approx(values.mean() + half, abs=0.01)


def test_bootstrap_of_a_constant_is_a_point_and_is_seeded():
    assert bootstrap_mean([0.5] * 7).low == bootstrap_mean([0.5] * 7).high == 0.5
    values = [0.1, 0.9, 0.4, 0.3]
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)


def test_bootstrap_ratio_resamples_units_together():
    nll, tokens = [10.0, 20.0, 30.0], [5.0, 10.0, 15.0]  # every unit has ratio 2
    interval = bootstrap_ratio(nll, tokens)
    assert interval.value == interval.low == interval.high == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [1.0, 2.0])
