"""PostgreSQL restarts under a running relay: no acknowledged registration is lost."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.fake_upstream import Schedule, create_fake_upstream_app
from tests.processes import RelayProcess, settle

pytestmark = pytest.mark.slow

REGISTRATIONS = 400
CONCURRENCY = 10


async def restart_postgres(dsn: str) -> str:
    """Restart the local cluster if we may (root with pg_ctlcluster), else drop every relay
    connection the way a restart would; return which was done."""
    clusters = Path("/etc/postgresql")
    if os.geteuid() == 0 and shutil.which("pg_ctlcluster") and clusters.is_dir():
        version = sorted(p.name for p in clusters.iterdir())[-1]
        proc = await asyncio.create_subprocess_exec(
            "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"
        )
        assert 0 == await proc.wait()
        return "restart"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'hiapi-relay'"
        )
    finally:
        await conn.close()
    return "terminate"


async def test_database_restart_loses_no_acknowledged_registration(
    tmp_path: Path, pg_schema: tuple[str, str]
) -> None:
    """Registrations during a PostgreSQL restart get 201 (kept) or 503 (not kept), never a lie."""
    dsn, schema = pg_schema
    upstream = TestServer(
        create_fake_upstream_app(schedule=Schedule(queued_s=0.2, handling_s=0.2, archiving_s=0)),
        host="127.0.0.1",
    )
    delivered: Counter[str] = Counter()

    async def receive(request: web.Request) -> web.Response:
        delivered[request.headers["webhook-id"]] += 1
        return web.Response(status=204)

    receiver_app = web.Application()
    receiver_app.router.add_post("/hook", receive)
    receiver = TestServer(receiver_app, host="127.0.0.1")
    await upstream.start_server()
    await receiver.start_server()
    relay = RelayProcess(
        env={
            "RELAY_STORE_URL": dsn,
            "RELAY_POSTGRES_SCHEMA": schema,
            "RELAY_UPSTREAM_URL": str(upstream.make_url("")).rstrip("/"),
            "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
            "RELAY_POLL_INITIAL_S": "0.2",
            "RELAY_POLL_MAX_S": "0.5",
            "RELAY_DELIVERY_BACKOFF_S": "0.2",
            "RELAY_UPSTREAM_TIMEOUT_S": "1",
            "RELAY_POLL_LEASE_S": "5",
            "RELAY_DELIVERY_TIMEOUT_S": "2",
            "RELAY_DELIVERY_LEASE_S": "5",
        },
        log_path=tmp_path / "relay.log",
    )
    await relay.start()
    statuses: Counter[int] = Counter()
    acknowledged: list[str] = []
    readiness: Counter[int] = Counter()
    hook = str(receiver.make_url("/hook"))
    try:
        async with aiohttp.ClientSession() as session:

            async def register(n: int) -> None:
                payload = {"taskId": f"tk-hiapi-restart-{n}", "callbackUrl": hook}
                async with session.post(f"{relay.url}/watch", json=payload) as response:
                    statuses[response.status] += 1
                    if response.status == 201:
                        acknowledged.append((await response.json())["watchId"])

            async def probe_readiness(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    async with session.get(f"{relay.url}/readyz") as response:
                        readiness[response.status] += 1
                    await asyncio.sleep(0.05)

            stop = asyncio.Event()
            prober = asyncio.create_task(probe_readiness(stop))
            restart: asyncio.Task[str] | None = None
            for start in range(0, REGISTRATIONS, CONCURRENCY):
                if start == REGISTRATIONS // 4:
                    restart = asyncio.create_task(restart_postgres(dsn))
                await asyncio.gather(*(register(n) for n in range(start, start + CONCURRENCY)))
            assert restart is not None
            how = await restart

            async def ready() -> int:
                async with session.get(f"{relay.url}/readyz") as response:
                    return response.status

            assert 200 == await settle(ready, 200, timeout=30)
            stop.set()
            await prober

            async def delivered_count() -> int:
                return len(set(delivered) & {f"msg_{w}" for w in acknowledged})

            assert len(acknowledged) == await settle(delivered_count, len(acknowledged), timeout=60)
            for watch_id in acknowledged:
                async with session.get(f"{relay.url}/watch/{watch_id}") as response:
                    assert 200 == response.status
        print(
            f"\ndb {how}: registrations {dict(statuses)}, readiness {dict(readiness)}, "
            f"acknowledged {len(acknowledged)}, delivered {len(delivered)}"
        )
        assert REGISTRATIONS == statuses[201] + statuses[503]
        assert len(acknowledged) == statuses[201]
        assert 0 == await relay.stop()
    finally:
        if relay.proc is not None and relay.proc.returncode is None:
            await relay.stop()
        await upstream.close()
        await receiver.close()
