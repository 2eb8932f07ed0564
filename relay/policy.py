"""Pure decisions: when to poll next, how to back off, what an answer means. No I/O, no clock.

Every function takes `now` (epoch seconds) and a uniform random draw `rand` in [0, 1) as arguments,
so the tests can drive them with exact values.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import orjson

from relay import jsondata
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

# 2**60 seconds is beyond any cap; clamping the exponent keeps float math finite for huge attempts.
_MAX_EXPONENT = 60
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() accepts '²'


def jittered(delay: float, jitter: float, rand: float) -> float:
    """Spread `delay` uniformly over [delay*(1-jitter), delay*(1+jitter)) so streams drift apart."""
    return delay * (1.0 - jitter + 2.0 * jitter * rand)


def jittered_within(interval: float, jitter: float, rand: float) -> float:
    """Spread `interval` uniformly over (interval*(1-jitter), interval]: shortened, never longer.

    For progress polls the interval is a promise, not an average: a task that ends waits at most
    one interval (RELAY_POLL_MAX_S at the most) before the relay sees it.
    """
    return interval * (1.0 - jitter * rand)


def backoff(attempt: int, *, initial: float, cap: float, jitter: float, rand: float) -> float:
    """The exponential delay of `attempt`, jittered, then capped: `cap` is the longest wait,
    jitter included (at the cap, jitter only shortens)."""
    return min(cap, jittered(exponential(attempt, initial=initial, cap=cap), jitter, rand))


def exponential(attempt: int, *, initial: float, cap: float, base: float = 2.0) -> float:
    """`min(cap, initial * base**(attempt-1))` for attempt >= 1, safe for any attempt count."""
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    return min(cap, initial * base**exponent)


def honor_retry_after(scheduled: float, retry_after: float | None, ceiling: float) -> float:
    """Never earlier than the peer asked (up to `ceiling`), never earlier than our own schedule."""
    if retry_after is None:
        return scheduled
    return max(scheduled, min(retry_after, ceiling))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as delta seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:  # the asctime form carries no zone; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


# --- the upstream answer --------------------------------------------------------------------------

_STATUS_OUTCOMES: tuple[tuple[range, PollOutcome], ...] = (
    (range(401, 402), PollOutcome.AUTH_ERROR),
    (range(403, 404), PollOutcome.AUTH_ERROR),
    (range(404, 405), PollOutcome.NOT_FOUND),
    (range(429, 430), PollOutcome.RATE_LIMITED),
    (range(400, 500), PollOutcome.CLIENT_ERROR),
    (range(500, 600), PollOutcome.SERVER_ERROR),
)


def _outcome_for_code(code: int) -> PollOutcome:
    for codes, outcome in _STATUS_OUTCOMES:
        if code in codes:
            return outcome
    return PollOutcome.INVALID_RESPONSE


def classify_upstream(
    *, http_status: int, body: bytes, task_id: str, retry_after: float | None = None
) -> PollResult:
    """Turn one HTTP answer of `GET /v1/tasks/{id}` into a typed result.

    The envelope's `code` is authoritative when the body is an envelope (a not-found may come with
    HTTP 200 or 404); otherwise the HTTP status decides.
    """
    envelope = _parse_envelope(body)
    if envelope is None:
        if 200 <= http_status < 300:
            return PollResult(
                outcome=PollOutcome.INVALID_RESPONSE,
                http_status=http_status,
                detail="body is not a task envelope",
            )
        outcome = _outcome_for_code(http_status)
        if outcome is PollOutcome.NOT_FOUND:
            # A bare 404 without the envelope is a wrong URL or a proxy page, not a verdict on the task.
            outcome = PollOutcome.CLIENT_ERROR
        return PollResult(
            outcome=outcome,
            http_status=http_status,
            retry_after=retry_after,
            detail=f"HTTP {http_status}",
        )

    code, data = envelope
    if not (200 <= http_status < 300 or http_status == 404):
        # An error status with an envelope body: trust the transport status for error classes.
        code = http_status
    if code != 200:
        outcome = _outcome_for_code(code)
        return PollResult(
            outcome=outcome,
            http_status=http_status,
            retry_after=retry_after,
            detail=f"envelope code {code}",
        )
    snapshot = _parse_task(data, task_id)
    if snapshot is None:
        return PollResult(
            outcome=PollOutcome.INVALID_RESPONSE,
            http_status=http_status,
            detail="envelope data is not this task",
        )
    if snapshot.status.terminal and jsondata.may_hold_a_long_integer(body):
        # The data goes to the callback verbatim: read it again keeping every integer exact
        # (once per task, at its end; the fast parse above decided the status).
        snapshot.data = jsondata.loads(body)["data"]
    return PollResult(outcome=PollOutcome.OK, snapshot=snapshot, http_status=http_status)


def _parse_envelope(body: bytes) -> tuple[int, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    code = parsed.get("code")
    if not isinstance(code, int) or isinstance(code, bool) or "data" not in parsed:
        return None
    return code, parsed["data"]


def _parse_task(data: Any, task_id: str) -> TaskSnapshot | None:
    if not isinstance(data, dict):
        return None
    raw_status = data.get("status")
    if data.get("taskId") != task_id or not isinstance(raw_status, str):
        return None
    return TaskSnapshot(
        task_id=task_id, status=TaskStatus.parse(raw_status), raw_status=raw_status, data=data
    )


# --- the poll schedule ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PollPolicy:
    initial_s: float
    max_s: float
    factor: float
    jitter: float
    error_backoff_max_s: float
    retry_after_max_s: float
    not_found_grace_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> PollPolicy:
        return cls(
            initial_s=settings.poll_initial_s,
            max_s=settings.poll_max_s,
            factor=settings.poll_factor,
            jitter=settings.poll_jitter,
            error_backoff_max_s=settings.error_backoff_max_s,
            retry_after_max_s=settings.retry_after_max_s,
            not_found_grace_s=settings.not_found_grace_s,
        )


def progress_interval(claim: TaskClaim, status: TaskStatus, policy: PollPolicy) -> float:
    """The next progress interval (before jitter): short at first and near the end, else growing."""
    if claim.polls == 0 or status is TaskStatus.ARCHIVING:
        return policy.initial_s
    return min(policy.max_s, max(claim.interval, policy.initial_s) * policy.factor)


def plan_after_poll(
    claim: TaskClaim, result: PollResult, *, now: float, rand: float, policy: PollPolicy
) -> TaskUpdate | TaskFinish:
    """Decide what one poll changes: finish the task, or when to poll it next."""
    if result.outcome is PollOutcome.OK and result.snapshot is not None:
        snapshot = result.snapshot
        if snapshot.status.terminal:
            event = EventType.SUCCESS if snapshot.status is TaskStatus.SUCCESS else EventType.FAIL
            return TaskFinish(
                task_id=claim.task_id,
                event_type=event,
                task_data=snapshot.data,
                status=snapshot.raw_status,
            )
        interval = progress_interval(claim, snapshot.status, policy)
        return TaskUpdate(
            task_id=claim.task_id,
            status=snapshot.raw_status,
            next_poll_at=now + jittered_within(interval, policy.jitter, rand),
            interval=interval,
            error_streak=0,
            first_not_found_at=None,
            last_error=None,
            lease_until=claim.lease_until,
        )

    if result.outcome is PollOutcome.NOT_FOUND:
        first_seen = now if claim.first_not_found_at is None else claim.first_not_found_at
        if now - first_seen >= policy.not_found_grace_s:
            return TaskFinish(
                task_id=claim.task_id, event_type=EventType.NOT_FOUND, task_data=None, status=None
            )
        # Inside the grace window a new task may just not be visible yet: look again soon.
        return TaskUpdate(
            task_id=claim.task_id,
            status=None,
            next_poll_at=now + jittered_within(policy.initial_s, policy.jitter, rand),
            interval=claim.interval,
            error_streak=0,
            first_not_found_at=first_seen,
            last_error="task not found upstream",
            lease_until=claim.lease_until,
        )

    streak = claim.error_streak + 1
    delay = backoff(
        streak, initial=policy.initial_s, cap=policy.error_backoff_max_s, jitter=policy.jitter,
        rand=rand,
    )  # fmt: skip
    delay = honor_retry_after(delay, result.retry_after, policy.retry_after_max_s)
    detail = f": {result.detail}" if result.detail else ""
    return TaskUpdate(
        task_id=claim.task_id,
        status=None,
        next_poll_at=now + delay,
        interval=claim.interval,
        error_streak=streak,
        first_not_found_at=claim.first_not_found_at,
        last_error=f"upstream {result.outcome.value}{detail}",
        lease_until=claim.lease_until,
    )


# --- the callback ---------------------------------------------------------------------------------


def classify_delivery(http_status: int) -> DeliveryOutcome:
    """2xx delivered; 408, 429 and 5xx worth another try; redirects, 410 and other 4xx final."""
    if 200 <= http_status < 300:
        return DeliveryOutcome.DELIVERED
    if http_status in (408, 429) or 500 <= http_status < 600:
        return DeliveryOutcome.RETRY
    return DeliveryOutcome.GAVE_UP


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryPolicy:
    backoff_s: float
    backoff_max_s: float
    max_attempts: int
    jitter: float

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            backoff_s=settings.delivery_backoff_s,
            backoff_max_s=settings.delivery_backoff_max_s,
            max_attempts=settings.delivery_max_attempts,
            jitter=settings.poll_jitter,
        )


def plan_after_delivery(
    job: DeliveryJob, result: DeliveryResult, *, now: float, rand: float, policy: DeliveryPolicy
) -> DeliveryRecord:
    """Decide what one attempt changes: delivered, failed for good, or when to try again."""
    if result.outcome is DeliveryOutcome.DELIVERED:
        return DeliveryRecord(
            watch_id=job.watch_id,
            outcome=result.outcome,
            next_attempt_at=None,
            last_error=None,
            lease_until=job.lease_until,
        )
    attempts = job.attempts + 1
    if result.outcome is DeliveryOutcome.GAVE_UP or attempts >= policy.max_attempts:
        reason = result.detail or "delivery failed"
        if result.outcome is DeliveryOutcome.RETRY:
            reason = f"{reason}; gave up after {attempts} attempt{'s' if attempts > 1 else ''}"
        return DeliveryRecord(
            watch_id=job.watch_id,
            outcome=DeliveryOutcome.GAVE_UP,
            next_attempt_at=None,
            last_error=reason,
            lease_until=job.lease_until,
        )
    delay = backoff(
        attempts, initial=policy.backoff_s, cap=policy.backoff_max_s, jitter=policy.jitter,
        rand=rand,
    )  # fmt: skip
    delay = honor_retry_after(delay, result.retry_after, policy.backoff_max_s)
    return DeliveryRecord(
        watch_id=job.watch_id,
        outcome=DeliveryOutcome.RETRY,
        next_attempt_at=now + delay,
        last_error=result.detail,
        lease_until=job.lease_until,
    )
