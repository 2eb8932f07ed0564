"""The application factory: routes, middlewares, and every resource and loop in a cleanup context.

Start-up order (cleanup runs in reverse, and only for what started): store -> HTTP clients ->
loops. Stopping sets one event, gives in-flight polls and callbacks `shutdown_timeout_s` to
finish, then cancels the rest; their leases hand them to the next start, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay import __version__, api, logs
from relay.apiprocs import ApiConfig, ApiProcessPool
from relay.config import LEASE_MARGIN_S, UPSTREAM_ATTEMPTS, Settings
from relay.delivery import CallbackSender, Deliverer
from relay.metrics import Metrics
from relay.models import ACTIVE_STATES, WatchState
from relay.netpolicy import CallbackPolicy, make_callback_connector
from relay.policy import DeliveryPolicy, PollPolicy
from relay.poller import Poller
from relay.pollworkers import PollWorkerPool, WorkerConfig
from relay.service import LocalService
from relay.state import (
    CLOCK,
    DELIVERER,
    LOOP_TASKS,
    METRICS,
    POLLER,
    REPLICA_ID,
    SERVICE,
    SETTINGS,
    STOP_STARTED,
    STOPPING,
    STORE,
    loops_alive,
)
from relay.store import Store, StoreUnavailable, open_store
from relay.upstream import InProcessPolls, PollTransport, UpstreamClient, make_upstream_session

log = logging.getLogger("relay.app")

GAUGE_REFRESH_S = 5.0
# A replica beats every 5 s and counts as gone after 15 s of silence (three missed beats).
HEARTBEAT_S = 5.0
HEARTBEAT_STALE_S = 15.0
# A replica joining others polls only once each of them has beaten since it joined, and so taken
# its smaller share: polling at once would put the deployment over budget for up to one beat.
JOIN_HOLD_S = HEARTBEAT_S + 1.0
# The retention sweep runs this often and deletes this many watches per write: each batch is one
# short transaction (1.5-1.7 ms for 500 in a SQLite file of 1M watches), so polls and
# registrations go on between them.
PURGE_EVERY_S = 60.0
PURGE_BATCH = 500

Resolve = Callable[[str, int], Awaitable[list[str]]]
API_POOL = web.AppKey("api_pool", ApiProcessPool)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
    rand: Callable[[], float] = random.random,
    registry: CollectorRegistry | None = None,
    run_loops: bool = True,
    on_fatal: Callable[[], None] | None = None,
) -> web.Application:
    """Build the relay. Tests pass their own store, clock, randomness, or `run_loops=False` to
    drive `app[POLLER].tick(now)` and `app[DELIVERER].tick(now)` by hand."""
    settings.check()
    tokens = tuple(t.value.encode() for t in settings.api_tokens)
    metrics = Metrics(registry)
    policy = CallbackPolicy(allow_nets=settings.callback_allow_nets)
    app = api.api_application(tokens=tokens, policy=policy)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[CLOCK] = clock
    app[STOPPING] = asyncio.Event()
    app[STOP_STARTED] = []
    app[LOOP_TASKS] = []
    app[REPLICA_ID] = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

    app.on_shutdown.append(_begin_stop)
    app.cleanup_ctx.append(partial(_store_ctx, store=store))
    app.cleanup_ctx.append(partial(_loops_ctx, policy=policy, rand=rand, run_loops=run_loops,
                                   on_fatal=on_fatal))  # fmt: skip
    if settings.api_processes:
        # Last: they stop first, while the store and the loops still answer their calls.
        app.cleanup_ctx.append(_api_processes_ctx)
    return app


async def _begin_stop(app: web.Application) -> None:
    """aiohttp's shutdown began: the loops stop claiming and start their drain now, while aiohttp
    waits for the open requests, not after it (the two waits one after the other took up to
    twice RELAY_SHUTDOWN_TIMEOUT_S, past a 30 s grace period with the defaults)."""
    app[STOP_STARTED].append(time.monotonic())
    app[STOPPING].set()
    pool = app.get(API_POOL)
    if pool is not None:
        pool.stop_accepting()


async def _api_processes_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    service = app[SERVICE]
    assert isinstance(service, LocalService)
    pool = ApiProcessPool(
        ApiConfig(
            host=settings.host,
            port=settings.port,
            api_tokens=tuple(t.value for t in settings.api_tokens),
            callback_allow_nets=tuple(str(n) for n in settings.callback_allow_nets),
            shutdown_timeout_s=settings.shutdown_timeout_s,
            event_loop=settings.event_loop,
            log_level=settings.log_level,
        ),
        processes=settings.api_processes,
        service=service,
        metrics=app[METRICS],
    )
    app[API_POOL] = pool
    try:
        await pool.start()
        yield
    finally:
        await pool.close()


def drain_budget(timeout_s: float, started: float | None, now: float) -> float:
    """What is left of RELAY_SHUTDOWN_TIMEOUT_S for the loops' drain."""
    if started is None:  # stopped without aiohttp's shutdown (a test's cleanup)
        return timeout_s
    return max(0.0, timeout_s - (now - started))


async def _store_ctx(app: web.Application, *, store: Store | None) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    owned = store is None
    app[STORE] = (
        store
        if store is not None
        else await open_store(
            settings.store_url,
            synchronous=settings.sqlite_synchronous,
            sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            postgres_schema=settings.postgres_schema,
        )
    )
    logs.event(log, "relay_starting", version=__version__, upstream=settings.upstream_url)
    yield
    if owned:
        await app[STORE].close()


async def _loops_ctx(
    app: web.Application,
    *,
    policy: CallbackPolicy,
    rand: Callable[[], float],
    run_loops: bool,
    on_fatal: Callable[[], None] | None,
) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    store = app[STORE]
    clock = app[CLOCK]
    upstream_session = make_upstream_session(concurrency=settings.upstream_concurrency)
    callback_session = aiohttp.ClientSession(
        connector=make_callback_connector(policy, limit=settings.delivery_concurrency)
    )
    api_key = settings.upstream_api_key.value if settings.upstream_api_key else None
    deliverer = Deliverer(
        store=store,
        sender=CallbackSender(
            callback_session,
            keys=settings.signing_key_bytes,
            timeout_s=settings.delivery_timeout_s,
        ),
        metrics=metrics,
        policy=DeliveryPolicy.from_settings(settings),
        concurrency=settings.delivery_concurrency,
        per_host=settings.delivery_per_host,
        lease_s=settings.delivery_lease_s,
        attempt_timeout_s=settings.delivery_timeout_s,
        clock=clock,
        rand=rand,
    )
    transport: PollTransport = InProcessPolls(
        UpstreamClient(
            upstream_session,
            base_url=settings.upstream_url,
            api_key=api_key,
            timeout_s=settings.upstream_timeout_s,
        )
    )
    workers = None
    if settings.poll_processes:
        workers = transport = PollWorkerPool(
            WorkerConfig(
                base_url=settings.upstream_url,
                api_key=api_key,
                timeout_s=settings.upstream_timeout_s,
                concurrency=settings.upstream_concurrency,
                event_loop=settings.event_loop,
                log_level=settings.log_level,
            ),
            processes=settings.poll_processes,
            # An unanswered poll ends as a timeout before its lease runs out (the lease is longer
            # than this by the rest of LEASE_MARGIN_S), so no other claimer polls it meanwhile.
            answer_timeout_s=settings.upstream_timeout_s * UPSTREAM_ATTEMPTS + LEASE_MARGIN_S / 2,
            metrics=metrics,
        )
    poller = Poller(
        store=store,
        transport=transport,
        metrics=metrics,
        policy=PollPolicy.from_settings(settings),
        rps=settings.upstream_rps,
        concurrency=settings.upstream_concurrency,
        lease_s=settings.poll_lease_s,
        clock=clock,
        rand=rand,
        on_finished=deliverer.wake,
    )
    app[POLLER] = poller
    app[DELIVERER] = deliverer
    app[SERVICE] = LocalService(
        store=store,
        metrics=metrics,
        clock=clock,
        new_watch_id=api.new_watch_id,
        watch_timeout_s=settings.watch_timeout_s,
        wake_poller=poller.wake,
        wake_deliverer=deliverer.wake,
        loops_alive=partial(loops_alive, app),
    )
    stopping = app[STOPPING]
    try:  # whatever fails from here on, the children and sessions are closed below
        if workers is not None:
            await workers.start()
        if run_loops:
            await join_replicas(app)
            for name, coro in (
                ("poll", poller.run(stopping)),
                ("delivery", deliverer.run(stopping)),
                ("gauges", _refresh_gauges(app, stopping)),
                ("heartbeat", _heartbeat(app, stopping)),
                ("listen", store.listen_registrations(poller.wake, stopping)),
                *(
                    [("retention", _retention(app, stopping))]
                    if settings.watch_retention_s > 0
                    else []
                ),
            ):
                task = asyncio.create_task(coro, name=f"relay-{name}")
                task.add_done_callback(partial(_loop_ended, stopping=stopping, on_fatal=on_fatal))
                app[LOOP_TASKS].append(task)
        yield
    finally:
        stopping.set()
        started = app[STOP_STARTED]
        budget = drain_budget(
            settings.shutdown_timeout_s, started[0] if started else None, time.monotonic()
        )
        await _stop_loops(app[LOOP_TASKS], (poller, deliverer), budget)
        with contextlib.suppress(StoreUnavailable):
            await store.retire(app[REPLICA_ID])
        if workers is not None:
            await workers.close()
        await upstream_session.close()
        await callback_session.close()


def _loop_ended(
    task: asyncio.Task[None], *, stopping: asyncio.Event, on_fatal: Callable[[], None] | None
) -> None:
    if task.cancelled() or stopping.is_set():
        return
    # A loop must never end on its own: run half-alive and watches silently stall. Stop instead.
    exc = task.exception()
    log.critical("loop_died", extra={"loop": task.get_name(), "detail": repr(exc)}, exc_info=exc)
    stopping.set()
    if on_fatal is not None:
        on_fatal()


async def _stop_loops(
    tasks: list[asyncio.Task[None]], loops: tuple[Poller, Deliverer], timeout_s: float
) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    if pending:
        logs.event(log, "drain_timeout", logging.WARNING, in_flight=sum(x.in_flight for x in loops))
        for loop in loops:
            await loop.cancel_in_flight()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    logs.event(log, "relay_stopped")


async def refresh_gauges(app: web.Application) -> None:
    """Set the state gauges from the store (the store is the truth when replicas share it)."""
    counts = await app[STORE].count_by_state()
    metrics = app[METRICS]
    for state, count in counts.items():
        metrics.watches_by_state.labels(state.value).set(count)
    metrics.watches_active.set(sum(counts[s] for s in ACTIVE_STATES))
    metrics.callbacks_backlog.set(counts[WatchState.DELIVERING])


async def _beat(app: web.Application) -> int | None:
    """One heartbeat: tell the store this replica lives, take this replica's budget share."""
    store, poller, metrics, clock = app[STORE], app[POLLER], app[METRICS], app[CLOCK]
    try:
        now = clock()
        live = await store.heartbeat(app[REPLICA_ID], now=now, stale_after_s=HEARTBEAT_STALE_S)
    except StoreUnavailable:
        metrics.store_errors.inc()
        return None
    poller.share_budget(live, now)
    metrics.replicas_live.set(live)
    return live


async def join_replicas(app: web.Application) -> int | None:
    """The first beat, before the loops start; if other replicas are polling, hold polling
    until each of them has beaten since (JOIN_HOLD_S) and so taken its smaller share."""
    live = await _beat(app)
    if live is not None and live > 1:
        app[POLLER].hold(app[CLOCK]() + JOIN_HOLD_S)
        logs.event(log, "replica_joining", replicas=live, hold_s=JOIN_HOLD_S)
    return live


async def _heartbeat(app: web.Application, stopping: asyncio.Event) -> None:
    """Beat every HEARTBEAT_S (the first beat ran before the loops started)."""
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=HEARTBEAT_S)
        if not stopping.is_set():
            await _beat(app)


async def purge_finished(app: web.Application, stopping: asyncio.Event | None = None) -> int:
    """Delete every finished watch last changed more than RELAY_WATCH_RETENTION_S ago, a batch
    per write; return how many. Stops between batches once `stopping` is set."""
    store, metrics, retention_s = app[STORE], app[METRICS], app[SETTINGS].watch_retention_s
    if retention_s <= 0:  # 0 keeps every watch
        return 0
    before = app[CLOCK]() - retention_s
    purged = 0
    while stopping is None or not stopping.is_set():
        count = await store.purge_finished(before=before, limit=PURGE_BATCH)
        metrics.watches_purged.inc(count)
        purged += count
        if count < PURGE_BATCH:
            break
    return purged


async def _retention(app: web.Application, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            purged = await purge_finished(app, stopping)
        except StoreUnavailable:
            app[METRICS].store_errors.inc()
        else:
            if purged:
                logs.event(log, "watches_purged", count=purged)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=PURGE_EVERY_S)


async def _refresh_gauges(app: web.Application, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            await refresh_gauges(app)
        except StoreUnavailable:
            app[METRICS].store_errors.inc()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=GAUGE_REFRESH_S)
