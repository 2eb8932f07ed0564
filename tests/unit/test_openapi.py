"""relay/openapi.json: a valid OpenAPI 3.1 document that says what the code does, served as is.

tests/faults/test_fuzz.py checks the answers against it; these check the document's own claims
against the router, the limits in relay/api.py, the records the handlers send and docs/api.md.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from relay import __version__, api
from relay.app import create_app
from relay.config import Secret, Settings
from relay.delivery import callback_body
from relay.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE
from relay.models import DeliveryJob, EventType, Watch, WatchState

RAW = resources.files("relay").joinpath("openapi.json").read_bytes()
DOC: dict[str, Any] = orjson.loads(RAW)
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
API_DOC = Path(__file__).parents[2] / "docs" / "api.md"


def operations() -> set[tuple[str, str]]:
    """(METHOD, path) for every operation in the document, path parameters written `{}`."""
    return {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
        for path, item in DOC["paths"].items()
        for method in item
        if method in METHODS
    }


def routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(METHOD, path) for every route the app registers, path parameters written `{}`."""
    app = create_app(Settings(store_url=f"sqlite:///{tmp_path / 'r.db'}"))
    return {
        (route.method, re.sub(r"\{[^}]+\}", "{}", route.resource.canonical))
        for route in app.router.routes()
        if route.resource is not None
    }


def problem_types(node: Any) -> set[str]:
    """Every problem `type` the document's responses enumerate."""
    found: set[str] = set()
    if isinstance(node, dict):
        enum = node.get("properties", {}).get("type", {}).get("enum", [])
        found.update(value for value in enum if str(value).startswith(PROBLEM_BASE))
        for value in node.values():
            found |= problem_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= problem_types(value)
    return found


def test_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    validate(DOC)

    assert (DOC["openapi"], DOC["info"]["version"]) == ("3.1.0", __version__)


def test_every_route_is_documented_and_every_operation_is_routed(tmp_path: Path) -> None:
    """The router and the document list the same operations; HEAD is aiohttp's, for each GET."""
    registered = routes(tmp_path)
    heads = {path for method, path in registered if method == "HEAD"}
    gets = {path for method, path in registered if method == "GET"}

    assert operations() == {(method, path) for method, path in registered if method != "HEAD"}
    assert gets == heads


def test_every_error_response_is_a_problem() -> None:
    """Each 4xx and 5xx answers application/problem+json, /readyz's status report aside."""
    responses = DOC["components"]["responses"]
    not_problems = []
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            for status, entry in operation["responses"].items():
                response = responses[entry["$ref"].rsplit("/", 1)[1]] if "$ref" in entry else entry
                if int(status) >= 400 and set(response["content"]) != {PROBLEM_CONTENT_TYPE}:
                    not_problems.append(f"{method.upper()} {path} {status}")

    assert ["GET /readyz 503"] == not_problems


def test_every_documented_problem_type_has_a_section_in_docs_api_md() -> None:
    """A problem's `type` links to a heading of docs/api.md that exists."""
    sections = set(re.findall(r"^## (\S+)$", API_DOC.read_text(), re.MULTILINE))

    documented = {kind.removeprefix(PROBLEM_BASE) for kind in problem_types(DOC)}

    assert set() == documented - sections
    assert {"unknown-watch", "invalid-field", "store-unavailable", "internal"} <= documented


def test_document_limits_are_the_codes_limits() -> None:
    """Lengths, page sizes, states and event types come from the same numbers as the handlers."""
    request = SCHEMAS["WatchRequest"]
    listing = {p["name"]: p["schema"] for p in DOC["paths"]["/watches"]["get"]["parameters"]}

    assert (
        api.MAX_TASK_ID_LENGTH,
        api.MAX_URL_LENGTH,
        {"taskId", "callbackUrl", "metadata"},
        [s.value for s in WatchState],
        (1, api.MAX_PAGE, api.DEFAULT_PAGE),
        [e.value for e in EventType],
    ) == (
        SCHEMAS["TaskId"]["maxLength"],
        request["properties"]["callbackUrl"]["maxLength"],
        set(request["properties"]),
        SCHEMAS["WatchState"]["enum"],
        (listing["limit"]["minimum"], listing["limit"]["maximum"], listing["limit"]["default"]),
        SCHEMAS["CallbackEvent"]["properties"]["type"]["enum"],
    )
    assert False is request["additionalProperties"]


def test_watch_and_callback_schemas_name_exactly_the_fields_sent() -> None:
    """The Watch and CallbackEvent schemas require every key the relay writes, and no other."""
    watch = Watch(
        watch_id="wt_" + "0" * 32, task_id="tk-hiapi-1", callback_url="http://example.com/",
        metadata=None, state=WatchState.WATCHING, task_status=None, polls=0, next_poll_at=None,
        delivery_attempts=0, last_error=None, created_at=0.0, updated_at=0.0, deadline_at=0.0,
    )  # fmt: skip
    job = DeliveryJob(
        watch_id=watch.watch_id, task_id=watch.task_id, callback_url=watch.callback_url,
        metadata=None, event_type=EventType.SUCCESS, task_data={}, event_at=0.0, attempts=0,
        due_at=0.0,
        lease_until=60.0,
    )  # fmt: skip
    event = orjson.loads(callback_body(job))
    event_schema = SCHEMAS["CallbackEvent"]

    assert (set(api.watch_json(watch)), set(event), set(event["data"])) == (
        set(SCHEMAS["Watch"]["required"]),
        set(event_schema["required"]),
        set(event_schema["properties"]["data"]["required"]),
    )


async def test_openapi_json_serves_the_packaged_document_without_a_token(tmp_path: Path) -> None:
    """GET /openapi.json answers the packaged file byte for byte, even when tokens are set."""
    settings = Settings(
        store_url=f"sqlite:///{tmp_path / 'r.db'}", api_tokens=(Secret("tok-openapi-1"),)
    )
    app = create_app(settings, registry=CollectorRegistry(), run_loops=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        response = await client.get("/openapi.json")

        assert (200, "application/json", RAW) == (
            response.status,
            response.content_type,
            await response.read(),
        )
