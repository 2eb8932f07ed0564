"""Timestamps in API answers and callbacks: the cached formatter says what datetime would."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay.delivery import iso_utc


def _by_datetime(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@given(st.floats(min_value=-1e9, max_value=253_402_300_799.0, allow_nan=False))
@example(0.9999995)  # rounds up to the next whole second
@example(1_796_160_000.9995)
@example(-0.5)
def test_iso_utc_matches_datetime_to_the_millisecond(epoch_s: float) -> None:
    assert iso_utc(epoch_s) == _by_datetime(epoch_s)


def test_the_same_second_twice_is_formatted_alike() -> None:
    assert iso_utc(1_796_160_000.25) == "2026-12-01T21:20:00.250Z"
    assert iso_utc(1_796_160_000.5) == "2026-12-01T21:20:00.500Z"


def test_past_year_9999_it_fails_as_datetime_does() -> None:
    with pytest.raises((ValueError, OverflowError, OSError)):
        iso_utc(253_402_300_800.0)
