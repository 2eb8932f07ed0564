"""Every metric the relay exposes, on one app-owned registry. Names are a contract: dashboards and
alerts use them. No label ever carries a task id, watch id, URL or host."""

from __future__ import annotations

import os
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from math import isnan

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from relay import __version__
from relay.models import DeliveryOutcome, PollOutcome, TaskStatus, WatchState

# Polls end within the upstream timeout (10 s by default, settable higher).
POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CALLBACK_BUCKETS = POLL_BUCKETS
# From the terminal status to the receiver's 2xx spans milliseconds (first try) to hours (retries).
TERMINAL_TO_DELIVERED_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600,
)  # fmt: skip
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

FINISHED_RESULTS = ("delivered", "failed", "cancelled")

# prometheus_client's own switch for `_created` series, read the way it reads it.
_EXPOSE_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)
# How prometheus_client writes a bucket's `le` ("0.005", "1.0", "+Inf"); it has no annotations.
_format_le: Callable[[float], str] = floatToGoString


class HistogramSeries:
    """One label set's buckets: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf's
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        if isnan(amount):  # in no bucket, as `amount <= bound` never holds for NaN
            return
        # The first bound >= amount, as prometheus_client's `amount <= bound` scan finds it.
        self.counts[bisect_left(self._bounds, amount)] += 1


class LoopHistogram:
    """A Prometheus histogram without locks, for the event loop's hot paths.

    prometheus_client's Histogram takes two locks and scans its buckets on every observation
    (1.6 us here); a poll makes two, a registration one. This one is a list per label set and
    a bisect (0.3 us). It needs no lock because everything that observes and the /metrics
    handler that collects run on the relay process's event loop thread: observe from nowhere
    else. The exposition is a Histogram's, sample for sample: `_bucket` (cumulative, `le` as
    prometheus_client formats it), `_count`, `_sum`, `_created`.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        for label in labelnames:
            if label == "le" or label.startswith("__"):
                raise ValueError(f"{name}: label {label!r} is reserved")
        bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = bounds
        self._les = [_format_le(b) for b in bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        # Like prometheus_client's: a histogram without labels has its one series from the start.
        self._unlabelled = None if self._labelnames else self.labels()
        registry.register(self)

    def labels(self, *values: str) -> HistogramSeries:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: labels {self._labelnames}, got {values!r}")
            # As prometheus_client: values are text (a number would break every later scrape).
            key = tuple(str(value) for value in values)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = HistogramSeries(self._bounds)
        return series

    def observe(self, amount: float) -> None:
        """For a histogram without labels."""
        if self._unlabelled is None:
            raise ValueError(f"{self._name} has labels {self._labelnames}: observe via labels()")
        self._unlabelled.observe(amount)

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._documentation, "histogram")]

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self._name, self._documentation, "histogram")
        name = self._name
        for values, series in self._series.items():
            labels = dict(zip(self._labelnames, values, strict=True))
            cumulative = 0
            for le, count in zip(self._les, series.counts, strict=True):
                cumulative += count
                metric.add_sample(f"{name}_bucket", {**labels, "le": le}, cumulative)
            metric.add_sample(f"{name}_count", labels, cumulative)
            metric.add_sample(f"{name}_sum", labels, series.sum)
            if _EXPOSE_CREATED:
                metric.add_sample(f"{name}_created", labels, series.created)
        yield metric


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        self.build_info = Gauge(
            "relay_build_info", "Relay build.", ["version", "python"], registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)

        self.poll_duration = LoopHistogram(
            "relay_upstream_poll_duration_seconds",
            "Time one upstream task poll took, by outcome.",
            ["outcome"],
            buckets=POLL_BUCKETS,
            registry=r,
        )
        self.polls = Counter(
            "relay_upstream_polls", "Upstream task polls, by outcome.", ["outcome"], registry=r
        )
        self.task_status = Counter(
            "relay_task_status",
            "Task statuses seen upstream (unknown: a status this relay does not know).",
            ["status"],
            registry=r,
        )
        self.watches_registered = Counter(
            "relay_watches_registered", "Watches newly registered.", registry=r
        )
        self.watches_active = Gauge(
            "relay_watches_active", "Watches watching or delivering.", registry=r
        )
        self.watches_by_state = Gauge(
            "relay_watches", "Watches in the store, by state.", ["state"], registry=r
        )
        self.watches_finished = Counter(
            "relay_watches_finished", "Watches that ended, by result.", ["result"], registry=r
        )
        self.watches_purged = Counter(
            "relay_watches_purged",
            "Finished watches deleted by the retention sweep (RELAY_WATCH_RETENTION_S).",
            registry=r,
        )
        self.callback_attempts = Counter(
            "relay_callback_attempts",
            "Callback delivery attempts, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.callback_duration = LoopHistogram(
            "relay_callback_duration_seconds",
            "Time one callback POST took.",
            buckets=CALLBACK_BUCKETS,
            registry=r,
        )
        self.terminal_to_delivered = LoopHistogram(
            "relay_terminal_to_delivered_seconds",
            "From seeing a task's end to the receiver's 2xx.",
            buckets=TERMINAL_TO_DELIVERED_BUCKETS,
            registry=r,
        )
        self.callbacks_backlog = Gauge(
            "relay_callbacks_pending",
            "Callbacks waiting for delivery (state delivering).",
            registry=r,
        )
        self.callbacks_deferred = Counter(
            "relay_callbacks_deferred",
            "Claimed callbacks put back without an attempt: receiver_busy (it already has"
            " RELAY_DELIVERY_PER_HOST attempts in flight) or handed_back (a stop cut them short).",
            ["reason"],
            registry=r,
        )
        self.scheduler_lag = LoopHistogram(
            "relay_scheduler_lag_seconds",
            "How late a poll or a callback attempt ran against its due time.",
            ["loop"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.upstream_in_flight = Gauge(
            "relay_upstream_requests_in_flight", "Upstream polls in flight.", registry=r
        )
        self.poll_workers = Gauge(
            "relay_poll_workers",
            "Poll worker processes ready to take polls (RELAY_POLL_PROCESSES; 0: in the relay).",
            registry=r,
        )
        self.poll_worker_exits = Counter(
            "relay_poll_worker_exits",
            "Poll worker processes that exited while the relay ran; each is started again.",
            registry=r,
        )
        self.api_processes = Gauge(
            "relay_api_processes",
            "API processes serving HTTP beside the relay process (RELAY_API_PROCESSES).",
            registry=r,
        )
        self.api_process_exits = Counter(
            "relay_api_process_exits",
            "API processes that exited while the relay ran; each is started again.",
            registry=r,
        )
        self.upstream_auth_failing = Gauge(
            "relay_upstream_auth_failing",
            "1 while the task API rejects the API key (401/403) and polling is paused.",
            registry=r,
        )
        self.replicas_live = Gauge(
            "relay_replicas_live",
            "Relay replicas sharing the store (by heartbeat); each polls at RPS / this.",
            registry=r,
        )
        self.events_emitted = Counter(
            "relay_task_events",
            "Task ends the relay turned into callbacks, by type.",
            ["type"],
            registry=r,
        )
        self.http_requests = Counter(
            "relay_http_requests",
            "Requests to the relay's own API, by route and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_duration = LoopHistogram(
            "relay_http_request_duration_seconds",
            "Time the relay's API took to answer, by route.",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "relay_store_errors",
            "Store calls that failed (disk full, locked, database down).",
            registry=r,
        )
        self.loop_errors = Counter(
            "relay_loop_errors",
            "Unexpected errors caught in a background loop.",
            ["loop"],
            registry=r,
        )

        # Series exist at 0 from the start, so rate() and alerts see them before the first event.
        for poll_outcome in PollOutcome:
            self.polls.labels(poll_outcome.value)
            self.poll_duration.labels(poll_outcome.value)
        for status in TaskStatus:
            self.task_status.labels(status.value)
        for result in FINISHED_RESULTS:
            self.watches_finished.labels(result)
        for delivery_outcome in DeliveryOutcome:
            self.callback_attempts.labels(delivery_outcome.value)
        for state in WatchState:
            self.watches_by_state.labels(state.value)
        for reason in ("receiver_busy", "handed_back"):
            self.callbacks_deferred.labels(reason)
        for loop in ("poll", "delivery"):
            self.scheduler_lag.labels(loop)
            self.loop_errors.labels(loop)
