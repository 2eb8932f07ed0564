"""Poll worker processes: the upstream's HTTP in child processes, the relay's logic in this one.

A relay process spends about half its CPU per poll in aiohttp's client and the event loop, and a
Python process runs on one core (BENCHMARKS.md). With RELAY_POLL_PROCESSES=N that half runs in N
child processes (`python -m relay poll-worker`), each with its own event loop and connection
pool. This process keeps everything else: the store, the schedule, the rate budget, the
classification of answers, metrics and logs. A child reads task ids on its stdin and writes the
upstream's answers, as received, on its stdout: binary frames, as many per write as are ready.

A child takes polls only once it has answered its CONFIG with READY. A child that dies fails
the polls it had in flight as network errors: they take the usual persisted backoff, nothing is
lost, and the child is started again. A poll past the answer deadline ends alone as a timeout;
a child that has said nothing for that long with polls due is killed. Children ignore SIGINT and
SIGTERM and leave when their stdin closes, after their polls in flight: the relay decides when.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay import logs
from relay.config import UPSTREAM_ATTEMPTS
from relay.frames import (
    HEADER,
    START_WAIT_S,
    STOP_GRACE_S,
    ChildProcess,
    Drained,
    FrameDecoder,
    FrameError,
    IncomingFrames,
    Outbox,
    RestartPolicy,
    encode,
    run_child,
    settle,
    start_child,
)
from relay.metrics import Metrics
from relay.models import PollOutcome, PollResult
from relay.upstream import (
    MAX_BODY_BYTES,
    Answer,
    Deliver,
    RetryGate,
    UpstreamClient,
    deliver_grouped,
    make_upstream_session,
)

log = logging.getLogger("relay.pollworkers")

MAX_PAYLOAD = MAX_BODY_BYTES + 64 * 1024

# relay -> child
CONFIG = 1  # payload: JSON of WorkerConfig; the first frame, once
FETCH = 2  # payload: the task id
TOKEN = 3  # the retry the child asked for may go on the wire
# child -> relay
ANSWER = 4  # small: HTTP status; payload: the body
RETRY_AFTER = 5  # payload: the answer's Retry-After header; sent just before its ANSWER
FAILURE = 6  # payload: JSON [outcome, detail] of a transport failure
WANT_TOKEN = 7  # the child wants to retry a dropped connection: it waits for a TOKEN
READY = 8  # the child accepted its CONFIG and serves FETCH frames from now on

__all__ = ["HEADER", "FrameDecoder", "FrameError", "encode"]  # the codec, from relay.frames


def _decoder() -> FrameDecoder:
    return FrameDecoder(last_kind=READY, max_payload=MAX_PAYLOAD)


# Bumped whenever the frames change: a child started from newer or older code on disk (an
# upgrade in place) refuses a CONFIG of another version instead of misreading frames.
PROTOCOL_VERSION = 2
WATCH_EVERY_S = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """What a child needs to poll; sent on its stdin, never in its arguments or environment."""

    base_url: str
    api_key: str | None = field(repr=False)
    timeout_s: float
    concurrency: int
    event_loop: str
    log_level: str
    attempts: int = UPSTREAM_ATTEMPTS
    protocol: int = PROTOCOL_VERSION


# --- the relay's side -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    key: int
    deliver: Deliver
    before_retry: RetryGate | None
    sent_at: float
    retry_after: str | None = None
    # Made only for a poll that waits for a retry token (rare): resolves when the poll ends.
    ended: asyncio.Future[None] | None = None

    def end(
        self, answer: Answer | PollResult, done: list[tuple[Deliver, int, Answer | PollResult]]
    ) -> None:
        if self.ended is not None:
            settle(self.ended, None)
        done.append((self.deliver, self.key, answer))


class _Child(ChildProcess):
    """One poll worker process, as the relay sees it."""

    def __init__(self, pool: PollWorkerPool) -> None:
        super().__init__()
        self._pool = pool
        self._decoder = _decoder()
        self.pending: dict[int, _Pending] = {}
        self.dying = False  # killed, or its stream broken: no new polls go to it
        self.last_heard = 0.0  # loop time of its last bytes on stdout

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or self.gone or self.dying:
            return  # a dying child's last bytes are not read: its polls fail with it
        self.last_heard = asyncio.get_running_loop().time()
        try:
            frames = self._decoder.feed(data if isinstance(data, bytes) else data.encode())
        except FrameError as exc:
            self._broken(str(exc))
            return
        done: list[tuple[Deliver, int, Answer | PollResult]] = []
        for kind, request_id, small, payload in frames:
            if kind == READY:
                self.became_ready()
                continue
            entry = self.pending.get(request_id)
            if entry is None:
                continue  # its poll was cancelled, or settled at its deadline, meanwhile
            try:
                self._on_frame(kind, request_id, small, payload, entry, done=done)
            except Exception as exc:  # a frame this relay cannot read: the child is not ours
                self.pending.pop(request_id, None)
                entry.end(_UNREADABLE, done)
                self._broken(repr(exc)[:200])
                break
        # Every answer of this read in one call: the poller handles them as one batch.
        deliver_grouped(done)

    def _broken(self, detail: str) -> None:
        logs.event(log, "poll_worker_broken", logging.ERROR, pid=self.pid, detail=detail)
        self.kill()

    def _on_frame(
        self,
        kind: int,
        request_id: int,
        small: int,
        payload: bytes,
        entry: _Pending,
        *,
        done: list[tuple[Deliver, int, Answer | PollResult]],
    ) -> None:
        if kind == ANSWER:
            del self.pending[request_id]
            entry.end(Answer(small, payload, entry.retry_after), done)
        elif kind == RETRY_AFTER:
            entry.retry_after = payload.decode("utf-8", "surrogateescape")
        elif kind == FAILURE:
            outcome, detail = orjson.loads(payload)
            result = PollResult(outcome=PollOutcome(outcome), detail=str(detail))
            del self.pending[request_id]
            entry.end(result, done)
        elif kind == WANT_TOKEN:
            self._pool.grant(self, request_id, entry.before_retry)
        else:
            raise FrameError(f"frame kind {kind} from a child")

    def connection_lost(self, exc: Exception | None) -> None:
        # The process has exited and both pipes are closed: every answer it wrote has been read.
        done: list[tuple[Deliver, int, Answer | PollResult]] = []
        for entry in self.pending.values():
            entry.end(_WORKER_FAILED, done)
        self.pending.clear()
        self.went_away()
        self._pool.ended(self)
        deliver_grouped(done)  # last: the pool's bookkeeping must not depend on the callback

    def kill(self) -> None:
        self.dying = True
        super().kill()


_WORKER_FAILED = PollResult(outcome=PollOutcome.NETWORK_ERROR, detail="poll worker exited")
_UNREADABLE = PollResult(
    outcome=PollOutcome.NETWORK_ERROR, detail="poll worker sent a frame the relay cannot read"
)
_OVERDUE = PollResult(outcome=PollOutcome.TIMEOUT, detail="no answer from the poll worker in time")
_NO_WORKER = PollResult(outcome=PollOutcome.NETWORK_ERROR, detail="no poll worker running")


def _load(child: _Child) -> int:
    return len(child.pending)


class PollWorkerPool:
    """A PollTransport that polls through `processes` child processes."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        processes: int,
        answer_timeout_s: float,
        metrics: Metrics,
        command: tuple[str, ...] = (sys.executable, "-m", "relay", "poll-worker"),
    ) -> None:
        self._config = config
        self._processes = processes
        self._answer_timeout_s = answer_timeout_s
        self._metrics = metrics
        self._command = command
        self._children: list[_Child] = []
        self._request_ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._restarts = RestartPolicy()
        self._closing = False
        metrics.poll_workers.set_function(lambda: sum(c.ready for c in self._children))

    @property
    def children(self) -> tuple[_Child, ...]:
        return tuple(self._children)

    async def start(self) -> None:
        """Start the children and wait (a bounded time) until they have taken their CONFIG."""
        for _ in range(self._processes):
            await self._spawn()
        self._keep(self._watch())
        waiting = [c.settled_in for c in self._children]
        if waiting:
            await asyncio.wait(waiting, timeout=START_WAIT_S)
        if not self.available:
            logs.event(log, "poll_workers_not_ready", logging.ERROR, waited_s=START_WAIT_S)

    async def _spawn(self) -> None:
        child = _Child(self)
        await start_child(child, self._command, encode(CONFIG, 0, orjson.dumps(self._config)))
        child.last_heard = child.started_at
        self._children.append(child)
        logs.event(log, "poll_worker_started", pid=child.pid)

    def submit(
        self,
        polls: Sequence[tuple[int, str]],
        *,
        before_retry: RetryGate | None,
        deliver: Deliver,
    ) -> None:
        """Send each (key, task id) to the child with the fewest polls in flight."""
        loop = asyncio.get_running_loop()
        live = [c for c in self._children if c.ready]
        if not live:
            failed: list[tuple[Deliver, int, Answer | PollResult]] = [
                (deliver, key, _NO_WORKER) for key, _ in polls
            ]
            # Later, never from within submit(): the caller is still registering these polls.
            # (An answer for a poll cancelled meanwhile is one its caller no longer knows.)
            loop.call_soon(deliver_grouped, failed)
            return
        sent_at = loop.time()
        request_ids = self._request_ids
        for key, task_id in polls:
            child = min(live, key=_load) if len(live) > 1 else live[0]
            request_id = next(request_ids) & 0xFFFFFFFF
            child.pending[request_id] = _Pending(key, deliver, before_retry, sent_at)
            child.send(encode(FETCH, request_id, task_id.encode()))

    async def fetch(
        self, task_id: str, *, now: float, before_retry: RetryGate | None = None
    ) -> PollResult:
        """One poll, awaited: what `submit` does for a batch."""
        future: asyncio.Future[Answer | PollResult] = asyncio.get_running_loop().create_future()

        def deliver(answers: list[tuple[int, Answer | PollResult]]) -> None:
            settle(future, answers[0][1])

        self.submit([(0, task_id)], before_retry=before_retry, deliver=deliver)
        try:
            answer = await future
        finally:
            self._drop(lambda entry: entry.deliver is deliver)
        return answer if isinstance(answer, PollResult) else answer.classify(task_id, now)

    async def cancel_all(self) -> None:
        self._drop(lambda entry: True)

    def _drop(self, which: Callable[[_Pending], bool]) -> None:
        """Forget polls in flight: their answers, if any come, are ignored; no token is paid."""
        for child in self._children:
            dropped = [rid for rid, entry in child.pending.items() if which(entry)]
            for request_id in dropped:
                entry = child.pending.pop(request_id)
                if entry.ended is not None:
                    settle(entry.ended, None)

    def grant(self, child: _Child, request_id: int, before_retry: RetryGate | None) -> None:
        """Let a child's retry go once the budget has a token for it."""
        if before_retry is None:
            child.send(encode(TOKEN, request_id))
            return

        entry = child.pending.get(request_id)
        if entry is None or self._closing:
            return  # its poll has ended, or the child is being stopped: no token for it
        if entry.ended is None:
            entry.ended = asyncio.get_running_loop().create_future()
        ended = entry.ended

        async def when_paid() -> None:
            paying = asyncio.ensure_future(before_retry())
            # The poll may end while it waits (its deadline, its child's death): the wait for
            # a token ends with it, and no token is taken for a request that never goes out.
            await asyncio.wait((paying, ended), return_when=asyncio.FIRST_COMPLETED)
            if not paying.done():
                paying.cancel()
                return
            paying.result()
            if request_id in child.pending:
                child.send(encode(TOKEN, request_id))

        self._keep(when_paid())

    def ended(self, child: _Child) -> None:
        if child in self._children:
            self._children.remove(child)
        if self._closing:
            return
        delay = self._restarts.child_exited(
            child, log, "poll_worker_exited", self._metrics.poll_worker_exits
        )
        self._keep(self._restart_after(delay))

    @property
    def available(self) -> bool:
        """Whether a child has taken its CONFIG and takes polls (else the poller claims none)."""
        return any(c.ready for c in self._children)

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._closing:
            try:
                await self._spawn()
            except Exception as exc:  # never give up on a child: the poller waits for one
                logs.event(log, "poll_worker_spawn_failed", logging.ERROR, detail=repr(exc)[:200])
                self._keep(self._restart_after(self._restarts.spawn_failed()))

    async def _watch(self) -> None:
        """Polls past the answer deadline end as timeouts, each on its own, before their leases
        run out; a child that has said nothing at all for that long with polls due is stuck,
        and is killed."""
        loop = asyncio.get_running_loop()
        deadline = self._answer_timeout_s
        while not self._closing:
            await asyncio.sleep(min(WATCH_EVERY_S, deadline / 4))
            now = loop.time()
            for child in list(self._children):
                if child.dying or not child.pending:
                    continue
                overdue = []
                for request_id, entry in child.pending.items():  # oldest first
                    if now - entry.sent_at <= deadline:
                        break
                    overdue.append(request_id)
                if not overdue:
                    continue
                done: list[tuple[Deliver, int, Answer | PollResult]] = []
                for request_id in overdue:
                    child.pending.pop(request_id).end(_OVERDUE, done)
                deliver_grouped(done)
                if now - child.last_heard > deadline:
                    logs.event(
                        log,
                        "poll_worker_unresponsive",
                        logging.ERROR,
                        pid=child.pid,
                        silent_s=round(now - child.last_heard, 3),
                    )
                    child.kill()

    def _keep(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Close every child's stdin; each leaves after its polls in flight, or is killed."""
        self._closing = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        children = list(self._children)
        for child in children:
            if child.outbox is not None:
                child.outbox.close()
        if not children:
            return
        _, late = await asyncio.wait([c.ended for c in children], timeout=STOP_GRACE_S)
        for child in children:
            if not child.ended.done():
                child.kill()
        if late:
            await asyncio.wait(late, timeout=STOP_GRACE_S)


# --- the child's side -----------------------------------------------------------------------------


def run_worker() -> int:
    """`relay poll-worker`: serve FETCH frames on stdin until it closes."""
    return run_child(
        who="poll-worker", config_kind=CONFIG, protocol=PROTOCOL_VERSION, serve=_serve_config
    )


async def _serve_config(fields: dict[str, Any], frames_out: int) -> None:
    await _serve(WorkerConfig(**fields), frames_out)


_STOPPING = "the relay is stopping: no more retries"


async def _serve(config: WorkerConfig, frames_out: int) -> None:
    loop = asyncio.get_running_loop()
    session = make_upstream_session(concurrency=config.concurrency)
    client = UpstreamClient(
        session,
        base_url=config.base_url,
        api_key=config.api_key,
        timeout_s=config.timeout_s,
        attempts=config.attempts,
    )
    stdout, drained = await loop.connect_write_pipe(Drained, os.fdopen(frames_out, "wb"))
    outbox = Outbox(stdout)
    outbox.send(encode(READY, 0))
    tokens: dict[int, asyncio.Future[None]] = {}
    polls: set[asyncio.Task[None]] = set()

    async def poll(request_id: int, task_id: str) -> None:
        async def token() -> None:
            if requests.closed.done():
                raise ConnectionAbortedError(_STOPPING)
            paid = loop.create_future()
            tokens[request_id] = paid
            outbox.send(encode(WANT_TOKEN, request_id))
            await paid

        try:
            answer = await client.fetch_answer(task_id, before_retry=token)
            if isinstance(answer, Answer):
                if answer.retry_after is not None:
                    retry_after = answer.retry_after.encode("utf-8", "surrogateescape")
                    outbox.send(encode(RETRY_AFTER, request_id, retry_after))
                outbox.send(encode(ANSWER, request_id, answer.body, small=answer.http_status))
                return
        except Exception as exc:  # an answer of some kind is owed for every FETCH
            answer = PollResult(outcome=PollOutcome.NETWORK_ERROR, detail=type(exc).__name__)
        finally:
            tokens.pop(request_id, None)
        outbox.send(
            encode(FAILURE, request_id, orjson.dumps([answer.outcome.value, answer.detail]))
        )

    def on_frame(kind: int, request_id: int, payload: bytes) -> None:
        if kind == FETCH:
            task = loop.create_task(poll(request_id, payload.decode()))
            polls.add(task)
            task.add_done_callback(polls.discard)
        elif kind == TOKEN:
            paid = tokens.pop(request_id, None)
            if paid is not None:
                settle(paid, None)

    _, requests = await loop.connect_read_pipe(
        lambda: IncomingFrames(on_frame, _decoder()), sys.stdin.buffer
    )
    await requests.closed
    # No token will come any more: a retry waiting for one ends now, as a network error.
    for paid in tokens.values():
        if not paid.done():
            paid.set_exception(ConnectionAbortedError(_STOPPING))
    while polls:
        await asyncio.gather(*polls, return_exceptions=True)
    outbox.close()
    await drained.closed  # every answer written has reached the pipe
    await session.close()
