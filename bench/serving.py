"""Serving a small aiohttp app of the harness's own (receiver, registration floor) until SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web


async def serve_until_stopped(app: web.Application, port: int) -> None:
    """Serve `app` on 127.0.0.1:`port` until SIGINT or SIGTERM."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
