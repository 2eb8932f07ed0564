"""Every metric the relay exposes, on one app-owned registry. Names are a contract: dashboards and
alerts use them. No label ever carries a task id, watch id, URL or host."""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

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

        self.poll_duration = Histogram(
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
        self.callback_attempts = Counter(
            "relay_callback_attempts",
            "Callback delivery attempts, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.callback_duration = Histogram(
            "relay_callback_duration_seconds",
            "Time one callback POST took.",
            buckets=CALLBACK_BUCKETS,
            registry=r,
        )
        self.terminal_to_delivered = Histogram(
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
        self.scheduler_lag = Histogram(
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
        self.http_duration = Histogram(
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
