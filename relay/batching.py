"""Many concurrent poll results, one store call: the leader-follower batch the poller writes with.

Each finishing poll hands its TaskUpdate to `UpdateBatch.apply` and waits. A caller that finds
no leader leads: it lets the other polls finishing in the same loop turn join, writes them all
with one `apply_poll_results` (one transaction, one hand-off to the store), then hands the lead
to the first caller that arrived meanwhile, so no poll is held up writing for the others.
Every caller resumes only once its update is stored; a failed write fails every caller of it.
"""

from __future__ import annotations

import asyncio

from relay.models import TaskUpdate
from relay.store.base import Store, StoreUnavailable


class UpdateBatch:
    def __init__(self, store: Store) -> None:
        self._store = store
        # Each waiting caller's future resolves False once its update is stored, or True when
        # the leader hands it the lead (its update is then still pending, written by itself).
        self._pending: list[tuple[TaskUpdate, asyncio.Future[bool]]] = []
        self._leading = False

    async def apply(self, update: TaskUpdate, *, now: float) -> None:
        """Store `update` (with whatever else is waiting); return once it is stored."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((update, future))
        if self._leading:
            if not await future:
                return  # stored by the leader
        else:
            self._leading = True
            future.set_result(True)  # leading: our outcome is the write's, raised below
        batch: list[tuple[TaskUpdate, asyncio.Future[bool]]] = []
        error: Exception | None = None
        settled = False
        try:
            await asyncio.sleep(0)  # the polls finishing in this loop turn join the batch
            batch, self._pending = self._pending, []
            try:
                await self._store.apply_poll_results([u for u, _ in batch], now=now)
            except Exception as exc:
                error = exc
            _settle(batch, error)
            settled = True
        finally:
            if not settled:  # cancelled mid-write (a stop past its bound): release the followers
                _settle(batch, StoreUnavailable("the write of this poll result was stopped"))
            self._hand_over()
        if error is not None:
            raise error

    def _hand_over(self) -> None:
        """One leader at a time, and never for long: the first waiting caller leads next."""
        for _, waiting in self._pending:
            if not waiting.done():
                waiting.set_result(True)
                return
        self._leading = False


def _settle(
    batch: list[tuple[TaskUpdate, asyncio.Future[bool]]], error: BaseException | None
) -> None:
    for _, future in batch:
        if future.done():
            continue  # the leader's own, or a caller that was cancelled
        if error is None:
            future.set_result(False)
        else:
            future.set_exception(error)
