"""The statistics the report and the fidelity study quote, against scipy's own."""

import random

import pytest
from scipy import stats

from orchestrator.stats import pearson_interval, welch_interval


def test_pearson_interval_is_scipys_fisher_z_interval():
    rng = random.Random(0)
    for n in (5, 7, 30):
        x = [rng.random() for _ in range(n)]
        y = [a + rng.gauss(0, 0.3) for a in x]
        mine = pearson_interval(x, y)
        theirs = stats.pearsonr(x, y)
        interval = theirs.confidence_interval(0.95)
        assert mine.r == pytest.approx(theirs.statistic)
        assert (mine.low, mine.high) == pytest.approx((interval.low, interval.high))
    assert pearson_interval([1, 2, 3], [1, 3, 2]).low is None  # three points: no interval
    with pytest.raises(ValueError, match="values that vary"):
        pearson_interval([1, 1, 1, 1], [1, 2, 3, 4])


def test_welch_interval_is_scipys():
    a, b = [0.45, 0.46, 0.44, 0.47], [0.41, 0.43, 0.40]
    mean_a, mean_b = sum(a) / 4, sum(b) / 3
    mine = welch_interval(mean_a, stats.tstd(a), 4, mean_b, stats.tstd(b), 3)
    theirs = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (mine.low, mine.high) == pytest.approx((theirs.low, theirs.high))
