"""The Store protocol: everything the API and the loops ask of persistence, and nothing more.

Claims are leases expressed in the due column itself: claiming a row pushes its due time to
`now + lease`, so a process that dies mid-work leaves the row to become due again by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from relay.models import (
    DeliveryJob,
    DeliveryRecord,
    NewWatch,
    TaskClaim,
    TaskFinish,
    TaskUpdate,
    Watch,
    WatchState,
)


class StoreUnavailable(Exception):
    """The store cannot take the write or read right now (disk full, locked, database down)."""


class StoreConflict(Exception):
    """The request conflicts with the watch's current state."""


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers and would commit a write."""

    async def register(
        self, new: NewWatch, *, watch_id: str, now: float, deadline_at: float
    ) -> tuple[Watch, bool]:
        """Commit a watch and its task's poll stream; (existing, False) if the pair is active."""

    async def get_watch(self, watch_id: str) -> Watch | None: ...

    async def list_watches(
        self, *, state: WatchState | None, task_id: str | None, limit: int, after: str | None
    ) -> list[Watch]:
        """Watches ordered by id (ids sort by creation time), strictly after `after`."""

    async def cancel_watch(self, watch_id: str, *, now: float) -> tuple[Watch, bool] | None:
        """Cancel an active watch: the watch, and whether this call cancelled it (False: it was
        cancelled already). StoreConflict if it already ended; None if unknown."""

    async def redeliver(self, watch_id: str, *, now: float) -> Watch | None:
        """Queue the callback of a delivered or failed watch again; StoreConflict otherwise."""

    async def claim_due_tasks(self, *, now: float, limit: int, lease_s: float) -> list[TaskClaim]:
        """Claim up to `limit` poll streams due by `now`, earliest first."""

    async def apply_poll_results(
        self, plans: Sequence[TaskUpdate | TaskFinish], *, now: float
    ) -> int:
        """Record polls; return how many watches moved to delivering."""

    async def expire_watches(self, *, now: float, limit: int) -> int:
        """Move watching watches past their deadline to delivering `task.timeout`; return count."""

    async def purge_finished(self, *, before: float, limit: int) -> int:
        """Delete up to `limit` finished watches (delivered, failed, cancelled) last changed
        before `before`, oldest first; return how many. Active watches are never touched."""

    async def claim_due_deliveries(
        self, *, now: float, limit: int, lease_s: float
    ) -> list[DeliveryJob]: ...

    async def record_deliveries(self, records: Sequence[DeliveryRecord], *, now: float) -> set[str]:
        """Apply each attempt's outcome to its watch if it is still delivering; the watch ids
        applied (a watch cancelled while its attempt was out keeps its state, and is not in it)."""

    async def release_tasks(self, held: Sequence[tuple[str, float]], *, due_at: float) -> None:
        """Hand claimed poll streams back before their lease ends (a stop cut their poll short):
        each (task id, its claim's lease_until). A stream whose lease has moved since (its lease
        ran out and another claimer took it) is left alone."""

    async def defer_deliveries(self, held: Sequence[tuple[str, float]], *, due_at: float) -> None:
        """Move claimed callbacks to `due_at` without counting an attempt (handed back, or their
        receiver already has its share of attempts in flight): each (watch id, its claim's
        lease_until). A callback whose lease has moved since (another claimer took it, or its
        attempt was recorded) is left alone: a late hand-back must not undo their work."""

    async def hasten_deliveries(
        self, watch_ids: Sequence[str], *, deferred_to: float, due_at: float
    ) -> None:
        """Bring callbacks deferred to `deferred_to` forward to `due_at` (their receiver has a
        slot free). A callback whose due time has moved since (claimed again by a replica, its
        attempt recorded) is left alone."""

    async def next_poll_due_at(self) -> float | None:
        """The earliest time a poll falls due (a leased stream's at its lease's end)."""

    async def next_deadline_at(self) -> float | None:
        """The earliest deadline of a watch still watching (passed ones included)."""

    async def next_delivery_due_at(self) -> float | None:
        """The earliest time a callback attempt falls due."""

    async def count_by_state(self) -> dict[WatchState, int]: ...

    async def heartbeat(self, replica_id: str, *, now: float, stale_after_s: float) -> int:
        """Record that this replica lives; return how many replicas live (this one included)."""

    async def retire(self, replica_id: str) -> None:
        """Forget this replica at a clean stop, so the others take its budget share at once."""

    async def listen_registrations(self, wake: Callable[[], None], stopping: asyncio.Event) -> None:
        """Call `wake` whenever another process registers a watch, until `stopping` is set.

        Only an accelerator: the poll loop also looks for due work at least once a second.
        """
