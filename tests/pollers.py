"""One way for tests to build a Poller over a real store and a transport the test drives."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from relay.config import Settings
from relay.metrics import Metrics
from relay.policy import PollPolicy
from relay.poller import Poller
from relay.store.base import Store
from relay.upstream import PollTransport


def make_poller(
    store: Store,
    transport: PollTransport,
    *,
    clock: Callable[[], float],
    concurrency: int = 4,
    rps: float = 100.0,
    lease_s: float = 60.0,
    on_finished: Callable[[], None] | None = None,
) -> Poller:
    """A Poller with the default poll policy, its own metrics registry, and `clock`."""
    return Poller(
        store=store,
        transport=transport,
        metrics=Metrics(CollectorRegistry()),
        policy=PollPolicy.from_settings(Settings()),
        rps=rps,
        concurrency=concurrency,
        lease_s=lease_s,
        clock=clock,
        on_finished=on_finished if on_finished is not None else lambda: None,
    )
