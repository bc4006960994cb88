"""Uncertainty of reported numbers: Wilson intervals for rates, bootstrap intervals for means
(docs/method.md section 8).

- A rate `k / n` (strict or loose accuracy, task accuracy, a share of examples) gets the
  Wilson score interval at confidence `1 - alpha` (z = 1.96 for 95%):
  `(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)` with `p = k/n`. Unlike the normal
  approximation it stays inside [0, 1] and is not empty at `k = 0` or `k = n`.
- A mean of per-example values (normalized distance, stress score, nDCG per position,
  per-sequence losses) gets a percentile bootstrap interval: the means of `resamples`
  resamples drawn with replacement (seeded), cut at the `alpha/2` and `1 - alpha/2`
  quantiles. A ratio of sums (perplexity = exp(Σ NLL / Σ tokens)) is resampled by its units
  (held-out sequences), keeping numerator and denominator together.

Every interval is returned with the count `n` it rests on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval.

    Attributes:
        value: the point estimate.
        low: lower end.
        high: upper end.
        n: the number of units (examples, sequences) it rests on.
        method: "wilson" or "bootstrap".
    """

    value: float
    low: float
    high: float
    n: int
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-ready."""
        return asdict(self)

    def overlaps(self, other: "Interval") -> bool:
        """Whether the two intervals share a point (their difference is not clear)."""
        return self.low <= other.high and other.low <= self.high


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a rate.

    Args:
        successes: k, with 0 <= k <= n.
        n: trials (> 0).
        confidence: e.g. 0.95.

    Returns:
        An `Interval` around `k / n`.

    Raises:
        ValueError: n < 1, k outside [0, n], or a confidence outside (0, 1).
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a rate needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends where round-off would blur them
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(value=p, low=low, high=high, n=n, method="wilson")


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> Interval:
    """Percentile bootstrap interval of a mean.

    Raises:
        ValueError: no value, or a confidence outside (0, 1).
    """
    return bootstrap_ratio(values, [1.0] * len(values), confidence, resamples, seed)


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], confidence: float = 0.95,
                    resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `Σ numerators / Σ denominators`, resampling units
    (each unit keeps its numerator and denominator together).

    Raises:
        ValueError: no unit, different lengths, a confidence outside (0, 1), or a
            non-positive denominator sum.
    """
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.size == 0 or num.shape != den.shape:
        raise ValueError(f"need as many numerators as denominators, at least one ({num.size} vs {den.size})")
    _z(confidence)
    if den.sum() <= 0:
        raise ValueError("the denominators must sum to a positive number")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num.size, size=(resamples, num.size))
    ratios = num[picks].sum(axis=1) / np.maximum(den[picks].sum(axis=1), np.finfo(float).tiny)
    low, high = np.quantile(ratios, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(value=float(num.sum() / den.sum()), low=float(low), high=float(high), n=int(num.size),
                    method="bootstrap")


def format_interval(interval: dict[str, float] | Interval, percent: bool = False, digits: int = 3) -> str:
    """`value [low, high]` for tables: percent with one decimal (ends rounded to whole
    percents), else `digits` decimals."""
    i = interval.to_dict() if isinstance(interval, Interval) else interval
    if percent:
        return f"{100 * i['value']:.1f} [{100 * i['low']:.0f}, {100 * i['high']:.0f}]"
    return f"{i['value']:.{digits}f} [{i['low']:.{digits}f}, {i['high']:.{digits}f}]"
