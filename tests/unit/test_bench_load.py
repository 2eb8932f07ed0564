"""The benchmark's raw load client against a real aiohttp server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.load import RawClient


@pytest.fixture
async def server() -> AsyncIterator[tuple[TestServer, list[tuple[str, dict[str, str], bytes]]]]:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def watch(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.path_qs, dict(request.headers), body))
        task = orjson.loads(body)["taskId"]
        if task == "close-after":
            return web.json_response({"n": len(seen)}, status=503, headers={"Connection": "close"})
        return web.json_response({"n": len(seen), "pad": "x" * 5000}, status=201)

    app = web.Application()
    app.router.add_post("/watch", watch)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    yield test_server, seen
    await test_server.close()


async def test_posts_on_one_kept_alive_connection_and_reads_each_whole_answer(
    server: tuple[TestServer, list[tuple[str, dict[str, str], bytes]]],
) -> None:
    test_server, seen = server
    url = test_server.make_url("/watch").with_query(tag="a b")
    client = RawClient(str(url), {"Authorization": "Bearer t"})
    try:
        statuses = [await client.post(orjson.dumps({"taskId": f"tk-{i}"})) for i in range(3)]
        writer = client._writer
        assert 503 == await client.post(orjson.dumps({"taskId": "close-after"}))
        assert client._writer is None  # the server said close: the next post reconnects
        assert writer is not None
        assert 201 == await client.post(orjson.dumps({"taskId": "tk-after"}))
    finally:
        client.close()

    assert [201, 201, 201] == statuses
    assert ["tk-0", "tk-1", "tk-2", "close-after", "tk-after"] == [
        orjson.loads(body)["taskId"] for _, _, body in seen
    ]
    assert {"/watch?tag=a+b"} == {path for path, _, _ in seen}
    assert {f"127.0.0.1:{url.port}"} == {headers["Host"] for _, headers, _ in seen}
    assert {"Bearer t"} == {headers["Authorization"] for _, headers, _ in seen}
