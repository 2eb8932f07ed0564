"""Child processes: started on free loopback ports, measured through /proc, always stopped."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0  # a relay over a 1M-row file needs a few seconds to answer /readyz
STOP_TIMEOUT_S = 10.0

# Runs in the child before the real program: the kernel sends the child SIGTERM if the harness
# dies, even by SIGKILL, so no benchmark process outlives its harness. execv keeps the pid, so
# /proc/<pid> still describes the real program.
_DEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(3)  # the harness is already gone\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The harness's environment without any RELAY_* of its own, plus `extra`.

    BENCH_RELAY_<NAME> in the harness's environment passes RELAY_<NAME> to every relay it starts
    (e.g. BENCH_RELAY_EVENT_LOOP=uvloop), to compare one setting across runs.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    passed = {k[len("BENCH_") :]: v for k, v in os.environ.items() if k.startswith("BENCH_RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    env.update(passed)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of `pid` so far, and of every process it
    started (RELAY_POLL_PROCESSES): the live ones and those it has reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return 0.0  # exited between the listing and the read: its parent's cutime has it
    fields = data[data.rindex(")") + 2 :].split()
    own = sum(int(x) for x in fields[11:15]) / CLK_TCK  # utime, stime, cutime, cstime
    return own + sum(cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def memory_bytes(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (resident peak) of `pid`, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy (not idle, not waiting on I/O) so far."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # user .. steal; guest time is inside user


async def busy_cores(seconds: float) -> float:
    """Cores the whole machine kept busy, on average, over the next `seconds`."""
    before = machine_busy_seconds()
    await asyncio.sleep(seconds)
    return (machine_busy_seconds() - before) / seconds


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU spent during a window, machine-wide and by each named process; what is left over is
    other work on the machine (another job on a shared box spoils the figures: it is reported)."""

    def __init__(self, children: dict[str, Child]) -> None:
        self._children = children
        self._t0 = time.monotonic()
        self._machine0 = machine_busy_seconds()
        self._own0 = own_cpu_seconds()
        self._cpu0 = {name: child.cpu() for name, child in children.items()}

    def stop(self, **extra_cpu_s: float) -> dict[str, float]:
        """Cores used on average, by name; `extra_cpu_s` adds processes that already exited."""
        cpu = {name: child.cpu() - self._cpu0[name] for name, child in self._children.items()}
        machine = machine_busy_seconds() - self._machine0
        seconds = time.monotonic() - self._t0
        cpu["harness"] = own_cpu_seconds() - self._own0
        cpu.update(extra_cpu_s)
        cores = {f"{name}_cores": value / seconds for name, value in cpu.items()}
        return {
            "seconds": seconds,
            "machine_busy_cores": machine / seconds,
            **cores,
            "other_cores": (machine - sum(cpu.values())) / seconds,
        }


@dataclass
class Child:
    """`python <args>` with its output in a log file (stdout piped when asked)."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    cwd: Path = REPO_ROOT  # `-m relay` runs the relay of this tree (bench.ab runs two)
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, *, pipe_stdout: bool = False) -> None:
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _DEATHSIG_SHIM,
                str(os.getpid()),
                *self.args,
                env=child_env(self.env),
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipe_stdout else log,
                stderr=log,
            )

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_bytes(self.pid)

    async def wait_ready(self, session: aiohttp.ClientSession, path: str) -> float:
        """Return seconds from start to the first 200 on `path`; fail with the log tail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while loop.time() < deadline:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                async with session.get(f"{self.url}{path}") as response:
                    if response.status == 200:
                        return time.monotonic() - self.started_at
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def launch(
    stack: AsyncExitStack,
    session: aiohttp.ClientSession,
    child: Child,
    *,
    ready_path: str,
) -> float:
    """Start a server child, stop it when `stack` closes, and wait until it answers."""
    await child.start()
    stack.push_async_callback(child.stop)
    return await child.wait_ready(session, ready_path)


async def run_to_end(child: Child, timeout_s: float) -> str:
    """Run a child that prints one result and exits; return its stdout. Killed on timeout."""
    await child.start(pipe_stdout=True)
    assert child.proc is not None
    assert child.proc.stdout is not None
    try:
        out = await asyncio.wait_for(child.proc.stdout.read(), timeout_s)
        code = await asyncio.wait_for(child.proc.wait(), STOP_TIMEOUT_S)
    finally:
        await child.stop()
    if code != 0:
        raise RuntimeError(f"{child.name} exited with {code}:\n{child.log_tail()}")
    return out.decode()


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter or on PATH, if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profile:
    """`py-spy record` of one process for a window, as collapsed stacks (every thread)."""

    def __init__(self, pid: int, seconds: float, out: Path) -> None:
        self._argv = [
            py_spy() or "py-spy", "record", "--pid", str(pid), "--duration",
            str(max(1, round(seconds))), "--rate", "200", "--format", "raw", "--nonblocking",
            "--output", str(out),
        ]  # fmt: skip
        self.out = out
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

    async def stop(self) -> None:
        """Kill the recorder if it still runs (the scenario was cut short)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    async def wait(self, timeout_s: float) -> None:
        if self._proc is None:
            return
        try:
            await asyncio.wait_for(self._proc.wait(), timeout_s)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
