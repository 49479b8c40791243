"""bench/stats.py: the one percentile every bench reports."""
import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from stats import percentile  # noqa: E402


def test_p50_is_the_median_for_odd_and_even_counts():
    for n in (1, 2, 7, 100, 101):
        values = [random.random() for _ in range(n)]
        assert percentile(values, 50) == pytest.approx(statistics.median(values))


def test_linear_interpolation_between_the_closest_ranks():
    values = [40, 10, 30, 20]  # unsorted on purpose
    assert percentile(values, 0) == 10
    assert percentile(values, 100) == 40
    assert percentile(values, 99) == pytest.approx(39.7)  # position 2.97: 30 + 0.97 * 10
    assert percentile(values, 25) == pytest.approx(17.5)  # position 0.75


def test_no_values_or_a_bad_q_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
