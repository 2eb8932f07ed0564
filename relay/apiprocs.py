"""API processes: the HTTP API in child processes too, the store and everything else in this one.

One relay process answers about 0.3 ms of CPU per registration, most of it aiohttp's server and
the handler around the store call, and a Python process runs on one core (BENCHMARKS.md). With
RELAY_API_PROCESSES=N, N child processes (`python -m relay api-process`) bind the relay's port
beside it (SO_REUSEPORT: the kernel spreads new connections over all of them). A child parses,
authenticates, validates and renders; what needs the store it asks this process, one CALL frame
per request on its stdout, answered by a RESULT or FAILED frame on its stdin. This process stays
the only writer: a 201 from a child still means committed, one poll stream per task still holds.

A child counts its requests in metric events it sends with the frames of the same loop turn:
the relay process holds the only registry, so a scrape sees every process's requests.
A child that dies is started again (the connections it held are closed; clients retry, and a
registration sent again answers the same watch). At shutdown the relay sends STOP: each child
stops listening and finishes its requests in flight, which the relay still answers. A child
whose stdin closes without STOP (the relay died) fails its calls as 503 and leaves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from relay import api, jsondata, logs
from relay.frames import (
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
from relay.models import NewWatch, Watch, WatchState
from relay.netpolicy import CallbackPolicy
from relay.service import LocalService
from relay.state import SERVICE
from relay.store.base import StoreConflict, StoreUnavailable

log = logging.getLogger("relay.apiprocs")
# "busy": the relay process did not take the call on (a 503 not counted as a store error).
_OVERLOADED = orjson.dumps(["busy", "the relay process is busy with this process's calls"])

# relay -> child
CONFIG = 1  # payload: JSON of ApiConfig; the first frame, once
RESULT = 2  # payload: JSON of the call's result
FAILED = 3  # payload: JSON [kind, message]: "unavailable", "conflict", "busy" or "internal"
STOP = 4  # stop listening, finish the requests in flight, leave
# child -> relay
READY = 5  # the child listens on the port
CALL = 6  # payload: JSON [deadline, method, *arguments]; deadline on CLOCK_MONOTONIC
EVENTS = 7  # payload: JSON list of metric events (see RemoteService)
LAST_KIND = EVENTS

PROTOCOL_VERSION = 2
# A page of 1,000 watches, each with 4 KiB of metadata and a 2,048-character (percent-encoded)
# callback URL: about 7 MiB, and room to spare. The relay never sends more (CallServer.answer):
# a child that read a longer frame could not find the next one, and would have to start again.
MAX_PAYLOAD = 16 * 1024 * 1024
# How long an idle keep-alive connection stays open: web.run_app's default, which the relay
# process uses (a bare AppRunner's is an hour).
KEEPALIVE_TIMEOUT_S = 75.0
# A call the relay process has not answered in this long answers 503 (the store's own waits,
# RELAY_SQLITE_BUSY_TIMEOUT_MS or a PostgreSQL statement, end well before it). The relay process
# does not start a call past that deadline: its child has given up on it already.
CALL_TIMEOUT_S = 30.0
# Calls of one API process the relay process works on at once; past it, a call answers 503 at
# once (its child keeps serving), so a stalled store cannot pile up unbounded work.
MAX_CALLS_PER_CHILD = 1024
# /healthz in an API process asks the relay process too: a wedged relay must fail its liveness
# probe, as it would if it served the probe itself.
HEALTH_TIMEOUT_S = 5.0


class RelayUnreachable(StoreUnavailable):
    """The relay process did not answer a call (gone, or too slow): a 503 like the store's, but
    not counted as a store error."""


def _decoder() -> FrameDecoder:
    return FrameDecoder(last_kind=LAST_KIND, max_payload=MAX_PAYLOAD)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    """What an API process needs; sent on its stdin, never in its arguments or environment."""

    host: str
    port: int
    api_tokens: tuple[str, ...] = field(repr=False)
    callback_allow_nets: tuple[str, ...]
    shutdown_timeout_s: float
    event_loop: str
    log_level: str
    protocol: int = PROTOCOL_VERSION


# --- the calls, as both sides see them -------------------------------------------------------------


def _watch(fields: dict[str, Any] | None) -> Watch | None:
    if fields is None:
        return None
    return Watch(**{**fields, "state": WatchState(fields["state"])})


class CallServer:
    """The relay's side of the calls: each CALL's answer, each EVENTS frame applied."""

    def __init__(
        self, service: LocalService, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._service = service
        self._clock = clock
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {
            "register": self._register,
            "get": service.get,
            "cancel": service.cancel,
            "redeliver": service.redeliver,
            "list": self._list_watches,
            "readiness": service.readiness,
            "metrics": self._metrics,
            "health": service.alive,
        }

    async def answer(self, payload: bytes) -> tuple[int, bytes]:
        """The (kind, payload) of the frame that answers the CALL carrying `payload`."""
        try:
            deadline, method, *arguments = jsondata.loads(payload)
            if self._clock() > deadline:  # its child answered 503 already: change nothing now
                return FAILED, orjson.dumps(["busy", "the call waited past its deadline"])
            result = jsondata.dumps(await self._methods[method](*arguments))
        except StoreUnavailable as exc:  # the child counts and logs it, as the relay would
            return FAILED, orjson.dumps(["unavailable", str(exc)])
        except StoreConflict as exc:
            return FAILED, orjson.dumps(["conflict", str(exc)])
        except Exception:  # a bug: logged here whole, a bare 500 there
            log.exception("api_call_crashed")
            return FAILED, orjson.dumps(["internal", ""])
        if len(result) > MAX_PAYLOAD:  # the limits above should make this impossible
            logs.event(log, "api_answer_too_large", logging.ERROR, method=method, size=len(result))
            return FAILED, orjson.dumps(["internal", ""])
        return RESULT, result

    def apply_events(self, payload: bytes) -> None:
        service = self._service
        try:
            for event in orjson.loads(payload):
                if event[0] == "h":
                    service.record_http(event[1], event[2], event[3], event[4])
                elif event[0] == "s":
                    service.count_store_failure(event[1], event[2])
        except (orjson.JSONDecodeError, TypeError, IndexError, ValueError) as exc:
            logs.event(log, "api_events_unreadable", logging.ERROR, detail=repr(exc)[:200])

    async def _register(self, task_id: str, callback_url: str, metadata: Any) -> list[Any]:
        new = NewWatch(task_id=task_id, callback_url=callback_url, metadata=metadata)
        watch, created = await self._service.register(new)
        return [watch, created]

    async def _list_watches(
        self, state: str | None, task_id: str | None, limit: int, after: str | None
    ) -> list[Watch]:
        return await self._service.list_watches(
            state=None if state is None else WatchState(state),
            task_id=task_id,
            limit=limit,
            after=after,
        )

    async def _metrics(self, accept: str, names: list[str]) -> list[str]:
        body, content_type = await self._service.metrics_page(accept, names)
        return [body.decode(), content_type]


# --- the relay's side -----------------------------------------------------------------------------


class _Child(ChildProcess):
    """One API process, as the relay sees it."""

    def __init__(self, pool: ApiProcessPool) -> None:
        super().__init__()
        self._pool = pool
        self._decoder = _decoder()
        self.calls_in_flight = 0  # CALLs being answered (ApiProcessPool.answer)

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or self.gone:
            return
        try:
            frames = self._decoder.feed(data if isinstance(data, bytes) else data.encode())
        except FrameError as exc:
            logs.event(log, "api_process_broken", logging.ERROR, pid=self.pid, detail=str(exc))
            self.kill()
            return
        for kind, request_id, _, payload in frames:
            if kind == CALL:
                self._pool.answer(self, request_id, payload)
            elif kind == EVENTS:
                self._pool.apply_events(payload)
            elif kind == READY:
                self.became_ready()

    def connection_lost(self, exc: Exception | None) -> None:
        self.went_away()
        self._pool.ended(self)


class ApiProcessPool:
    """Starts `processes` API processes, answers their calls, restarts the ones that die."""

    def __init__(
        self,
        config: ApiConfig,
        *,
        processes: int,
        service: LocalService,
        metrics: Metrics,
        command: tuple[str, ...] = (sys.executable, "-m", "relay", "api-process"),
    ) -> None:
        self._config = config
        self._processes = processes
        self.calls = CallServer(service)
        self._metrics = metrics
        self._command = command
        self._children: list[_Child] = []
        self._background: set[asyncio.Task[Any]] = set()  # calls being answered
        self._restarting: set[asyncio.Task[None]] = set()
        self._restarts = RestartPolicy()
        self._stopping = False
        metrics.api_processes.set_function(lambda: sum(c.ready for c in self._children))

    async def start(self) -> None:
        """Start the children and wait (a bounded time) until each listens."""
        for _ in range(self._processes):
            await self._spawn()
        waiting = [c.settled_in for c in self._children]
        await asyncio.wait(waiting, timeout=START_WAIT_S)
        if not all(c.ready for c in self._children):
            logs.event(log, "api_processes_not_ready", logging.ERROR, waited_s=START_WAIT_S)

    async def _spawn(self) -> None:
        child = _Child(self)
        await start_child(child, self._command, encode(CONFIG, 0, orjson.dumps(self._config)))
        self._children.append(child)
        logs.event(log, "api_process_started", pid=child.pid)
        if self._stopping:  # the shutdown began while it was being started
            child.send(encode(STOP, 0))

    def answer(self, child: _Child, request_id: int, payload: bytes) -> None:
        if child.calls_in_flight >= MAX_CALLS_PER_CHILD:
            child.send(encode(FAILED, request_id, _OVERLOADED))
            return
        child.calls_in_flight += 1
        self._keep(self._answer(child, request_id, payload))

    async def _answer(self, child: _Child, request_id: int, payload: bytes) -> None:
        try:
            kind, answer = await self.calls.answer(payload)
        finally:
            child.calls_in_flight -= 1
        child.send(encode(kind, request_id, answer))

    def apply_events(self, payload: bytes) -> None:
        self.calls.apply_events(payload)

    def stop_accepting(self) -> None:
        """The relay's shutdown began: every child stops listening and drains its requests."""
        self._stopping = True
        for child in self._children:
            child.send(encode(STOP, 0))

    def ended(self, child: _Child) -> None:
        if child in self._children:
            self._children.remove(child)
        if self._stopping:
            return
        delay = self._restarts.child_exited(
            child, log, "api_process_exited", self._metrics.api_process_exits
        )
        self._restart(delay)

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            await self._spawn()
        except Exception as exc:  # never give up: the relay process still serves meanwhile
            logs.event(log, "api_process_spawn_failed", logging.ERROR, detail=repr(exc)[:200])
            self._restart(self._restarts.spawn_failed())

    def _keep(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _restart(self, delay: float) -> None:
        task = asyncio.create_task(self._restart_after(delay))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def close(self) -> None:
        """Stop every child: each finishes its requests in flight (answered meanwhile), or is
        killed after RELAY_SHUTDOWN_TIMEOUT_S and a grace period."""
        # First the starts in progress: one that ended after the list below was taken would
        # be left running (cancelling subprocess_exec kills its process).
        for task in list(self._restarting):
            task.cancel()
        await asyncio.gather(*self._restarting, return_exceptions=True)
        if not self._stopping:
            self.stop_accepting()
        children = list(self._children)
        if children:
            bound = self._config.shutdown_timeout_s + STOP_GRACE_S
            _, late = await asyncio.wait([c.ended for c in children], timeout=bound)
            for child in children:
                if not child.ended.done():
                    logs.event(log, "api_process_killed", logging.WARNING, pid=child.pid)
                    child.kill()
            if late:
                await asyncio.wait(late, timeout=STOP_GRACE_S)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


# --- the child's side -----------------------------------------------------------------------------


class FrameSink(Protocol):
    def send(self, frame: bytes) -> None: ...


class RemoteService:
    """The WatchService of an API process: each call a CALL frame, its answer a RESULT frame."""

    def __init__(self, outbox: FrameSink, *, call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._outbox = outbox
        self._call_timeout_s = call_timeout_s
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._ids = itertools.count(1)
        self._events: list[list[Any]] = []
        self._flush_due: asyncio.Handle | None = None
        self._relay_gone = False

    async def _call(self, method: str, *arguments: Any, timeout_s: float | None = None) -> Any:
        if self._relay_gone:
            raise RelayUnreachable("the relay process is gone")
        timeout_s = self._call_timeout_s if timeout_s is None else timeout_s
        request_id = next(self._ids) & 0xFFFFFFFF
        answered: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answered
        deadline = time.monotonic() + timeout_s  # one clock for every process of the machine
        call = jsondata.dumps([deadline, method, *arguments])  # metadata: every integer exact
        self._outbox.send(encode(CALL, request_id, call))
        try:
            async with asyncio.timeout(timeout_s):
                kind, payload = await answered
        except TimeoutError:
            raise RelayUnreachable(
                f"the relay process did not answer within {timeout_s:g} s"
                " (what was asked may still be done)"
            ) from None
        finally:
            self._pending.pop(request_id, None)
        if kind == RESULT:
            return jsondata.loads(payload)
        failure, message = orjson.loads(payload)
        if failure == "unavailable":
            raise StoreUnavailable(message)
        if failure == "busy":
            raise RelayUnreachable(message)
        if failure == "conflict":
            raise StoreConflict(message)
        raise RuntimeError("the relay process failed this call (its log says why)")

    def answered(self, kind: int, request_id: int, payload: bytes) -> None:
        waiting = self._pending.get(request_id)
        if waiting is not None:
            settle(waiting, (kind, payload))

    def relay_gone(self) -> None:
        """The relay process closed the pipe without STOP: no call will be answered."""
        self._relay_gone = True
        for waiting in self._pending.values():
            if not waiting.done():
                waiting.set_exception(RelayUnreachable("the relay process is gone"))

    async def register(self, new: NewWatch) -> tuple[Watch, bool]:
        fields, created = await self._call("register", new.task_id, new.callback_url, new.metadata)
        watch = _watch(fields)
        assert watch is not None
        return watch, bool(created)

    async def get(self, watch_id: str) -> Watch | None:
        return _watch(await self._call("get", watch_id))

    async def cancel(self, watch_id: str) -> Watch | None:
        return _watch(await self._call("cancel", watch_id))

    async def redeliver(self, watch_id: str) -> Watch | None:
        return _watch(await self._call("redeliver", watch_id))

    async def list_watches(
        self, *, state: WatchState | None, task_id: str | None, limit: int, after: str | None
    ) -> list[Watch]:
        found = await self._call(
            "list", None if state is None else state.value, task_id, limit, after
        )
        return [w for w in map(_watch, found) if w is not None]

    async def readiness(self) -> dict[str, str]:
        try:
            checks: dict[str, str] = await self._call("readiness")
        except RelayUnreachable:
            return {"relay": "unavailable"}
        return checks

    async def metrics_page(self, accept: str, names: list[str]) -> tuple[bytes, str]:
        self.flush()  # this process's requests so far are in the page it gets back
        body, content_type = await self._call("metrics", accept, names)
        return str(body).encode(), str(content_type)

    async def alive(self) -> bool:
        try:
            return bool(await self._call("health", timeout_s=HEALTH_TIMEOUT_S))
        except RelayUnreachable:
            return False

    def record_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self._event(["h", route, method, status, seconds])

    def store_failed(self, path: str, exc: StoreUnavailable) -> None:
        if isinstance(exc, RelayUnreachable):  # the store may be fine: say what failed here
            logs.event(log, "relay_unreachable", logging.ERROR, path=path, detail=str(exc))
            return
        self._event(["s", path, str(exc)])

    def _event(self, event: list[Any]) -> None:
        # Sent at the end of this turn of the loop, with whatever else goes out in it (one
        # write): a child killed -9 loses the counts of at most the requests of one turn.
        self._events.append(event)
        if self._flush_due is None:
            self._flush_due = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if self._flush_due is not None:
            self._flush_due.cancel()
            self._flush_due = None
        if self._events:
            self._outbox.send(encode(EVENTS, 0, orjson.dumps(self._events)))
            self._events = []


def create_api_process_app(config: ApiConfig, service: RemoteService) -> web.Application:
    policy = CallbackPolicy(
        allow_nets=tuple(ipaddress.ip_network(n) for n in config.callback_allow_nets)
    )
    app = api.api_application(
        tokens=tuple(t.encode() for t in config.api_tokens),
        policy=policy,
    )
    app[SERVICE] = service
    return app


def run_api_process() -> int:
    """`relay api-process`: serve the API on the relay's port until the relay says STOP."""
    return run_child(
        who="api-process", config_kind=CONFIG, protocol=PROTOCOL_VERSION, serve=_serve_config
    )


async def _serve_config(fields: dict[str, Any], frames_out: int) -> None:
    await _serve(ApiConfig(**fields), frames_out)


async def _serve(config: ApiConfig, frames_out: int) -> None:
    loop = asyncio.get_running_loop()
    stdout, drained = await loop.connect_write_pipe(Drained, os.fdopen(frames_out, "wb"))
    outbox = Outbox(stdout)
    service = RemoteService(outbox)
    stop: asyncio.Future[None] = loop.create_future()

    def on_frame(kind: int, request_id: int, payload: bytes) -> None:
        if kind in (RESULT, FAILED):
            service.answered(kind, request_id, payload)
        elif kind == STOP:
            settle(stop, None)

    _, incoming = await loop.connect_read_pipe(
        lambda: IncomingFrames(on_frame, _decoder()), sys.stdin.buffer
    )
    # The relay never closes a child's stdin itself: an end of it, before or after STOP, means
    # the relay is gone, and no call will be answered any more.
    incoming.closed.add_done_callback(lambda _: service.relay_gone())
    runner = web.AppRunner(
        create_api_process_app(config, service),
        access_log=None,
        shutdown_timeout=config.shutdown_timeout_s,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,  # run_app's, as the relay process has
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port, reuse_port=True).start()
        outbox.send(encode(READY, 0))
        await asyncio.wait((stop, incoming.closed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Stop listening, close idle connections, let the requests in flight finish.
        await runner.cleanup()
        service.flush()
        outbox.close()
        await drained.closed
