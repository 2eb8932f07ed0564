"""The fake upstream, exercised over real loopback HTTP with a fake clock."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.fake_upstream import (
    FAKE_UPSTREAM_KEY,
    Schedule,
    create_fake_upstream_app,
    lifecycle_status,
    run_fake_upstream,
)

T0 = 1_700_000_000.0


class FakeClock:
    """A clock that only moves when a test advances it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[aiohttp.ClientSession]:
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession(base_url=f"http://{server.host}:{server.port}") as s:
            yield s
    finally:
        await server.close()


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[aiohttp.ClientSession]:
    async with serving(create_fake_upstream_app(clock=clock)) as session:
        yield session


async def get_task(session: aiohttp.ClientSession, task_id: str) -> tuple[int, Any]:
    async with session.get(f"/v1/tasks/{task_id}") as resp:
        return resp.status, orjson.loads(await resp.read())


async def control(session: aiohttp.ClientSession, method: str, path: str, doc: Any = None) -> Any:
    async with session.request(method, path, data=orjson.dumps(doc)) as resp:
        assert resp.status == 200, await resp.text()
        return orjson.loads(await resp.read())


def outputs(task_id: str, completed: int) -> list[dict[str, Any]]:
    expire_at = completed + 86_400
    return [
        {
            "url": f"https://cdn.example.invalid/{task_id}/video.mp4",
            "type": "video",
            "expireAt": expire_at,
        },
        {
            "url": f"https://cdn.example.invalid/{task_id}/thumbnail.jpg",
            "type": "thumbnail",
            "expireAt": expire_at,
        },
    ]


def ok(data: dict[str, Any]) -> dict[str, Any]:
    return {"code": 200, "message": "success", "data": data}


NOT_FOUND = {"code": 404, "message": "task not found", "data": None}
SCHEDULE = Schedule()


@pytest.mark.parametrize(
    ("elapsed", "ends_in_fail", "expected"),
    [
        (0.0, False, "queued"),
        (0.999, False, "queued"),
        (1.0, False, "handling"),
        (2.999, False, "handling"),
        (3.0, False, "archiving"),
        (3.499, False, "archiving"),
        (3.5, False, "success"),
        (3.5, True, "fail"),
        (1.0, True, "handling"),
    ],
)
def test_lifecycle_status_follows_the_schedule(
    elapsed: float, ends_in_fail: bool, expected: str
) -> None:
    """Each status lasts its scheduled seconds; the end depends on the fail flag."""
    assert lifecycle_status(SCHEDULE, elapsed, ends_in_fail=ends_in_fail) == expected


def test_schedule_rejects_negative_durations() -> None:
    """A negative duration is a configuration error."""
    with pytest.raises(ValueError, match="must be >= 0"):
        Schedule(handling_s=-1.0)


async def test_task_progresses_through_every_status_as_the_clock_advances(
    fake: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """queued -> handling -> archiving -> success, with completed and outputs only at the end."""
    task_id = "tk-hiapi-demo-1"
    base = {"taskId": task_id, "model": "video-gen-1", "created": 1_700_000_000, "completed": 0}
    seen = []
    for step in (0.0, 1.0, 2.0, 0.5):
        clock.advance(step)
        seen.append(await get_task(fake, task_id))
    completed = 1_700_000_003  # created + 3.5 s, truncated like the real API's unix seconds
    assert seen == [
        (200, ok({**base, "status": "queued"})),
        (200, ok({**base, "status": "handling"})),
        (200, ok({**base, "status": "archiving"})),
        (
            200,
            ok(
                {
                    **base,
                    "status": "success",
                    "completed": completed,
                    "output": outputs(task_id, completed),
                }
            ),
        ),
    ]


async def test_fail_directive_ends_in_fail_with_an_error(
    fake: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """An id with -fail- ends in fail with an error object and no output."""
    task_id = "tk-hiapi-fail-1"
    await get_task(fake, task_id)
    clock.advance(3.5)
    assert await get_task(fake, task_id) == (
        200,
        ok(
            {
                "taskId": task_id,
                "model": "video-gen-1",
                "status": "fail",
                "created": 1_700_000_000,
                "completed": 1_700_000_003,
                "error": {
                    "code": "generation_failed",
                    "message": "the model could not render this task",
                },
            }
        ),
    )


async def test_slow_directive_stretches_the_schedule_tenfold(
    fake: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """An id with -slow- stays queued for 10 s instead of 1 s."""
    task_id = "tk-hiapi-slow-1"
    statuses = []
    for step in (0.0, 9.9, 0.1):
        clock.advance(step)
        statuses.append((await get_task(fake, task_id))[1]["data"]["status"])
    assert statuses == ["queued", "queued", "handling"]


async def test_vanish_directive_answers_not_found_with_http_404(
    fake: aiohttp.ClientSession,
) -> None:
    """An id with -vanish- answers the not-found envelope with HTTP 404, every time."""
    answers = [await get_task(fake, "tk-hiapi-vanish-1") for _ in range(2)]
    assert answers == [(404, NOT_FOUND), (404, NOT_FOUND)]


async def test_not_found_can_be_sent_with_http_200(clock: FakeClock) -> None:
    """With not_found_http_status=200 the not-found envelope comes with HTTP 200."""
    app = create_fake_upstream_app(clock=clock, not_found_http_status=200)
    async with serving(app) as session:
        assert await get_task(session, "tk-hiapi-vanish-1") == (200, NOT_FOUND)


async def test_ids_without_the_prefix_are_not_found(fake: aiohttp.ClientSession) -> None:
    """Only tk-hiapi- ids are auto-created."""
    assert await get_task(fake, "job-1") == (404, NOT_FOUND)


async def test_api_key_is_required_when_configured(clock: FakeClock) -> None:
    """Missing or wrong bearer tokens get 401; the right one gets the task."""
    unauthorized = {"code": 401, "message": "unauthorized", "data": None}
    app = create_fake_upstream_app(clock=clock, api_key="k-123")
    async with serving(app) as session:
        results = []
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer k-123"}):
            async with session.get("/v1/tasks/tk-hiapi-1", headers=headers) as resp:
                doc = orjson.loads(await resp.read())
                results.append((resp.status, doc if resp.status == 401 else doc["code"]))
    assert results == [(401, unauthorized), (401, unauthorized), (200, 200)]


async def test_put_flips_a_task_to_success_and_records_the_flip(
    fake: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A PUT pins the status now; completed is the flip time and the flip shows in stats."""
    task_id = "tk-hiapi-bench-1"
    await get_task(fake, task_id)
    clock.advance(0.25)
    put = await control(fake, "PUT", f"/_fake/tasks/{task_id}", {"status": "success"})
    clock.advance(100.0)  # a pinned task no longer follows the schedule
    status, got = await get_task(fake, task_id)
    expected = ok(
        {
            "taskId": task_id,
            "model": "video-gen-1",
            "status": "success",
            "created": 1_700_000_000,
            "completed": 1_700_000_000,
            "output": outputs(task_id, 1_700_000_000),
        }
    )
    stats = await control(fake, "GET", "/_fake/stats")
    assert (put, status, got, stats["flips"]) == (expected, 200, expected, {task_id: T0 + 0.25})


async def test_put_pins_given_output_and_error(fake: aiohttp.ClientSession) -> None:
    """A PUT's output or error replaces the defaults."""
    custom = [{"url": "https://cdn.example.invalid/x.png", "type": "image", "expireAt": 1}]
    await control(fake, "PUT", "/_fake/tasks/tk-hiapi-a", {"status": "success", "output": custom})
    await control(fake, "PUT", "/_fake/tasks/tk-hiapi-b", {"status": "fail", "error": {"code": 7}})
    a = (await get_task(fake, "tk-hiapi-a"))[1]["data"]["output"]
    b = (await get_task(fake, "tk-hiapi-b"))[1]["data"]["error"]
    assert (a, b) == (custom, {"code": 7})


async def test_put_rejects_an_unknown_status(fake: aiohttp.ClientSession) -> None:
    """A typo in the status is a 400, not a silently pinned nonsense status."""
    async with fake.put("/_fake/tasks/tk-hiapi-1", data=b'{"status": "sucess"}') as resp:
        status, doc = resp.status, orjson.loads(await resp.read())
    assert (status, doc["code"]) == (400, 400)


async def test_delete_makes_a_task_vanish(fake: aiohttp.ClientSession) -> None:
    """After DELETE, a task that existed answers not found."""
    first, _ = await get_task(fake, "tk-hiapi-1")
    await control(fake, "DELETE", "/_fake/tasks/tk-hiapi-1")
    assert (first, await get_task(fake, "tk-hiapi-1")) == (200, (404, NOT_FOUND))


async def test_scripted_500_is_answered_once_then_normal_behaviour_resumes(
    fake: aiohttp.ClientSession,
) -> None:
    """A scripted status answers one GET with a plausible envelope; the next GET is normal."""
    queued = await control(
        fake, "POST", "/_fake/script/tk-hiapi-1", {"responses": [{"status": 500}]}
    )
    first = await get_task(fake, "tk-hiapi-1")
    second_status, second = await get_task(fake, "tk-hiapi-1")
    assert (queued, first, (second_status, second["data"]["status"])) == (
        {"taskId": "tk-hiapi-1", "queued": 1},
        (500, {"code": 500, "message": "internal server error", "data": None}),
        (200, "queued"),
    )


async def test_scripted_entries_answer_retry_after_raw_body_and_exact_json(
    fake: aiohttp.ClientSession,
) -> None:
    """retryAfter sets the header, body is sent raw, json is sent exactly with HTTP 200."""
    script = [{"status": 429, "retryAfter": 2}, {"body": "not json"}, {"json": {"weird": [1]}}]
    await control(fake, "POST", "/_fake/script/tk-hiapi-1", {"responses": script})
    seen = []
    for _ in script:
        async with fake.get("/v1/tasks/tk-hiapi-1") as resp:
            seen.append((resp.status, resp.headers.get("Retry-After"), await resp.text()))
    assert seen == [
        (429, "2", '{"code":429,"message":"too many requests","data":null}'),
        (200, None, "not json"),
        (200, None, '{"weird":[1]}'),
    ]


async def test_script_rejects_unknown_keys(fake: aiohttp.ClientSession) -> None:
    """A misspelt key is a 400 rather than a silently normal answer."""
    body = orjson.dumps({"responses": [{"delay": 5}]})
    async with fake.post("/_fake/script/tk-hiapi-1", data=body) as resp:
        doc = orjson.loads(await resp.read())
    assert (resp.status, doc["message"]) == (400, "unknown response keys: ['delay']")


async def test_scripted_resets_drop_the_connection(fake: aiohttp.ClientSession) -> None:
    """Two scripted resets fail a GET with a connection error; then answers resume."""
    # aiohttp's client retries an idempotent request once after a disconnect, so one reset
    # alone is absorbed (see the next test); the retry meets the second reset.
    script = {"responses": [{"reset": True}, {"reset": True}]}
    await control(fake, "POST", "/_fake/script/tk-hiapi-1", script)
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_task(fake, "tk-hiapi-1")
    after = (await get_task(fake, "tk-hiapi-1"))[0]
    stats = await control(fake, "GET", "/_fake/stats")
    assert (after, stats["perTask"]) == (200, {"tk-hiapi-1": 3})


async def test_a_single_reset_is_absorbed_by_the_client_retry(fake: aiohttp.ClientSession) -> None:
    """One scripted reset costs a GET a silent retry: the caller sees 200, the fake two GETs."""
    await control(fake, "POST", "/_fake/script/tk-hiapi-1", {"responses": [{"reset": True}]})
    status = (await get_task(fake, "tk-hiapi-1"))[0]
    stats = await control(fake, "GET", "/_fake/stats")
    assert (status, stats["perTask"]) == (200, {"tk-hiapi-1": 2})


@pytest.mark.parametrize(
    ("task_id", "fault"),
    [
        ("tk-hiapi-429-1", (429, "1", '{"code":429,"message":"too many requests","data":null}')),
        (
            "tk-hiapi-500-1",
            (500, None, '{"code":500,"message":"internal server error","data":null}'),
        ),
        ("tk-hiapi-garbage-1", (200, None, '{"code": 200, "message": "succ')),
    ],
)
async def test_fault_directives_fail_every_other_request(
    fake: aiohttp.ClientSession, task_id: str, fault: tuple[int, str | None, str]
) -> None:
    """-429-, -500- and -garbage- fail the 1st and 3rd GETs and answer the 2nd normally."""
    seen = []
    for _ in range(3):
        async with fake.get(f"/v1/tasks/{task_id}") as resp:
            seen.append((resp.status, resp.headers.get("Retry-After"), await resp.text()))
    normal = seen[1][0], seen[1][1], orjson.loads(seen[1][2])["data"]["status"]
    assert [seen[0], normal, seen[2]] == [fault, (200, None, "queued"), fault]


async def test_concurrent_gets_for_one_task_are_reported_as_an_overlap(
    fake: aiohttp.ClientSession,
) -> None:
    """Two GETs in flight at once for one task count as one overlap and a concurrency of 2."""
    # The short real delay is what keeps the first GET in flight while the second arrives.
    await control(fake, "POST", "/_fake/script/tk-hiapi-1", {"responses": [{"delayS": 0.2}]})
    answers = await asyncio.gather(get_task(fake, "tk-hiapi-1"), get_task(fake, "tk-hiapi-1"))
    await get_task(fake, "tk-hiapi-2")
    stats = await control(fake, "GET", "/_fake/stats")
    assert [status for status, _ in answers] == [200, 200]
    assert stats == {
        "requests": 3,
        "perTask": {"tk-hiapi-1": 2, "tk-hiapi-2": 1},
        "maxConcurrentPerTask": {"tk-hiapi-1": 2, "tk-hiapi-2": 1},
        "overlaps": 1,
        "maxRps1s": 3,
        "flips": {},
    }


async def test_max_rps_counts_gets_per_clock_second(
    fake: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """maxRps1s is the largest number of GETs within one whole second of the clock."""
    for step in (0.0, 0.5, 0.6, 0.1, 0.1):  # seconds ...0: 2 GETs, ...1: 3 GETs
        clock.advance(step)
        await get_task(fake, "tk-hiapi-1")
    assert (await control(fake, "GET", "/_fake/stats"))["maxRps1s"] == 3


async def test_fail_all_answers_every_task_until_cleared(fake: aiohttp.ClientSession) -> None:
    """fail-all 401 hits every task, like a revoked key; status null restores answers."""
    unauthorized = (401, {"code": 401, "message": "unauthorized", "data": None})
    await control(fake, "POST", "/_fake/fail-all", {"status": 401})
    during = [await get_task(fake, t) for t in ("tk-hiapi-1", "tk-hiapi-2")]
    await control(fake, "POST", "/_fake/fail-all", {"status": None})
    after = (await get_task(fake, "tk-hiapi-1"))[0]
    assert (during, after) == ([unauthorized, unauthorized], 200)


async def test_fail_all_with_a_count_stops_by_itself(fake: aiohttp.ClientSession) -> None:
    """fail-all with count n answers n GETs with the status, then normal answers resume."""
    await control(fake, "POST", "/_fake/fail-all", {"status": 503, "count": 2})
    statuses = [(await get_task(fake, "tk-hiapi-1"))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]


async def test_reset_forgets_tasks_scripts_and_stats(
    fake: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """After reset, a task starts over from queued and stats count from zero."""
    await get_task(fake, "tk-hiapi-1")
    await control(fake, "POST", "/_fake/script/tk-hiapi-1", {"responses": [{"status": 500}]})
    await control(fake, "PUT", "/_fake/tasks/tk-hiapi-2", {"status": "fail"})
    clock.advance(1.0)
    await control(fake, "POST", "/_fake/reset")
    status, doc = await get_task(fake, "tk-hiapi-1")
    stats = await control(fake, "GET", "/_fake/stats")
    assert (status, doc["data"]["status"], doc["data"]["created"]) == (200, "queued", 1_700_000_001)
    assert (stats["requests"], stats["flips"]) == (1, {})


async def test_stats_are_readable_in_process(clock: FakeClock) -> None:
    """The app key gives in-process tests the same stats document."""
    app = create_fake_upstream_app(clock=clock)
    async with serving(app) as session:
        await get_task(session, "tk-hiapi-1")
        assert app[FAKE_UPSTREAM_KEY].stats()["requests"] == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(probe: Callable[[], Any], attempts: int = 200) -> Any:
    for _ in range(attempts):
        try:
            return await probe()
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.01)
    raise AssertionError("server never came up")


async def test_run_fake_upstream_serves_until_stopped() -> None:
    """run_fake_upstream answers on its port with the api key and returns once stop is set."""
    port, stop = free_port(), asyncio.Event()
    server = asyncio.create_task(
        run_fake_upstream("127.0.0.1", port, api_key="k", schedule=Schedule(), stop=stop)
    )
    try:
        async with aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"}
        ) as session:
            status, doc = await wait_until(lambda: get_task(session, "tk-hiapi-1"))
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=5)
    assert (status, doc["data"]["status"]) == (200, "queued")


async def chaos_answers(session: aiohttp.ClientSession, task_id: str, n: int) -> list[Any]:
    seen = []
    for _ in range(n):
        async with session.get(f"/v1/tasks/{task_id}") as resp:
            seen.append((resp.status, resp.headers.get("Retry-After"), await resp.text()))
    return seen


async def test_chaos_at_rate_one_fails_every_get_and_counts_each_kind(
    fake: aiohttp.ClientSession,
) -> None:
    """rate 1: every GET is a fault of a listed kind; GET /_fake/chaos counts them by kind."""
    config = {"rate": 1, "seed": 7, "kinds": ["503", "429-retry-after"]}
    await control(fake, "POST", "/_fake/chaos", config)
    seen = await chaos_answers(fake, "tk-hiapi-1", 20)
    chaos = await control(fake, "GET", "/_fake/chaos")
    observed = {
        "503": sum(1 for s in seen if s[:2] == (503, None)),
        "429-retry-after": sum(1 for s in seen if s[:2] == (429, "1")),
    }
    assert 20 == sum(observed.values())
    assert observed == chaos["injected"]
    assert (chaos["rate"], chaos["seed"], chaos["kinds"]) == (1.0, 7, config["kinds"])


async def test_chaos_with_one_seed_repeats_the_same_faults(fake: aiohttp.ClientSession) -> None:
    """The same seed, after a reset, draws the same sequence of faults and normal answers."""
    runs = []
    for _ in range(2):
        await control(fake, "POST", "/_fake/reset")
        await control(fake, "POST", "/_fake/chaos", {"rate": 0.5, "seed": 3, "kinds": ["500"]})
        runs.append([status for status, _, _ in await chaos_answers(fake, "tk-hiapi-1", 30)])
    assert runs[0] == runs[1]
    assert {200, 500} == set(runs[0])


async def test_chaos_backwards_answers_an_earlier_status_never_an_end(
    fake: aiohttp.ClientSession,
) -> None:
    """backwards on a finished task answers queued, handling or archiving, with no output."""
    await control(fake, "PUT", "/_fake/tasks/tk-hiapi-1", {"status": "success"})
    await control(fake, "POST", "/_fake/chaos", {"rate": 1, "seed": 1, "kinds": ["backwards"]})
    answers = [
        orjson.loads(text)["data"] for _, _, text in await chaos_answers(fake, "tk-hiapi-1", 12)
    ]
    assert {"queued", "handling", "archiving"} >= {a["status"] for a in answers}
    assert [] == [a for a in answers if a["completed"] != 0 or "output" in a]


async def test_chaos_malformed_kinds_break_the_answer_each_its_own_way(
    fake: aiohttp.ClientSession,
) -> None:
    """truncated cuts the body short; not-json is a 200 HTML page; wrong-shape is not this task."""
    await control(fake, "POST", "/_fake/chaos", {"rate": 1, "kinds": ["truncated"]})
    async with fake.get("/v1/tasks/tk-hiapi-1") as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await control(fake, "POST", "/_fake/chaos", {"rate": 1, "kinds": ["not-json"]})
    ((status, _, text),) = await chaos_answers(fake, "tk-hiapi-1", 1)
    assert (200, True) == (status, text.startswith("<html>"))
    await control(fake, "POST", "/_fake/chaos", {"rate": 1, "seed": 5, "kinds": ["wrong-shape"]})
    for status, _, text in await chaos_answers(fake, "tk-hiapi-1", 12):
        doc = orjson.loads(text)
        data = doc["data"]
        this_task = (
            isinstance(data, dict)
            and data.get("taskId") == "tk-hiapi-1"
            and data.get("status") in ("queued", "handling", "archiving", "success", "fail")
        )
        assert (200, 200, False) == (status, doc["code"], this_task)


async def test_chaos_rate_zero_stops_it_and_bad_settings_are_rejected(
    fake: aiohttp.ClientSession,
) -> None:
    """rate 0 ends chaos; an unknown kind or a rate over 1 is a 400."""
    await control(fake, "POST", "/_fake/chaos", {"rate": 1, "kinds": ["500"]})
    await control(fake, "POST", "/_fake/chaos", {"rate": 0})
    statuses = [s for s, _, _ in await chaos_answers(fake, "tk-hiapi-1", 3)]
    rejected = []
    for bad in ({"rate": 1, "kinds": ["501"]}, {"rate": 1.5}, {"rate": 0.5, "hang": 1}):
        async with fake.post("/_fake/chaos", data=orjson.dumps(bad)) as resp:
            rejected.append(resp.status)
    assert (statuses, rejected) == ([200, 200, 200], [400, 400, 400])
