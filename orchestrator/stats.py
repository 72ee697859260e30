"""How sure a difference of mean accuracies is: Welch's t interval over seeds.

    welch_interval(0.45, 0.010, 3, 0.41, 0.014, 3)  # -> Interval(0.04, low, high, df)

A side with one run has no spread to tell, so the interval is unknown (None). A baseline taken
as exact (the paper's figure, or a number given) has no spread of its own: the interval is
the poster side's one-sample t interval around the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    difference: float  # mean of a - mean of b
    low: float
    high: float
    df: float  # Welch-Satterthwaite degrees of freedom


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` (possibly fractional) degrees of freedom."""
    from scipy.special import stdtrit  # scipy.stats costs half a second to import

    return float(stdtrit(df, p))


def welch_interval(mean_a: float, std_a: float | None, n_a: int, mean_b: float,
                   std_b: float | None, n_b: int | None, level: float = LEVEL
                   ) -> Interval | None:
    """The `level` interval of mean_a - mean_b from two samples' means, sample standard
    deviations (ddof 1) and sizes; `n_b` None: b is exact (no spread). None when a side has
    one run, or a spread is unknown."""
    if n_a < 2 or std_a is None or not math.isfinite(std_a):
        return None
    var_a = std_a ** 2 / n_a
    if n_b is None:
        var_b, df = 0.0, float(n_a - 1)
    else:
        if n_b < 2 or std_b is None or not math.isfinite(std_b):
            return None
        var_b = std_b ** 2 / n_b
        total = var_a + var_b
        if total == 0:
            df = float(n_a + n_b - 2)
        else:
            df = total ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(var_a + var_b)
    difference = mean_a - mean_b
    return Interval(difference, difference - half, difference + half, df)


@dataclass(frozen=True)
class Correlation:
    r: float  # Pearson's
    low: float | None  # its `level` interval (Fisher's z); None with fewer than 4 points
    high: float | None
    n: int


def pearson_interval(x: list[float], y: list[float], level: float = LEVEL) -> Correlation:
    """Pearson's correlation of x and y with its interval from Fisher's z transform (the
    normal approximation: with a handful of points the interval is wide, and said so)."""
    n = len(x)
    if n != len(y) or n < 3:
        raise ValueError(f"a correlation needs at least 3 pairs, got {n}")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        raise ValueError("a correlation needs values that vary")
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    if n < 4 or abs(r) == 1.0:
        return Correlation(r, None, None, n)
    from scipy.special import ndtri

    z, half = math.atanh(r), float(ndtri(0.5 + level / 2)) / math.sqrt(n - 3)
    return Correlation(r, math.tanh(z - half), math.tanh(z + half), n)
