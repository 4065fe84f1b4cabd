"""The eval metrics' standard errors: each formula against what resampling the items really does."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from revision import standard_errors


def _spread(statistic, items, draws=4000, seed=0):
    """The sd of ``statistic`` over fresh draws of items from the same population (what an SE promises)."""
    rng = np.random.default_rng(seed)
    return float(np.std([statistic(rng.choice(items, len(items))) for _ in range(draws)]))


def test_the_formulas_match_what_another_draw_of_items_does():
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 0.5, size=200)
    assert standard_errors.of_mean(values) == pytest.approx(_spread(np.mean, values), rel=0.1)
    hits = rng.random(200) < 0.3
    assert standard_errors.of_proportion(list(hits)) == pytest.approx(_spread(np.mean, hits.astype(float)), rel=0.1)
    lengths = rng.integers(5, 30, size=200).astype(float)
    sums = lengths * rng.normal(2.0, 0.5, size=200)  # per-caption summed NLL: longer captions, larger sums
    pairs = np.stack([sums, lengths], axis=1)
    ratio = lambda rows: rows[:, 0].sum() / rows[:, 1].sum()  # noqa: E731
    assert standard_errors.of_ratio(sums, lengths) == pytest.approx(_spread(ratio, pairs), rel=0.1)


def test_the_bootstrap_is_seeded_and_measures_the_statistic_it_is_given():
    values = list(np.random.default_rng(2).normal(size=100))
    mean = lambda rows: float(np.mean([values[i] for i in rows]))  # noqa: E731
    first = standard_errors.bootstrap(len(values), mean, seed=3)
    assert first == standard_errors.bootstrap(len(values), mean, seed=3)
    assert first != standard_errors.bootstrap(len(values), mean, seed=4)
    assert first == pytest.approx(standard_errors.of_mean(values), rel=0.15)


def test_too_few_items_have_no_standard_error():
    assert math.isnan(standard_errors.of_mean([1.0]))
    assert math.isnan(standard_errors.of_proportion([]))
    assert math.isnan(standard_errors.of_ratio([1.0], [2.0]))
    assert math.isnan(standard_errors.bootstrap(1, lambda rows: 0.0, seed=0))
    random.seed(0)  # the bootstrap has its own generator: the global one is left alone
    before = random.random()
    random.seed(0)
    standard_errors.bootstrap(10, lambda rows: float(len(rows)), seed=0)
    assert random.random() == before
