"""Seed-paired comparisons: seed s of two arms shares initialisation, data order and eval items, so the
differences per seed carry the comparison, and their spread, not each arm's, is its noise.

``paired_difference`` gives the mean difference, its confidence interval and the two-sided paired t-test's
p-value; ``benjamini_hochberg`` corrects a family of such p-values; ``detectable_difference`` is the smallest
true difference such a test finds at a given power.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from scipy import stats


@dataclass(frozen=True)
class PairedDifference:
    n: int  # seeds with both arms
    delta: float  # mean of a - b over the seeds
    sd: float  # standard deviation of the per-seed differences
    ci: tuple[float, float]  # confidence interval of delta
    p: float  # two-sided paired t-test of delta = 0

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n)


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, sd_floor: float = 0.0
) -> PairedDifference:
    """``a`` against ``b``, the same seeds in the same order; needs two seeds or more. ``sd_floor``: the least
    spread the differences are taken to have (one item of an accuracy: seeds that agree exactly on a one-item
    difference have sd 0, which says nothing about it)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs the same seeds on both sides, at least two: {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    n, delta = len(differences), statistics.fmean(differences)
    sd = max(statistics.stdev(differences), sd_floor)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if delta == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(delta) / (sd / math.sqrt(n)), n - 1))
    return PairedDifference(n, delta, sd, (float(delta - half), float(delta + half)), p)


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided paired t-test at level ``alpha`` on ``n`` seeds detects
    with probability ``power``, where the per-seed differences have standard deviation ``sd``:
    (t[1 - alpha/2] + t[power]) * sd / sqrt(n), t with n - 1 degrees of freedom (the usual approximation)."""
    if n < 2:
        return math.inf
    return (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate over the family), in the input order."""
    if not p_values:
        return []
    return [float(p) for p in stats.false_discovery_control(list(p_values), method="bh")]
