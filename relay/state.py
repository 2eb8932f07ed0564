"""Typed keys for what the application holds; shared by the app factory and the handlers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from relay.config import Settings
from relay.delivery import Deliverer
from relay.metrics import Metrics
from relay.poller import Poller
from relay.service import Clock, WatchService
from relay.store.base import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
CallbackCheck = Callable[[str], Awaitable[URL]]

CLOCK: web.AppKey[Clock] = web.AppKey("clock")
POLLER = web.AppKey("poller", Poller)
DELIVERER = web.AppKey("deliverer", Deliverer)
CALLBACK_CHECK: web.AppKey[CallbackCheck] = web.AppKey("callback_check")
# What the handlers ask of the relay: in this process, or over a pipe in an API process.
SERVICE: web.AppKey[WatchService] = web.AppKey("service")
LOOP_TASKS = web.AppKey("loop_tasks", list[asyncio.Task[None]])
STOPPING = web.AppKey("stopping", asyncio.Event)
# time.monotonic() when the shutdown began (aiohttp's on_shutdown): the loops' drain and the
# open requests share one RELAY_SHUTDOWN_TIMEOUT_S from there.
STOP_STARTED = web.AppKey("stop_started", list[float])  # empty until then (set before start)
REPLICA_ID = web.AppKey("replica_id", str)


def loops_alive(app: web.Application) -> bool:
    tasks = app.get(LOOP_TASKS, [])
    return bool(tasks) and not any(task.done() for task in tasks)
