"""The callback loop: claim due callbacks, sign and POST each once, record the attempt.

The body of a watch's callback is built only from persisted fields, so every retry and every
restart sends the same bytes under the same `webhook-id`; only `webhook-timestamp` (and so the
signature) is per attempt, as the Standard Webhooks spec asks.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
from yarl import URL

from relay import __version__, jsondata, logs, signing
from relay.metrics import Metrics
from relay.models import DeliveryJob, DeliveryOutcome, DeliveryResult
from relay.netpolicy import AddressForbidden
from relay.policy import DeliveryPolicy, classify_delivery, parse_retry_after, plan_after_delivery
from relay.store.base import Store, StoreUnavailable
from relay.workloop import WorkLoop

USER_AGENT = f"hiapi-relay/{__version__}"
# A callback whose receiver is at its in-flight bound is deferred: as soon as one of that
# receiver's attempts ends, a slot's worth of its waiting callbacks is due again (a busy fast
# receiver is not held to RELAY_DELIVERY_PER_HOST callbacks a second). The deferral itself is
# the fallback for when that cannot happen here (this replica stopped): the longest an attempt
# in flight can take (RELAY_DELIVERY_TIMEOUT_S) plus this margin. A short fixed deferral made a
# hanging receiver's whole backlog fall due, be claimed and be deferred again every second,
# which kept the loop busy and made healthy receivers' callbacks queue behind it (20,000
# waiting callbacks: 23 s late, measured).
HOST_BUSY_MARGIN_S = 1.0
_FORBIDDEN_DETAIL = "cannot connect: the network policy forbids every address of this host"
_log = logging.getLogger("relay.delivery")


def receiver_key(callback_url: str) -> str:
    """Callbacks are bounded per receiver: scheme, host and port."""
    url = URL(callback_url)
    return f"{url.scheme}://{url.host}:{url.port}"


def message_id(watch_id: str) -> str:
    """The `webhook-id` of a watch's callback: one per watch, the same on every attempt."""
    return f"msg_{watch_id}"


_SECONDS_CACHE: dict[int, str] = {}
_YEAR_10000 = 253_402_300_800


def iso_utc(epoch_s: float) -> str:
    """`2026-12-01T21:25:57.123Z`: milliseconds, truncated, as `datetime.isoformat` would give.

    The date-and-time part is cached per whole second: a registration answers with four
    timestamps, and formatting each through datetime cost 2 us (~3 % of a registration).
    """
    if not 0 <= epoch_s < _YEAR_10000:  # datetime's own answer, or its error past year 9999
        return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    whole = int(epoch_s)
    micros = round((epoch_s - whole) * 1e6)  # datetime rounds to microseconds the same way
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    prefix = _SECONDS_CACHE.get(whole)
    if prefix is None:
        if len(_SECONDS_CACHE) >= 4096:
            _SECONDS_CACHE.clear()
        prefix = _SECONDS_CACHE[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{prefix}.{micros // 1000:03d}Z"


def callback_body(job: DeliveryJob) -> bytes:
    """The Standard Webhooks envelope; `task` is the upstream `data` object verbatim (or null)."""
    return jsondata.dumps(
        {
            "type": job.event_type.value,
            "timestamp": iso_utc(job.event_at),
            "data": {
                "watchId": job.watch_id,
                "taskId": job.task_id,
                "metadata": job.metadata,
                "task": job.task_data,
            },
        }
    )


class Sender(Protocol):
    async def send(self, job: DeliveryJob, *, now: float) -> DeliveryResult: ...


class CallbackSender:
    """POSTs one callback; owns the timeout, never follows redirects, never reads a large body."""

    def __init__(
        self, session: aiohttp.ClientSession, *, keys: Sequence[bytes], timeout_s: float
    ) -> None:
        self._session = session
        self._keys = tuple(keys)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s

    def headers(self, job: DeliveryJob, body: bytes, *, now: float) -> dict[str, str]:
        msg_id = message_id(job.watch_id)
        timestamp = int(now)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._keys:
            headers["webhook-signature"] = signing.sign(
                msg_id=msg_id, timestamp=timestamp, body=body, keys=self._keys
            )
        return headers

    async def send(self, job: DeliveryJob, *, now: float) -> DeliveryResult:
        body = callback_body(job)
        try:
            async with self._session.post(
                job.callback_url,
                data=body,
                headers=self.headers(job, body, now=now),
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
        except TimeoutError:
            return DeliveryResult(
                outcome=DeliveryOutcome.RETRY, detail=f"no answer within {self._timeout_s:g} s"
            )
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressForbidden):
                # The addresses go to the operator's log only: lastError is the API's, and
                # must not tell a caller what an internal name resolves to.
                logs.event(
                    _log,
                    "callback_address_forbidden",
                    logging.WARNING,
                    watch_id=job.watch_id,
                    task_id=job.task_id,
                    detail=str(exc.os_error),
                )
                return DeliveryResult(outcome=DeliveryOutcome.RETRY, detail=_FORBIDDEN_DETAIL)
            return DeliveryResult(
                outcome=DeliveryOutcome.RETRY, detail=f"cannot connect: {exc.os_error}"
            )
        except (aiohttp.ClientError, OSError) as exc:
            return DeliveryResult(outcome=DeliveryOutcome.RETRY, detail=type(exc).__name__)
        outcome = classify_delivery(status)
        if 300 <= status < 400:
            detail = f"HTTP {status}: redirects are not followed"
        else:
            detail = f"HTTP {status}"
        return DeliveryResult(
            outcome=outcome, http_status=status, retry_after=retry_after, detail=detail
        )


class Deliverer(WorkLoop[DeliveryJob]):
    name = "delivery"
    log = logging.getLogger("relay.delivery")

    def __init__(
        self,
        *,
        store: Store,
        sender: Sender,
        metrics: Metrics,
        policy: DeliveryPolicy,
        concurrency: int,
        per_host: int,
        lease_s: float,
        attempt_timeout_s: float,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(metrics=metrics, concurrency=concurrency, clock=clock)
        self._per_host = per_host
        self._busy_defer_s = attempt_timeout_s + HOST_BUSY_MARGIN_S
        self._host_in_flight: Counter[str] = Counter()
        # Callbacks deferred because their receiver was busy: receiver -> deferred-to time -> ids.
        self._parked: dict[str, dict[float, list[str]]] = {}
        self._store = store
        self._sender = sender
        self._policy = policy
        self._lease_s = lease_s
        self._rand = rand

    async def _claim(self, now: float, free: int) -> list[DeliveryJob]:
        jobs = await self._store.claim_due_deliveries(now=now, limit=free, lease_s=self._lease_s)
        accepted: list[DeliveryJob] = []
        busy: dict[str, list[DeliveryJob]] = {}
        for job in jobs:
            host = receiver_key(job.callback_url)
            if self._host_in_flight[host] >= self._per_host:
                busy.setdefault(host, []).append(job)
                continue
            self._host_in_flight[host] += 1  # given back when the attempt ends (_handle)
            accepted.append(job)
            self._metrics.scheduler_lag.labels("delivery").observe(max(0.0, now - job.due_at))
        if busy:
            # One slow receiver must not take every slot from the healthy ones: its other
            # callbacks wait, without an attempt counted, until it has a slot free.
            deferred_to = now + self._busy_defer_s
            try:
                await self._store.defer_deliveries(
                    [(j.watch_id, j.lease_until) for waiting in busy.values() for j in waiting],
                    due_at=deferred_to,
                )
            except StoreUnavailable as exc:
                # The accepted ones hold receiver slots already and must still run (their
                # attempts give the slots back); the busy ones fall due when their claim's
                # lease ends. Raising here would strand both: slots counted, never released.
                self._store_unavailable(exc)
            else:
                self._metrics.callbacks_deferred.labels("receiver_busy").inc(
                    sum(len(waiting) for waiting in busy.values())
                )
                for host, waiting in busy.items():
                    parked = self._parked.setdefault(host, {}).setdefault(deferred_to, [])
                    parked.extend(j.watch_id for j in waiting)
                    # Its last attempt may have ended while the deferral was being written.
                    if self._host_in_flight[host] < self._per_host:
                        await self._unpark(host)
        return accepted

    async def _unpark(self, host: str) -> None:
        """Slots of `host` are free: as many of its parked callbacks as it has slots free (the
        earliest parked first) are due now, not when their deferral ends; the rest stay parked
        for the next slot. Bringing more forward would only have the next claim park them again
        (two store writes each, and counted as deferred again).

        If the store cannot take that now, they fall due when the deferral ends: nothing is lost.
        """
        groups = self._parked.get(host)
        room = self._per_host - self._host_in_flight[host]
        if not groups or room <= 0:
            return
        # Take the ids before any await: a claim or another unpark may park or take meanwhile.
        now = self._clock()
        taken: list[tuple[float, list[str]]] = []
        for deferred_to in sorted(groups):
            ids = groups.pop(deferred_to)
            if now >= deferred_to:
                continue  # due already
            taken.append((deferred_to, ids[:room]))
            if ids[room:]:
                groups[deferred_to] = ids[room:]
            room -= len(taken[-1][1])
            if room <= 0:
                break
        if not groups:
            del self._parked[host]
        try:
            for deferred_to, ids in taken:
                await self._store.hasten_deliveries(ids, deferred_to=deferred_to, due_at=now)
        except StoreUnavailable as exc:
            self._store_unavailable(exc)
        if taken:
            self.wake()

    async def _hand_back(self, items: list[DeliveryJob], now: float) -> None:
        await self._store.defer_deliveries([(j.watch_id, j.lease_until) for j in items], due_at=now)
        self._metrics.callbacks_deferred.labels("handed_back").inc(len(items))

    async def _next_due_at(self, now: float) -> float | None:
        return await self._store.next_delivery_due_at()

    async def _handle(self, item: DeliveryJob) -> None:
        started = time.perf_counter()
        host = receiver_key(item.callback_url)
        try:
            result = await self._sender.send(item, now=self._clock())
        finally:
            self._host_in_flight[host] -= 1
            if not self._host_in_flight[host]:
                del self._host_in_flight[host]
        try:
            await self._record(item, result, started)
        finally:
            # The slot is free whether or not the record was written: the receiver's parked
            # callbacks must not wait out their deferral because the store failed just now.
            if host in self._parked and self._host_in_flight[host] < self._per_host:
                await self._unpark(host)

    async def _record(self, item: DeliveryJob, result: DeliveryResult, started: float) -> None:
        metrics = self._metrics
        metrics.callback_duration.observe(time.perf_counter() - started)
        now = self._clock()
        record = plan_after_delivery(item, result, now=now, rand=self._rand(), policy=self._policy)
        # The attempt happened whether or not its record is written: counted before the write,
        # which may fail (the callback is then attempted again, and counted again).
        metrics.callback_attempts.labels(record.outcome.value).inc()
        applied = await self._store.record_deliveries([record], now=now)
        # Not applied: the watch was cancelled while its attempt was out (it ended, and was
        # counted, as cancelled), or this claim's lease ran out and another claimer took the
        # callback over (its own record counts).
        if item.watch_id in applied:
            if record.outcome is DeliveryOutcome.DELIVERED:
                metrics.terminal_to_delivered.observe(max(0.0, now - item.event_at))
                metrics.watches_finished.labels("delivered").inc()
            elif record.outcome is DeliveryOutcome.GAVE_UP:
                metrics.watches_finished.labels("failed").inc()
        logs.event(
            self.log,
            "callback_" + record.outcome.value,
            logging.INFO if record.outcome is DeliveryOutcome.DELIVERED else logging.WARNING,
            watch_id=item.watch_id,
            task_id=item.task_id,
            type=item.event_type.value,
            outcome=record.outcome.value,
            attempt=item.attempts + 1,
            http_status=result.http_status,
            detail=record.last_error,
        )
