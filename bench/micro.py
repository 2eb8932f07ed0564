"""Micro-benchmarks that split a poll's CPU between the relay's own work and aiohttp's.

    python -m bench.micro poll-overhead [--polls N]   # the relay's CPU per poll, no HTTP
    python -m bench.micro client [--seconds S]        # CPU per GET: bare aiohttp vs UpstreamClient

`poll-overhead` runs the real Poller over a real SQLite file (2,000 streams, always due, budget
lifted, 64 in flight) with a transport that answers on the next loop turn with ready-made task
documents (parsed and classified as real answers are), and reports CPU per poll twice: the
event-loop thread's alone, and the whole process's (the SQLite threads' claims and writes
included). That is what a poll costs the relay besides its HTTP. `client` starts
`relay fake-upstream` as its own process and runs, in this process, the ceiling's bare loop and
UpstreamClient.fetch_answer (the relay's HTTP path: its session, middleware, headers, timeout
and capped read), 64 concurrent each, in the order bare, relay, relay, bare after a warm-up of
each, so that a drift of the machine does not favour one: CPU per 200 answer.
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
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson

from bench.scenarios import API_KEY, FULL, Bench
from relay.metrics import Metrics
from relay.models import NewWatch
from relay.policy import PollPolicy
from relay.poller import Poller
from relay.store.sqlite import SQLiteStore
from relay.upstream import Answer, Deliver, RetryGate, UpstreamClient, make_upstream_session

STREAMS = FULL.polls_watches  # as the polls scenarios and the ceiling
CONCURRENCY = FULL.concurrency


def _answer_body(task_id: str) -> bytes:
    data = {"taskId": task_id, "model": "m", "status": "queued", "created": 1, "completed": 0}
    return orjson.dumps({"code": 200, "message": "success", "data": data})


class _AnswerAtOnce:
    """A PollTransport whose answers, real task documents, come on the next loop turn."""

    available = True

    def __init__(self, task_ids: list[str]) -> None:
        self.fetched = 0
        self._reached: tuple[int, asyncio.Event] | None = None
        # Made beforehand: building them is the benchmark's work, not the relay's.
        self._bodies = {task_id: _answer_body(task_id) for task_id in task_ids}

    async def reach(self, count: int) -> None:
        """Return once `count` polls were fetched in all."""
        reached = asyncio.Event()
        self._reached = (count, reached)
        if self.fetched < count:
            await reached.wait()

    def submit(
        self, polls: Sequence[tuple[int, str]], *, before_retry: RetryGate, deliver: Deliver
    ) -> None:
        self.fetched += len(polls)
        if self._reached is not None and self.fetched >= self._reached[0]:
            self._reached[1].set()
        answers = [(key, Answer(200, self._bodies[task_id], None)) for key, task_id in polls]
        asyncio.get_running_loop().call_soon(deliver, answers)

    async def cancel_all(self) -> None:
        pass  # every poll is answered on the next loop turn


async def poll_overhead(polls: int) -> None:
    task_ids = [f"tk-micro-{n}" for n in range(STREAMS)]
    with tempfile.TemporaryDirectory() as scratch:
        store = SQLiteStore(str(Path(scratch) / "micro.db"))
        await store.open()
        try:
            now = time.time()
            for n, task_id in enumerate(task_ids):
                new = NewWatch(task_id=task_id, callback_url="http://127.0.0.1:9/", metadata=None)
                await store.register(new, watch_id=f"wt_{n:06d}", now=now, deadline_at=now + 86_400)
            await _measure_polls(store, _AnswerAtOnce(task_ids), polls)
        finally:
            await store.close()


async def _measure_polls(store: SQLiteStore, fetcher: _AnswerAtOnce, polls: int) -> None:
    poller = Poller(
        store=store,
        transport=fetcher,
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

    async def reach(count: int) -> None:
        # The poll loop ending (it never should) must end the wait too, not hang it.
        reached = asyncio.ensure_future(fetcher.reach(count))
        await asyncio.wait((reached, running), return_when=asyncio.FIRST_COMPLETED)
        if not reached.done():
            reached.cancel()
            raise RuntimeError("the poll loop ended early")

    try:
        await reach(5_000)  # warm-up
        for _ in range(3):
            start, wall = fetcher.fetched, time.perf_counter()
            loop_cpu, process_cpu = time.thread_time(), time.process_time()
            await reach(start + polls)
            done = fetcher.fetched - start
            wall = time.perf_counter() - wall
            loop_cpu, process_cpu = time.thread_time() - loop_cpu, time.process_time() - process_cpu
            print(
                f"poll-overhead  {done:,} polls  {done / wall:9,.0f} polls/s"
                f"  {1e6 * loop_cpu / done:5.1f} us event-loop CPU per poll"
                f"  {1e6 * process_cpu / done:5.1f} us process CPU per poll"
            )
    finally:
        stopping.set()
        await running


async def client(seconds: float) -> None:
    async with aiohttp.ClientSession() as session, AsyncExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        # The harness's own fake upstream, started as every scenario gets it.
        bench = Bench(plan=FULL, workdir=scratch, session=session, stack=stack)
        base = (await bench.fake_upstream()).url
        ids = [f"tk-hiapi-slow-micro-{n}" for n in range(STREAMS)]
        loops = {"bare": _bare_loop, "relay": _relay_loop}
        for name in ("bare", "relay"):
            await loops[name](base, ids, min(1.0, seconds))  # warm-up, not reported
        for name in ("bare", "relay", "relay", "bare"):
            answered, sent, rate, cpu_us = await loops[name](base, ids, seconds)
            print(
                f"client {name:5s}  {answered:,} answers of {sent:,} GETs  {rate:9,.0f} GET/s"
                f"  {cpu_us:5.1f} us CPU per GET"
            )


async def _timed(
    ids: list[str], seconds: float, get: Callable[[str], Awaitable[bool]]
) -> tuple[int, int, float, float]:
    """(200 answers, GETs sent, the answers' rate, CPU per answer) of `get` run 64 at a time for
    `seconds`."""
    answered = sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(first: int) -> None:
        nonlocal answered, sent
        n = first
        while time.perf_counter() < deadline:
            sent += 1
            ok = await get(ids[n % len(ids)])  # awaited first: `x += await` would lose updates
            answered += ok
            n += CONCURRENCY

    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return answered, sent, answered / wall, 1e6 * cpu / max(1, answered)


async def _bare_loop(base: str, ids: list[str], seconds: float) -> tuple[int, int, float, float]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONCURRENCY),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:

        async def get(task_id: str) -> bool:
            async with session.get(f"{base}/v1/tasks/{task_id}", headers=headers) as response:
                await response.read()
                return response.status == 200

        return await _timed(ids, seconds, get)


async def _relay_loop(base: str, ids: list[str], seconds: float) -> tuple[int, int, float, float]:
    async with make_upstream_session(concurrency=CONCURRENCY) as session:
        upstream = UpstreamClient(session, base_url=base, api_key=API_KEY, timeout_s=30)

        async def no_wait() -> None:
            return None

        async def get(task_id: str) -> bool:
            answer = await upstream.fetch_answer(task_id, before_retry=no_wait)
            return isinstance(answer, Answer) and answer.http_status == 200

        return await _timed(ids, seconds, get)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    overhead = sub.add_parser("poll-overhead", help="the relay's CPU per poll, no HTTP")
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
