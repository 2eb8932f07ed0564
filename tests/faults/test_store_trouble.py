"""Store trouble: the SQLite file locked by another process, on a full disk, on a disk gone read-only.

Each runs a real `relay serve` and makes the trouble for real: a second process holding
`BEGIN EXCLUSIVE`; a tmpfs of a few MiB filled to the last block; an ext4 image whose kernel
driver is told to fail (`errors=remount-ro`), exactly what a disk error does to a live volume.
The promise under test: a registration the relay could not commit answers 503 problem+json, never
201; every registration that got 201 is delivered once the store is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.fake_upstream import create_fake_upstream_app
from relay.models import NewWatch
from relay.state import SETTINGS
from relay.store import StoreUnavailable
from relay.store.sqlite import SQLiteStore
from tests.conftest import Receiver, RelayFactory, Upstream
from tests.processes import RelayProcess, locked, settle

PROBLEM_JSON = "application/problem+json"
ACKNOWLEDGED = 20
# A registration as large as the API takes: the disk fills in a bounded number of them.
PADDING = {"pad": "x" * 4000}


@dataclass
class Rig:
    upstream_url: str
    callback_url: str
    by_id: Counter[str] = field(default_factory=Counter)

    async def pin(self, session: aiohttp.ClientSession, task_id: str, status: str) -> None:
        url = f"{self.upstream_url}/_fake/tasks/{task_id}"
        async with session.put(url, json={"status": status}) as response:
            assert 200 == response.status


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    upstream = TestServer(create_fake_upstream_app(), host="127.0.0.1")
    rig = Rig(upstream_url="", callback_url="")

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        rig.by_id[request.headers["webhook-id"]] += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    receiver = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    await receiver.start_server()
    rig.upstream_url = str(upstream.make_url("")).rstrip("/")
    rig.callback_url = str(receiver.make_url("/hook"))
    yield rig
    await receiver.close()
    await upstream.close()


def relay_process(db: Path, rig: Rig, log: Path, **env: str) -> RelayProcess:
    return RelayProcess(
        env={
            "RELAY_STORE_URL": f"sqlite:///{db}",
            "RELAY_UPSTREAM_URL": rig.upstream_url,
            "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
            "RELAY_POLL_INITIAL_S": "0.2",
            "RELAY_POLL_MAX_S": "0.5",
            "RELAY_UPSTREAM_TIMEOUT_S": "1",
            "RELAY_POLL_LEASE_S": "5",
            "RELAY_DELIVERY_TIMEOUT_S": "1",
            "RELAY_DELIVERY_LEASE_S": "3",
            "RELAY_DELIVERY_BACKOFF_S": "0.2",
            "RELAY_SQLITE_BUSY_TIMEOUT_MS": "200",
            **env,
        },
        log_path=log,
    )


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any
    task_id: str


async def try_register(
    session: aiohttp.ClientSession, relay: RelayProcess, rig: Rig, task_id: str, **extra: Any
) -> Answer:
    await rig.pin(session, task_id, "handling")  # still running: it ends when the test says
    payload = {"taskId": task_id, "callbackUrl": rig.callback_url, **extra}
    async with session.post(f"{relay.url}/watch", json=payload) as response:
        return Answer(response.status, response.content_type, await response.json(), task_id)


async def register_ok(
    session: aiohttp.ClientSession, relay: RelayProcess, rig: Rig, tag: str, n: int
) -> dict[str, str]:
    """n registrations that must all get 201; task id by watch id."""
    kept = {}
    for i in range(n):
        answer = await try_register(session, relay, rig, f"tk-hiapi-{tag}-{i}")
        assert 201 == answer.status, answer.body
        kept[answer.body["watchId"]] = answer.task_id
    return kept


async def readyz(session: aiohttp.ClientSession, relay: RelayProcess) -> tuple[int, Any]:
    async with session.get(f"{relay.url}/readyz") as response:
        return response.status, await response.json()


async def watches_of(session: aiohttp.ClientSession, relay: RelayProcess, task_id: str) -> int:
    async with session.get(f"{relay.url}/watches", params={"taskId": task_id}) as response:
        assert 200 == response.status
        return len((await response.json())["watches"])


def check_refusals(refused: list[Answer]) -> None:
    """Every refusal is a 503 problem+json naming the store."""
    wrong = [
        (a.status, a.content_type, a.body)
        for a in refused
        if (a.status, a.content_type, a.body.get("status")) != (503, PROBLEM_JSON, 503)
    ]
    assert [] == wrong


async def deliver_all(
    session: aiohttp.ClientSession, relay: RelayProcess, rig: Rig, kept: dict[str, str]
) -> int:
    """End every kept watch's task; wait for each callback; return the duplicates."""
    for task_id in kept.values():
        await rig.pin(session, task_id, "success")

    async def delivered() -> int:
        return sum(1 for w in kept if rig.by_id[f"msg_{w}"] > 0)

    got = await settle(delivered, len(kept), timeout=20)
    assert len(kept) == got, relay.log_tail()
    assert {f"msg_{w}" for w in kept} == set(rig.by_id)
    return sum(rig.by_id.values()) - len(kept)


@pytest.mark.slow
async def test_a_file_locked_by_another_process_answers_503_and_recovers(
    tmp_path: Path, rig: Rig
) -> None:
    """BEGIN EXCLUSIVE elsewhere: registrations 503 (nothing kept); after it, 201; all delivered."""
    db = tmp_path / "relay.db"
    relay = relay_process(db, rig, tmp_path / "relay.log")
    await relay.start()
    try:
        async with aiohttp.ClientSession() as session:
            kept = await register_ok(session, relay, rig, "before", ACKNOWLEDGED)
            async with locked(db):
                refused = [
                    await try_register(session, relay, rig, f"tk-hiapi-locked-{i}")
                    for i in range(5)
                ]
                ready_locked = await readyz(session, relay)
                reads = await watches_of(session, relay, next(iter(kept.values())))
            check_refusals(refused)
            kept |= await register_ok(session, relay, rig, "after", 5)
            ready_after = await readyz(session, relay)
            left_behind = [await watches_of(session, relay, a.task_id) for a in refused]
            duplicates = await deliver_all(session, relay, rig, kept)
        print(
            f"\nlocked store: {ACKNOWLEDGED} acknowledged before, {len(refused)} refused with 503"
            f" while locked (readyz {ready_locked[0]} {ready_locked[1]['checks']}, reads still"
            f" answered), 5 kept after; {len(kept)} delivered, lost 0, duplicated {duplicates}"
        )
        assert (1, [0] * len(refused), 0) == (reads, left_behind, duplicates)
        assert (503, "unavailable") == (ready_locked[0], ready_locked[1]["checks"]["store"])
        assert 200 == ready_after[0]
        assert 0 == await relay.stop()
    finally:
        await relay.stop()  # a no-op after a clean stop; never leaves a relay behind


# --- full and read-only disks need mounts, and so root -------------------------------------------

needs_root = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0,
    reason="needs root on Linux to mount a tmpfs or a loop device (CI runs it as root)",
)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)


def unmount(mountpoint: Path) -> None:
    if run("umount", str(mountpoint)).returncode != 0:
        run("umount", "-l", str(mountpoint))  # busy: detach now, release when the last file closes


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    mountpoint.mkdir()
    done = run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint))
    assert 0 == done.returncode, done.stderr
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def fill(directory: Path) -> int:
    """Write a file until the disk refuses another byte; return its size."""
    written = 0
    with (directory / "filler").open("wb", buffering=0) as filler:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            while True:
                try:
                    written += filler.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


@needs_root
@pytest.mark.slow
async def test_a_full_disk_answers_503_never_201_and_recovers(tmp_path: Path, rig: Rig) -> None:
    """A tmpfs filled to the last byte: 503s, never a 201 it did not keep; space back, all delivered."""
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        db = disk / "relay.db"
        relay = relay_process(db, rig, tmp_path / "relay.log")
        await relay.start()
        try:
            async with aiohttp.ClientSession() as session:
                kept = await register_ok(session, relay, rig, "before", ACKNOWLEDGED)
                filler = fill(disk)
                answers = []
                # A registration that fits in pages SQLite already holds still commits; the
                # disk's last blocks go within a bounded number of them.
                for i in range(400):
                    answer = await try_register(
                        session, relay, rig, f"tk-hiapi-full-{i}", metadata=PADDING
                    )
                    answers.append(answer)
                    if answer.status == 503:
                        break
                answers += [
                    await try_register(
                        session, relay, rig, f"tk-hiapi-fuller-{i}", metadata=PADDING
                    )
                    for i in range(5)
                ]
                ready_full = await readyz(session, relay)
                accepted = [a for a in answers if a.status == 201]
                refused = [a for a in answers if a.status != 201]
                kept |= {a.body["watchId"]: a.task_id for a in accepted}
                (disk / "filler").unlink()
                kept |= await register_ok(session, relay, rig, "after", 5)
                ready_after = await readyz(session, relay)
                left_behind = [await watches_of(session, relay, a.task_id) for a in refused]
                # The 201s are on the disk, not only in a page cache of the process.
                assert 0 == await relay.stop()
                await relay.start()
                duplicates = await deliver_all(session, relay, rig, kept)
            print(
                f"\nfull disk: {ACKNOWLEDGED} acknowledged, then {filler / 2**20:.1f} MiB of filler;"
                f" {len(accepted)} more fit before the first 503, {len(refused)} refused with 503"
                f" (readyz {ready_full[0]} {ready_full[1]['checks']}); space freed: 5 kept; restart;"
                f" {len(kept)} delivered, lost 0, duplicated {duplicates}"
            )
            check_refusals(refused)
            assert 6 == len(refused)
            # The probe's one-page write needs the same new block (the WAL is young: no
            # checkpoint yet has freed its start for reuse).
            assert (503, "unavailable") == (ready_full[0], ready_full[1]["checks"]["store"])
            assert ([0] * len(refused), 0, 200) == (left_behind, duplicates, ready_after[0])
        finally:
            await relay.stop()


async def start_live(relay: RelayProcess) -> None:
    """Start `relay serve` and wait until it answers /healthz (it may not be ready)."""
    env = {**os.environ, **relay.env, "RELAY_PORT": str(relay.port)}
    with relay.log_path.open("ab") as log:
        relay.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", env=env, stdout=log, stderr=log
        )

    async def live() -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{relay.url}/healthz") as response,
            ):
                return response.status == 200
        except aiohttp.ClientError:
            return False

    assert await settle(live, True, timeout=20), relay.log_tail()


async def serve_until_exit(relay: RelayProcess, timeout: float = 20.0) -> tuple[int, list[str]]:
    """Run `relay serve` with the relay's settings, expecting it to exit; its code and log."""
    serve = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "serve",
        env={**os.environ, **relay.env, "RELAY_PORT": str(relay.port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(serve.communicate(), timeout)
    except TimeoutError:
        serve.kill()  # it kept running: leave no relay behind the test
        await serve.wait()
        raise
    assert serve.returncode is not None
    return serve.returncode, stderr.decode().splitlines()


@contextlib.contextmanager
def ext4_image(image: Path, mountpoint: Path) -> Iterator[Path]:
    """A loop-mounted ext4 that turns read-only on its first error, as a failing disk does."""
    for tool in ("mkfs.ext4", "e2fsck", "losetup"):
        assert shutil.which(tool), f"{tool} is needed (e2fsprogs, util-linux)"
    image.write_bytes(b"")
    os.truncate(image, 32 * 2**20)
    done = run("mkfs.ext4", "-q", "-F", str(image))
    assert 0 == done.returncode, done.stderr
    mountpoint.mkdir()
    mount_ext4(image, mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def mount_ext4(image: Path, mountpoint: Path, *options: str) -> None:
    done = run(
        "mount",
        "-o",
        ",".join(("loop", "errors=remount-ro", *options)),
        str(image),
        str(mountpoint),
    )
    assert 0 == done.returncode, done.stderr


def break_ext4(mountpoint: Path) -> None:
    """Make the kernel's ext4 driver report an error: with errors=remount-ro it turns read-only."""
    device = next(
        line.split()[0]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1] == str(mountpoint)
    )
    (Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error").write_text("relay test\n")
    options = run("findmnt", "-no", "OPTIONS", str(mountpoint)).stdout
    # Kernels since 6.8 name it emergency_ro; before, the mount shows plain ro.
    assert options.startswith("ro,") or "emergency_ro" in options, options


@needs_root
@pytest.mark.slow
async def test_a_disk_gone_read_only_answers_503_never_201_and_recovers(
    tmp_path: Path, rig: Rig
) -> None:
    """ext4 fails under a live relay: 503s, never 201; back on it read-only, then rw: recovers."""
    image, mountpoint = tmp_path / "disk.img", tmp_path / "disk"
    with ext4_image(image, mountpoint) as disk:
        db = disk / "relay.db"
        # FULL: a commit is on the device when 201 goes out, so a disk failure cannot undo it.
        relay = relay_process(db, rig, tmp_path / "relay.log", RELAY_SQLITE_SYNCHRONOUS="FULL")
        await relay.start()
        try:
            async with aiohttp.ClientSession() as session:
                kept = await register_ok(session, relay, rig, "before", ACKNOWLEDGED)
                break_ext4(disk)
                refused = [
                    await try_register(session, relay, rig, f"tk-hiapi-ro-{i}") for i in range(5)
                ]
                ready_failed = await readyz(session, relay)
                stopped_with = await relay.stop()
                # What an operator does: check the file system, attach it again. Read-only
                # first, as a volume often comes back; the relay starts on it but is not ready.
                unmount(disk)
                repaired = run("e2fsck", "-fy", str(image)).returncode
                mount_ext4(image, disk)
                done = run("mount", "-o", "remount,ro", str(disk))
                assert 0 == done.returncode, done.stderr
                await start_live(relay)
                refused += [
                    await try_register(session, relay, rig, f"tk-hiapi-ro-again-{i}")
                    for i in range(5)
                ]
                ready_ro = await readyz(session, relay)
                done = run("mount", "-o", "remount,rw", str(disk))
                assert 0 == done.returncode, done.stderr

                async def ready() -> int:
                    return (await readyz(session, relay))[0]

                # No restart: the store opens a new connection once the file takes writes.
                ready_rw = await settle(ready, 200, timeout=10)
                kept |= await register_ok(session, relay, rig, "after", 5)
                left_behind = [await watches_of(session, relay, a.task_id) for a in refused]
                duplicates = await deliver_all(session, relay, rig, kept)
            print(
                f"\nread-only disk: {ACKNOWLEDGED} acknowledged; ext4 error under the relay:"
                f" 5 refused with 503 (readyz {ready_failed[0]}), SIGTERM exit {stopped_with};"
                f" e2fsck exit {repaired}; started on it mounted ro: 5 refused (readyz"
                f" {ready_ro[0]}); remounted rw: readyz {ready_rw} without a restart, 5 kept;"
                f" {len(kept)} delivered, lost 0, duplicated {duplicates}"
            )
            check_refusals(refused)
            assert ([0] * len(refused), 0) == (left_behind, duplicates)
            assert (503, 503, 200) == (ready_failed[0], ready_ro[0], ready_rw)
            assert "unavailable" == ready_failed[1]["checks"]["store"]
            assert 0 == stopped_with
        finally:
            await relay.stop()


@needs_root
@pytest.mark.slow
async def test_a_relay_started_on_a_store_it_cannot_open_says_so_in_one_line_and_exits(
    tmp_path: Path, rig: Rig
) -> None:
    """A fresh file system mounted read-only: exit 1 and one store_unavailable line, no traceback."""
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        done = run("mount", "-o", "remount,ro", str(disk))
        assert 0 == done.returncode, done.stderr
        relay = relay_process(disk / "relay.db", rig, tmp_path / "relay.log")
        exit_code, lines = await serve_until_exit(relay)
    print(f"\nstarted on a read-only store: exit {exit_code}, {lines}")
    assert (1, ["store_unavailable"]) == (
        exit_code,
        [orjson.loads(line)["event"] for line in lines],
    )


async def test_a_store_failure_while_deferring_busy_callbacks_strands_no_receiver_slot(
    make_relay: RelayFactory,
    upstream: Upstream,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store fails as busy callbacks are deferred: the claimed one still goes; all 3 arrive."""
    relay = await make_relay(delivery_per_host=1)
    for n in range(3):
        await upstream.flip(f"tk-hiapi-busy-{n}", "success")
        await relay.register(f"tk-hiapi-busy-{n}", receiver.at(f"/hook/{n}"))
    await relay.poll()  # three callbacks due at once, all to one receiver that takes one at a time
    store = relay.store
    real_defer = store.defer_deliveries
    failures = []

    async def defer_failing_once(held: list[tuple[str, float]], *, due_at: float) -> None:
        if not failures:
            failures.append(held)
            raise StoreUnavailable("sqlite: database is locked")
        await real_defer(held, due_at=due_at)

    monkeypatch.setattr(store, "defer_deliveries", defer_failing_once)
    arrived = []
    await relay.deliver()  # one claimed and sent; deferring the other two fails
    arrived.append(len(receiver.requests))
    await relay.deliver(relay.app[SETTINGS].delivery_lease_s + 1)  # their claim's lease is over
    arrived.append(len(receiver.requests))
    await relay.deliver(2.0)  # the one deferred as busy just now
    arrived.append(len(receiver.requests))
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert (1, [1, 2, 3], 3) == (len(failures), arrived, len(set(ids)))


async def test_a_file_full_mid_statement_fails_the_batch_and_the_store_recovers(
    tmp_path: Path,
) -> None:
    """SQLITE_FULL inside a write (SQLite then rolls back the whole batch): 503s, no hang, recovery."""
    store = SQLiteStore(str(tmp_path / "relay.db"))
    await store.open()
    try:

        async def register(n: int) -> Any:
            new = NewWatch(
                task_id=f"tk-hiapi-full-{n}",
                callback_url="http://127.0.0.1:9/hook",
                metadata=PADDING,
            )
            return await store.register(new, watch_id=f"wt_{n:032x}", now=1.0, deadline_at=9.0)

        await register(0)
        # A disk that is full at the SQLite level: no page beyond those the file has now.
        pages = await store._run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
        await store._run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}"))
        # Three writes queued together commit (or fail) as one batch.
        during = await asyncio.wait_for(
            asyncio.gather(*(register(n) for n in (1, 2, 3)), return_exceptions=True), 5
        )
        await store._run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
        after = await asyncio.wait_for(register(4), 5)
        kept = [
            w.watch_id
            for w in await store.list_watches(state=None, task_id=None, limit=10, after=None)
        ]
    finally:
        await store.close()
    assert [StoreUnavailable] * 3 == [type(d) for d in during]
    assert [f"wt_{0:032x}", f"wt_{4:032x}"] == kept
    assert after[1]
