"""Helpers for tests that run `relay serve` as a real process (restart, kill -9, replicas)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

READY_TIMEOUT_S = 20.0

T = TypeVar("T")

# Locking the file: another process opens it and takes the write lock until told to stop.
LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@asynccontextmanager
async def locked(db: Path) -> AsyncIterator[None]:
    """Another process holds the SQLite write lock on `db` for the duration."""
    locker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOCKER,
        str(db),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert locker.stdout is not None
    assert locker.stdin is not None
    try:
        assert b"locked\n" == await asyncio.wait_for(locker.stdout.readline(), 10)
        yield
    finally:
        locker.stdin.close()
        await asyncio.wait_for(locker.wait(), 10)


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (its poll workers or API processes), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(x) for x in (task / "children").read_text().split()]
    return found


async def children_started(pid: int, count: int, *, timeout: float = 20.0) -> list[int]:
    """The processes `pid` started, once there are `count` of them (or `timeout` passed)."""

    async def started() -> int:
        return len(child_pids(pid))

    await settle(started, count, timeout=timeout)
    return child_pids(pid)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose: it runs nothing.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Loopback:
    """A fake task API and a callback receiver (POST /hook/{n}), both servers on 127.0.0.1."""

    upstream: TestServer
    receiver: TestServer

    @property
    def upstream_url(self) -> str:
        return str(self.upstream.make_url("")).rstrip("/")

    def hook(self, n: object) -> str:
        return str(self.receiver.make_url(f"/hook/{n}"))

    def relay_env(self, tmp_path: Path, **settings: str) -> dict[str, str]:
        """A `relay serve` environment on a SQLite file in `tmp_path`, polling this upstream
        and allowed to call back loopback receivers; `settings` add or override RELAY_* ones."""
        return {
            "RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
            "RELAY_UPSTREAM_URL": self.upstream_url,
            "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
            **settings,
        }


@asynccontextmanager
async def loopback(
    upstream_app: web.Application,
    receive: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[Loopback]:
    """Serve `upstream_app` and a receiver whose POST /hook/{n} runs `receive`; close both."""
    receiver_app = web.Application()
    receiver_app.router.add_post("/hook/{n}", receive)
    servers = Loopback(
        upstream=TestServer(upstream_app, host="127.0.0.1"),
        receiver=TestServer(receiver_app, host="127.0.0.1"),
    )
    try:
        await servers.upstream.start_server()
        await servers.receiver.start_server()
        yield servers
    finally:
        await servers.receiver.close()
        await servers.upstream.close()


@dataclass
class RelayProcess:
    """`python -m relay serve` with the given environment, logging to a file."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {**os.environ, **self.env, "RELAY_PORT": str(self.port)}
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "serve", env=env, stdout=log, stderr=log
            )
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Return once /readyz answers 200; fail with the log tail if the process dies first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise AssertionError(f"relay exited early:\n{self.log_tail()}")
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"relay not ready in {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no drain, exactly like a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def settle(
    probe: Callable[[], Awaitable[T]], wanted: T, *, timeout: float = 10.0, every: float = 0.05
) -> T:
    """Probe until it returns `wanted` or `timeout` passes; return the last value seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = await probe()
    while value != wanted and loop.time() < deadline:
        await asyncio.sleep(every)
        value = await probe()
    return value
