"""The HTTP API end to end on a real SQLite file: registration, reads, listing, cancellation,
redelivery, problem+json errors (bad input changes nothing), token auth, health and metrics.

Every callback URL is on loopback; the SSRF cases are only judged at registration, never dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from relay.api import method_label
from relay.app import create_app, drain_budget
from relay.config import Secret, sqlite_path
from relay.delivery import iso_utc
from relay.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE
from relay.models import WatchState
from relay.state import SETTINGS, STOPPING
from tests.conftest import T0, Receiver, Relay, RelayFactory, Upstream, make_settings

TASK = "tk-hiapi-api-1"
OTHER_TASK = "tk-hiapi-api-2"
# Registration never dials the callback URL, so rejection tests may name a port nobody serves.
HOOK = "http://127.0.0.1:9/hook"
WATCH_TIMEOUT_S = 86_400.0
UNKNOWN_ID = "wt_" + "0" * 32
MAX_BODY = 64 * 1024
TOKEN_ONE = "tok-one-9f3c2a77e1"
TOKEN_TWO = "tok-two-7b1e4d05c8"
TOKENS = (Secret(TOKEN_ONE), Secret(TOKEN_TWO))

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
}
POLL_OUTCOMES = {
    "ok",
    "not_found",
    "rate_limited",
    "auth_error",
    "client_error",
    "server_error",
    "timeout",
    "network_error",
    "invalid_response",
}
CONTRACT_FAMILIES = {
    "relay_upstream_poll_duration_seconds": "histogram",
    "relay_upstream_polls": "counter",
    "relay_task_status": "counter",
    "relay_watches_registered": "counter",
    "relay_watches_active": "gauge",
    "relay_watches_finished": "counter",
    "relay_callback_attempts": "counter",
    "relay_callback_duration_seconds": "histogram",
    "relay_terminal_to_delivered_seconds": "histogram",
    "relay_scheduler_lag_seconds": "histogram",
    "relay_build_info": "gauge",
}


@pytest.fixture(params=["in-process", "api-process"])
def front(request: pytest.FixtureRequest) -> str:
    """Every API test runs against the relay's own app and against an API process's app."""
    return str(request.param)


# --- helpers ------------------------------------------------------------------------------------


def problem(
    status: int, kind: str, detail: str, instance: str, field: str | None = None
) -> dict[str, Any]:
    """The exact problem+json body the API owes for one error."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + kind,
        "title": TITLES[status],
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if field is not None:
        body["errors"] = [{"field": field, "detail": detail}]
    return body


async def answer(response: ClientResponse) -> tuple[int, str, Any]:
    """Status, content type and decoded JSON body of a response."""
    return response.status, response.content_type, orjson.loads(await response.read())


def invalid(detail: str, field: str, instance: str = "/watch") -> tuple[int, str, Any]:
    return 422, PROBLEM_CONTENT_TYPE, problem(422, "invalid-field", detail, instance, field)


def json_error(raw: bytes) -> str:
    """orjson's own message for `raw`, which the 400 detail quotes."""
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return exc.msg
    raise AssertionError(f"{raw!r} is valid JSON")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post_watch(
    relay: Relay, body: Any, headers: dict[str, str] | None = None
) -> ClientResponse:
    return await relay.client.post("/watch", json=body, headers=headers)


async def post_raw(relay: Relay, data: bytes, content_type: str | None) -> ClientResponse:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return await relay.client.post("/watch", data=data, headers=headers)


async def page(
    relay: Relay, query: str = "", headers: dict[str, str] | None = None
) -> tuple[list[str], str | None]:
    """The watch ids and next cursor of one `GET /watches` page."""
    response = await relay.client.get(f"/watches{query}", headers=headers)
    assert 200 == response.status, await response.text()
    body = await response.json()
    return [w["watchId"] for w in body["watches"]], body["nextCursor"]


async def assert_no_watch(relay: Relay, headers: dict[str, str] | None = None) -> None:
    """Nothing was registered: no watch, no poll stream, no count, an empty listing."""
    assert dict.fromkeys(WatchState, 0) == await relay.store.count_by_state()
    assert None is await relay.store.next_poll_due_at()
    assert None is await relay.store.next_deadline_at()
    assert 0 == relay.sample("relay_watches_registered_total")
    response = await relay.client.get("/watches", headers=headers)
    assert (200, {"watches": [], "nextCursor": None}) == (response.status, await response.json())


def progress(watch: Any) -> tuple[str, int]:
    """A watch's state and delivery attempts."""
    return watch["state"], watch["deliveryAttempts"]


def committed_watch_ids(relay: Relay) -> list[str]:
    """Watch ids as a second, independent connection to the SQLite file sees them."""
    path = sqlite_path(relay.app[SETTINGS].store_url)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT watch_id FROM watches ORDER BY watch_id")]


async def delivered_watch(relay: Relay, upstream: Upstream, receiver: Receiver) -> Any:
    """A watch whose task succeeded and whose callback the receiver took."""
    await upstream.flip(TASK, "success")
    watch = await relay.register(TASK, receiver.at("/hook"))
    assert (1, 1) == await relay.step()
    return await relay.watch(watch["watchId"])


async def failed_watch(relay: Relay, upstream: Upstream, receiver: Receiver) -> Any:
    """A watch whose receiver answered 410, which ends delivery at once."""
    receiver.script("/hook", 410)
    await upstream.flip(TASK, "success")
    watch = await relay.register(TASK, receiver.at("/hook"))
    assert (1, 1) == await relay.step()
    return await relay.watch(watch["watchId"])


LiveFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_live_relay(tmp_path: Path, upstream: Upstream) -> AsyncIterator[LiveFactory]:
    """A relay whose background loops run (readiness needs them); the test never ticks it."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(**overrides: Any) -> TestClient[web.Request, web.Application]:
        settings = make_settings(tmp_path, upstream.url, **overrides)
        app = create_app(settings, registry=CollectorRegistry(), run_loops=True)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


# --- registration -------------------------------------------------------------------------------


async def test_registration_answers_201_with_location_after_commit(relay: Relay) -> None:
    """A new watch answers 201 with Location, every field, and is visible to another connection."""
    response = await post_watch(relay, {"taskId": TASK, "callbackUrl": HOOK, "metadata": {"n": 1}})

    body = await response.json()
    watch_id = body["watchId"]
    assert re.fullmatch(r"wt_[0-9a-f]{32}", watch_id)
    assert (201, "application/json", f"/watch/{watch_id}") == (
        response.status,
        response.content_type,
        response.headers["Location"],
    )
    assert {
        "watchId": watch_id,
        "taskId": TASK,
        "callbackUrl": HOOK,
        "metadata": {"n": 1},
        "state": "watching",
        "taskStatus": None,
        "polls": 0,
        "nextPollAt": iso_utc(T0),
        "deliveryAttempts": 0,
        "lastError": None,
        "createdAt": iso_utc(T0),
        "updatedAt": iso_utc(T0),
        "deadlineAt": iso_utc(T0 + WATCH_TIMEOUT_S),
    } == body
    assert [watch_id] == committed_watch_ids(relay)
    assert body == await relay.watch(watch_id)
    assert 1 == relay.sample("relay_watches_registered_total")


async def test_registering_the_same_pair_while_active_returns_the_existing_watch(
    relay: Relay,
) -> None:
    """The same taskId and callbackUrl again answers 200 with the first watch; one is registered."""
    first = await post_watch(relay, {"taskId": TASK, "callbackUrl": HOOK})
    relay.clock.advance(5)
    second = await post_watch(relay, {"taskId": TASK, "callbackUrl": HOOK})

    first_body = await first.json()
    assert (201, 200) == (first.status, second.status)
    assert first_body == await second.json()
    assert first.headers["Location"] == second.headers["Location"]
    assert ([first_body["watchId"]], None) == await page(relay)
    assert 1 == relay.sample("relay_watches_registered_total")


async def test_same_task_with_another_callback_url_is_a_second_watch_on_one_poll_stream(
    relay: Relay, upstream: Upstream
) -> None:
    """Another callbackUrl for the same task is a new watch; the task is still polled once."""
    first = await relay.register(TASK, HOOK)
    response = await post_watch(relay, {"taskId": TASK, "callbackUrl": HOOK + "2"})

    second = await response.json()
    assert 201 == response.status
    assert first["watchId"] != second["watchId"]
    assert sorted([first["watchId"], second["watchId"]]) == committed_watch_ids(relay)
    assert 2 == relay.sample("relay_watches_registered_total")
    assert 1 == await relay.poll()
    assert 1 == upstream.polls(TASK)


async def test_registering_a_delivered_pair_again_creates_a_new_watch(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """Once a watch is delivered, the same pair registers a fresh watch with 201."""
    old = await delivered_watch(relay, upstream, receiver)

    response = await post_watch(relay, {"taskId": TASK, "callbackUrl": receiver.at("/hook")})

    new = await response.json()
    assert (201, "watching") == (response.status, new["state"])
    assert old["watchId"] != new["watchId"]
    assert "delivered" == (await relay.watch(old["watchId"]))["state"]
    assert 2 == relay.sample("relay_watches_registered_total")


async def test_largest_accepted_fields_register(relay: Relay) -> None:
    """A 128-character taskId, a 2048-character URL and 4096 bytes of metadata are accepted."""
    task_id = "tk-hiapi-" + "a" * 119
    url = "http://127.0.0.1:9/" + "p" * 2029
    metadata = {"x": "m" * 4088}
    assert (128, 2048, 4096) == (len(task_id), len(url), len(orjson.dumps(metadata)))

    response = await post_watch(
        relay, {"taskId": task_id, "callbackUrl": url, "metadata": metadata}
    )

    body = await response.json()
    assert (201, task_id, url, metadata) == (
        response.status,
        body["taskId"],
        body["callbackUrl"],
        body["metadata"],
    )


async def test_body_of_exactly_64_kib_is_accepted(relay: Relay) -> None:
    """A valid body padded with whitespace to exactly 64 KiB is not too large."""
    payload = orjson.dumps({"taskId": TASK, "callbackUrl": HOOK})
    data = payload[:-1] + b" " * (MAX_BODY - len(payload)) + b"}"
    assert MAX_BODY == len(data)

    response = await post_raw(relay, data, "application/json")

    assert 201 == response.status, await response.text()


# --- registration: bad input changes nothing ----------------------------------------------------

LONG_TASK = "tk-hiapi-" + "a" * 120
LONG_URL = "http://127.0.0.1:9/" + "p" * 2030
BIG_METADATA = {"x": "m" * 4089}


@pytest.mark.parametrize(
    ("body", "field", "detail"),
    [
        pytest.param({"callbackUrl": HOOK}, "taskId", "taskId: is required", id="task-missing"),
        pytest.param(
            {"taskId": 123, "callbackUrl": HOOK},
            "taskId",
            "taskId: must be a string",
            id="task-int",
        ),
        pytest.param(
            {"taskId": None, "callbackUrl": HOOK},
            "taskId",
            "taskId: must be a string",
            id="task-null",
        ),
        pytest.param(
            {"taskId": "task-1", "callbackUrl": HOOK},
            "taskId",
            "taskId: must start with 'tk-hiapi-'",
            id="task-no-prefix",
        ),
        pytest.param(
            {"taskId": "tk-hiapi-a b", "callbackUrl": HOOK},
            "taskId",
            "taskId: may contain only letters, digits, '-' and '_' after the prefix",
            id="task-space",
        ),
        pytest.param(
            {"taskId": "tk-hiapi-a/../b", "callbackUrl": HOOK},
            "taskId",
            "taskId: may contain only letters, digits, '-' and '_' after the prefix",
            id="task-slash",
        ),
        pytest.param(
            {"taskId": "tk-hiapi-é", "callbackUrl": HOOK},
            "taskId",
            "taskId: may contain only letters, digits, '-' and '_' after the prefix",
            id="task-non-ascii",
        ),
        pytest.param(
            {"taskId": "tk-hiapi-", "callbackUrl": HOOK},
            "taskId",
            "taskId: may contain only letters, digits, '-' and '_' after the prefix",
            id="task-prefix-only",
        ),
        pytest.param(
            {"taskId": LONG_TASK, "callbackUrl": HOOK},
            "taskId",
            "taskId: must be at most 128 characters",
            id="task-129-chars",
        ),
        pytest.param({"taskId": TASK}, "callbackUrl", "callbackUrl: is required", id="url-missing"),
        pytest.param(
            {"taskId": TASK, "callbackUrl": 5},
            "callbackUrl",
            "callbackUrl: must be a string",
            id="url-int",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "/hook"},
            "callbackUrl",
            "callbackUrl must be an absolute http or https URL",
            id="url-relative",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "ftp://127.0.0.1/hook"},
            "callbackUrl",
            "callbackUrl must be an absolute http or https URL",
            id="url-ftp",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "http:///hook"},
            "callbackUrl",
            "callbackUrl has no host",
            id="url-no-host",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "http://127.0.0.1:99999/"},
            "callbackUrl",
            "callbackUrl is not a valid URL",
            id="url-bad-port",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "http://[]@/"},
            "callbackUrl",
            "callbackUrl is not a valid URL",
            id="url-yarl-index-error",  # yarl 1.25 raises IndexError here, not ValueError
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": LONG_URL},
            "callbackUrl",
            "callbackUrl is longer than 2048 characters",
            id="url-2049-chars",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "http://user:hunter2@127.0.0.1:9/hook"},
            "callbackUrl",
            "callbackUrl must not contain credentials",
            id="url-credentials",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "http://10.0.0.1/hook"},
            "callbackUrl",
            "callbackUrl resolves to 10.0.0.1, a private address, which the network policy forbids",
            id="url-private",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": "http://169.254.169.254/latest/meta-data/"},
            "callbackUrl",
            "callbackUrl resolves to 169.254.169.254, a link-local address,"
            " which the network policy forbids",
            id="url-metadata-service",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": HOOK, "metadata": ["a"]},
            "metadata",
            "metadata: must be a JSON object",
            id="metadata-array",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": HOOK, "metadata": "a"},
            "metadata",
            "metadata: must be a JSON object",
            id="metadata-string",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": HOOK, "metadata": BIG_METADATA},
            "metadata",
            "metadata: must be at most 4096 bytes as JSON",
            id="metadata-4097-bytes",
        ),
        pytest.param(
            {"taskId": TASK, "callbackUrl": HOOK, "priority": 1},
            "priority",
            "priority: is not a field of a watch (taskId, callbackUrl, metadata)",
            id="unknown-field",
        ),
    ],
)
async def test_invalid_field_answers_422_naming_it_and_changes_nothing(
    relay: Relay, body: dict[str, Any], field: str, detail: str
) -> None:
    """Each bad field answers 422 problem+json naming that field, and no watch appears."""
    response = await post_watch(relay, body)

    assert invalid(detail, field) == await answer(response)
    await assert_no_watch(relay)


async def test_credentials_in_callback_url_are_never_echoed(relay: Relay) -> None:
    """The 422 for a URL with credentials does not repeat the password."""
    response = await post_watch(
        relay, {"taskId": TASK, "callbackUrl": "http://user:hunter2@127.0.0.1:9/hook"}
    )

    assert 422 == response.status
    assert "hunter2" not in await response.text()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[]", id="array"),
        pytest.param(orjson.dumps([{"taskId": TASK, "callbackUrl": HOOK}]), id="array-of-watch"),
        pytest.param(b'"tk-hiapi-x"', id="string"),
        pytest.param(b"null", id="null"),
    ],
)
async def test_json_that_is_not_an_object_answers_422_and_changes_nothing(
    relay: Relay, data: bytes
) -> None:
    """A body that is JSON but not an object answers 422 (no single field is to blame)."""
    response = await post_raw(relay, data, "application/json")

    assert (
        422,
        PROBLEM_CONTENT_TYPE,
        problem(422, "invalid-body", "the body must be a JSON object", "/watch"),
    ) == await answer(response)
    await assert_no_watch(relay)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b'{"taskId": }', id="missing-value"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"taskId=tk-hiapi-1", id="form-encoded"),
    ],
)
async def test_body_that_is_not_json_answers_400_and_changes_nothing(
    relay: Relay, data: bytes
) -> None:
    """A body that does not parse as JSON answers 400 problem+json."""
    response = await post_raw(relay, data, "application/json")

    detail = f"the body is not valid JSON: {json_error(data)}"
    assert (400, PROBLEM_CONTENT_TYPE, problem(400, "bad-json", detail, "/watch")) == await answer(
        response
    )
    await assert_no_watch(relay)


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain", id="text"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param("application/merge-patch+json", id="other-json"),
        pytest.param(None, id="unset"),
    ],
)
async def test_wrong_content_type_answers_415_and_changes_nothing(
    relay: Relay, content_type: str | None
) -> None:
    """A valid watch sent without Content-Type: application/json answers 415."""
    response = await post_raw(
        relay, orjson.dumps({"taskId": TASK, "callbackUrl": HOOK}), content_type
    )

    assert (
        415,
        PROBLEM_CONTENT_TYPE,
        problem(
            415,
            "content-type",
            "the body must be JSON with Content-Type: application/json",
            "/watch",
        ),
    ) == await answer(response)
    await assert_no_watch(relay)


def oversized_body() -> bytes:
    """A valid watch padded with whitespace to one byte over 64 KiB."""
    payload = orjson.dumps({"taskId": TASK, "callbackUrl": HOOK})
    return payload[:-1] + b" " * (MAX_BODY + 1 - len(payload)) + b"}"


async def test_body_over_64_kib_answers_413_and_changes_nothing(relay: Relay) -> None:
    """A body one byte over 64 KiB, announced by Content-Length, answers 413."""
    response = await post_raw(relay, oversized_body(), "application/json")

    assert (
        413,
        PROBLEM_CONTENT_TYPE,
        problem(413, "too-large", "the body is over 65536 bytes", "/watch"),
    ) == await answer(response)
    await assert_no_watch(relay)


async def test_chunked_body_over_64_kib_answers_413_and_changes_nothing(relay: Relay) -> None:
    """A body over 64 KiB without Content-Length is cut off while read and answers 413."""
    data = oversized_body()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 16 * 1024):
            yield data[start : start + 16 * 1024]

    response = await relay.client.post(
        "/watch", data=chunks(), headers={"Content-Type": "application/json"}
    )

    assert (
        413,
        PROBLEM_CONTENT_TYPE,
        problem(413, "too-large", "the body is over 65536 bytes", "/watch"),
    ) == await answer(response)
    await assert_no_watch(relay)


async def test_deeply_nested_metadata_answers_422_naming_metadata(relay: Relay) -> None:
    """Metadata nested 300 deep (under 4 KiB) answers 422 naming metadata, not 500."""
    nested = b"[" * 300 + b"]" * 300
    data = b'{"taskId": "tk-hiapi-api-1", "callbackUrl": "' + HOOK.encode()
    data += b'", "metadata": {"a": ' + nested + b"}}"

    response = await post_raw(relay, data, "application/json")

    assert (422, PROBLEM_CONTENT_TYPE, "metadata") == (
        response.status,
        response.content_type,
        (await response.json(content_type=None))["errors"][0]["field"],
    )


# --- SSRF at registration -----------------------------------------------------------------------


def forbidden(address: str) -> str:
    # str() of ::ffff:127.0.0.1 differs across Python versions, so format it as the relay does.
    return (
        f"callbackUrl resolves to {ipaddress.ip_address(address)}, a loopback address,"
        " which the network policy forbids"
    )


def legacy(host: str) -> str:
    return (
        f"callbackUrl host {host!r} is a legacy numeric form of 127.0.0.1;"
        " write IPv4 addresses as four decimal octets"
    )


@pytest.mark.parametrize(
    ("url", "details"),
    [
        pytest.param("http://127.0.0.1/", {forbidden("127.0.0.1")}, id="dotted"),
        pytest.param("http://127.1/", {legacy("127.1")}, id="short"),
        pytest.param("http://2130706433/", {legacy("2130706433")}, id="decimal"),
        pytest.param("http://0x7f000001/", {legacy("0x7f000001")}, id="hex"),
        pytest.param("http://0177.0.0.1/", {legacy("0177.0.0.1")}, id="octal"),
        pytest.param("http://[::1]/", {forbidden("::1")}, id="ipv6"),
        pytest.param("http://[::ffff:127.0.0.1]/", {forbidden("::ffff:127.0.0.1")}, id="mapped"),
        pytest.param(
            "http://localhost/",
            {
                "callbackUrl host 'localhost' resolves to a loopback address,"
                " which the network policy forbids"
            },
            id="localhost",
        ),
    ],
)
async def test_loopback_callback_is_refused_when_loopback_is_not_allowed(
    make_relay: RelayFactory, url: str, details: set[str]
) -> None:
    """Every spelling of loopback answers 422 naming callbackUrl, and no watch appears."""
    relay = await make_relay(callback_allow_nets=())

    response = await post_watch(relay, {"taskId": TASK, "callbackUrl": url})

    status, content_type, body = await answer(response)
    assert body["detail"] in details
    assert invalid(body["detail"], "callbackUrl") == (status, content_type, body)
    await assert_no_watch(relay)


# --- reading watches ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "watch_id",
    [
        pytest.param(UNKNOWN_ID, id="well-formed"),
        pytest.param("nope", id="word"),
        pytest.param("wt_" + "0" * 31, id="short"),
        pytest.param("wt_" + "0" * 33, id="long"),
        pytest.param("wt_" + "A" * 32, id="upper-hex"),
        pytest.param("WT_" + "0" * 32, id="upper-prefix"),
    ],
)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        pytest.param("GET", "", id="get"),
        pytest.param("DELETE", "", id="delete"),
        pytest.param("POST", "/redeliver", id="redeliver"),
    ],
)
async def test_unknown_or_malformed_watch_id_answers_404(
    relay: Relay, watch_id: str, method: str, suffix: str
) -> None:
    """Any id that names no watch answers 404 problem+json, whatever its shape."""
    await relay.register(TASK, HOOK)
    path = f"/watch/{watch_id}{suffix}"

    response = await relay.client.request(method, path)

    assert (
        404,
        PROBLEM_CONTENT_TYPE,
        problem(404, "unknown-watch", "no watch has this id", path),
    ) == await answer(response)
    assert {**dict.fromkeys(WatchState, 0), WatchState.WATCHING: 1} == (
        await relay.store.count_by_state()
    )


# --- listing ------------------------------------------------------------------------------------


async def test_listing_walks_five_watches_in_pages_of_two_in_creation_order(relay: Relay) -> None:
    """limit=2 over five watches gives three pages in creation order, none repeated."""
    ids = []
    for n in range(5):
        ids.append((await relay.register(TASK, f"{HOOK}{n}"))["watchId"])
        relay.clock.advance(1)

    first = await page(relay, "?limit=2")
    second = await page(relay, f"?limit=2&cursor={first[1]}")
    third = await page(relay, f"?limit=2&cursor={second[1]}")

    assert [(ids[0:2], ids[1]), (ids[2:4], ids[3]), (ids[4:], None)] == [first, second, third]


async def test_listing_watches_registered_in_one_millisecond_has_no_repeats_or_gaps(
    relay: Relay,
) -> None:
    """Watches created at the same instant still page completely, in id order."""
    ids = [(await relay.register(TASK, f"{HOOK}{n}"))["watchId"] for n in range(5)]

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(3):
        query = "?limit=2" if cursor is None else f"?limit=2&cursor={cursor}"
        batch, cursor = await page(relay, query)
        seen += batch

    assert (sorted(ids), None) == (seen, cursor)


async def test_listing_filters_by_state_and_task_id(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """state= and taskId= narrow the listing, alone and together."""
    await upstream.flip(TASK, "queued")
    await upstream.flip(OTHER_TASK, "success")
    watching = (await relay.register(TASK, receiver.at("/a1")))["watchId"]
    relay.clock.advance(1)
    cancelled = (await relay.register(TASK, receiver.at("/a2")))["watchId"]
    relay.clock.advance(1)
    delivered = (await relay.register(OTHER_TASK, receiver.at("/b1")))["watchId"]
    assert (2, 1) == await relay.step()
    assert 204 == (await relay.client.delete(f"/watch/{cancelled}")).status

    expected = {
        "": [watching, cancelled, delivered],
        "?state=watching": [watching],
        "?state=delivering": [],
        "?state=delivered": [delivered],
        "?state=cancelled": [cancelled],
        "?state=failed": [],
        f"?taskId={TASK}": [watching, cancelled],
        f"?taskId={OTHER_TASK}": [delivered],
        f"?taskId={TASK}&state=cancelled": [cancelled],
        f"?taskId={OTHER_TASK}&state=watching": [],
        "?taskId=tk-hiapi-nobody": [],
    }
    assert expected == {query: (await page(relay, query))[0] for query in expected}


@pytest.mark.parametrize(
    ("query", "field", "detail"),
    [
        pytest.param(
            "state=done",
            "state",
            "state: must be one of watching, delivering, delivered, failed, cancelled",
            id="state-unknown",
        ),
        pytest.param(
            "state=",
            "state",
            "state: must be one of watching, delivering, delivered, failed, cancelled",
            id="state-empty",
        ),
        pytest.param(
            "limit=0", "limit", "limit: must be an integer from 1 to 1000", id="limit-zero"
        ),
        pytest.param(
            "limit=1001", "limit", "limit: must be an integer from 1 to 1000", id="limit-over"
        ),
        pytest.param(
            "limit=-1", "limit", "limit: must be an integer from 1 to 1000", id="limit-negative"
        ),
        pytest.param(
            "limit=two", "limit", "limit: must be an integer from 1 to 1000", id="limit-word"
        ),
        pytest.param(
            "limit=2.5", "limit", "limit: must be an integer from 1 to 1000", id="limit-float"
        ),
        pytest.param(
            "limit=", "limit", "limit: must be an integer from 1 to 1000", id="limit-empty"
        ),
        pytest.param(
            "cursor=abc", "cursor", "cursor: is not a cursor this API returned", id="cursor-junk"
        ),
        pytest.param(
            "cursor=" + "wt_" + "0" * 31,
            "cursor",
            "cursor: is not a cursor this API returned",
            id="cursor-short",
        ),
        pytest.param(
            "taskId=task-1", "taskId", "taskId: must start with 'tk-hiapi-'", id="task-no-prefix"
        ),
        pytest.param(
            "sort=asc",
            "sort",
            "sort: is not a query parameter (state, taskId, limit, cursor)",
            id="unknown-param",
        ),
    ],
)
async def test_bad_listing_query_answers_422_naming_the_parameter(
    relay: Relay, query: str, field: str, detail: str
) -> None:
    """Each bad query parameter answers 422 problem+json naming it."""
    response = await relay.client.get(f"/watches?{query}")

    assert invalid(detail, field, "/watches") == await answer(response)
    await assert_no_watch(relay)


async def test_limit_of_a_superscript_digit_answers_422(relay: Relay) -> None:
    """limit=² is not an integer: 422 naming limit, not a 500."""
    response = await relay.client.get("/watches?limit=%C2%B2")

    assert invalid("limit: must be an integer from 1 to 1000", "limit", "/watches") == (
        await answer(response)
    )


# --- cancellation -------------------------------------------------------------------------------


async def test_cancelled_watch_reads_cancelled_and_gets_no_callback(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """DELETE answers 204; the watch reads cancelled and its task's end sends nothing."""
    watch = await relay.register(TASK, receiver.at("/hook"))
    now = relay.clock.advance(5)

    response = await relay.client.delete(f"/watch/{watch['watchId']}")

    assert (204, b"") == (response.status, await response.read())
    assert {
        **watch,
        "state": "cancelled",
        "nextPollAt": None,
        "updatedAt": iso_utc(now),
    } == await relay.watch(watch["watchId"])
    await upstream.flip(TASK, "success")
    assert (0, 0) == await relay.step(advance=60)
    assert ([], 0) == (receiver.requests, upstream.polls(TASK))
    assert 1 == relay.sample("relay_watches_finished_total", {"result": "cancelled"})


async def test_two_deletes_at_once_count_one_cancelled_watch(relay: Relay) -> None:
    """Both answer 204; the watch ended once, so it counts once."""
    watch = await relay.register(TASK, "http://127.0.0.1:9/hook")
    statuses = await asyncio.gather(
        *(relay.client.delete(f"/watch/{watch['watchId']}") for _ in range(2))
    )
    assert [204, 204] == [r.status for r in statuses]
    assert 1 == relay.sample("relay_watches_finished_total", {"result": "cancelled"})


async def test_cancelling_a_cancelled_watch_answers_204_again(relay: Relay) -> None:
    """A second DELETE is a no-op 204; the watch is counted as cancelled once."""
    watch = await relay.register(TASK, HOOK)
    assert 204 == (await relay.client.delete(f"/watch/{watch['watchId']}")).status
    before = await relay.watch(watch["watchId"])
    relay.clock.advance(5)

    response = await relay.client.delete(f"/watch/{watch['watchId']}")

    assert (204, b"") == (response.status, await response.read())
    assert before == await relay.watch(watch["watchId"])
    assert 1 == relay.sample("relay_watches_finished_total", {"result": "cancelled"})


@pytest.mark.parametrize(
    ("make_watch", "state"),
    [
        pytest.param(delivered_watch, "delivered", id="delivered"),
        pytest.param(failed_watch, "failed", id="failed"),
    ],
)
async def test_cancelling_a_finished_watch_answers_409_and_changes_nothing(
    relay: Relay,
    upstream: Upstream,
    receiver: Receiver,
    make_watch: Callable[[Relay, Upstream, Receiver], Awaitable[Any]],
    state: str,
) -> None:
    """A delivered or failed watch cannot be cancelled; it stays as it was."""
    watch = await make_watch(relay, upstream, receiver)
    assert state == watch["state"]
    relay.clock.advance(5)
    path = f"/watch/{watch['watchId']}"

    response = await relay.client.delete(path)

    assert (
        409,
        PROBLEM_CONTENT_TYPE,
        problem(409, "conflict", f"cannot cancel: the watch is already {state}", path),
    ) == await answer(response)
    assert watch == await relay.watch(watch["watchId"])
    assert 0 == relay.sample("relay_watches_finished_total", {"result": "cancelled"})


# --- redelivery ---------------------------------------------------------------------------------


async def test_redelivering_a_delivered_watch_sends_the_same_message_again(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """Redeliver answers 202 and the callback arrives again with the same webhook-id and body."""
    watch = await delivered_watch(relay, upstream, receiver)
    now = relay.clock.advance(30)

    response = await relay.client.post(f"/watch/{watch['watchId']}/redeliver")

    assert (
        202,
        "application/json",
        {**watch, "state": "delivering", "deliveryAttempts": 0, "updatedAt": iso_utc(now)},
    ) == await answer(response)
    assert 1 == await relay.deliver()
    first, second = receiver.requests
    expected_id = f"msg_{watch['watchId']}"
    assert (expected_id, expected_id) == (first.headers["webhook-id"], second.headers["webhook-id"])
    assert first.body == second.body
    assert ("delivered", 1) == progress(await relay.watch(watch["watchId"]))


async def test_redelivering_a_failed_watch_delivers_it(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """A failed watch can be redelivered; the new attempt keeps the webhook-id and succeeds."""
    watch = await failed_watch(relay, upstream, receiver)
    assert ("failed", 1, "HTTP 410") == (
        watch["state"],
        watch["deliveryAttempts"],
        watch["lastError"],
    )

    response = await relay.client.post(f"/watch/{watch['watchId']}/redeliver")

    body = await response.json()
    assert (202, "delivering", 0, None) == (response.status, *progress(body), body["lastError"])
    assert 1 == await relay.deliver()
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert ("delivered", 1) == progress(await relay.watch(watch["watchId"]))


@pytest.mark.parametrize("cancel", [False, True], ids=["watching", "cancelled"])
async def test_redelivering_an_unfinished_or_cancelled_watch_answers_409_and_sends_nothing(
    relay: Relay, receiver: Receiver, cancel: bool
) -> None:
    """Only delivered or failed watches can be redelivered; others stay as they were."""
    watch = await relay.register(TASK, receiver.at("/hook"))
    if cancel:
        assert 204 == (await relay.client.delete(f"/watch/{watch['watchId']}")).status
    before = await relay.watch(watch["watchId"])
    relay.clock.advance(5)
    path = f"/watch/{watch['watchId']}/redeliver"

    response = await relay.client.post(path)

    detail = (
        "cannot redeliver: only a delivered or failed watch can be redelivered;"
        f" this one is {before['state']}"
    )
    assert (409, PROBLEM_CONTENT_TYPE, problem(409, "conflict", detail, path)) == await answer(
        response
    )
    assert before == await relay.watch(watch["watchId"])
    assert (0, []) == (await relay.deliver(), receiver.requests)


async def test_redelivering_a_delivered_watch_after_the_pair_was_registered_again(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """A delivered watch can be redelivered even when its pair has a newer active watch."""
    old = await delivered_watch(relay, upstream, receiver)
    await relay.register(TASK, receiver.at("/hook"))

    response = await relay.client.post(f"/watch/{old['watchId']}/redeliver")

    assert 202 == response.status, await response.text()


# --- routing errors -----------------------------------------------------------------------------


async def test_unknown_route_answers_404_problem(relay: Relay) -> None:
    """A path the API does not have answers 404 problem+json."""
    response = await relay.client.get("/tasks")

    assert (
        404,
        PROBLEM_CONTENT_TYPE,
        problem(404, "not-found", "Not Found", "/tasks"),
    ) == await answer(response)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        pytest.param("GET", "/watch", "POST", id="get-watch"),
        pytest.param("PUT", f"/watch/{UNKNOWN_ID}", "DELETE,GET,HEAD", id="put-watch-id"),
        pytest.param("DELETE", "/watches", "GET,HEAD", id="delete-watches"),
        pytest.param("GET", f"/watch/{UNKNOWN_ID}/redeliver", "POST", id="get-redeliver"),
    ],
)
async def test_wrong_method_answers_405_problem_with_allow(
    relay: Relay, method: str, path: str, allow: str
) -> None:
    """A known path with a method it does not take answers 405 problem+json and Allow."""
    response = await relay.client.request(method, path)

    assert (
        405,
        PROBLEM_CONTENT_TYPE,
        problem(405, "method-not-allowed", "Method Not Allowed", path),
        allow,
    ) == (*(await answer(response)), response.headers["Allow"])
    await assert_no_watch(relay)


# --- token auth ---------------------------------------------------------------------------------


def unauthorized(instance: str) -> dict[str, Any]:
    return problem(
        401,
        "unauthorized",
        "a valid bearer token is required (Authorization: Bearer <token>)",
        instance,
    )


def leaks_token(response: ClientResponse, text: str) -> bool:
    shown = text + "".join(f"{k}: {v}" for k, v in response.headers.items())
    return any(token in shown for token in (TOKEN_ONE, TOKEN_TWO))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer tok-wrong-000000000"}, id="wrong"),
        pytest.param({"Authorization": "Bearer tok-one"}, id="prefix-of-token"),
        pytest.param({"Authorization": "Bearer"}, id="empty"),
        pytest.param({"Authorization": f"Basic {TOKEN_ONE}"}, id="basic-scheme"),
        pytest.param({"Authorization": f"Token {TOKEN_ONE}"}, id="token-scheme"),
        pytest.param({"Authorization": TOKEN_ONE}, id="no-scheme"),
        pytest.param({"X-Api-Key": TOKEN_ONE}, id="other-header"),
    ],
)
async def test_registration_without_a_valid_bearer_token_answers_401_and_changes_nothing(
    make_relay: RelayFactory, headers: dict[str, str]
) -> None:
    """A missing, wrong or wrongly-schemed token answers 401, names no token, registers nothing."""
    relay = await make_relay(api_tokens=TOKENS)

    response = await post_watch(relay, {"taskId": TASK, "callbackUrl": HOOK}, headers)

    text = await response.text()
    assert (401, PROBLEM_CONTENT_TYPE, unauthorized("/watch"), 'Bearer realm="relay"') == (
        *(await answer(response)),
        response.headers["WWW-Authenticate"],
    )
    assert not leaks_token(response, text)
    await assert_no_watch(relay, auth(TOKEN_ONE))


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        pytest.param("GET", "", id="get"),
        pytest.param("DELETE", "", id="delete"),
        pytest.param("POST", "/redeliver", id="redeliver"),
    ],
)
async def test_watch_routes_without_a_token_answer_401_and_change_nothing(
    make_relay: RelayFactory, method: str, suffix: str
) -> None:
    """Reading, cancelling or redelivering a watch needs a token; without one it stays as it was."""
    relay = await make_relay(api_tokens=TOKENS)
    created = await post_watch(relay, {"taskId": TASK, "callbackUrl": HOOK}, auth(TOKEN_ONE))
    watch = await created.json()
    path = f"/watch/{watch['watchId']}{suffix}"

    response = await relay.client.request(method, path, headers={"Authorization": "Bearer no"})

    assert (401, PROBLEM_CONTENT_TYPE, unauthorized(path)) == await answer(response)
    after = await relay.client.get(f"/watch/{watch['watchId']}", headers=auth(TOKEN_TWO))
    assert watch == await after.json()


async def test_listing_without_a_token_answers_401(make_relay: RelayFactory) -> None:
    """GET /watches needs a token too."""
    relay = await make_relay(api_tokens=TOKENS)

    response = await relay.client.get("/watches")

    assert (401, PROBLEM_CONTENT_TYPE, unauthorized("/watches")) == await answer(response)


@pytest.mark.parametrize("token", [TOKEN_ONE, TOKEN_TWO], ids=["first", "second"])
async def test_either_configured_token_is_accepted(make_relay: RelayFactory, token: str) -> None:
    """Each configured token registers, reads and lists watches."""
    relay = await make_relay(api_tokens=TOKENS)

    created = await post_watch(relay, {"taskId": TASK, "callbackUrl": HOOK}, auth(token))
    watch = await created.json()
    read = await relay.client.get(f"/watch/{watch['watchId']}", headers=auth(token))

    assert (201, 200, watch) == (created.status, read.status, await read.json())
    assert ([watch["watchId"]], None) == await page(relay, headers=auth(token))


async def test_bearer_scheme_is_case_insensitive(make_relay: RelayFactory) -> None:
    """`bearer <token>` is the same scheme as `Bearer <token>` (RFC 9110 section 11.1)."""
    relay = await make_relay(api_tokens=TOKENS)

    response = await relay.client.get("/watches", headers={"Authorization": f"bearer {TOKEN_TWO}"})

    assert 200 == response.status


async def test_health_and_metrics_stay_open_when_tokens_are_set(
    make_live_relay: LiveFactory,
) -> None:
    """/healthz, /readyz and /metrics answer without a token."""
    client = await make_live_relay(api_tokens=TOKENS)

    statuses = [(await client.get(path)).status for path in ("/healthz", "/readyz", "/metrics")]

    assert [200, 200, 200] == statuses


# --- health and metrics -------------------------------------------------------------------------


async def test_healthz_answers_ok(relay: Relay) -> None:
    """/healthz answers 200 while the process serves."""
    response = await relay.client.get("/healthz")

    assert (200, "application/json", {"status": "ok"}) == await answer(response)


async def test_readyz_answers_ready_when_store_and_loops_run(make_live_relay: LiveFactory) -> None:
    """/readyz answers 200 when the store answers and both loops are running."""
    client = await make_live_relay()

    response = await client.get("/readyz")

    assert (
        200,
        "application/json",
        {"status": "ready", "checks": {"store": "ok", "loops": "ok"}},
    ) == await answer(response)


async def test_readyz_answers_503_when_loops_do_not_run(relay: Relay) -> None:
    """/readyz answers 503 naming the loops when they are not running."""
    response = await relay.client.get("/readyz")

    assert (
        503,
        "application/json",
        {"status": "not ready", "checks": {"store": "ok", "loops": "stopped"}},
    ) == await answer(response)


async def test_metrics_expose_the_contract_families_with_outcomes_precreated(
    relay: Relay,
) -> None:
    """/metrics parses as Prometheus text with every contract family, outcome and process metric."""
    response = await relay.client.get("/metrics")

    assert 200 == response.status
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    assert CONTRACT_FAMILIES == {
        name: families[name].type for name in CONTRACT_FAMILIES if name in families
    }
    polls = families["relay_upstream_polls"].samples
    durations = families["relay_upstream_poll_duration_seconds"].samples
    assert (POLL_OUTCOMES, POLL_OUTCOMES) == (
        {s.labels["outcome"] for s in polls if s.name == "relay_upstream_polls_total"},
        {
            s.labels["outcome"]
            for s in durations
            if s.name == "relay_upstream_poll_duration_seconds_count"
        },
    )
    samples = {s.name for family in families.values() for s in family.samples}
    assert {"process_cpu_seconds_total", "relay_watches_registered_total"} <= samples


# --- what every request goes through ------------------------------------------------------------


def http_count(relay: Relay, route: str, method: str, code: int) -> float:
    labels = {"route": route, "method": method, "code": str(code)}
    return relay.sample("relay_http_requests_total", labels) or 0.0


async def test_metrics_pick_families_by_name_and_gzip_when_accepted(relay: Relay) -> None:
    """What prometheus_client's own handler does: `name[]` filters, gzip when accepted."""
    await relay.register("tk-hiapi-m1", "http://127.0.0.1:9/hook")
    response = await relay.client.get(
        "/metrics",
        params=[("name[]", "relay_watches_registered_total")],
        headers={"Accept-Encoding": "gzip"},
    )
    assert 200 == response.status
    assert "gzip" == response.headers["Content-Encoding"]
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = [line for line in (await response.text()).splitlines() if not line.startswith("#")]
    assert ["relay_watches_registered_total 1.0"] == samples


async def test_a_crashing_handler_answers_500_revealing_nothing_logs_it_and_counts_it(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(watch_id: str) -> None:
        raise RuntimeError("internal detail that must not leave the relay")

    monkeypatch.setattr(relay.store, "get_watch", broken)
    with caplog.at_level(logging.ERROR, logger="relay.api"):
        response = await relay.client.get(f"/watch/{UNKNOWN_ID}")

    expected = problem(
        500, "internal", "the relay failed to handle this request", f"/watch/{UNKNOWN_ID}"
    )
    assert (500, PROBLEM_CONTENT_TYPE, expected) == await answer(response)
    crashes = [r for r in caplog.records if r.getMessage() == "request_crashed"]
    assert 1 == len(crashes)
    assert crashes[0].exc_info is not None
    assert isinstance(crashes[0].exc_info[1], RuntimeError)
    assert 1 == http_count(relay, "/watch/{watch_id}", "GET", 500)


async def test_every_answer_is_counted_by_route_method_and_code(make_relay: RelayFactory) -> None:
    """201, 200, 401, 404, 405 and 422, each under its route; no route matched is `unmatched`."""
    relay = await make_relay(api_tokens=TOKENS)
    ok = auth(TOKEN_ONE)
    body = {"taskId": TASK, "callbackUrl": HOOK}

    assert 201 == (await post_watch(relay, body, headers=ok)).status
    assert 200 == (await post_watch(relay, body, headers=ok)).status
    other = {"taskId": f"{TASK}-other", "callbackUrl": HOOK}
    assert 201 == (await post_watch(relay, other, headers=ok)).status  # the same series again
    assert 401 == (await post_watch(relay, body)).status
    assert 422 == (await post_watch(relay, {"taskId": 7}, headers=ok)).status
    assert 404 == (await relay.client.get(f"/watch/{UNKNOWN_ID}", headers=ok)).status
    assert 404 == (await relay.client.get("/nowhere")).status
    assert 405 == (await relay.client.put("/watch", headers=ok)).status

    expected = {
        ("/watch", "POST", 201): 2,
        ("/watch", "POST", 200): 1,
        ("/watch", "POST", 401): 1,
        ("/watch", "POST", 422): 1,
        ("/watch/{watch_id}", "GET", 404): 1,
        ("unmatched", "GET", 404): 1,
        ("unmatched", "PUT", 405): 1,
    }
    assert expected == {key: http_count(relay, *key) for key in expected}
    timed = relay.sample(
        "relay_http_request_duration_seconds_count", {"route": "/watch", "method": "POST"}
    )
    assert 5 == timed  # every POST /watch above, whatever its code


# --- bytes no client should send ------------------------------------------------------------


async def test_a_bearer_token_that_is_not_utf8_is_refused_as_unauthorized(
    make_relay: RelayFactory,
) -> None:
    """A raw 0xff in the token: 401 like any wrong token, not a crash."""
    relay = await make_relay(api_tokens=TOKENS)
    port = relay.client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /watches HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer tok\xff\r\n"
        b"Connection: close\r\n\r\n"
    )
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert b"401" == status_line.split()[1]


async def test_a_body_that_does_not_decode_as_its_content_encoding_is_a_400(
    relay: Relay,
) -> None:
    response = await relay.client.post(
        "/watch",
        data=b"not gzip at all",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert (400, "bad-encoding") == (response.status, (await response.json())["type"].split("#")[1])
    await assert_no_watch(relay)


def test_the_method_label_is_bounded_whatever_the_client_sends() -> None:
    assert ("GET", "PROPFIND", "other", "other") == tuple(
        method_label(m) for m in ("GET", "PROPFIND", "M00000", "get")
    )


# --- stopping -------------------------------------------------------------------------------------


async def test_the_loops_stop_claiming_when_the_shutdown_begins_not_after_the_requests(
    make_live_relay: LiveFactory,
) -> None:
    """aiohttp's shutdown waits for open requests before its cleanup; the loops' drain starts
    with that wait and shares its RELAY_SHUTDOWN_TIMEOUT_S, instead of following it."""
    client = await make_live_relay()
    app = client.server.app
    assert app is not None
    assert not app[STOPPING].is_set()

    await app.shutdown()  # what aiohttp does first on SIGTERM

    assert app[STOPPING].is_set()


def test_the_drain_gets_what_is_left_of_the_shutdown_timeout() -> None:
    assert (20.0, 12.5, 0.0) == (
        drain_budget(20.0, None, 100.0),
        drain_budget(20.0, 100.0, 107.5),
        drain_budget(20.0, 100.0, 130.0),
    )
