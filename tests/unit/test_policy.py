"""The pure policy: jitter, backoff, Retry-After, the upstream and receiver classifiers, the plans."""

from __future__ import annotations

import math
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import Settings
from relay.models import (
    DeliveryJob,
    DeliveryOutcome,
    DeliveryRecord,
    DeliveryResult,
    EventType,
    PollOutcome,
    PollResult,
    TaskClaim,
    TaskFinish,
    TaskSnapshot,
    TaskStatus,
    TaskUpdate,
)
from relay.policy import (
    DeliveryPolicy,
    PollPolicy,
    classify_delivery,
    classify_upstream,
    exponential,
    honor_retry_after,
    jittered,
    jittered_within,
    parse_retry_after,
    plan_after_delivery,
    plan_after_poll,
    progress_interval,
)

NOW = 1_700_000_000.0
TASK = "tk-hiapi-0001"
# `rand=0.5` puts a jittered backoff exactly on its centre, so schedules come out as exact numbers.
NEUTRAL = 0.5
# `rand=0.0` keeps a progress interval whole (its jitter only ever shortens it).
WHOLE = 0.0

POLL = PollPolicy(
    initial_s=2.0,
    max_s=60.0,
    factor=2.0,
    jitter=0.2,
    error_backoff_max_s=300.0,
    retry_after_max_s=120.0,
    not_found_grace_s=60.0,
)
DELIVERY = DeliveryPolicy(backoff_s=5.0, backoff_max_s=3600.0, max_attempts=10, jitter=0.2)


def envelope(code: Any, data: Any) -> bytes:
    return orjson.dumps({"code": code, "data": data})


def task(status: Any = "handling", **extra: Any) -> dict[str, Any]:
    return {"taskId": TASK, "status": status, **extra}


def claim(
    *,
    polls: int = 3,
    interval: float = 8.0,
    error_streak: int = 0,
    first_not_found_at: float | None = None,
) -> TaskClaim:
    return TaskClaim(
        task_id=TASK,
        polls=polls,
        interval=interval,
        error_streak=error_streak,
        first_not_found_at=first_not_found_at,
        due_at=NOW,
        lease_until=NOW + 60.0,
    )


def ok(status: str, **extra: Any) -> PollResult:
    data = task(status, **extra)
    snapshot = TaskSnapshot(
        task_id=TASK, status=TaskStatus.parse(status), raw_status=status, data=data
    )
    return PollResult(outcome=PollOutcome.OK, snapshot=snapshot, http_status=200)


def job(attempts: int = 0) -> DeliveryJob:
    return DeliveryJob(
        watch_id="w-1",
        task_id=TASK,
        callback_url="https://example.com/hook",
        metadata=None,
        event_type=EventType.SUCCESS,
        task_data=task("success"),
        event_at=NOW - 10.0,
        attempts=attempts,
        due_at=NOW,
        lease_until=NOW + 60.0,
    )


# --- jitter, backoff, Retry-After -------------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "jitter", "rand", "expected"),
    [
        (10.0, 0.2, 0.5, 10.0),
        (10.0, 0.2, 0.0, 8.0),
        (10.0, 0.0, 0.0, 10.0),
        (10.0, 0.0, 0.999, 10.0),
        (2.0, 0.2, 0.5, 2.0),
        (3600.0, 0.2, 0.5, 3600.0),
        (0.0, 0.2, 0.999, 0.0),
    ],
)
def test_jittered_spreads_around_the_delay(
    delay: float, jitter: float, rand: float, expected: float
) -> None:
    """A neutral draw keeps the delay; the lowest draw takes off exactly `jitter` of it."""
    assert expected == jittered(delay, jitter, rand)


@pytest.mark.parametrize(
    ("interval", "rand", "expected"),
    [(10.0, 0.0, 10.0), (10.0, 0.5, 9.0), (10.0, 0.999, 8.002), (60.0, 0.25, 57.0)],
)
def test_a_progress_interval_is_only_ever_shortened_by_its_jitter(
    interval: float, rand: float, expected: float
) -> None:
    """The interval is the longest a finished task waits to be seen: jitter takes off up to 20 %."""
    assert pytest.approx(expected) == jittered_within(interval, 0.2, rand)


@given(
    interval=st.floats(min_value=0.0, max_value=86_400.0),
    jitter=st.floats(min_value=0.0, max_value=0.9),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_a_jittered_progress_interval_stays_within_its_bounds(
    interval: float, jitter: float, rand: float
) -> None:
    actual = jittered_within(interval, jitter, rand)
    assert interval * (1.0 - jitter) <= actual <= interval


@pytest.mark.parametrize("delay", [2.0, 10.0, 300.0, 3600.0])
def test_jittered_stays_below_the_upper_bound_for_the_highest_draw(delay: float) -> None:
    """The highest draw in [0, 1) lands just under delay * (1 + jitter)."""
    actual = jittered(delay, 0.2, 0.999)
    assert pytest.approx(delay * 1.1996) == actual
    assert actual < delay * 1.2


@pytest.mark.parametrize(
    ("attempt", "initial", "cap", "expected"),
    [
        (1, 2.0, 300.0, 2.0),
        (2, 2.0, 300.0, 4.0),
        (3, 2.0, 300.0, 8.0),
        (8, 2.0, 300.0, 256.0),
        (9, 2.0, 300.0, 300.0),
        (0, 2.0, 300.0, 2.0),
        (-7, 2.0, 300.0, 2.0),
        (1, 5.0, 3600.0, 5.0),
        (10, 5.0, 3600.0, 2560.0),
        (11, 5.0, 3600.0, 3600.0),
        (1_000, 5.0, 3600.0, 3600.0),
        (10**9, 5.0, 3600.0, 3600.0),
        (sys.maxsize, 5.0, 3600.0, 3600.0),
        (10**100, 5.0, 3600.0, 3600.0),
    ],
)
def test_exponential_doubles_up_to_the_cap(
    attempt: int, initial: float, cap: float, expected: float
) -> None:
    """`initial * 2**(attempt-1)`, never below `initial`, never above `cap`."""
    assert expected == exponential(attempt, initial=initial, cap=cap)


@pytest.mark.parametrize("attempt", [61, 1_000, 10**9, 10**100])
def test_exponential_of_a_huge_attempt_is_finite_even_without_a_cap(attempt: int) -> None:
    """The exponent is clamped, so even an infinite cap gives a finite number, not OverflowError."""
    actual = exponential(attempt, initial=1.0, cap=math.inf)
    assert 2.0**60 == actual


def test_exponential_uses_the_given_base() -> None:
    """A base other than 2 grows by that base."""
    assert 4.5 == exponential(3, initial=2.0, cap=100.0, base=1.5)


@pytest.mark.parametrize(
    ("scheduled", "retry_after", "ceiling", "expected"),
    [
        (10.0, None, 300.0, 10.0),
        (10.0, 60.0, 300.0, 60.0),
        (10.0, 300.0, 300.0, 300.0),
        (10.0, 600.0, 300.0, 300.0),
        (10.0, math.inf, 300.0, 300.0),
        (10.0, 5.0, 300.0, 10.0),
        (10.0, 0.0, 300.0, 10.0),
        (400.0, 600.0, 300.0, 400.0),
    ],
)
def test_honor_retry_after_waits_as_asked_within_the_ceiling(
    scheduled: float, retry_after: float | None, ceiling: float, expected: float
) -> None:
    """The later of our schedule and the peer's ask, the ask clamped at the ceiling."""
    assert expected == honor_retry_after(scheduled, retry_after, ceiling)


# 1445412480 is Wed, 21 Oct 2015 07:28:00 GMT.
DATE_NOW = 1_445_412_480.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 30 ", 30.0),
        ("86400", 86400.0),
        ("Wed, 21 Oct 2015 07:30:00 GMT", 120.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 08:28:00 +0000", 3600.0),
        ("Wed, 21 Oct 2015 09:28:00 +0100", 3600.0),
        ("Wednesday, 21-Oct-15 07:29:00 GMT", 60.0),
        ("Wed Oct 21 07:30:00 2015", 120.0),  # asctime: no zone, and HTTP dates are GMT
        ("Wed, 21 Oct 2015 07:29:00 -0000", 60.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after_reads_seconds_and_http_dates(value: str, expected: float) -> None:
    """Delta seconds are taken as they are; a date counts from `now`, and a past date means 0."""
    assert expected == parse_retry_after(value, DATE_NOW)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "1.5",
        "1e3",
        "0x10",
        "+30",
        "Wed, 32 Oct 2015 07:28:00 GMT",
        "Mon, 01 Jan 99999 00:00:00 GMT",
        "Wed, 21 Oct 2015",
    ],
)
def test_parse_retry_after_gives_none_for_garbage(value: str | None) -> None:
    """Absent, negative, fractional, malformed or zone-less values are ignored."""
    assert parse_retry_after(value, DATE_NOW) is None


@pytest.mark.parametrize(
    "value", ["²", "³", "١٢٠", "Wed, 21 Oct 2015 99999999999999999999:28:00 GMT"]
)
def test_parse_retry_after_never_raises_on_a_peers_header(value: str) -> None:
    """Non-ASCII digits and out-of-range dates are ignored, never raised."""
    assert parse_retry_after(value, DATE_NOW) is None


# --- the upstream answer ----------------------------------------------------------------------


def snapshot_result(data: dict[str, Any], status: TaskStatus, http_status: int = 200) -> PollResult:
    snapshot = TaskSnapshot(task_id=TASK, status=status, raw_status=data["status"], data=data)
    return PollResult(outcome=PollOutcome.OK, snapshot=snapshot, http_status=http_status)


def failure(
    outcome: PollOutcome, http_status: int, detail: str, retry_after: float | None = None
) -> PollResult:
    return PollResult(
        outcome=outcome, http_status=http_status, retry_after=retry_after, detail=detail
    )


def invalid(http_status: int, detail: str) -> PollResult:
    return PollResult(outcome=PollOutcome.INVALID_RESPONSE, http_status=http_status, detail=detail)


NOT_ENVELOPE = "body is not a task envelope"
NOT_THIS_TASK = "envelope data is not this task"


@pytest.mark.parametrize(
    ("http_status", "body", "retry_after", "expected"),
    [
        pytest.param(
            200,
            envelope(200, task("queued")),
            None,
            snapshot_result(task("queued"), TaskStatus.QUEUED),
            id="ok-queued",
        ),
        pytest.param(
            200,
            envelope(200, task("handling", progress=40)),
            None,
            snapshot_result(task("handling", progress=40), TaskStatus.HANDLING),
            id="ok-handling",
        ),
        pytest.param(
            201,
            envelope(200, task("archiving")),
            None,
            snapshot_result(task("archiving"), TaskStatus.ARCHIVING, 201),
            id="ok-other-2xx",
        ),
        pytest.param(
            200,
            envelope(200, task("paused")),
            None,
            snapshot_result(task("paused"), TaskStatus.UNKNOWN),
            id="ok-unknown-status-kept-raw",
        ),
        pytest.param(
            404,
            envelope(404, None),
            None,
            failure(PollOutcome.NOT_FOUND, 404, "envelope code 404"),
            id="not-found-http-404-envelope",
        ),
        pytest.param(
            200,
            envelope(404, None),
            None,
            failure(PollOutcome.NOT_FOUND, 200, "envelope code 404"),
            id="not-found-http-200-envelope",
        ),
        pytest.param(
            404,
            b"<html>Not Found</html>",
            None,
            failure(PollOutcome.CLIENT_ERROR, 404, "HTTP 404"),
            id="bare-404-html",
        ),
        pytest.param(
            404,
            b"",
            None,
            failure(PollOutcome.CLIENT_ERROR, 404, "HTTP 404"),
            id="bare-404-empty",
        ),
        pytest.param(
            401, b"", None, failure(PollOutcome.AUTH_ERROR, 401, "HTTP 401"), id="http-401"
        ),
        pytest.param(
            403, b"", None, failure(PollOutcome.AUTH_ERROR, 403, "HTTP 403"), id="http-403"
        ),
        pytest.param(
            401,
            envelope(401, None),
            None,
            failure(PollOutcome.AUTH_ERROR, 401, "envelope code 401"),
            id="http-401-envelope",
        ),
        pytest.param(
            200,
            envelope(401, None),
            None,
            failure(PollOutcome.AUTH_ERROR, 200, "envelope code 401"),
            id="envelope-401-http-200",
        ),
        pytest.param(
            200,
            envelope(403, None),
            None,
            failure(PollOutcome.AUTH_ERROR, 200, "envelope code 403"),
            id="envelope-403-http-200",
        ),
        pytest.param(
            429,
            b"slow down",
            30.0,
            failure(PollOutcome.RATE_LIMITED, 429, "HTTP 429", retry_after=30.0),
            id="http-429-retry-after",
        ),
        pytest.param(
            429,
            b"",
            None,
            failure(PollOutcome.RATE_LIMITED, 429, "HTTP 429"),
            id="http-429-no-retry-after",
        ),
        pytest.param(
            200,
            envelope(429, None),
            7.0,
            failure(PollOutcome.RATE_LIMITED, 200, "envelope code 429", retry_after=7.0),
            id="envelope-429-http-200",
        ),
        pytest.param(
            429,
            envelope(200, task("handling")),
            12.0,
            failure(PollOutcome.RATE_LIMITED, 429, "envelope code 429", retry_after=12.0),
            id="http-429-beats-envelope-200",
        ),
        pytest.param(
            500, b"", None, failure(PollOutcome.SERVER_ERROR, 500, "HTTP 500"), id="http-500"
        ),
        pytest.param(
            502,
            b"<html>Bad Gateway</html>",
            None,
            failure(PollOutcome.SERVER_ERROR, 502, "HTTP 502"),
            id="http-502",
        ),
        pytest.param(
            503,
            b"",
            60.0,
            failure(PollOutcome.SERVER_ERROR, 503, "HTTP 503", retry_after=60.0),
            id="http-503-retry-after",
        ),
        pytest.param(
            503,
            envelope(200, task("success")),
            None,
            failure(PollOutcome.SERVER_ERROR, 503, "envelope code 503"),
            id="http-503-beats-envelope-200",
        ),
        pytest.param(
            200,
            envelope(500, None),
            None,
            failure(PollOutcome.SERVER_ERROR, 200, "envelope code 500"),
            id="envelope-500-http-200",
        ),
        pytest.param(
            400, b"", None, failure(PollOutcome.CLIENT_ERROR, 400, "HTTP 400"), id="http-400"
        ),
        pytest.param(
            418, b"", None, failure(PollOutcome.CLIENT_ERROR, 418, "HTTP 418"), id="http-418"
        ),
        pytest.param(
            200,
            envelope(400, None),
            None,
            failure(PollOutcome.CLIENT_ERROR, 200, "envelope code 400"),
            id="envelope-400-http-200",
        ),
        pytest.param(
            302, b"", None, failure(PollOutcome.INVALID_RESPONSE, 302, "HTTP 302"), id="http-302"
        ),
        pytest.param(
            200,
            envelope(302, None),
            None,
            failure(PollOutcome.INVALID_RESPONSE, 200, "envelope code 302"),
            id="envelope-302-http-200",
        ),
    ],
)
def test_classify_upstream_maps_each_answer_to_its_outcome(
    http_status: int, body: bytes, retry_after: float | None, expected: PollResult
) -> None:
    """The envelope code decides when the body is an envelope, else the HTTP status does."""
    actual = classify_upstream(
        http_status=http_status, body=body, task_id=TASK, retry_after=retry_after
    )
    assert expected == actual


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>ok</html>", id="html"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b'{"code": 200, "data": ', id="truncated-json"),
        pytest.param(b"[]", id="json-list"),
        pytest.param(b'"ok"', id="json-string"),
        pytest.param(b"null", id="json-null"),
        pytest.param(orjson.dumps({"data": task()}), id="no-code"),
        pytest.param(orjson.dumps({"code": 200}), id="no-data"),
        pytest.param(orjson.dumps({"code": "200", "data": task()}), id="string-code"),
        pytest.param(orjson.dumps({"code": 200.0, "data": task()}), id="float-code"),
        pytest.param(orjson.dumps({"code": True, "data": task()}), id="bool-code"),
        pytest.param(orjson.dumps(task("success")), id="bare-task-object"),
    ],
)
def test_classify_upstream_calls_a_2xx_without_an_envelope_invalid(body: bytes) -> None:
    """A 2xx whose body is not `{"code": int, "data": ...}` is an invalid response."""
    actual = classify_upstream(http_status=200, body=body, task_id=TASK, retry_after=5.0)
    assert invalid(200, NOT_ENVELOPE) == actual


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"taskId": "tk-hiapi-other", "status": "success"}, id="other-task"),
        pytest.param({"status": "success"}, id="no-task-id"),
        pytest.param({"taskId": TASK}, id="no-status"),
        pytest.param({"taskId": TASK, "status": None}, id="null-status"),
        pytest.param({"taskId": TASK, "status": 3}, id="int-status"),
        pytest.param({"taskId": TASK, "status": ["success"]}, id="list-status"),
        pytest.param(None, id="null-data"),
        pytest.param([task("success")], id="list-data"),
        pytest.param("success", id="string-data"),
    ],
)
def test_classify_upstream_rejects_envelope_data_that_is_not_this_task(data: Any) -> None:
    """An envelope with code 200 must carry this task with a string status."""
    actual = classify_upstream(http_status=200, body=envelope(200, data), task_id=TASK)
    assert invalid(200, NOT_THIS_TASK) == actual


def test_classify_upstream_forwards_the_data_object_verbatim() -> None:
    """Every field of `data`, known or not, nested or not, reaches the snapshot unchanged."""
    data = task(
        "success",
        result={"urls": ["https://cdn.example/a.png"], "seed": 42},
        cost=3.5,
        tags=["x", None],
        finishedAt="2024-01-01T00:00:00Z",
    )
    actual = classify_upstream(http_status=200, body=envelope(200, data), task_id=TASK)
    assert actual.snapshot is not None
    assert data == actual.snapshot.data
    assert TaskStatus.SUCCESS == actual.snapshot.status


# --- the poll schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("polls", "interval", "status", "expected"),
    [
        (0, 0.0, TaskStatus.QUEUED, 2.0),
        (0, 30.0, TaskStatus.HANDLING, 2.0),
        (1, 2.0, TaskStatus.QUEUED, 4.0),
        (2, 4.0, TaskStatus.HANDLING, 8.0),
        (3, 8.0, TaskStatus.HANDLING, 16.0),
        (4, 16.0, TaskStatus.HANDLING, 32.0),
        (5, 32.0, TaskStatus.HANDLING, 60.0),
        (6, 60.0, TaskStatus.HANDLING, 60.0),
        (3, 0.5, TaskStatus.HANDLING, 4.0),
        (3, 0.0, TaskStatus.UNKNOWN, 4.0),
        (5, 32.0, TaskStatus.ARCHIVING, 2.0),
        (6, 60.0, TaskStatus.ARCHIVING, 2.0),
    ],
)
def test_progress_interval_starts_short_grows_to_the_cap_and_resets_when_archiving(
    polls: int, interval: float, status: TaskStatus, expected: float
) -> None:
    """First poll and archiving use the initial interval; otherwise it grows by the factor to max."""
    assert expected == progress_interval(claim(polls=polls, interval=interval), status, POLL)


def test_first_poll_after_registration_schedules_the_initial_interval() -> None:
    """A task's first answer, still running, is looked at again after `initial_s`."""
    actual = plan_after_poll(
        claim(polls=0, interval=0.0), ok("queued"), now=NOW, rand=WHOLE, policy=POLL
    )
    expected = TaskUpdate(
        task_id=TASK,
        status="queued",
        next_poll_at=NOW + 2.0,
        interval=2.0,
        error_streak=0,
        first_not_found_at=None,
        last_error=None,
        lease_until=NOW + 60.0,
    )
    assert expected == actual


def test_a_running_task_is_polled_at_growing_intervals_up_to_the_cap() -> None:
    """Feeding each plan back as the next claim gives 2, 4, 8, 16, 32, 60, 60 seconds."""
    current = claim(polls=0, interval=0.0)
    gaps = []
    for _ in range(7):
        update = plan_after_poll(current, ok("handling"), now=NOW, rand=WHOLE, policy=POLL)
        assert isinstance(update, TaskUpdate)
        gaps.append(update.next_poll_at - NOW)
        current = claim(polls=current.polls + 1, interval=update.interval)
    assert [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0] == gaps


@pytest.mark.parametrize(("rand", "expected_gap"), [(0.0, 16.0), (0.5, 14.4), (0.999, 12.8032)])
def test_poll_interval_is_jittered_but_the_stored_interval_is_not(
    rand: float, expected_gap: float
) -> None:
    """Jitter brings the next poll forward; the interval kept for growth stays exact."""
    actual = plan_after_poll(
        claim(polls=3, interval=8.0), ok("handling"), now=0.0, rand=rand, policy=POLL
    )
    assert isinstance(actual, TaskUpdate)
    assert pytest.approx(expected_gap) == actual.next_poll_at
    assert 16.0 == actual.interval


def test_archiving_resets_the_interval_to_initial() -> None:
    """Near the end the task is watched closely again."""
    actual = plan_after_poll(
        claim(polls=9, interval=60.0), ok("archiving"), now=NOW, rand=WHOLE, policy=POLL
    )
    expected = TaskUpdate(
        task_id=TASK,
        status="archiving",
        next_poll_at=NOW + 2.0,
        interval=2.0,
        error_streak=0,
        first_not_found_at=None,
        last_error=None,
        lease_until=NOW + 60.0,
    )
    assert expected == actual


def test_an_unknown_status_keeps_polling_and_records_the_raw_status() -> None:
    """A status the relay does not know is not an end; its raw text is stored."""
    actual = plan_after_poll(
        claim(polls=1, interval=2.0), ok("paused"), now=NOW, rand=WHOLE, policy=POLL
    )
    assert isinstance(actual, TaskUpdate)
    assert ("paused", NOW + 4.0) == (actual.status, actual.next_poll_at)


@pytest.mark.parametrize(
    ("status", "event"), [("success", EventType.SUCCESS), ("fail", EventType.FAIL)]
)
def test_a_terminal_status_finishes_the_task_with_its_data_verbatim(
    status: str, event: EventType
) -> None:
    """Success and fail end the stream and carry the whole data object to the callback."""
    result = ok(status, result={"urls": ["https://cdn.example/a.png"]}, extra=[1, 2])
    actual = plan_after_poll(claim(), result, now=NOW, rand=NEUTRAL, policy=POLL)
    expected = TaskFinish(
        task_id=TASK,
        event_type=event,
        task_data={
            "taskId": TASK,
            "status": status,
            "result": {"urls": ["https://cdn.example/a.png"]},
            "extra": [1, 2],
        },
        status=status,
    )
    assert expected == actual


NOT_FOUND = PollResult(outcome=PollOutcome.NOT_FOUND, http_status=404, detail="envelope code 404")


def test_the_first_not_found_starts_the_grace_window() -> None:
    """A task not visible yet is looked at again after `initial_s`, remembering when it was missed."""
    actual = plan_after_poll(
        claim(polls=0, interval=0.0, error_streak=2), NOT_FOUND, now=NOW, rand=WHOLE, policy=POLL
    )
    expected = TaskUpdate(
        task_id=TASK,
        status=None,
        next_poll_at=NOW + 2.0,
        interval=0.0,
        error_streak=0,
        first_not_found_at=NOW,
        last_error="task not found upstream",
        lease_until=NOW + 60.0,
    )
    assert expected == actual


def test_not_found_inside_the_grace_window_keeps_the_first_miss() -> None:
    """A second miss within the grace keeps polling and keeps the time of the first miss."""
    first = NOW - 59.0
    actual = plan_after_poll(
        claim(interval=8.0, first_not_found_at=first), NOT_FOUND, now=NOW, rand=WHOLE, policy=POLL
    )
    expected = TaskUpdate(
        task_id=TASK,
        status=None,
        next_poll_at=NOW + 2.0,
        interval=8.0,
        error_streak=0,
        first_not_found_at=first,
        last_error="task not found upstream",
        lease_until=NOW + 60.0,
    )
    assert expected == actual


@pytest.mark.parametrize("missed_for", [60.0, 61.0, 3600.0])
def test_not_found_past_the_grace_window_finishes_as_not_found(missed_for: float) -> None:
    """Once the grace has run out, the task ends as not found with no data."""
    actual = plan_after_poll(
        claim(first_not_found_at=NOW - missed_for), NOT_FOUND, now=NOW, rand=NEUTRAL, policy=POLL
    )
    expected = TaskFinish(task_id=TASK, event_type=EventType.NOT_FOUND, task_data=None, status=None)
    assert expected == actual


def test_not_found_with_no_grace_finishes_at_once() -> None:
    """A zero grace makes the first miss final."""
    policy = PollPolicy(
        initial_s=2.0,
        max_s=60.0,
        factor=2.0,
        jitter=0.2,
        error_backoff_max_s=300.0,
        retry_after_max_s=120.0,
        not_found_grace_s=0.0,
    )
    actual = plan_after_poll(claim(), NOT_FOUND, now=NOW, rand=NEUTRAL, policy=policy)
    assert isinstance(actual, TaskFinish)
    assert EventType.NOT_FOUND == actual.event_type


SERVER_ERROR = PollResult(outcome=PollOutcome.SERVER_ERROR, http_status=503, detail="HTTP 503")


@pytest.mark.parametrize(
    ("streak_before", "expected_delay"),
    [
        (0, 2.0),
        (1, 4.0),
        (2, 8.0),
        (3, 16.0),
        (6, 128.0),
        (7, 256.0),
        (8, 300.0),
        (9, 300.0),
        (10_000, 300.0),
    ],
)
def test_errors_back_off_exponentially_up_to_the_error_cap(
    streak_before: int, expected_delay: float
) -> None:
    """Each failed poll adds one to the streak and doubles the wait, capped at the error backoff max."""
    actual = plan_after_poll(
        claim(interval=8.0, error_streak=streak_before, first_not_found_at=NOW - 5.0),
        SERVER_ERROR,
        now=NOW,
        rand=NEUTRAL,
        policy=POLL,
    )
    expected = TaskUpdate(
        task_id=TASK,
        status=None,
        next_poll_at=NOW + expected_delay,
        interval=8.0,
        error_streak=streak_before + 1,
        first_not_found_at=NOW - 5.0,
        last_error="upstream server_error: HTTP 503",
        lease_until=NOW + 60.0,
    )
    assert expected == actual


@pytest.mark.parametrize(
    ("result", "expected_error"),
    [
        (PollResult(outcome=PollOutcome.TIMEOUT), "upstream timeout"),
        (
            PollResult(outcome=PollOutcome.NETWORK_ERROR, detail="ServerDisconnectedError"),
            "upstream network_error: ServerDisconnectedError",
        ),
        (
            PollResult(outcome=PollOutcome.AUTH_ERROR, http_status=401, detail="HTTP 401"),
            "upstream auth_error: HTTP 401",
        ),
        (
            PollResult(
                outcome=PollOutcome.INVALID_RESPONSE,
                http_status=200,
                detail="body is not a task envelope",
            ),
            "upstream invalid_response: body is not a task envelope",
        ),
    ],
)
def test_every_error_outcome_is_recorded_with_its_detail(
    result: PollResult, expected_error: str
) -> None:
    """The stored error names the outcome, then the detail when there is one."""
    actual = plan_after_poll(claim(), result, now=NOW, rand=NEUTRAL, policy=POLL)
    assert isinstance(actual, TaskUpdate)
    assert (expected_error, 1, NOW + 2.0) == (
        actual.last_error,
        actual.error_streak,
        actual.next_poll_at,
    )


@pytest.mark.parametrize(
    ("streak_before", "retry_after", "expected_delay"),
    [
        (0, 30.0, 30.0),
        (0, 120.0, 120.0),
        (0, 121.0, 120.0),
        (0, 86_400.0, 120.0),
        (0, 1.0, 2.0),
        (0, 0.0, 2.0),
        (8, 30.0, 300.0),
    ],
)
def test_retry_after_is_honored_up_to_the_retry_after_cap(
    streak_before: int, retry_after: float, expected_delay: float
) -> None:
    """A rate limit waits as long as asked, clamped at `retry_after_max_s`, never less than backoff."""
    result = PollResult(
        outcome=PollOutcome.RATE_LIMITED,
        http_status=429,
        retry_after=retry_after,
        detail="HTTP 429",
    )
    actual = plan_after_poll(
        claim(error_streak=streak_before), result, now=NOW, rand=NEUTRAL, policy=POLL
    )
    assert isinstance(actual, TaskUpdate)
    assert NOW + expected_delay == actual.next_poll_at
    assert "upstream rate_limited: HTTP 429" == actual.last_error


def test_an_ok_after_errors_resets_the_streak_and_the_not_found_mark() -> None:
    """One good answer clears the error streak, the last error and the first-miss time."""
    actual = plan_after_poll(
        claim(polls=4, interval=8.0, error_streak=5, first_not_found_at=NOW - 30.0),
        ok("handling"),
        now=NOW,
        rand=WHOLE,
        policy=POLL,
    )
    expected = TaskUpdate(
        task_id=TASK,
        status="handling",
        next_poll_at=NOW + 16.0,
        interval=16.0,
        error_streak=0,
        first_not_found_at=None,
        last_error=None,
        lease_until=NOW + 60.0,
    )
    assert expected == actual


def test_poll_policy_takes_its_numbers_from_settings() -> None:
    """The policy mirrors the settings it is built from."""
    expected = PollPolicy(
        initial_s=2.0,
        max_s=60.0,
        factor=1.5,
        jitter=0.2,
        error_backoff_max_s=300.0,
        retry_after_max_s=300.0,
        not_found_grace_s=60.0,
    )
    assert expected == PollPolicy.from_settings(Settings())


# --- the callback -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "expected"),
    [
        (200, DeliveryOutcome.DELIVERED),
        (201, DeliveryOutcome.DELIVERED),
        (202, DeliveryOutcome.DELIVERED),
        (204, DeliveryOutcome.DELIVERED),
        (299, DeliveryOutcome.DELIVERED),
        (408, DeliveryOutcome.RETRY),
        (429, DeliveryOutcome.RETRY),
        (500, DeliveryOutcome.RETRY),
        (502, DeliveryOutcome.RETRY),
        (503, DeliveryOutcome.RETRY),
        (504, DeliveryOutcome.RETRY),
        (599, DeliveryOutcome.RETRY),
        (100, DeliveryOutcome.GAVE_UP),
        (301, DeliveryOutcome.GAVE_UP),
        (302, DeliveryOutcome.GAVE_UP),
        (307, DeliveryOutcome.GAVE_UP),
        (308, DeliveryOutcome.GAVE_UP),
        (400, DeliveryOutcome.GAVE_UP),
        (401, DeliveryOutcome.GAVE_UP),
        (403, DeliveryOutcome.GAVE_UP),
        (404, DeliveryOutcome.GAVE_UP),
        (410, DeliveryOutcome.GAVE_UP),
        (413, DeliveryOutcome.GAVE_UP),
        (422, DeliveryOutcome.GAVE_UP),
        (600, DeliveryOutcome.GAVE_UP),
    ],
)
def test_classify_delivery_decides_retry_or_give_up(
    http_status: int, expected: DeliveryOutcome
) -> None:
    """2xx delivered; 408, 429 and 5xx retried; redirects and other 4xx final."""
    assert expected == classify_delivery(http_status)


def test_a_delivered_callback_is_done() -> None:
    """A 2xx ends the watch with no next attempt and no error."""
    result = DeliveryResult(outcome=DeliveryOutcome.DELIVERED, http_status=204, detail="HTTP 204")
    actual = plan_after_delivery(job(3), result, now=NOW, rand=NEUTRAL, policy=DELIVERY)
    expected = DeliveryRecord(
        watch_id="w-1",
        outcome=DeliveryOutcome.DELIVERED,
        next_attempt_at=None,
        last_error=None,
        lease_until=NOW + 60.0,
    )
    assert expected == actual


RETRY_503 = DeliveryResult(outcome=DeliveryOutcome.RETRY, http_status=503, detail="HTTP 503")
LONG_DELIVERY = DeliveryPolicy(backoff_s=5.0, backoff_max_s=3600.0, max_attempts=20, jitter=0.2)


@pytest.mark.parametrize(
    ("attempts_before", "expected_delay"),
    [
        (0, 5.0),
        (1, 10.0),
        (2, 20.0),
        (3, 40.0),
        (4, 80.0),
        (5, 160.0),
        (6, 320.0),
        (7, 640.0),
        (8, 1280.0),
        (9, 2560.0),
        (10, 3600.0),
        (11, 3600.0),
        (18, 3600.0),
    ],
)
def test_failed_deliveries_retry_from_five_seconds_doubling_to_an_hour(
    attempts_before: int, expected_delay: float
) -> None:
    """The n-th failure waits 5 * 2**(n-1) seconds, at most 3600."""
    actual = plan_after_delivery(
        job(attempts_before), RETRY_503, now=NOW, rand=NEUTRAL, policy=LONG_DELIVERY
    )
    expected = DeliveryRecord(
        watch_id="w-1",
        outcome=DeliveryOutcome.RETRY,
        next_attempt_at=NOW + expected_delay,
        last_error="HTTP 503",
        lease_until=NOW + 60.0,
    )
    assert expected == actual


def test_delivery_backoff_jitter_stays_within_twenty_percent() -> None:
    """The first retry lands at 4 s for the lowest draw and just under 6 s for the highest."""
    lowest = plan_after_delivery(job(0), RETRY_503, now=0.0, rand=0.0, policy=DELIVERY)
    highest = plan_after_delivery(job(0), RETRY_503, now=0.0, rand=0.999, policy=DELIVERY)
    assert highest.next_attempt_at is not None
    assert 4.0 == lowest.next_attempt_at
    assert pytest.approx(5.998) == highest.next_attempt_at
    assert highest.next_attempt_at < 6.0


@pytest.mark.parametrize(
    ("result", "expected_error"),
    [
        (RETRY_503, "HTTP 503; gave up after 10 attempts"),
        (
            DeliveryResult(outcome=DeliveryOutcome.RETRY, detail="no answer within 10 s"),
            "no answer within 10 s; gave up after 10 attempts",
        ),
        (
            DeliveryResult(outcome=DeliveryOutcome.RETRY),
            "delivery failed; gave up after 10 attempts",
        ),
    ],
)
def test_the_last_allowed_attempt_gives_up(result: DeliveryResult, expected_error: str) -> None:
    """A retryable failure on attempt `max_attempts` is final and says how many were made."""
    actual = plan_after_delivery(job(9), result, now=NOW, rand=NEUTRAL, policy=DELIVERY)
    expected = DeliveryRecord(
        watch_id="w-1",
        outcome=DeliveryOutcome.GAVE_UP,
        next_attempt_at=None,
        last_error=expected_error,
        lease_until=NOW + 60.0,
    )
    assert expected == actual


def test_the_attempt_before_the_last_still_retries() -> None:
    """Attempt nine of ten is followed by a tenth."""
    actual = plan_after_delivery(job(8), RETRY_503, now=NOW, rand=NEUTRAL, policy=DELIVERY)
    assert (DeliveryOutcome.RETRY, NOW + 1280.0) == (actual.outcome, actual.next_attempt_at)


@pytest.mark.parametrize("status", [410, 400, 404, 422, 301])
def test_a_final_answer_gives_up_on_the_first_attempt(status: int) -> None:
    """Gone, other 4xx and redirects are not retried, and say so without an attempt count."""
    result = DeliveryResult(
        outcome=classify_delivery(status), http_status=status, detail=f"HTTP {status}"
    )
    actual = plan_after_delivery(job(0), result, now=NOW, rand=NEUTRAL, policy=DELIVERY)
    expected = DeliveryRecord(
        watch_id="w-1",
        outcome=DeliveryOutcome.GAVE_UP,
        next_attempt_at=None,
        last_error=f"HTTP {status}",
        lease_until=NOW + 60.0,
    )
    assert expected == actual


@pytest.mark.parametrize(
    ("attempts_before", "retry_after", "expected_delay"),
    [
        (0, 120.0, 120.0),
        (0, 3600.0, 3600.0),
        (0, 7200.0, 3600.0),
        (0, math.inf, 3600.0),
        (0, 1.0, 5.0),
        (0, 0.0, 5.0),
        (5, 60.0, 160.0),
    ],
)
def test_delivery_honors_retry_after_within_the_backoff_cap(
    attempts_before: int, retry_after: float, expected_delay: float
) -> None:
    """A 429's Retry-After delays the next attempt, clamped at the backoff max, never shortened."""
    result = DeliveryResult(
        outcome=DeliveryOutcome.RETRY, http_status=429, retry_after=retry_after, detail="HTTP 429"
    )
    actual = plan_after_delivery(
        job(attempts_before), result, now=NOW, rand=NEUTRAL, policy=DELIVERY
    )
    assert NOW + expected_delay == actual.next_attempt_at


def test_delivery_policy_takes_its_numbers_from_settings() -> None:
    """The defaults are 5 s doubling to an hour, ten attempts, the poll jitter."""
    expected = DeliveryPolicy(backoff_s=5.0, backoff_max_s=3600.0, max_attempts=10, jitter=0.2)
    assert expected == DeliveryPolicy.from_settings(Settings())


@pytest.mark.parametrize(("rand", "expected"), [(0.0, 0.8), (0.5, 1.0), (0.999, 1.0)])
def test_jitter_never_takes_a_delay_past_its_cap(rand: float, expected: float) -> None:
    """At the cap, jitter only shortens: RELAY_DELIVERY_BACKOFF_MAX_S and
    RELAY_ERROR_BACKOFF_MAX_S are the longest waits, as documented."""
    retry = plan_after_delivery(job(15), RETRY_503, now=0.0, rand=rand, policy=LONG_DELIVERY)
    failed = PollResult(outcome=PollOutcome.SERVER_ERROR, http_status=503, detail="HTTP 503")
    poll = plan_after_poll(claim(error_streak=20), failed, now=0.0, rand=rand, policy=POLL)
    assert isinstance(poll, TaskUpdate)
    assert (3600.0 * expected, 300.0 * expected) == (retry.next_attempt_at, poll.next_poll_at)
