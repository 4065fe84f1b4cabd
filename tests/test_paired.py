"""Seed-paired comparisons: the same numbers as scipy's paired t-test, and a detectable difference that really
is detected at the power asked for."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from revision.paired import detectable_difference, paired_difference

A = [0.912, 0.874, 0.951, 0.889, 0.930]
B = [0.880, 0.861, 0.902, 0.874, 0.893]


def test_paired_difference_is_the_paired_t_test():
    diff = paired_difference(A, B)
    assert diff.n == 5 and diff.delta == pytest.approx(sum(A) / 5 - sum(B) / 5)
    assert diff.p == pytest.approx(stats.ttest_rel(A, B).pvalue)
    half = stats.t.ppf(0.975, 4) * diff.se
    assert diff.ci == pytest.approx((diff.delta - half, diff.delta + half))
    assert paired_difference(B, A).delta == pytest.approx(-diff.delta)


def test_pairing_removes_what_the_seeds_share():
    shared = [0.3, -0.2, 0.5, 0.0, -0.4]  # a seed effect both arms carry
    a, b = [s + 0.05 for s in shared], [s + 0.01 * i for i, s in enumerate(shared)]
    assert paired_difference(a, b).p < stats.ttest_ind(a, b).pvalue


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_detectable_difference_is_found_at_about_the_power_asked(n):
    sd = 0.1
    d = detectable_difference(sd, n)
    critical = stats.t.ppf(0.975, n - 1)
    noncentrality = d / (sd / math.sqrt(n))
    power = stats.nct.sf(critical, n - 1, noncentrality) + stats.nct.cdf(-critical, n - 1, noncentrality)
    assert 0.75 < power < 0.85
    assert detectable_difference(sd, n + 1) < d  # more seeds, smaller detectable differences


def test_one_seed_detects_nothing_and_mismatched_seeds_are_refused():
    assert detectable_difference(0.1, 1) == math.inf
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])
