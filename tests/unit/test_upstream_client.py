"""The task-API client against the fake upstream over loopback: every retry waits its turn."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relay.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream, create_fake_upstream_app
from relay.models import PollOutcome
from relay.upstream import UpstreamClient, make_upstream_session


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, FakeUpstream]]:
    app = create_fake_upstream_app(api_key="k")
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), app[FAKE_UPSTREAM_KEY]
    await server.close()


@pytest.mark.parametrize(
    ("resets", "outcome", "gate_calls"),
    [
        (0, PollOutcome.OK, 0),
        (1, PollOutcome.OK, 1),  # aiohttp's own silent retry
        (2, PollOutcome.OK, 2),  # ... and the first immediate retry
        (6, PollOutcome.NETWORK_ERROR, 5),  # three attempts of two requests each, all dropped
    ],
)
async def test_every_request_after_a_fetchs_first_waits_for_the_retry_gate(
    fake: tuple[str, FakeUpstream], resets: int, outcome: PollOutcome, gate_calls: int
) -> None:
    """Each request a fetch puts on the wire after its first passes the gate (the budget)."""
    url, upstream = fake
    calls = 0

    async def gate() -> None:
        nonlocal calls
        calls += 1

    session = make_upstream_session(concurrency=4)
    try:
        if resets:
            script = {"responses": [{"reset": True}] * resets}
            async with (
                aiohttp.ClientSession() as control,
                control.post(f"{url}/_fake/script/tk-hiapi-1", json=script) as response,
            ):
                assert 200 == response.status
        client = UpstreamClient(session, base_url=url, api_key="k", timeout_s=2.0)
        result = await client.fetch("tk-hiapi-1", now=0.0, before_retry=gate)
    finally:
        await session.close()
    assert (outcome, gate_calls, resets + 1 if resets < 6 else 6) == (
        result.outcome,
        calls,
        upstream.stats()["requests"],
    )
