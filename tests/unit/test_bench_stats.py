"""The benchmark's arithmetic: percentiles, histogram quantiles from scraped buckets, profiles."""

from __future__ import annotations

import math

import pytest

from bench.stats import (
    histogram_delta,
    histogram_quantile,
    parse_samples,
    percentile,
    profile_summary,
    share_at_most,
)

BEFORE = """\
# TYPE relay_scheduler_lag_seconds histogram
relay_scheduler_lag_seconds_bucket{le="0.01",loop="poll"} 10.0
relay_scheduler_lag_seconds_bucket{le="0.1",loop="poll"} 10.0
relay_scheduler_lag_seconds_bucket{le="1.0",loop="poll"} 10.0
relay_scheduler_lag_seconds_bucket{le="+Inf",loop="poll"} 10.0
relay_scheduler_lag_seconds_count{loop="poll"} 10.0
relay_scheduler_lag_seconds_sum{loop="poll"} 0.05
relay_scheduler_lag_seconds_bucket{le="0.01",loop="delivery"} 0.0
relay_scheduler_lag_seconds_bucket{le="0.1",loop="delivery"} 0.0
relay_scheduler_lag_seconds_bucket{le="1.0",loop="delivery"} 0.0
relay_scheduler_lag_seconds_bucket{le="+Inf",loop="delivery"} 0.0
relay_scheduler_lag_seconds_count{loop="delivery"} 0.0
relay_scheduler_lag_seconds_sum{loop="delivery"} 0.0
"""
AFTER = (
    BEFORE.replace('"0.01",loop="poll"} 10.0', '"0.01",loop="poll"} 60.0')
    .replace('"0.1",loop="poll"} 10.0', '"0.1",loop="poll"} 100.0')
    .replace('"1.0",loop="poll"} 10.0', '"1.0",loop="poll"} 110.0')
    .replace('"+Inf",loop="poll"} 10.0', '"+Inf",loop="poll"} 110.0')
)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 0.99, 1.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.5, 3.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.0, 1.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 1.0, 5.0),
        ([5.0, 1.0], 0.5, 3.0),
    ],
)
def test_percentile_interpolates_between_closest_ranks(
    values: list[float], q: float, expected: float
) -> None:
    """Sorted, then linear between the two nearest ranks."""
    assert expected == percentile(values, q)


def test_histogram_delta_counts_only_what_the_window_added() -> None:
    """Bucket counts are cumulative: the window's share is after minus before, per bound."""
    buckets = histogram_delta(
        parse_samples(BEFORE), parse_samples(AFTER), "relay_scheduler_lag_seconds", loop="poll"
    )
    assert [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)] == buckets


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.5, 0.01), (0.9, 0.1), (0.95, 0.55), (0.25, 0.005)],
)
def test_histogram_quantile_is_linear_within_a_bucket(q: float, expected: float) -> None:
    """The same estimate as Prometheus' histogram_quantile."""
    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert expected == pytest.approx(histogram_quantile(q, buckets))


def test_histogram_quantile_past_the_last_finite_bound_is_infinite() -> None:
    """Observations in the +Inf bucket only say 'more than the last bound'."""
    assert math.inf == histogram_quantile(0.99, [(1.0, 50.0), (math.inf, 100.0)])


def test_share_at_most_reads_one_cumulative_bucket() -> None:
    """90 of 100 observations at most 0.1 s."""
    assert 0.9 == share_at_most(0.1, [(0.01, 50.0), (0.1, 90.0), (math.inf, 100.0)])


def test_profile_summary_ranks_own_and_inclusive_samples() -> None:
    """Own samples go to the innermost frame; inclusive counts a function once per stack."""
    collapsed = (
        'process 1:"python";thread (0x1);run (relay/app.py:10);query (relay/store/sqlite.py:5) 3\n'
        'process 1:"python";thread (0x1);run (relay/app.py:11);run (relay/app.py:12) 1\n'
    )
    assert {
        "samples": 4,
        "own": [("query (relay/store/sqlite.py)", 0.75), ("run (relay/app.py)", 0.25)],
        "inclusive": [("run (relay/app.py)", 1.0), ("query (relay/store/sqlite.py)", 0.75)],
    } == profile_summary(collapsed)
