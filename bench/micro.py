"""Micro-benchmarks that split a poll's CPU between the relay's own work and aiohttp's.

    python -m bench.micro poll-overhead [--polls N]   # the relay's own CPU per poll, no HTTP
    python -m bench.micro client [--seconds S]        # CPU per GET: bare aiohttp vs UpstreamClient

`poll-overhead` runs the real Poller over a real SQLite file (2,000 streams, always due, budget
lifted, 64 in flight) with a fetcher that answers on the next loop turn with a parsed task
answer, and reports the event-loop thread's CPU per poll: what a poll costs the relay besides
its HTTP. `client` starts `relay fake-upstream` as its own process and runs, in this process
and in turn, the ceiling's bare loop and UpstreamClient.fetch_answer (the relay's HTTP path:
its session, middleware, headers, timeout and capped read), each 64 concurrent: CPU per GET.
Both print one line per measurement; they assert nothing (speed belongs here, not in tests).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import orjson

from bench.procs import Child, free_port, launch
from relay.metrics import Metrics
from relay.models import NewWatch, PollResult
from relay.policy import PollPolicy
from relay.poller import Poller
from relay.store.sqlite import SQLiteStore
from relay.upstream import Answer, RetryGate, UpstreamClient, make_upstream_session

STREAMS = 2_000
CONCURRENCY = 64
API_KEY = "micro-bench-key"


def _answer_body(task_id: str) -> bytes:
    data = {"taskId": task_id, "model": "m", "status": "queued", "created": 1, "completed": 0}
    return orjson.dumps({"code": 200, "message": "success", "data": data})


class _AnswerAtOnce:
    """A fetcher whose answer, a real task document, comes on the next loop turn."""

    available = True

    def __init__(self) -> None:
        self.fetched = 0
        self._reached: tuple[int, asyncio.Event] | None = None

    async def reach(self, count: int) -> None:
        """Return once `count` polls were fetched in all."""
        reached = asyncio.Event()
        self._reached = (count, reached)
        if self.fetched < count:
            await reached.wait()

    async def fetch(
        self, task_id: str, *, now: float, before_retry: RetryGate | None = None
    ) -> PollResult:
        self.fetched += 1
        if self._reached is not None and self.fetched >= self._reached[0]:
            self._reached[1].set()
        await asyncio.sleep(0)
        return Answer(200, _answer_body(task_id), None).classify(task_id, now)


async def poll_overhead(polls: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = SQLiteStore(str(Path(scratch) / "micro.db"))
        await store.open()
        now = time.time()
        for n in range(STREAMS):
            new = NewWatch(
                task_id=f"tk-micro-{n}", callback_url="http://127.0.0.1:9/", metadata=None
            )
            await store.register(new, watch_id=f"wt_{n:06d}", now=now, deadline_at=now + 86_400)
        fetcher = _AnswerAtOnce()
        poller = Poller(
            store=store,
            fetcher=fetcher,
            metrics=Metrics(),
            policy=PollPolicy(
                initial_s=0.01, max_s=0.01, factor=1.0, jitter=0.0,
                error_backoff_max_s=60.0, retry_after_max_s=60.0, not_found_grace_s=60.0,
            ),
            rps=1e9,
            concurrency=CONCURRENCY,
            lease_s=60.0,
        )  # fmt: skip
        stopping = asyncio.Event()
        running = asyncio.create_task(poller.run(stopping))
        try:
            await fetcher.reach(5_000)  # warm-up
            for _ in range(3):
                start, cpu, wall = fetcher.fetched, time.thread_time(), time.perf_counter()
                await fetcher.reach(start + polls)
                done = fetcher.fetched - start
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                print(
                    f"poll-overhead  {done / wall:9,.0f} polls/s"
                    f"  event-loop thread {1e6 * cpu / done:5.1f} us CPU per poll"
                )
        finally:
            stopping.set()
            await running
            await store.close()


async def client(seconds: float) -> None:
    async with aiohttp.ClientSession() as control, _fake_upstream(control) as base:
        ids = [f"tk-hiapi-slow-micro-{n}" for n in range(STREAMS)]
        for _ in range(2):
            for name, loop in (("bare", _bare_loop), ("relay", _relay_loop)):
                rate, cpu_us = await loop(base, ids, seconds)
                print(f"client {name:5s}  {rate:9,.0f} GET/s  {cpu_us:5.1f} us CPU per GET")


@asynccontextmanager
async def _fake_upstream(control: aiohttp.ClientSession) -> AsyncIterator[str]:
    """`relay fake-upstream` in its own process, as the harness runs it; its base URL."""
    async with AsyncExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        port = free_port()
        child = Child(
            "micro-fake-upstream",
            ["-m", "relay", "fake-upstream", "--port", str(port), "--api-key", API_KEY,
             "--queued-s", "100000"],
            scratch / "fake-upstream.log",
            port=port,
        )  # fmt: skip
        await launch(stack, control, child, ready_path="/_fake/stats")
        yield child.url


async def _timed(
    ids: list[str], seconds: float, get: Callable[[str], Awaitable[None]]
) -> tuple[float, float]:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(first: int) -> None:
        nonlocal done
        n = first
        while time.perf_counter() < deadline:
            await get(ids[n % len(ids)])
            done += 1
            n += CONCURRENCY

    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return done / wall, 1e6 * cpu / max(1, done)


async def _bare_loop(base: str, ids: list[str], seconds: float) -> tuple[float, float]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONCURRENCY),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:

        async def get(task_id: str) -> None:
            async with session.get(f"{base}/v1/tasks/{task_id}", headers=headers) as response:
                await response.read()

        return await _timed(ids, seconds, get)


async def _relay_loop(base: str, ids: list[str], seconds: float) -> tuple[float, float]:
    async with make_upstream_session(concurrency=CONCURRENCY) as session:
        upstream = UpstreamClient(session, base_url=base, api_key=API_KEY, timeout_s=30)

        async def no_wait() -> None:
            return None

        async def get(task_id: str) -> None:
            await upstream.fetch_answer(task_id, before_retry=no_wait)

        return await _timed(ids, seconds, get)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    overhead = sub.add_parser("poll-overhead", help="the relay's own CPU per poll, no HTTP")
    overhead.add_argument("--polls", type=int, default=40_000)
    http = sub.add_parser("client", help="CPU per GET: bare aiohttp loop vs UpstreamClient")
    http.add_argument("--seconds", type=float, default=6.0)
    http.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    overhead.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    job = poll_overhead(args.polls) if args.command == "poll-overhead" else client(args.seconds)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(job)
    else:
        asyncio.run(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
