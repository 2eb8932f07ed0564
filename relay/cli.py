"""`relay serve | fake-upstream | migrate` (also `python -m relay ...`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from relay import __version__, logs
from relay.config import ConfigError, Settings
from relay.store.base import StoreUnavailable

log = logging.getLogger("relay.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description="hiapi task relay")
    parser.add_argument("--version", action="version", version=f"hiapi-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the relay (settings from RELAY_* environment variables)")
    sub.add_parser("migrate", help="create or upgrade the store's schema, then exit")
    sub.add_parser(
        "poll-worker", help="(started by `serve` with RELAY_POLL_PROCESSES; not by hand)"
    )
    sub.add_parser("api-process", help="(started by `serve` with RELAY_API_PROCESSES; not by hand)")
    fake = sub.add_parser("fake-upstream", help="run a local simulator of the hiapi task API")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8081)
    fake.add_argument("--api-key", default=os.environ.get("FAKE_UPSTREAM_API_KEY"))
    fake.add_argument("--queued-s", type=float, default=1.0, help="seconds a task stays queued")
    fake.add_argument("--handling-s", type=float, default=2.0, help="seconds a task is handled")
    fake.add_argument("--archiving-s", type=float, default=0.5, help="seconds in archiving")
    args = parser.parse_args(argv)

    if args.command == "fake-upstream":
        return _fake_upstream(args)
    if args.command == "poll-worker":
        from relay.pollworkers import run_worker

        return run_worker()
    if args.command == "api-process":
        from relay.apiprocs import run_api_process

        return run_api_process()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if args.command == "migrate":
        try:
            return asyncio.run(_migrate(settings))
        except StoreUnavailable as exc:
            logs.event(log, "store_unavailable", logging.CRITICAL, detail=str(exc))
            return 1
    return _serve(settings)


def _serve(settings: Settings) -> int:
    from relay.apiprocs import KEEPALIVE_TIMEOUT_S
    from relay.app import create_app

    fatal: list[bool] = []

    def on_fatal() -> None:
        # A loop died: stop the way SIGTERM does (drain, hand back), then exit non-zero, so a
        # supervisor that restarts only on failure restarts this relay.
        fatal.append(True)
        signal.raise_signal(signal.SIGTERM)

    app = create_app(settings, on_fatal=on_fatal)
    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            # Handlers get this long after SIGTERM; the loops' drain bound is the same setting.
            shutdown_timeout=settings.shutdown_timeout_s,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,  # the API processes' too
            access_log=None,
            print=None,
            # API processes bind the same port; the kernel spreads new connections over all.
            reuse_port=True if settings.api_processes else None,
            loop=loop_factory() if loop_factory else None,
        )
    except StoreUnavailable as exc:
        # Only start-up lets it out (later, a request answers 503 and the loops retry): one
        # log line that says why, not a traceback; the orchestrator restarts the relay.
        logs.event(log, "store_unavailable", logging.CRITICAL, detail=str(exc))
        return 1
    return 1 if fatal else 0


async def _migrate(settings: Settings) -> int:
    from relay.store import open_store

    store = await open_store(
        settings.store_url,
        synchronous=settings.sqlite_synchronous,
        sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        postgres_schema=settings.postgres_schema,
    )
    await store.close()
    print("store schema is up to date", file=sys.stderr)
    return 0


def _fake_upstream(args: argparse.Namespace) -> int:
    from relay.fake_upstream import Schedule, run_fake_upstream

    logs.configure("INFO")
    stop = asyncio.Event()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        schedule = Schedule(
            queued_s=args.queued_s, handling_s=args.handling_s, archiving_s=args.archiving_s
        )
        print(f"fake upstream on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        await run_fake_upstream(
            args.host, args.port, api_key=args.api_key, schedule=schedule, stop=stop
        )

    asyncio.run(serve())
    return 0
