"""What the HTTP API asks of the relay, apart from HTTP: the seam between the two.

`LocalService` does it in this process: the store, the clock, the loops' wake-ups, the metrics
and the log lines that go with each change. An API process (apiprocs.py) has a `RemoteService`
with the same methods instead, which asks the relay process over a pipe. The handlers in api.py
validate and render; they never know which of the two they talk to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import RestrictedRegistry

from relay import logs
from relay.metrics import HistogramSeries, Metrics
from relay.models import NewWatch, Watch, WatchState
from relay.store.base import Store, StoreUnavailable

log = logging.getLogger("relay.api")

Clock = Callable[[], float]
WatchId = Callable[[float], str]


class WatchService(Protocol):
    async def register(self, new: NewWatch) -> tuple[Watch, bool]:
        """The watch, and whether this call created it (False: the same one was watching)."""

    async def get(self, watch_id: str) -> Watch | None: ...

    async def cancel(self, watch_id: str) -> Watch | None:
        """Raises StoreConflict when the watch cannot be cancelled any more."""

    async def redeliver(self, watch_id: str) -> Watch | None:
        """Raises StoreConflict when the watch has nothing to deliver again."""

    async def list_watches(
        self, *, state: WatchState | None, task_id: str | None, limit: int, after: str | None
    ) -> list[Watch]: ...

    async def readiness(self) -> dict[str, str]:
        """Each check's verdict: "ok" or what is wrong."""

    async def metrics_page(self, accept: str, names: list[str]) -> tuple[bytes, str]:
        """The Prometheus exposition for a scraper sending `accept`, only the families in
        `names` if any: body and content type."""

    async def alive(self) -> bool:
        """Whether the relay process answers (always, in the relay process itself)."""

    def record_http(self, route: str, method: str, status: int, seconds: float) -> None: ...

    def store_failed(self, path: str, exc: StoreUnavailable) -> None:
        """A request answered 503 because the store failed it: counted and logged once."""


class LocalService:
    """The relay's own process: everything happens here."""

    def __init__(
        self,
        *,
        store: Store,
        metrics: Metrics,
        clock: Clock,
        new_watch_id: WatchId,
        watch_timeout_s: float,
        wake_poller: Callable[[], None],
        wake_deliverer: Callable[[], None],
        loops_alive: Callable[[], bool],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._new_watch_id = new_watch_id
        self._watch_timeout_s = watch_timeout_s
        self._wake_poller = wake_poller
        self._wake_deliverer = wake_deliverer
        self._loops_alive = loops_alive
        # The metric children of each (route, method, code), looked up once: `labels()` is ~2 us
        # a call, two calls a request. Bounded: the API passes canonical routes or "unmatched"
        # and HTTP's registered methods or "other".
        self._http: dict[tuple[str, str, int], tuple[Counter, HistogramSeries]] = {}

    async def register(self, new: NewWatch) -> tuple[Watch, bool]:
        now = self._clock()
        watch, created = await self._store.register(
            new,
            watch_id=self._new_watch_id(now),
            now=now,
            deadline_at=now + self._watch_timeout_s,
        )
        if created:
            self._metrics.watches_registered.inc()
            self._wake_poller()
            logs.event(log, "watch_registered", watch_id=watch.watch_id, task_id=watch.task_id)
        return watch, created

    async def get(self, watch_id: str) -> Watch | None:
        return await self._store.get_watch(watch_id)

    async def cancel(self, watch_id: str) -> Watch | None:
        cancelled = await self._store.cancel_watch(watch_id, now=self._clock())
        if cancelled is None:
            return None
        watch, cancelled_now = cancelled
        if cancelled_now:  # decided in the store's transaction: two cancels count once
            self._metrics.watches_finished.labels("cancelled").inc()
            logs.event(log, "watch_cancelled", watch_id=watch_id, task_id=watch.task_id)
        return watch

    async def redeliver(self, watch_id: str) -> Watch | None:
        watch = await self._store.redeliver(watch_id, now=self._clock())
        if watch is not None:
            self._wake_deliverer()
            logs.event(log, "redelivery_queued", watch_id=watch_id, task_id=watch.task_id)
        return watch

    async def list_watches(
        self, *, state: WatchState | None, task_id: str | None, limit: int, after: str | None
    ) -> list[Watch]:
        return await self._store.list_watches(
            state=state, task_id=task_id, limit=limit, after=after
        )

    async def readiness(self) -> dict[str, str]:
        checks = {"store": "ok", "loops": "ok"}
        try:
            await self._store.ping()
        except StoreUnavailable:
            checks["store"] = "unavailable"
        if not self._loops_alive():
            checks["loops"] = "stopped"
        return checks

    async def metrics_page(self, accept: str, names: list[str]) -> tuple[bytes, str]:
        registry = self._metrics.registry
        return exposition(registry.restricted_registry(names) if names else registry, accept)

    async def alive(self) -> bool:
        return True

    def record_http(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        bound = self._http.get(key)
        if bound is None:
            bound = self._http[key] = (
                self._metrics.http_requests.labels(route, method, str(status)),
                self._metrics.http_duration.labels(route, method),
            )
        bound[0].inc()
        bound[1].observe(seconds)

    def store_failed(self, path: str, exc: StoreUnavailable) -> None:
        self.count_store_failure(path, str(exc))

    def count_store_failure(self, path: str, detail: str) -> None:
        self._metrics.store_errors.inc()
        logs.event(log, "store_unavailable", logging.ERROR, path=path, detail=detail)


def exposition(registry: CollectorRegistry | RestrictedRegistry, accept: str) -> tuple[bytes, str]:
    """The registry in the format `accept` asks for; the text format if it cannot be parsed."""
    try:
        encoder, content_type = choose_encoder(accept)
    except (TypeError, ValueError):
        # prometheus_client raises on a `version=` it cannot compare (`text/plain; version=x.y`):
        # answer as to a scraper that named no format rather than with a 500.
        encoder, content_type = choose_encoder("")
    return encoder(registry), content_type
