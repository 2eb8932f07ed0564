"""The relay's child processes (poll workers, API processes): frames on their pipes, when to
start one again, and the start of a child's own `main`.

A frame is a fixed header (kind, request id, a small number, payload length) and a payload.
Each protocol numbers its own kinds from 1 and tells the decoder its last one: a kind beyond it,
or a payload over the bound, means the other side is not speaking this protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

import orjson
from prometheus_client import Counter

from relay import logs

# kind, request id, a small number (an HTTP status, say), payload length.
HEADER = struct.Struct("<BIHI")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A child that lived this long before it died starts again at once, not after a backoff.
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 5.0
START_WAIT_S = 10.0

# Whatever the relay's own environment holds (the API key, tokens, signing secrets, the store's
# password) stays out of its children's: they get what Python and TLS need, nothing named
# RELAY_*, and none of libpq's PG* (PGPASSWORD, which asyncpg reads too: the children never
# open the store); their settings come over stdin.
_SECRET_PREFIXES = ("RELAY_", "PG")


class FrameError(Exception):
    """The byte stream is not frames: the other side is broken."""


def encode(kind: int, request_id: int, payload: bytes = b"", small: int = 0) -> bytes:
    return HEADER.pack(kind, request_id, small, len(payload)) + payload


class FrameDecoder:
    """Bytes in as they arrive, whole frames out: (kind, request id, small, payload)."""

    def __init__(self, *, last_kind: int, max_payload: int) -> None:
        self._buffer = bytearray()
        self._last_kind = last_kind
        self._max_payload = max_payload

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        position, size, header = 0, len(buffer), HEADER.size
        while size - position >= header:
            kind, request_id, small, length = HEADER.unpack_from(buffer, position)
            if length > self._max_payload or not 1 <= kind <= self._last_kind:
                raise FrameError(f"frame kind {kind} with {length} bytes")
            end = position + header + length
            if end > size:
                break
            frames.append((kind, request_id, small, bytes(buffer[position + header : end])))
            position = end
        if position:
            del buffer[:position]
        return frames


class Outbox:
    """Frames queued within one turn of the event loop leave in one write."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._frames: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def send(self, frame: bytes) -> None:
        if not self._frames:
            self._loop.call_soon(self._flush)
        self._frames.append(frame)

    def _flush(self) -> None:
        data = b"".join(self._frames)
        self._frames.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()


def settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_PREFIXES)}


def read_first_frame(fd: int, who: str) -> tuple[int, int, int, bytes]:
    """The CONFIG frame, read before the event loop starts."""

    # os.read, not sys.stdin: a buffered reader would swallow frames meant for the event loop.
    def read_exactly(count: int) -> bytes:
        chunks = []
        while count:
            chunk = os.read(fd, count)
            if not chunk:
                raise SystemExit(f"{who}: stdin closed before the configuration")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    kind, request_id, small, length = HEADER.unpack(read_exactly(HEADER.size))
    return kind, request_id, small, read_exactly(length)


class IncomingFrames(asyncio.Protocol):
    """A child's stdin: frames from the relay, handed to `on_frame`; `closed` resolves at EOF."""

    def __init__(self, on_frame: Callable[[int, int, bytes], None], decoder: FrameDecoder) -> None:
        self._decoder = decoder
        self._on_frame = on_frame
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        for kind, request_id, _, payload in self._decoder.feed(data):
            self._on_frame(kind, request_id, payload)

    def eof_received(self) -> bool | None:
        settle(self.closed, None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        settle(self.closed, None)


class Drained(asyncio.Protocol):
    """The frames pipe's protocol: `closed` resolves once everything written has left."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        settle(self.closed, None)


def frames_on_private_stdout() -> int:
    """Frames go out on a private copy of fd 1; fd 1 itself then points at stderr, so a stray
    print() anywhere in the child cannot corrupt the frame stream."""
    frames_out = os.dup(1)
    os.dup2(2, 1)
    return frames_out


class ChildProcess(asyncio.SubprocessProtocol):
    """A child process as the relay sees it: its stdin as an Outbox, whether it is ready (it
    answered its CONFIG with READY) and whether it is gone. Subclasses read its stdout."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.SubprocessTransport | None = None
        self.outbox: Outbox | None = None
        self.ended: asyncio.Future[None] = loop.create_future()
        self.settled_in: asyncio.Future[None] = loop.create_future()  # READY, or gone
        self.started_at = 0.0
        self.ready = False
        self.gone = False  # exited, both pipes closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes; they have the same methods.
        self.transport = cast(asyncio.SubprocessTransport, transport)
        self.outbox = Outbox(cast(asyncio.WriteTransport, self.transport.get_pipe_transport(0)))

    def became_ready(self) -> None:
        self.ready = True
        settle(self.settled_in, None)

    def went_away(self) -> None:
        """The process has exited and both pipes are closed: every frame it wrote was read."""
        self.gone = True
        self.ready = False
        settle(self.settled_in, None)  # nobody waits for a READY that cannot come
        if self.transport is not None:
            self.transport.close()  # the process is gone; this releases the transport itself
        settle(self.ended, None)

    def send(self, frame: bytes) -> None:
        if self.outbox is not None and not self.gone:
            self.outbox.send(frame)

    def kill(self) -> None:
        self.ready = False
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(ProcessLookupError):
                self.transport.kill()

    @property
    def pid(self) -> int | None:
        return None if self.transport is None else self.transport.get_pid()

    @property
    def returncode(self) -> int | None:
        return None if self.transport is None else self.transport.get_returncode()


async def start_child(child: ChildProcess, command: Sequence[str], config: bytes) -> None:
    """Start `command` as `child`, its stdin and stdout pipes of frames, its stderr the relay's
    (it logs there), its environment without the relay's secrets; then send it `config`."""
    loop = asyncio.get_running_loop()
    await loop.subprocess_exec(
        lambda: child,
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
        env=child_env(),
    )
    child.started_at = loop.time()
    child.send(config)


class RestartPolicy:
    """How long to wait before starting a child again: at once after a long life, with a growing
    backoff while children keep dying young (a crash at start must not spin)."""

    def __init__(self) -> None:
        self._failures_in_a_row = 0

    def delay_after_exit(self, lived_s: float) -> float:
        self._failures_in_a_row = 0 if lived_s >= STABLE_AFTER_S else self._failures_in_a_row + 1
        if not self._failures_in_a_row:
            return 0.0
        return RESTART_BACKOFF_S[min(self._failures_in_a_row, len(RESTART_BACKOFF_S)) - 1]

    def spawn_failed(self) -> float:
        self._failures_in_a_row += 1
        return RESTART_BACKOFF_S[-1]

    def child_exited(
        self, child: ChildProcess, log: logging.Logger, event: str, exits: Counter
    ) -> float:
        """Log and count a child that exited while the relay ran; the delay before its restart."""
        delay = self.delay_after_exit(asyncio.get_running_loop().time() - child.started_at)
        logs.event(
            log, event, logging.ERROR, pid=child.pid, returncode=child.returncode,
            restart_in_s=delay,
        )  # fmt: skip
        exits.inc()
        return delay


ChildServe = Callable[[dict[str, Any], int], Coroutine[Any, Any, None]]


def run_child(*, who: str, config_kind: int, protocol: int, serve: ChildServe) -> int:
    """A child's `main`: read its CONFIG frame from stdin, check the protocol, set up its logs,
    then run `serve(config fields, frames fd)` on the event loop the relay runs."""
    # The relay stops its children itself, after its own drain; a Ctrl-C sent to the whole
    # process group must not cut their work short first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    frames_out = frames_on_private_stdout()
    kind, _, _, payload = read_first_frame(sys.stdin.fileno(), who)
    fields = orjson.loads(payload) if kind == config_kind else {}
    if fields.get("protocol") != protocol:
        print(
            f"{who}: the relay speaks frame protocol {fields.get('protocol')}, this code"
            f" {protocol} (upgraded in place?): restart the relay",
            file=sys.stderr,
        )
        return 2
    logs.configure(fields["log_level"])
    pid = os.getpid()
    pid_field = who.replace("-", "_") + "_pid"

    def tag(record: logging.LogRecord) -> bool:
        setattr(record, pid_field, pid)  # its lines interleave with the relay's on one stderr
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    if fields["event_loop"] == "uvloop":
        import uvloop

        uvloop.run(serve(fields, frames_out))
    else:
        asyncio.run(serve(fields, frames_out))
    return 0
