"""The five measurements. Each starts what it needs as child processes and stops them on the way
out; each returns a JSON-ready dict of figures and the settings they were measured under."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import seed
from bench.procs import (
    REPO_ROOT,
    Child,
    CpuMeter,
    Profile,
    busy_cores,
    free_port,
    launch,
    run_to_end,
)
from bench.stats import (
    Samples,
    delta,
    histogram_delta,
    histogram_quantile,
    latency_summary,
    parse_samples,
    profile_summary,
    share_at_most,
    total,
)
from relay.config import Settings
from relay.delivery import HOST_BUSY_MARGIN_S
from relay.signing import generate_secret

API_KEY = "bench-key"
CALLBACK_NETS = "127.0.0.0/8"
UNUSED_CALLBACK = "http://127.0.0.1:9/hook"  # never called: those tasks never end
LIFTED_RPS = "1000000"
FAKE_QUEUED_S = "100000"  # tasks never end on their own (x10 for `-slow-` ids)
LOAD_SLACK_S = 30.0
PROFILE_SLACK_S = 15.0
QUIET_CORES = 0.25  # machine-wide busy cores below which the box counts as quiet
QUIET_PROBE_S = 3.0
QUIET_PAUSE_S = 3.0
QUIET_GLANCE_S = 0.5  # when no waiting is allowed (--quick): only record how busy it was  # a load client gets its duration plus this before it is killed


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """How long and how big each measurement is; QUICK must finish in under a minute."""

    concurrency: int = 64
    ceiling_s: float = 10.0
    ceiling_warmup_s: float = 1.0
    registration_s: float = 10.0
    registration_warmup_s: float = 1.0
    polls_watches: int = 2000
    polls_interval_s: float = 0.01
    polls_warmup_s: float = 5.0
    polls_window_s: float = 20.0
    notify_watches: int = 500
    notify_rate: float = 50.0
    notify_interval_s: float = 1.0
    burst_watches: int = 2000
    blocked_watches: int = 5000  # waiting for the hanging receiver in notify-blocked
    blocked_timeout_s: float = 2.0  # its RELAY_DELIVERY_TIMEOUT_S: a turn every 3 s
    scale_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    scale_base_interval_s: float = 60.0  # RELAY_POLL_MAX_S's default
    scale_demand_cap: float = 100_000 / 60.0  # polls/s; larger sizes get a longer interval
    scale_warmup_s: float = 10.0
    scale_window_s: float = 30.0
    # One task in this many has ended before the relay starts: its watch moves to delivering
    # when its poll comes round, and its callback goes to a real receiver.
    scale_ended_every: int = 100
    baseline_settle_s: float = 5.0
    replica_counts: tuple[int, ...] = (1, 2, 3)
    replicas_watches: int = 2000
    replicas_warmup_s: float = 5.0
    replicas_window_s: float = 15.0

    def scale_interval(self, watches: int) -> float:
        """The default 60 s interval, lengthened where it would demand more than 100k/60 s."""
        return max(self.scale_base_interval_s, watches / self.scale_demand_cap)


FULL = Plan()
QUICK = Plan(
    ceiling_s=2.0,
    ceiling_warmup_s=0.5,
    registration_s=2.0,
    registration_warmup_s=0.5,
    polls_watches=300,
    polls_warmup_s=0.5,
    polls_window_s=2.0,
    notify_watches=60,
    notify_interval_s=0.5,
    burst_watches=200,
    blocked_watches=100,
    blocked_timeout_s=0.5,
    scale_sizes=(10_000,),
    scale_warmup_s=1.0,
    scale_window_s=2.0,
    baseline_settle_s=1.0,
    replica_counts=(1, 2),
    replicas_watches=200,
    replicas_warmup_s=0.5,
    replicas_window_s=1.5,
)


@dataclass
class Bench:
    """What every scenario shares: the plan, a scratch directory, an HTTP session, the fake
    upstream (started once, on first use, and kept for the run) and the ceiling once known."""

    plan: Plan
    workdir: Path
    session: aiohttp.ClientSession
    stack: AsyncExitStack
    tag: str = ""
    upstream: Child | None = None
    ceiling_rps: float | None = None
    profile_dir: Path | None = None
    quiet_wait_s: float = 0.0  # per wait
    quiet_budget_s: float = 0.0  # all waits of the run together
    progress: Callable[[str], None] = print

    async def wait_quiet(self) -> dict[str, float]:
        """Wait (bounded) until other work leaves the cores alone; report what was seen."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        allowed = min(self.quiet_wait_s, self.quiet_budget_s)
        deadline = began + allowed
        busy = await busy_cores(QUIET_PROBE_S if allowed > 0 else QUIET_GLANCE_S)
        while busy >= QUIET_CORES and loop.time() < deadline:
            self.progress(f"other work is using {busy:.2f} cores; waiting for quiet")
            await asyncio.sleep(QUIET_PAUSE_S)
            busy = await busy_cores(QUIET_PROBE_S)
        waited = loop.time() - began
        self.quiet_budget_s = max(0.0, self.quiet_budget_s - waited)
        return {"busy_cores": busy, "waited_s": waited}

    def __post_init__(self) -> None:
        self.tag = self.tag or secrets.token_hex(3)

    async def fake_upstream(self) -> Child:
        if self.upstream is None:
            port = free_port()
            child = Child(
                "fake-upstream",
                ["-m", "relay", "fake-upstream", "--port", str(port), "--api-key", API_KEY,
                 "--queued-s", FAKE_QUEUED_S],
                self.workdir / "fake-upstream.log",
                port=port,
            )  # fmt: skip
            await launch(self.stack, self.session, child, ready_path="/_fake/stats")
            self.upstream = child
        return self.upstream

    async def profile(self, child: Child, name: str, seconds: float) -> Profile | None:
        """With --profile: start a py-spy recording of `child` for about `seconds`."""
        if self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        profile = Profile(child.pid, seconds, self.profile_dir / f"{name}.txt")
        await profile.start()
        self.stack.push_async_callback(profile.stop)
        return profile

    async def profile_result(self, profile: Profile | None) -> dict[str, Any] | None:
        if profile is None:
            return None
        await profile.wait(PROFILE_SLACK_S)
        if not profile.out.exists():
            return {"error": "py-spy wrote nothing (is it installed? ptrace allowed?)"}
        summary = profile_summary(profile.out.read_text(errors="replace"))
        return {"file": str(profile.out), **summary}

    async def relay(
        self, stack: AsyncExitStack, name: str, settings: dict[str, str], tree: Path = REPO_ROOT
    ) -> tuple[Child, float]:
        """A `relay serve` process of `tree`'s relay, on a fresh SQLite file unless `settings`
        names one."""
        upstream = await self.fake_upstream()
        port = free_port()
        env = {
            "RELAY_HOST": "127.0.0.1",
            "RELAY_PORT": str(port),
            "RELAY_STORE_URL": f"sqlite:///{self.workdir / f'{name}.db'}",
            "RELAY_UPSTREAM_URL": upstream.url,
            "RELAY_UPSTREAM_API_KEY": API_KEY,
            "RELAY_CALLBACK_ALLOW_NETS": CALLBACK_NETS,
            "RELAY_SHUTDOWN_TIMEOUT_S": "2",
            **settings,
        }
        child = Child(name, ["-m", "relay", "serve"], self.workdir / f"{name}.log", env, port, tree)
        ready_s = await launch(stack, self.session, child, ready_path="/readyz")
        return child, ready_s

    async def load(self, name: str, mode: str, url: str, *extra: str, duration: float) -> Any:
        """Run `python -m bench.load` to its end and return its JSON result."""
        child = Child(
            name,
            ["-m", "bench.load", mode, "--url", url, "--duration", str(duration),
             "--concurrency", str(self.plan.concurrency), *extra],
            self.workdir / f"{name}.log",
        )  # fmt: skip
        return orjson.loads(await run_to_end(child, duration + LOAD_SLACK_S))

    async def register(self, relay: Child, name: str, ids: str, count: int, callback: str) -> Any:
        result = await self.load(
            name, "watch", f"{relay.url}/watch", "--ids", ids, "--count", str(count),
            "--callback", callback, duration=120.0,
        )  # fmt: skip
        if result["ok_total"] != count:
            raise RuntimeError(f"{name}: {result['ok_total']} of {count} watches registered")
        return result

    async def scrape(self, relay: Child) -> Samples:
        async with self.session.get(f"{relay.url}/metrics") as response:
            response.raise_for_status()
            return parse_samples(await response.text())

    async def get_json(self, url: str) -> Any:
        async with self.session.get(url) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


# --- 1. the ceiling ------------------------------------------------------------------------------


async def ceiling(b: Bench) -> dict[str, Any]:
    """A bare aiohttp client (its own process) against the fake upstream: the most GETs/s here."""
    plan = b.plan
    result, cpu = await _bare_client(b, "ceiling-client")
    upstream_cpu = cpu["upstream_cores"] * cpu["seconds"]
    b.ceiling_rps = result["rate_per_s"]
    errors = result["sent_total"] - result["ok_total"]
    return {
        "requests_per_s": result["rate_per_s"],
        "latency_ms": result["latency_ms"],
        "errors": errors,
        "client_cpu_s_per_1k": 1000 * result["client_cpu_s"] / max(1, result["sent_total"]),
        "upstream_cpu_s_per_1k": 1000 * upstream_cpu / max(1, result["sent_total"]),
        "cpu": cpu,
        "config": {
            "concurrency": plan.concurrency,
            "duration_s": plan.ceiling_s,
            "warmup_s": plan.ceiling_warmup_s,
            "task_ids": plan.polls_watches,
            "client": f"aiohttp ClientSession, keep-alive, own process, {result['loop']} loop",
        },
    }


async def _bare_client(b: Bench, name: str) -> tuple[dict[str, Any], dict[str, float]]:
    """One run of the bare client against the fake upstream; its result and the CPU used."""
    plan = b.plan
    upstream = await b.fake_upstream()
    meter = CpuMeter({"upstream": upstream})
    result = await b.load(
        name, "get", f"{upstream.url}/v1/tasks/",
        "--ids", f"tk-hiapi-slow-poll-{b.tag}-", "--id-count", str(plan.polls_watches),
        "--warmup", str(plan.ceiling_warmup_s), "--header", f"Authorization: Bearer {API_KEY}",
        duration=plan.ceiling_s,
    )  # fmt: skip
    return result, meter.stop(client=result["client_process_cpu_s"])


# --- 2. registration throughput ------------------------------------------------------------------


async def registration(b: Bench) -> dict[str, Any]:
    """64 concurrent POST /watch (never-ending tasks, polling pushed an hour out) for N seconds."""
    return await _registration(b, "registration", {}, with_floor=True)


async def registration_processes(b: Bench) -> dict[str, Any]:
    """The same with the HTTP API also in one API process per core (RELAY_API_PROCESSES).
    No floor of its own: the registration scenario's, measured just before, serves for both."""
    processes = os.cpu_count() or 1
    result = await _registration(
        b, "registration-processes", {"RELAY_API_PROCESSES": str(processes)}, with_floor=False
    )
    result["api_processes"] = processes
    return result


async def _registration(
    b: Bench, name: str, extra_settings: dict[str, str], *, with_floor: bool
) -> dict[str, Any]:
    plan = b.plan
    settings = {"RELAY_POLL_INITIAL_S": "3600", "RELAY_POLL_MAX_S": "3600", **extra_settings}
    async with AsyncExitStack() as stack:
        relay, _ = await b.relay(stack, name, settings)
        meter = CpuMeter({"relay": relay, "upstream": await b.fake_upstream()})
        profile = await b.profile(relay, name, plan.registration_s)
        result = await b.load(
            "registration-client", "watch", f"{relay.url}/watch",
            "--ids", f"tk-hiapi-slow-reg-{b.tag}-", "--callback", UNUSED_CALLBACK,
            "--warmup", str(plan.registration_warmup_s), duration=plan.registration_s,
        )  # fmt: skip
        cpu = meter.stop(client=result["client_process_cpu_s"])
        profiled = await b.profile_result(profile)
        after = await b.scrape(relay)
    relay_cpu = cpu["relay_cores"] * cpu["seconds"]
    # Durability check: every 201 is a row in the file after the relay stopped.
    rows = await asyncio.to_thread(_count_rows, b.workdir / f"{name}.db")
    # Measured right after the relay's window, as the polls' ceiling is: this VM's speed drifts.
    floor = await _registration_floor(b) if with_floor else None
    return {
        "watches_per_s": result["rate_per_s"],
        "floor": floor,
        "ratio_to_floor": result["rate_per_s"] / floor["requests_per_s"]
        if floor is not None and floor["requests_per_s"]
        else None,
        "latency_ms": result["latency_ms"],
        "created_201": result["statuses"].get("201", 0),
        "rows_in_store": rows,
        "errors": result["sent_total"] - result["ok_total"],
        "statuses": result["statuses"],
        "relay_cpu_s_per_1k": 1000 * relay_cpu / max(1, result["sent_total"]),
        "polls_meanwhile": total(after, "relay_upstream_polls_total"),
        "cpu": cpu,
        "profile": profiled,
        "config": {
            "concurrency": plan.concurrency,
            "duration_s": plan.registration_s,
            "warmup_s": plan.registration_warmup_s,
            "relay": settings | {"RELAY_UPSTREAM_RPS": "50 (default)"},
            "client": f"{result['client']} HTTP/1.1 client, keep-alive, own process",
            "note": "each new task's first poll is due at once; the default 50/s budget caps them",
        },
    }


async def _registration_floor(b: Bench) -> dict[str, Any]:
    """The same load against a bare aiohttp `POST /watch` (bench/floor.py, its own process): the
    most registrations one aiohttp process could answer here, with no relay behind them."""
    plan = b.plan
    async with AsyncExitStack() as stack:
        port = free_port()
        floor = Child(
            "registration-floor", ["-m", "bench.floor", "--port", str(port)],
            b.workdir / "registration-floor.log", port=port,
        )  # fmt: skip
        await launch(stack, b.session, floor, ready_path="/_floor/ready")
        meter = CpuMeter({"floor": floor})
        result = await b.load(
            "registration-floor-client", "watch", f"{floor.url}/watch",
            "--ids", f"tk-hiapi-slow-floor-{b.tag}-", "--callback", UNUSED_CALLBACK,
            "--warmup", str(plan.registration_warmup_s), duration=plan.registration_s,
        )  # fmt: skip
        cpu = meter.stop(client=result["client_process_cpu_s"])
    floor_cpu = cpu["floor_cores"] * cpu["seconds"]
    return {
        "requests_per_s": result["rate_per_s"],
        "latency_ms": result["latency_ms"],
        "errors": result["sent_total"] - result["ok_total"],
        "cpu_s_per_1k": 1000 * floor_cpu / max(1, result["sent_total"]),
        "cpu": cpu,
    }


def _count_rows(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM watches").fetchone()[0])
    finally:
        conn.close()


# --- 3. sustained polls ---------------------------------------------------------------------------


async def polls(b: Bench) -> dict[str, Any]:
    """Every stream always due, the budget lifted: how many polls a second the relay makes."""
    return await _polls(b, "polls", {})


async def polls_workers(b: Bench) -> dict[str, Any]:
    """The same with the polls' HTTP in one worker process per core (RELAY_POLL_PROCESSES).

    Each process that makes requests gets the bare client's concurrency, as an operator who
    adds poll processes would set it: a poll holds its slot from the claim until its answer is
    back in the relay process, two pipe hops and a second event loop later than in one
    process, so the same slots carry fewer polls a second (Little's law). The ceiling client
    is measured at its best concurrency (BENCHMARKS.md: fewer GETs/s at 128 than at 64).
    """
    processes = os.cpu_count() or 1
    settings = {
        "RELAY_POLL_PROCESSES": str(processes),
        "RELAY_UPSTREAM_CONCURRENCY": str(b.plan.concurrency * processes),
    }
    result = await _polls(b, "polls-workers", settings)
    result["poll_processes"] = processes
    return result


async def _polls(b: Bench, name: str, extra_settings: dict[str, str]) -> dict[str, Any]:
    plan = b.plan
    settings = {**fixed_interval_settings(plan, plan.polls_interval_s), **extra_settings}
    upstream = await b.fake_upstream()
    async with AsyncExitStack() as stack:
        relay, _ = await b.relay(stack, name, settings)
        await b.register(
            relay, f"{name}-register", f"tk-hiapi-slow-poll-{b.tag}-", plan.polls_watches,
            UNUSED_CALLBACK,
        )  # fmt: skip
        await asyncio.sleep(plan.polls_warmup_s)
        window = await _window(b, relay, upstream, plan.polls_window_s, name)
    # This VM's speed drifts by a quarter within minutes: the ratio takes the ceiling measured
    # right after this window (the relay stopped), not the one at the start of the run.
    adjacent, _ = await _bare_client(b, f"{name}-ceiling")
    ceiling_rps = adjacent["rate_per_s"]
    before, after, seconds = window["before"], window["after"], window["seconds"]
    polled = delta(before, after, "relay_upstream_polls_total")
    ok = delta(before, after, "relay_upstream_polls_total", outcome="ok")
    rate = polled / seconds
    duration_sum = delta(before, after, "relay_upstream_poll_duration_seconds_sum")
    lag = histogram_delta(before, after, "relay_scheduler_lag_seconds", loop="poll")
    return {
        "polls_per_s": rate,
        "ok_share": ok / polled if polled else math.nan,
        "relay_cpu_s_per_1k_polls": (
            1000 * window["cpu"]["relay_cores"] * seconds / polled if polled else math.nan
        ),
        "cpu": window["cpu"],
        "profile": window["profile"],
        "ratio_to_ceiling": rate / ceiling_rps if ceiling_rps else None,
        "ceiling_per_s": ceiling_rps,
        "first_ceiling_per_s": b.ceiling_rps,
        "poll_duration_mean_ms": 1000 * duration_sum / polled if polled else math.nan,
        "scheduler_lag_p99_s": histogram_quantile(0.99, lag),
        "config": {
            "watches": plan.polls_watches,
            "warmup_s": plan.polls_warmup_s,
            "window_s": plan.polls_window_s,
            "relay": settings,
        },
    }


async def _window(
    b: Bench, relay: Child, upstream: Child, seconds: float, name: str
) -> dict[str, Any]:
    """Scrape, let `seconds` pass, scrape again; the CPU every process used meanwhile."""
    before = await b.scrape(relay)
    profile = await b.profile(relay, name, seconds)
    meter = CpuMeter({"relay": relay, "upstream": upstream})
    await asyncio.sleep(seconds)
    cpu = meter.stop()
    after = await b.scrape(relay)
    return {
        "before": before,
        "after": after,
        "seconds": cpu["seconds"],
        "cpu": cpu,
        "profile": await b.profile_result(profile),
    }


# --- 4. notification latency ----------------------------------------------------------------------


async def notify(b: Bench) -> dict[str, Any]:
    """Tasks pinned to handling, flipped to success at a steady rate: flip -> receiver's arrival."""
    return await _flip_and_measure(b, "notify", b.plan.notify_watches, b.plan.notify_rate)


async def burst(b: Bench) -> dict[str, Any]:
    """Tasks pinned to handling, all flipped to success at once, all calling back one receiver:
    how fast one receiver's backlog drains (RELAY_DELIVERY_PER_HOST attempts at a time)."""
    return await _flip_and_measure(b, "burst", b.plan.burst_watches, None)


async def notify_blocked(b: Bench) -> dict[str, Any]:
    """notify, while another receiver hangs with a backlog: how much one receiver that never
    answers delays the callbacks of a healthy one (RELAY_DELIVERY_PER_HOST keeps it from taking
    every slot; its waiting callbacks still pass through the claim queue, once per turn)."""
    plan = b.plan
    return await _flip_and_measure(
        b, "notify-blocked", plan.notify_watches, plan.notify_rate, blocked=plan.blocked_watches
    )


async def _flip_and_measure(
    b: Bench, name: str, count: int, rate: float | None, *, blocked: int = 0
) -> dict[str, Any]:
    """Pin `count` tasks to handling, watch them with one receiver, flip them to success at
    `rate` a second (None: all at once) and measure flip -> the receiver's arrival. With
    `blocked`, that many callbacks wait for a second receiver that never answers (attempts
    time out after plan.blocked_timeout_s) before the flips begin."""
    plan = b.plan
    settings = fixed_interval_settings(plan, plan.notify_interval_s) | {
        "RELAY_SIGNING_SECRET": generate_secret()
    }
    if blocked:
        settings["RELAY_DELIVERY_TIMEOUT_S"] = str(plan.blocked_timeout_s)
    upstream = await b.fake_upstream()
    prefix = f"tk-hiapi-slow-{name}-{b.tag}-"
    ids = [f"{prefix}{i}" for i in range(count)]
    control = f"{upstream.url}/_fake/tasks"
    async with AsyncExitStack() as stack:
        receiver = await _receiver(b, stack, f"{name}-receiver")
        await _bounded(16, [_pin(b, f"{control}/{t}", "handling") for t in ids])
        relay, _ = await b.relay(stack, name, settings)
        hanging = (
            await _hanging_backlog(b, stack, relay, name, control, blocked) if blocked else None
        )
        await b.register(relay, f"{name}-register", prefix, len(ids), f"{receiver.url}/hook")
        # Two intervals: every stream has had its first poll and runs at its steady pace.
        await asyncio.sleep(2 * plan.notify_interval_s)
        before = await b.scrape(relay)
        meter = CpuMeter({"relay": relay, "upstream": upstream, "receiver": receiver})
        profile = await b.profile(relay, name, len(ids) / (rate or len(ids)))
        start = time.monotonic()
        if rate is None:
            await _bounded(16, [_pin(b, f"{control}/{t}", "success") for t in ids])
        else:
            for n, task in enumerate(ids):
                await sleep_until(start + n / rate)
                await _pin(b, f"{control}/{task}", "success")
        flipping_s = time.monotonic() - start
        deadline = time.monotonic() + 3 * plan.notify_interval_s + 60
        stats = await b.get_json(f"{receiver.url}/_recv/stats")
        while len(stats["arrivals"]) < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            stats = await b.get_json(f"{receiver.url}/_recv/stats")
        cpu = meter.stop()
        profiled = await b.profile_result(profile)
        after = await b.scrape(relay)
        hung = await b.get_json(f"{hanging.url}/_recv/stats") if hanging else None
    flips = (await b.get_json(f"{upstream.url}/_fake/stats"))["flips"]
    latencies = [stats["arrivals"][t] - flips[t] for t in ids if t in stats["arrivals"]]
    summary = latency_summary(latencies)
    delivered = delta(before, after, "relay_terminal_to_delivered_seconds_count")
    delivery_sum = delta(before, after, "relay_terminal_to_delivered_seconds_sum")
    jitter = Settings().poll_jitter  # RELAY_POLL_JITTER is left at its default
    arrivals = [stats["arrivals"][t] for t in ids if t in stats["arrivals"]]
    first_flip = min(flips[t] for t in ids if t in flips) if flips else math.nan
    drained_s = (max(arrivals) - first_flip) if arrivals else math.nan
    return {
        "latency_ms": summary,
        "received": len(latencies),
        "expected": len(ids),
        "duplicates": stats["duplicates"],
        "poll_interval_s": plan.notify_interval_s,
        # Jitter only shortens a poll interval: the interval in force is the longest wait.
        "poll_interval_min_with_jitter_s": plan.notify_interval_s * (1 - jitter),
        "seen_to_delivered_mean_ms": 1000 * delivery_sum / delivered if delivered else math.nan,
        "flip_rate_per_s": len(ids) / flipping_s if flipping_s else math.nan,
        "all_delivered_after_s": drained_s,
        "deferred_receiver_busy": delta(before, after, "relay_callbacks_deferred_total",
                                        reason="receiver_busy"),
        "cpu": cpu,
        "profile": profiled,
        **(
            {
                "blocked_callbacks": blocked,
                "blocked_attempts_in_window": hung["count"] if hung else 0,
                "blocked_attempt_timeout_s": plan.blocked_timeout_s,
            }
            if blocked
            else {}
        ),
        "config": {
            "watches": len(ids),
            "flip_rate_per_s": rate if rate is not None else "all at once",
            "relay": settings | {"RELAY_SIGNING_SECRET": "(generated)",
                                 "RELAY_POLL_JITTER": f"{jitter:g} (default)",
                                 "RELAY_DELIVERY_PER_HOST": "8 (default)"},
        },
    }  # fmt: skip


async def _receiver(b: Bench, stack: AsyncExitStack, name: str, *extra: str) -> Child:
    """A `bench.receiver` process (`extra`: its options), stopped when `stack` closes."""
    port = free_port()
    receiver = Child(
        name, ["-m", "bench.receiver", "--port", str(port), *extra],
        b.workdir / f"{name}.log", port=port,
    )  # fmt: skip
    await launch(stack, b.session, receiver, ready_path="/_recv/stats")
    return receiver


async def _hanging_backlog(
    b: Bench, stack: AsyncExitStack, relay: Child, name: str, control: str, count: int
) -> Child:
    """A receiver that never answers, with `count` callbacks for it: their tasks have ended
    already, so each is polled once, and then they wait, RELAY_DELIVERY_PER_HOST at a time in
    attempts that time out. Returns once all are waiting and a turn of deferrals has passed."""
    hanging = await _receiver(b, stack, f"{name}-hanging", "--hang")
    prefix = f"tk-hiapi-slow-{name}-hung-{b.tag}-"
    await _bounded(16, [_pin(b, f"{control}/{prefix}{i}", "success") for i in range(count)])
    await b.register(relay, f"{name}-register-hung", prefix, count, f"{hanging.url}/hook")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # each task's end seen: its callback is waiting
        if total(await b.scrape(relay), "relay_task_events_total") >= count:
            break
        await asyncio.sleep(0.1)
    # One whole turn: the first attempts time out and the backlog is deferred at least once.
    turn_s = b.plan.blocked_timeout_s + HOST_BUSY_MARGIN_S
    await asyncio.sleep(turn_s + b.plan.notify_interval_s)
    return hanging


async def _pin(b: Bench, url: str, status: str) -> None:
    async with b.session.put(url, json={"status": status}) as response:
        response.raise_for_status()
        await response.read()


async def _bounded(limit: int, coros: list[Awaitable[None]]) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[None]) -> None:
        async with semaphore:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


# --- 5. scale: scheduler lag and memory per watch ---------------------------------------------------


async def scale(b: Bench) -> dict[str, Any]:
    """Seed N active watches straight into SQLite, run the relay over them, read lag and RSS.

    One task in plan.scale_ended_every has ended: at each size, the window sees tasks end among
    N watches and their callbacks delivered, as a real deployment does (a store statement that
    walked every watch for each ended task stays hidden without it)."""
    plan = b.plan
    baseline = await _baseline_rss(b)
    sizes = []
    for watches in plan.scale_sizes:
        quiet = await b.wait_quiet()
        sizes.append(
            {**await _one_size(b, watches, baseline["rss_bytes"]), "machine_before": quiet}
        )
    return {"baseline": baseline, "sizes": sizes}


def fixed_interval_settings(plan: Plan, interval_s: float) -> dict[str, str]:
    """Every stream polled every `interval_s`, the rate budget lifted."""
    return {
        "RELAY_UPSTREAM_RPS": LIFTED_RPS,
        "RELAY_UPSTREAM_CONCURRENCY": str(plan.concurrency),
        "RELAY_POLL_INITIAL_S": str(interval_s),
        "RELAY_POLL_MAX_S": str(interval_s),
        "RELAY_POLL_FACTOR": "1",
    }


async def _baseline_rss(b: Bench) -> dict[str, Any]:
    plan = b.plan
    path = b.workdir / "scale-0.db"
    await seed.create_schema(str(path))
    async with AsyncExitStack() as stack:
        relay, _ = await b.relay(
            stack, "scale-0", fixed_interval_settings(plan, plan.scale_base_interval_s)
        )
        await asyncio.sleep(plan.baseline_settle_s)
        await b.scrape(relay)  # the scrape path's own allocations belong to the baseline
        memory = relay.memory()
    return {"rss_bytes": memory["VmRSS"], "hwm_bytes": memory["VmHWM"]}


async def _one_size(b: Bench, watches: int, baseline_rss: int) -> dict[str, Any]:
    plan = b.plan
    name = f"scale-{watches}"
    path = b.workdir / f"{name}.db"
    interval = plan.scale_interval(watches)
    upstream = await b.fake_upstream()
    prefix = f"tk-hiapi-slow-scale{watches}-{b.tag}-"
    ended = [seed.task_id(prefix, i) for i in range(0, watches, plan.scale_ended_every)]
    await _bounded(16, [_pin(b, f"{upstream.url}/_fake/tasks/{t}", "success") for t in ended])
    await seed.create_schema(str(path))
    settings = fixed_interval_settings(plan, interval) | {"RELAY_SIGNING_SECRET": generate_secret()}
    async with AsyncExitStack() as stack:
        receiver = await _receiver(b, stack, f"{name}-receiver")
        seeded = await asyncio.to_thread(
            seed.seed,
            str(path),
            count=watches,
            interval_s=interval,
            task_prefix=prefix,
            callback_url=f"{receiver.url}/hook",
            start_in_s=3.0 + 3.0 * watches / 1_000_000,  # the due index rebuild, the relay's start
        )
        relay, ready_s = await b.relay(stack, name, settings)
        await sleep_until(time.monotonic() + max(0.0, seeded.due_from - time.time()))
        await asyncio.sleep(plan.scale_warmup_s)
        window = await _window(b, relay, upstream, plan.scale_window_s, name)
        memory = relay.memory()
        # Read before the relay stops: its last connection checkpoints and removes the WAL.
        db_bytes, wal_bytes = file_size(path), file_size(path.with_name(path.name + "-wal"))
    before, after, seconds = window["before"], window["after"], window["seconds"]
    lag = histogram_delta(before, after, "relay_scheduler_lag_seconds", loop="poll")
    lag_count = lag[-1][1] if lag else 0.0
    lag_sum = delta(before, after, "relay_scheduler_lag_seconds_sum", loop="poll")
    polled = delta(before, after, "relay_upstream_polls_total")
    delivered = delta(before, after, "relay_terminal_to_delivered_seconds_count")
    delivery_sum = delta(before, after, "relay_terminal_to_delivered_seconds_sum")
    return {
        "watches": watches,
        "interval_s": interval,
        "demanded_polls_per_s": watches / interval,
        "polls_per_s": polled / seconds,
        "scheduler_lag_p50_s": histogram_quantile(0.50, lag),
        "scheduler_lag_p99_s": histogram_quantile(0.99, lag),
        "scheduler_lag_mean_s": lag_sum / lag_count if lag_count else math.nan,
        "scheduler_lag_share_le_100ms": share_at_most(0.1, lag),
        "tasks_ended": len(ended),
        "ended_seen_per_s": delta(before, after, "relay_task_events_total") / seconds,
        "callbacks_delivered_per_s": delivered / seconds,
        "seen_to_delivered_mean_ms": 1000 * delivery_sum / delivered if delivered else math.nan,
        "rss_bytes": memory["VmRSS"],
        "hwm_bytes": memory["VmHWM"],
        "rss_bytes_per_watch": (memory["VmRSS"] - baseline_rss) / watches,
        "cpu": window["cpu"],
        "profile": window["profile"],
        "sqlite_bytes": db_bytes,
        "sqlite_wal_bytes": wal_bytes,
        "sqlite_bytes_per_watch": db_bytes / watches,
        "seed_s": seeded.seconds,
        "relay_ready_s": ready_s,
        "config": {
            "warmup_s": plan.scale_warmup_s,
            "window_s": plan.scale_window_s,
            "ended_every": plan.scale_ended_every,
            "relay": settings | {"RELAY_SIGNING_SECRET": "(generated)"},
        },
    }


# --- 6. several replicas on one PostgreSQL --------------------------------------------------------

PG_DSN_ENVS = ("BENCH_POSTGRES_DSN", "RELAY_TEST_POSTGRES_DSN")


async def replicas(b: Bench) -> dict[str, Any]:
    """1..N relays on one PostgreSQL schema, every stream always due, the budget lifted: the
    deployment's polls a second, and the CPU each poll costs the relays and the database."""
    dsn = next((os.environ[name] for name in PG_DSN_ENVS if os.environ.get(name)), None)
    if dsn is None:
        return {"skipped": f"set {PG_DSN_ENVS[0]} (or {PG_DSN_ENVS[1]}) to measure"}
    plan = b.plan
    upstream = await b.fake_upstream()
    runs = []
    for count in plan.replica_counts:
        schema = f"bench_{b.tag}_{count}"
        settings = {
            "RELAY_STORE_URL": dsn,
            "RELAY_POSTGRES_SCHEMA": schema,
            **fixed_interval_settings(plan, plan.polls_interval_s),
        }
        try:
            async with AsyncExitStack() as stack:
                relays = [
                    (await b.relay(stack, f"replica-{count}-{n}", settings))[0]
                    for n in range(count)
                ]
                await b.register(
                    relays[0], f"replicas-{count}-register", f"tk-hiapi-slow-rep-{b.tag}-",
                    plan.replicas_watches, UNUSED_CALLBACK,
                )  # fmt: skip
                await asyncio.sleep(plan.replicas_warmup_s)
                before = [await b.scrape(r) for r in relays]
                meter = CpuMeter({**{f"relay{n}": r for n, r in enumerate(relays)},
                                  "upstream": upstream})  # fmt: skip
                pg_before = postgres_cpu_seconds()
                await asyncio.sleep(plan.replicas_window_s)
                cpu = meter.stop(postgres=postgres_cpu_seconds() - pg_before)
                after = [await b.scrape(r) for r in relays]
        finally:
            await _drop_schema(dsn, schema)
        seconds = cpu["seconds"]
        polled = sum(
            delta(x, y, "relay_upstream_polls_total") for x, y in zip(before, after, strict=True)
        )
        relay_cores = sum(cpu[f"relay{n}_cores"] for n in range(count))
        runs.append(
            {
                "replicas": count,
                "polls_per_s": polled / seconds,
                "relay_cores": relay_cores,
                "postgres_cores": cpu["postgres_cores"],
                "relay_cpu_s_per_1k_polls": 1000 * relay_cores * seconds / polled,
                "postgres_cpu_s_per_1k_polls": 1000 * cpu["postgres_cores"] * seconds / polled,
                "cpu": cpu,
            }
        )
    return {
        "runs": runs,
        "config": {
            "watches": plan.replicas_watches,
            "window_s": plan.replicas_window_s,
            "relay": {k: v for k, v in settings.items() if k != "RELAY_STORE_URL"},
        },
    }


def postgres_cpu_seconds() -> float:
    """User + system CPU of every process named `postgres` on this machine (server and backends)."""
    total_s = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            data = (proc / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        fields = data[data.rindex(")") + 2 :].split()
        total_s += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total_s


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


SCENARIOS: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
    "ceiling": ceiling,
    "registration": registration,
    "registration-processes": registration_processes,
    "polls": polls,
    "polls-workers": polls_workers,
    "notify": notify,
    "burst": burst,
    "notify-blocked": notify_blocked,
    "scale": scale,
    "replicas": replicas,
}


def plan_json(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
