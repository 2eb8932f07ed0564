"""LoopHistogram: the relay's lock-free histogram exposes what prometheus_client's would."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from relay.metrics import LAG_BUCKETS, POLL_BUCKETS, LoopHistogram, Metrics

_CREATED = re.compile(rb"^\S+_created\S* \S+$", re.MULTILINE)


def _pair(
    labelnames: tuple[str, ...],
) -> tuple[Histogram, LoopHistogram, CollectorRegistry, CollectorRegistry]:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "Doc.", labelnames, buckets=POLL_BUCKETS, registry=theirs)
    loop = LoopHistogram("h_seconds", "Doc.", labelnames, buckets=POLL_BUCKETS, registry=ours)
    return reference, loop, theirs, ours


def _without_created(text: bytes) -> bytes:
    """`_created` is each series' creation time: the one value that differs between the two."""
    return _CREATED.sub(b"", text)


# Bounds themselves, just either side of them, 0, negatives, past the last bound, NaN, inf.
_amounts = st.one_of(
    st.sampled_from([0.0, 0.005, 0.01, 60.0, 61.0, -1.0, 1e9, math.nan, math.inf]),
    st.floats(min_value=-10, max_value=100, allow_nan=False),
)


@given(st.lists(st.tuples(st.sampled_from(["ok", "timeout"]), _amounts), max_size=40))
def test_the_exposition_is_prometheus_clients_sample_for_sample(
    observations: list[tuple[str, float]],
) -> None:
    reference, loop, theirs, ours = _pair(("outcome",))
    for outcome in ("ok", "timeout"):  # series at 0 from the start, as Metrics makes them
        reference.labels(outcome)
        loop.labels(outcome)
    for outcome, amount in observations:
        reference.labels(outcome).observe(amount)
        loop.labels(outcome).observe(amount)
    assert _without_created(generate_latest(ours)) == _without_created(generate_latest(theirs))
    assert _without_created(generate_openmetrics(ours)) == _without_created(
        generate_openmetrics(theirs)
    )


def test_an_unlabelled_histogram_has_its_series_from_the_start() -> None:
    reference, loop, theirs, ours = _pair(())
    assert _without_created(generate_latest(ours)) == _without_created(generate_latest(theirs))
    loop.observe(0.02)
    reference.observe(0.02)
    text = generate_latest(ours)
    assert b'h_seconds_bucket{le="0.025"} 1.0' in text
    assert b'h_seconds_bucket{le="0.01"} 0.0' in text
    assert _without_created(text) == _without_created(generate_latest(theirs))


def test_created_is_exposed_per_series() -> None:
    _, loop, _, ours = _pair(("outcome",))
    loop.labels("ok")
    assert re.search(rb'^h_seconds_created\{outcome="ok"\} \d', generate_latest(ours), re.MULTILINE)


def test_wrong_label_counts_are_refused() -> None:
    _, loop, _, _ = _pair(("outcome",))
    with pytest.raises(ValueError, match="outcome"):
        loop.labels()
    with pytest.raises(ValueError, match="observe via labels"):
        loop.observe(1.0)


@pytest.mark.parametrize("label", ["le", "__name"])
def test_reserved_label_names_are_refused(label: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        LoopHistogram(
            "h_seconds", "Doc.", (label,), buckets=POLL_BUCKETS, registry=CollectorRegistry()
        )


def test_label_values_are_text_as_prometheus_clients_are() -> None:
    """A number as a label value (a child process's event, say) must not break every scrape."""
    reference, loop, theirs, ours = _pair(("outcome",))
    loop.labels(3).observe(0.5)  # type: ignore[arg-type]
    reference.labels(3).observe(0.5)
    assert loop.labels("3") is loop.labels(3)  # type: ignore[arg-type]
    assert _without_created(generate_latest(ours)) == _without_created(generate_latest(theirs))


def test_a_restricted_registry_selects_a_loop_histogram_by_its_sample_names() -> None:
    """/metrics?name[]=... filters with restricted_registry, which finds collectors by the
    names describe() gives."""
    metrics = Metrics()
    metrics.scheduler_lag.labels("poll").observe(0.003)
    restricted = metrics.registry.restricted_registry(["relay_scheduler_lag_seconds_bucket"])
    text = generate_latest(restricted).decode()
    assert 'relay_scheduler_lag_seconds_bucket{le="0.005",loop="poll"} 1.0' in text
    assert len(LAG_BUCKETS) + 1 == text.count('loop="poll"')  # the buckets only, +Inf included
    assert "relay_upstream_polls_total" not in text
