"""The poll loop: claim due poll streams, poll each once within the rate budget, record the plan.

One stream per task id (the store holds one `tasks` row however many watches name it), so five
watches on one task cost one poll per interval. The token bucket caps upstream requests a second;
the loop's concurrency caps requests in flight.

Polls hold no asyncio task of the poller's own: a claimed batch goes to the PollTransport in one
call, and the answers come back in batches, each handled in one go (classified, counted, planned)
and written with one store call. A poll's slot is free once its answer is in; it has ended once
its result is written.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable

from relay import logs
from relay.metrics import Metrics
from relay.models import (
    PollOutcome,
    PollResult,
    TaskClaim,
    TaskFinish,
    TaskStatus,
    TaskUpdate,
)
from relay.policy import PollPolicy, exponential, plan_after_poll
from relay.ratelimit import TokenBucket
from relay.store.base import Store, StoreUnavailable
from relay.upstream import Answer, PollTransport
from relay.workloop import ClaimLoop

EXPIRE_BATCH = 500
# Saved-up tokens, as a fraction of a second's worth: any one-second window then sees at most
# 1.1 x RELAY_UPSTREAM_RPS, and a burst after an idle spell stays small.
BURST_FRACTION = 0.1


def burst_for(rps: float) -> float:
    return max(1.0, rps * BURST_FRACTION)


EXPIRY_EVERY_S = 1.0
# While no poll worker runs, how often the loop looks again (a restarted one is up in ~0.5 s).
TRANSPORT_RECHECK_S = 0.25
# While the API key is rejected and a probe is out: how long the loop idles at most before it
# looks again (the probe's answer wakes it at once).
PROBE_WAIT_S = 1.0


class Poller(ClaimLoop[TaskClaim]):
    name = "poll"
    log = logging.getLogger("relay.poller")

    def __init__(
        self,
        *,
        store: Store,
        transport: PollTransport,
        metrics: Metrics,
        policy: PollPolicy,
        rps: float,
        concurrency: int,
        lease_s: float,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_finished: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(metrics=metrics, concurrency=concurrency, clock=clock)
        self._store = store
        self._transport = transport
        self._policy = policy
        self._lease_s = lease_s
        self._rand = rand
        self._on_finished = on_finished
        self._rps = rps
        # Polls on the wire: key -> (claim, perf_counter at start). Then their results' writes.
        self._outstanding: dict[int, tuple[TaskClaim, float]] = {}
        self._keys = itertools.count()
        self._writes: dict[asyncio.Task[None], list[TaskClaim]] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._deliver = self._on_answers  # one bound method: the transport groups answers by it
        self._bucket = TokenBucket(rps, burst=burst_for(rps), now=clock())
        self._last_expiry = float("-inf")
        # A rejected API key fails every task alike: pause all polling instead of burning
        # through every stream's backoff, and say so in a gauge an alert can use.
        self._auth_failures = 0
        self._paused_until = float("-inf")
        self._held_until = float("-inf")
        # Read at scrape time: a plain int costs the hot path nothing, a Gauge.inc() a lock.
        self._requests_in_flight = 0
        metrics.upstream_in_flight.set_function(lambda: self._requests_in_flight)
        # Label lookups resolved once, not on every poll.
        self._poll_duration = {o: metrics.poll_duration.labels(o.value) for o in PollOutcome}
        self._polls = {o: metrics.polls.labels(o.value) for o in PollOutcome}
        self._task_status = {t: metrics.task_status.labels(t.value) for t in TaskStatus}
        self._lag = metrics.scheduler_lag.labels(self.name)

    def share_budget(self, replicas: int, now: float) -> None:
        """Take 1/`replicas` of RELAY_UPSTREAM_RPS: the budget is the deployment's, not ours."""
        share = self._rps / max(1, replicas)
        self._bucket.set_rate(share, burst=burst_for(share), now=now)

    @property
    def budget_rps(self) -> float:
        """This replica's share of RELAY_UPSTREAM_RPS."""
        return self._bucket.rate

    def hold(self, until: float) -> None:
        """Poll nothing before `until` (a joining replica waits for the others to share)."""
        self._held_until = max(self._held_until, until)

    async def expire(self, now: float) -> int:
        """Move watches past their deadline to a `task.timeout` callback."""
        self._last_expiry = now
        expired = 0
        while True:
            count = await self._store.expire_watches(now=now, limit=EXPIRE_BATCH)
            expired += count
            if count < EXPIRE_BATCH:
                break
        if expired:
            self._metrics.events_emitted.labels("task.timeout").inc(expired)
            logs.event(self.log, "watches_expired", count=expired)
            self._on_finished()
        return expired

    async def _claim(self, now: float, free: int) -> list[TaskClaim]:
        if now - self._last_expiry >= EXPIRY_EVERY_S:
            await self.expire(now)
        budget = min(free, self._bucket.available(now))
        if self._auth_failures:
            # While the key is rejected, probe with one poll at a time: the next one waits for
            # the answer (the pause it may bring), not for the next turn of this loop.
            budget = min(budget, 0 if self._requests_in_flight else 1)
        if budget <= 0 or now < self._paused_until or now < self._held_until:
            return []
        if not self._transport.available:
            return []  # no poll worker running: a claim would only burn its stream's backoff
        # Reserved before the store's await, the unused part given back after: a retry asking
        # for a token meanwhile must not spend one this claim is about to (the bucket went
        # below zero, the budget over its rate for a moment).
        self._bucket.take(now, budget)
        try:
            claims = await self._store.claim_due_tasks(now=now, limit=budget, lease_s=self._lease_s)
        except BaseException:
            self._bucket.give_back(budget)
            raise
        self._bucket.give_back(budget - len(claims))
        return claims

    async def _next_due_at(self, now: float) -> float | None:
        resume = max(self._paused_until, self._held_until)
        if now < resume:
            return resume
        if self._auth_failures and self._requests_in_flight:
            return now + PROBE_WAIT_S  # its answer frees a slot, which wakes this loop sooner
        if self._bucket.available(now) <= 0:
            return now + self._bucket.wait_s(now)
        if not self._transport.available:
            return now + TRANSPORT_RECHECK_S
        due = await self._store.next_poll_due_at()
        # A watch's deadline is acted on by expire(), at most every EXPIRY_EVERY_S: a deadline
        # already past waits for that turn. Taken as due now, it sent the loop round without a
        # pause until then (thousands of empty claims a second).
        next_expiry = self._last_expiry + EXPIRY_EVERY_S
        if due is None or due > next_expiry:
            deadline = await self._store.next_deadline_at()
            if deadline is not None:
                expiry_due = max(deadline, next_expiry)
                due = expiry_due if due is None else min(due, expiry_due)
        return due

    async def _retry_token(self) -> None:
        """An immediate retry is a request like any other: it waits for a token of the budget.

        The wait counts against the request's timeout, which bounds it.
        """
        while True:
            now = self._clock()
            if self._bucket.available(now) >= 1:
                self._bucket.take(now)
                return
            await asyncio.sleep(self._bucket.wait_s(now))

    async def _hand_back(self, items: list[TaskClaim], now: float) -> None:
        await self._store.release_tasks([(c.task_id, c.lease_until) for c in items], due_at=now)

    @property
    def in_flight(self) -> int:
        return len(self._outstanding) + sum(len(c) for c in self._writes.values())

    def _launch(self, items: list[TaskClaim]) -> None:
        now = self._clock()
        started = time.perf_counter()
        observe_lag = self._lag.observe
        polls = []
        for claim in items:
            observe_lag(max(0.0, now - claim.due_at))
            key = next(self._keys)
            self._outstanding[key] = (claim, started)
            polls.append((key, claim.task_id))
        self._requests_in_flight += len(polls)
        self._transport.submit(polls, before_retry=self._retry_token, deliver=self._deliver)

    def _on_answers(self, answers: list[tuple[int, Answer | PollResult]]) -> None:
        """A batch of answers: classify, count and plan each; write the updates with one call
        and each finish with its own (see _record)."""
        finished = time.perf_counter()
        now = self._clock()
        done: list[tuple[TaskClaim, PollResult, TaskUpdate | TaskFinish]] = []
        taken = 0
        # Counted once per batch: a Counter.inc takes a lock (0.8 us), and a poll has two.
        outcomes: dict[PollOutcome, int] = {}
        statuses: dict[TaskStatus, int] = {}
        for key, answer in answers:
            entry = self._outstanding.pop(key, None)
            if entry is None:
                continue  # cut short by a stop meanwhile
            taken += 1
            claim, started = entry
            try:
                result = (
                    answer
                    if isinstance(answer, PollResult)
                    else answer.classify(claim.task_id, now)
                )
                outcome = result.outcome
                self._poll_duration[outcome].observe(finished - started)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if result.snapshot is not None:
                    status = result.snapshot.status
                    statuses[status] = statuses.get(status, 0) + 1
                self._track_auth(result, now)
                plan = plan_after_poll(
                    claim, result, now=now, rand=self._rand(), policy=self._policy
                )
            except Exception:  # a bug: the lease brings the task back; the others go on
                self._item_crashed()
                continue
            done.append((claim, result, plan))
        for outcome, count in outcomes.items():
            self._polls[outcome].inc(count)
        for status, count in statuses.items():
            self._task_status[status].inc(count)
        self._requests_in_flight -= taken
        # RELAY_UPSTREAM_CONCURRENCY bounds requests in flight: the next polls may start while
        # these results wait for their write.
        self._slots_freed(taken)
        if done:
            task = asyncio.create_task(self._record(done, now))
            self._writes[task] = [claim for claim, _, _ in done]
            task.add_done_callback(self._written)
        else:
            self._check_idle()

    async def _record(
        self, done: list[tuple[TaskClaim, PollResult, TaskUpdate | TaskFinish]], now: float
    ) -> None:
        updates = [(c, r, p) for c, r, p in done if isinstance(p, TaskUpdate)]
        finishes = [(c, r, p) for c, r, p in done if isinstance(p, TaskFinish)]
        # Each write fails alone: the updates' failure does not hold a finish back, nor the
        # reverse. A failed one's tasks fall due again when their leases run out: nothing lost.
        if updates:
            written = self._store.apply_poll_results([p for _, _, p in updates], now=now)
            if await self._guarded(written) is None:
                updates = []
            for claim, result, plan in updates:
                self._log_poll(claim, result, plan, 0)
        # A finish moves watches to delivering, once per task: written on its own, it returns
        # how many for the metrics and the log.
        for claim, result, finish in finishes:
            moved = await self._guarded(self._store.apply_poll_results([finish], now=now))
            if moved is None:
                continue
            try:  # a bug here must not keep the batch's other finishes from their writes
                self._log_poll(claim, result, finish, moved)
                self._metrics.events_emitted.labels(finish.event_type.value).inc(moved)
                self._on_finished()
            except Exception:
                self._item_crashed()

    async def _guarded(self, write: Awaitable[int]) -> int | None:
        """The write's result, or None once its failure is logged and counted."""
        try:
            return await write
        except StoreUnavailable as exc:
            self._store_unavailable(exc)
        except Exception:
            self._item_crashed()
        return None

    def _written(self, task: asyncio.Task[None]) -> None:
        del self._writes[task]
        self._check_idle()

    def _check_idle(self) -> None:
        if self._outstanding or self._writes:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_in_flight(self) -> None:
        while self._outstanding or self._writes:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    async def _cancel_in_flight(self) -> None:
        await self._transport.cancel_all()
        cut_short = [claim for claim, _ in self._outstanding.values()]
        self._requests_in_flight -= len(self._outstanding)
        self._slots_freed(len(self._outstanding))
        self._outstanding.clear()
        for task, claims in self._writes.items():
            if task.cancel():
                cut_short += claims  # its write may or may not have committed: due again now
        await asyncio.gather(*self._writes, return_exceptions=True)
        self._check_idle()
        await self._hand_back_cut_short(cut_short)

    def _track_auth(self, result: PollResult, now: float) -> None:
        if result.outcome is PollOutcome.AUTH_ERROR:
            if now < self._paused_until:
                return  # a poll that was in flight when the pause began: same verdict
            self._auth_failures += 1
            pause = exponential(
                self._auth_failures,
                initial=self._policy.initial_s,
                cap=self._policy.error_backoff_max_s,
            )
            self._paused_until = now + pause
            self._metrics.upstream_auth_failing.set(1)
            if self._auth_failures == 1 or self._auth_failures % 10 == 0:
                logs.event(
                    self.log,
                    "upstream_auth_failing",
                    logging.ERROR,
                    outcome=result.outcome.value,
                    http_status=result.http_status,
                    attempt=self._auth_failures,
                    pause_s=pause,
                )
        elif self._auth_failures and result.outcome in (PollOutcome.OK, PollOutcome.NOT_FOUND):
            # Only when it was failing: a Gauge.set takes a lock, on every poll that adds up.
            self._auth_failures = 0
            self._metrics.upstream_auth_failing.set(0)

    def _log_poll(
        self, claim: TaskClaim, result: PollResult, plan: TaskUpdate | TaskFinish, moved: int
    ) -> None:
        if isinstance(plan, TaskFinish):
            logs.event(
                self.log,
                "task_finished",
                task_id=claim.task_id,
                type=plan.event_type.value,
                watches=moved,
                polls=claim.polls + 1,
            )
        elif result.outcome.value != "ok":
            logs.event(
                self.log,
                "poll_failed",
                logging.WARNING if plan.error_streak > 0 else logging.INFO,
                task_id=claim.task_id,
                outcome=result.outcome.value,
                attempt=plan.error_streak,
                http_status=result.http_status,
                detail=result.detail,
            )
