"""The token bucket, stepped along a fake time line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.ratelimit import TokenBucket


def drain(bucket: TokenBucket, now: float) -> int:
    """Take every whole token available at `now`; return how many."""
    count = bucket.available(now)
    if count > 0:
        bucket.take(now, count)
    return count


def test_a_new_bucket_holds_one_second_of_tokens() -> None:
    """Without an explicit burst, the bucket starts full at `rate` tokens."""
    assert 8 == TokenBucket(8.0, now=0.0).available(0.0)


def test_an_explicit_burst_sets_the_capacity() -> None:
    """The burst caps what can be spent at once."""
    assert 3 == TokenBucket(8.0, burst=3.0, now=0.0).available(0.0)


def test_a_slow_bucket_still_holds_one_token() -> None:
    """A rate below one a second still lets one request through."""
    assert 1 == TokenBucket(0.25, now=0.0).available(0.0)


def test_the_burst_is_spent_then_nothing_is_left() -> None:
    """Taking the whole burst leaves no whole token at the same instant."""
    bucket = TokenBucket(8.0, burst=4.0, now=0.0)
    assert (4, 0) == (drain(bucket, 0.0), bucket.available(0.0))


def test_tokens_refill_at_the_rate() -> None:
    """An emptied bucket regains `rate` tokens a second, counted in whole tokens."""
    bucket = TokenBucket(8.0, burst=8.0, now=0.0)
    bucket.take(0.0, 8)
    observed = [bucket.available(t) for t in (0.0625, 0.125, 0.25, 0.375, 0.5, 0.75)]
    assert [0, 1, 2, 3, 4, 6] == observed


def test_refill_stops_at_the_burst() -> None:
    """A long idle spell saves up no more than the burst."""
    bucket = TokenBucket(8.0, burst=4.0, now=0.0)
    bucket.take(0.0, 4)
    assert 4 == bucket.available(3600.0)


def test_a_clock_going_backwards_adds_nothing() -> None:
    """An earlier `now` than the last one refills nothing, and later time counts from the latest."""
    bucket = TokenBucket(4.0, burst=4.0, now=10.0)
    bucket.take(10.0, 4)
    assert (0, 0, 2) == (bucket.available(5.0), bucket.available(10.0), bucket.available(10.5))


def test_wait_is_zero_while_a_token_is_available() -> None:
    """No wait when one whole token is there."""
    bucket = TokenBucket(4.0, burst=2.0, now=0.0)
    bucket.take(0.0, 1)
    assert 0.0 == bucket.wait_s(0.0)


def test_wait_is_the_exact_time_to_the_next_token() -> None:
    """An empty bucket at 4/s waits 0.25 s, less as time passes, then nothing."""
    bucket = TokenBucket(4.0, burst=4.0, now=0.0)
    bucket.take(0.0, 4)
    waits = [bucket.wait_s(t) for t in (0.0, 0.125, 0.1875, 0.25, 0.5)]
    assert [0.25, 0.125, 0.0625, 0.0, 0.0] == waits


def test_overspending_is_repaid_before_the_next_token() -> None:
    """Taking more than is there is allowed, and the debt adds to the wait."""
    bucket = TokenBucket(4.0, burst=4.0, now=0.0)
    bucket.take(0.0, 6)
    assert (0.75, 0, 1) == (bucket.wait_s(0.0), bucket.available(0.5), bucket.available(0.75))


def test_waiting_as_told_always_finds_a_token() -> None:
    """Sleeping exactly `wait_s` (on the fake clock) and retrying never comes up empty."""
    bucket = TokenBucket(4.0, burst=1.0, now=0.0)
    now = 0.0
    for _ in range(100):
        now += bucket.wait_s(now)
        assert 1 <= bucket.available(now)
        bucket.take(now)
    assert 24.75 == now


def test_waiting_as_told_finds_a_token_at_epoch_time() -> None:
    """At a real-world epoch time, `now + wait_s(now)` still finds a whole token."""
    now = 1_700_000_000.0
    bucket = TokenBucket(50.0, burst=1.0, now=now)
    bucket.take(now)
    now += bucket.wait_s(now)
    assert 1 == bucket.available(now)


def test_a_greedy_consumer_gets_the_burst_plus_the_rate() -> None:
    """Draining every 1/64 s for 16 s yields exactly burst + rate * 16 tokens, and never more."""
    rate, burst, step = 8.0, 4.0, 1 / 64
    bucket = TokenBucket(rate, burst=burst, now=0.0)
    taken = [drain(bucket, i * step) for i in range(16 * 64 + 1)]
    assert int(burst + rate * 16) == sum(taken)


@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 8.0, 50.0]),
    burst=st.sampled_from([None, 1.0, 2.0, 10.0]),
    steps=st.lists(
        st.tuples(st.floats(0.0, 2.0, allow_nan=False), st.integers(0, 20)),
        min_size=1,
        max_size=60,
    ),
)
def test_no_window_ever_gets_more_than_rate_times_its_length_plus_the_burst(
    rate: float, burst: float | None, steps: list[tuple[float, int]]
) -> None:
    """Over any stretch of T seconds a consumer taking what it is allowed gets <= rate*T + burst."""
    bucket = TokenBucket(rate, burst=burst, now=0.0)
    capacity = bucket.burst
    now = 0.0
    timeline: list[tuple[float, int]] = []
    for advance, want in steps:
        now += advance
        count = min(want, bucket.available(now))
        if count > 0:
            bucket.take(now, count)
        timeline.append((now, count))
    for i, (start, _) in enumerate(timeline):
        spent = 0
        for end, count in timeline[i:]:
            spent += count
            # The bucket rounds up a token it is within a thousandth of (float clocks).
            assert spent <= rate * (end - start) + capacity + 1e-3


def test_tokens_given_back_are_spendable_again_up_to_the_burst() -> None:
    bucket = TokenBucket(10.0, burst=4.0, now=0.0)
    bucket.take(0.0, 4)
    assert 0 == bucket.available(0.0)
    bucket.give_back(3)
    assert 3 == bucket.available(0.0)
    bucket.give_back(5)  # never more than the burst
    assert 4 == bucket.available(0.0)
