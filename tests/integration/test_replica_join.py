"""A replica joining others on PostgreSQL stays under the deployment's budget while it joins.

The replicas already polling learn of the newcomer only at their next heartbeat; until then
they still poll at their old, larger share. The newcomer therefore polls nothing until each of
them has beaten once since it joined.
"""

from __future__ import annotations

from relay.app import HEARTBEAT_STALE_S, JOIN_HOLD_S, join_replicas
from relay.state import POLLER, STORE
from tests.conftest import FakeClock, RelayFactory, Upstream


async def test_a_replica_joining_others_polls_only_after_they_have_shared_the_budget(
    pg_schema: tuple[str, str],  # first: its schema is dropped after the relay has stopped
    make_relay: RelayFactory,
    clock: FakeClock,
    upstream: Upstream,
) -> None:
    dsn, schema = pg_schema
    relay = await make_relay(store_url=dsn, postgres_schema=schema, upstream_rps=100.0)
    await relay.app[STORE].heartbeat(
        "a-replica-already-polling", now=clock(), stale_after_s=HEARTBEAT_STALE_S
    )

    assert 2 == await join_replicas(relay.app)
    await relay.register("tk-hiapi-join", "http://127.0.0.1:9/hook")

    assert 0 == await relay.poll()
    assert 0 == await relay.poll(JOIN_HOLD_S - 0.1)
    assert 0 == upstream.polls("tk-hiapi-join")
    assert 1 == await relay.poll(0.1)
    assert 1 == upstream.polls("tk-hiapi-join")
    # Its share is half of the deployment's budget from the first beat on.
    assert 50.0 == relay.app[POLLER].budget_rps


async def test_a_replica_alone_polls_at_once_with_the_whole_budget(
    pg_schema: tuple[str, str], make_relay: RelayFactory, upstream: Upstream
) -> None:
    dsn, schema = pg_schema
    relay = await make_relay(store_url=dsn, postgres_schema=schema, upstream_rps=100.0)

    assert 1 == await join_replicas(relay.app)
    await relay.register("tk-hiapi-alone", "http://127.0.0.1:9/hook")

    assert 1 == await relay.poll()
    assert 1 == upstream.polls("tk-hiapi-alone")
    assert 100.0 == relay.app[POLLER].budget_rps
