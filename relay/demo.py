"""`make demo`: the whole loop on loopback in about ten seconds.

Starts the fake task API and the relay (SQLite, in a temporary directory) as real processes, runs
a small receiver here that verifies every signature, registers a few watches, prints each callback
as it arrives and the relay's metric lines, then stops everything.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from relay import signing

DEMO_TIMEOUT_S = 40.0
# (task id, receiver path, metadata): two services watch the first task, so it costs one poll
# stream and gives two callbacks; `-fail-` and `-vanish-` script the fake task API.
WATCHES = (
    ("tk-hiapi-demo-video-001", "/hooks/gallery", {"user": "alice"}),
    ("tk-hiapi-demo-video-001", "/hooks/billing", {"invoice": 42}),
    ("tk-hiapi-demo-fail-002", "/hooks/gallery", None),
    ("tk-hiapi-demo-vanish-003", "/hooks/gallery", None),
)
METRIC_PREFIXES = (
    "relay_upstream_polls_total",
    "relay_task_status_total",
    "relay_watches_registered_total",
    "relay_callback_attempts_total",
    "relay_watches_finished_total",
    "relay_terminal_to_delivered_seconds_count",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def process(args: list[str], env: dict[str, str], log_path: Path) -> AsyncIterator[None]:
    """Run `python -m relay ...` with its output in `log_path`; SIGTERM it on the way out."""
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", *args, env=env, stdout=log_file, stderr=log_file
        )
        try:
            yield
        finally:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_http(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status < 500:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"demo: {url} did not come up; see the logs above")


async def settled_metrics(session: aiohttp.ClientSession, url: str, *, delivered: int) -> str:
    """The exposition once the relay has recorded every delivery (a receiver sees it first)."""
    wanted = f'relay_callback_attempts_total{{outcome="delivered"}} {float(delivered)}'
    text = ""
    for _ in range(50):
        async with session.get(url) as response:
            text = await response.text()
        if wanted in text:
            break
        await asyncio.sleep(0.1)
    return text


async def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="relay-demo-"))
    secret = signing.generate_secret()
    upstream_port, relay_port, receiver_port = free_port(), free_port(), free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    env = {
        **os.environ,
        "RELAY_PORT": str(relay_port),
        "RELAY_STORE_URL": f"sqlite:///{workdir}/relay.db",
        "RELAY_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
        "RELAY_UPSTREAM_API_KEY": "demo-key",
        "RELAY_SIGNING_SECRET": secret,
        "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",  # the demo receiver lives on loopback
        "RELAY_POLL_INITIAL_S": "0.5",
        "RELAY_POLL_MAX_S": "2",
        "RELAY_NOT_FOUND_GRACE_S": "2",
    }
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            signing.verify(body, dict(request.headers), secret)
        except signing.WebhookVerificationError as exc:
            print(f"  !! signature rejected: {exc}")
            return web.Response(status=400)
        event = orjson.loads(body)
        event["_webhook_id"] = request.headers["webhook-id"]
        event["_path"] = request.path
        await received.put(event)
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hooks/{name}", receive)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()

    print(f"demo: working in {workdir}")
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            process(
                ["fake-upstream", "--port", str(upstream_port), "--api-key", "demo-key",
                 "--queued-s", "0.5", "--handling-s", "1.5", "--archiving-s", "0.5"],
                env,
                workdir / "fake-upstream.log",
            )
        )  # fmt: skip
        await stack.enter_async_context(process(["serve"], env, workdir / "relay.log"))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        await wait_http(session, f"{relay_url}/healthz")
        print(f"demo: relay on {relay_url}, fake task API on :{upstream_port}\n")

        for task_id, path, metadata in WATCHES:
            payload = {
                "taskId": task_id,
                "callbackUrl": f"http://127.0.0.1:{receiver_port}{path}",
                "metadata": metadata,
            }
            async with session.post(f"{relay_url}/watch", json=payload) as response:
                watch = await response.json()
                print(f"POST /watch {task_id} -> {response.status} {watch['watchId']}")
        print("\nwaiting for callbacks (signatures verified with relay.signing.verify)...\n")

        deadline = time.monotonic() + DEMO_TIMEOUT_S
        for _ in WATCHES:
            try:
                event = await asyncio.wait_for(received.get(), deadline - time.monotonic())
            except TimeoutError:
                print("demo: not every callback arrived in time; see relay.log in", workdir)
                return 1
            data = event["data"]
            task = data["task"] or {}
            outputs = ", ".join(f"{o['type']}={o['url']}" for o in task.get("output") or [])
            error = task.get("error")
            print(f"callback {event['type']:<15} {data['taskId']} -> {event['_path']}")
            print(f"    webhook-id={event['_webhook_id']}")
            print(f"    metadata={data['metadata']}  signature=verified")
            if outputs:
                print(f"    output: {outputs}")
            if error:
                print(f"    error: {error}")

        text = await settled_metrics(session, f"{relay_url}/metrics", delivered=len(WATCHES))
        print("\nmetrics (GET /metrics, non-zero lines):")
        for line in text.splitlines():
            if line.startswith(METRIC_PREFIXES) and not line.endswith(" 0.0"):
                print(f"    {line}")
    await runner.cleanup()
    print("\ndemo: done; everything stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
