"""Schemathesis against a running relay, driven by relay/openapi.json: no 5xx, no crash, every error
a problem+json, every answer (status, content type, headers, body) as the document says. Bounded
and derandomized, so every run sends the same requests.

The relay runs in this process, served from an event loop on a thread of its own (schemathesis
calls it with blocking `requests`), on a SQLite file, with its loops running so /readyz is 200.
Its upstream is a closed loopback port, so no task ever ends and no callback is ever sent. Fuzzed
callback hosts must never reach the system resolver (that would send DNS queries off this
machine), so registration resolves every name to 127.0.0.1 with a resolver the test owns, and
loopback is an allowed network here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from yarl import URL

from relay.app import create_app
from relay.errors import PROBLEM_CONTENT_TYPE
from relay.netpolicy import CallbackPolicy, IPAddress, check_callback_url
from relay.state import CALLBACK_CHECK
from tests.conftest import make_settings
from tests.processes import free_port

# Up to this many generated requests per operation and generation mode (valid, invalid), on top of
# the coverage phase's boundary values and wrong methods: about 500 requests, ~15 s.
MAX_EXAMPLES = 40
SCENARIOS = 20  # stateful runs: register, then act on the watch just made
SCENARIO_STEPS = 6
REQUEST_TIMEOUT_S = 5

# Nothing listens here, and no callback is ever due; were one sent, it would fail on loopback.
CLOSED_PORT = free_port()
# The document says only "a URI"; these are URIs the relay takes (every name resolves to loopback,
# which is allowed here), so valid cases register watches and reach the store, not only the
# validator. Invalid cases still send anything that is not a string of at most 2048 characters.
CALLBACK_URLS = st.one_of(
    st.text(max_size=30).map(lambda path: f"http://127.0.0.1:{CLOSED_PORT}/hook/{quote(path)}"),
    st.from_regex(
        r"https?://[a-z0-9-]{1,20}(\.[a-z0-9-]{1,10}){0,3}(:[0-9]{1,5})?"
        r"(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,40})?",
        fullmatch=True,
    ),
)
schemathesis.openapi.format("uri", CALLBACK_URLS)

# The statuses an invalid request may get; 413 is a body over 64 KiB, however invalid otherwise.
REJECTIONS = ["400", "401", "404", "405", "409", "413", "415", "422"]
schema = schemathesis.openapi.from_dict(
    orjson.loads(resources.files("relay").joinpath("openapi.json").read_bytes()),
    config=schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "mode": "all"},
            "request-timeout": REQUEST_TIMEOUT_S,
            "checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}},
        }
    ),
)


def errors_are_problems(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool:
    """Every 4xx and 5xx is an application/problem+json body carrying its own status."""
    if response.status_code < 400 or case.path == "/readyz":  # /readyz's 503 is a status report
        return True
    content_type = response.headers.get("content-type", [""])[0].partition(";")[0]
    assert PROBLEM_CONTENT_TYPE == content_type, f"{response.status_code} sent as {content_type!r}"
    assert response.status_code == orjson.loads(response.content)["status"]
    return True


# Not run: positive_data_acceptance (a well-formed callbackUrl is still refused when its host
# resolves to a forbidden address, and a well-formed watch id usually names no watch),
# use_after_free (DELETE cancels; a cancelled watch stays readable, as documented), and the
# token checks (no RELAY_API_TOKENS here; tests/faults/test_security.py covers tokens).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
    errors_are_problems,
]


async def resolve_to_loopback(host: str, port: int) -> list[IPAddress]:
    """Every name is 127.0.0.1: fuzzed hosts never reach a real resolver."""
    return [ipaddress.IPv4Address("127.0.0.1")]


class CrashLog(logging.Handler):
    """Keeps every record of ERROR or worse that the relay logs (`request_crashed`, `loop_died`)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self) -> list[str]:
        return [record.getMessage() for record in self.records]


@dataclass
class Served:
    url: str
    runner: web.AppRunner


class ServerThread:
    """An event loop on a daemon thread that serves relays to blocking callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def serve(self, tmp_path: Path) -> Served:
        return asyncio.run_coroutine_threadsafe(self._serve(tmp_path), self.loop).result(10)

    def stop(self, served: Served) -> None:
        asyncio.run_coroutine_threadsafe(served.runner.cleanup(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _serve(self, tmp_path: Path) -> Served:
        settings = make_settings(tmp_path, f"http://127.0.0.1:{CLOSED_PORT}")
        # Its own Random: hypothesis fails a test whose global `random` moves while it draws.
        app = create_app(
            settings, rand=random.Random(0).random, registry=CollectorRegistry(), run_loops=True
        )
        policy = CallbackPolicy(allow_nets=settings.callback_allow_nets)

        async def check(url: str) -> URL:
            return await check_callback_url(url, policy, resolve_to_loopback)

        app[CALLBACK_CHECK] = check
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return Served(f"http://127.0.0.1:{port}", runner)


@pytest.fixture(scope="module")
def crash_log() -> Iterator[CrashLog]:
    handler = CrashLog()
    logger = logging.getLogger("relay")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def server_thread(crash_log: CrashLog) -> Iterator[ServerThread]:
    server = ServerThread()
    yield server
    server.close()


@pytest.fixture(scope="module")
def relay_url(
    server_thread: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    served = server_thread.serve(tmp_path_factory.mktemp("fuzz"))
    yield served.url
    server_thread.stop(served)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@schema.parametrize()
def test_every_operation_answers_generated_requests_as_documented(
    case: schemathesis.Case, relay_url: str, session: requests.Session, crash_log: CrashLog
) -> None:
    """Valid and invalid requests to each operation: no 5xx, errors are problems, as documented."""
    case.call_and_validate(base_url=relay_url, session=session, checks=CHECKS)

    assert [] == crash_log.events()


def test_watch_lifecycles_answer_as_documented(
    server_thread: ServerThread,
    tmp_path: Path,
    session: requests.Session,
    crash_log: CrashLog,
) -> None:
    """Register, then read, cancel and redeliver the watch just made, following the links."""
    statuses: Counter[tuple[str, int]] = Counter()
    stores = itertools.count()

    class Workflow(schema.as_state_machine()):
        # Each scenario gets a fresh store: an answer that depends on an earlier scenario
        # (200 "already registered" for a 201) would make hypothesis's replays diverge.
        def setup(self) -> None:
            store = tmp_path / f"store-{next(stores)}"
            store.mkdir()
            self.served = server_thread.serve(store)

        def teardown(self) -> None:
            server_thread.stop(self.served)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": self.served.url, "session": session, "timeout": REQUEST_TIMEOUT_S}

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case, **kwargs: Any
        ) -> None:
            statuses[(f"{case.method} {case.operation.path}", response.status_code)] += 1
            kwargs.pop("additional_checks", None)
            case.validate_response(
                response, checks=[*CHECKS, ensure_resource_availability], transport_kwargs=kwargs
            )

    Workflow.run(
        settings=settings(
            max_examples=SCENARIOS,
            stateful_step_count=SCENARIO_STEPS,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )

    assert [] == crash_log.events()
    # The links were followed: watches were made, read, cancelled and refused a redelivery.
    lifecycle = {
        ("POST /watch", 201),
        ("GET /watch/{watchId}", 200),
        ("DELETE /watch/{watchId}", 204),
        ("POST /watch/{watchId}/redeliver", 409),
    }
    assert set() == lifecycle - set(statuses)


VERSION_CHARACTERS = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=";,")
ACCEPT_HEADERS = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    st.builds(
        "{}; version={}{}".format,
        st.sampled_from(["text/plain", "application/openmetrics-text"]),
        st.text(VERSION_CHARACTERS, max_size=8),
        st.sampled_from(["", "; escaping=allow-utf-8", "; escaping=bogus", ", */*"]),
    ),
)


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(accept=ACCEPT_HEADERS)
@example(accept="text/plain; version=x.y")  # prometheus_client raised TypeError: a 500
@example(accept="application/openmetrics-text; version=abc")
def test_metrics_answers_any_accept_header(
    relay_url: str, session: requests.Session, accept: str
) -> None:
    """Whatever a scraper puts in Accept, /metrics answers 200 in a Prometheus format."""
    response = session.get(f"{relay_url}/metrics", headers={"Accept": accept}, timeout=5)

    assert 200 == response.status_code
    assert response.headers["Content-Type"].startswith(
        ("text/plain", "application/openmetrics-text")
    )
