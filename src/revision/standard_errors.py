"""Standard errors of the eval metrics over their items (images, questions, probes): how much a number would move
with another draw of items of the same kind. The exact formula where there is one, a seeded bootstrap over items
where the metric is no mean (corpus BLEU, F1)."""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np

DRAWS = 200


def of_mean(values: Sequence[float]) -> float:
    """Of a mean over items: sd / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def of_proportion(hits: Sequence[bool]) -> float:
    """Of a share of items: sqrt(p (1 - p) / n)."""
    if not len(hits):
        return math.nan
    p = sum(map(bool, hits)) / len(hits)
    return math.sqrt(p * (1 - p) / len(hits))


def of_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Of sum(a) / sum(b) over items (a per-token mean over captions of different lengths), by the delta method."""
    a, b = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(a) < 2 or b.sum() == 0:
        return math.nan
    ratio = a.sum() / b.sum()
    return float(math.sqrt(((a - ratio * b) ** 2).sum() / (len(a) * (len(a) - 1))) / b.mean())


def bootstrap(n: int, statistic: Callable[[list[int]], float], seed: int, draws: int = DRAWS) -> float:
    """The sd of ``statistic`` over ``draws`` seeded resamples of the item indices 0..n-1."""
    if n < 2:
        return math.nan
    rng = random.Random(f"{seed}-bootstrap")
    values = [statistic([rng.randrange(n) for _ in range(n)]) for _ in range(draws)]
    return float(np.std(values, ddof=1))
