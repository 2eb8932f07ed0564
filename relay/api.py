"""The relay's HTTP API: validate, call the store, answer JSON. No SQL and no outbound HTTP here."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import ContentEncodingError, PayloadEncodingError
from yarl import URL

from relay import jsondata
from relay.delivery import iso_utc
from relay.errors import Problem, invalid_field
from relay.models import TASK_ID_PREFIX, NewWatch, Watch, WatchState
from relay.netpolicy import CallbackPolicy, CallbackUrlRejected, check_callback_url
from relay.state import CALLBACK_CHECK, SERVICE
from relay.store.base import StoreConflict, StoreUnavailable

log = logging.getLogger("relay.api")

MAX_BODY_BYTES = 64 * 1024
# 64 KiB that take longer than this to arrive is a client holding a handler open (slow body).
BODY_READ_TIMEOUT_S = 10.0
MAX_METADATA_BYTES = 4 * 1024
MAX_TASK_ID_LENGTH = 128
MAX_URL_LENGTH = 2048
DEFAULT_PAGE = 100
MAX_PAGE = 1000

_TASK_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_WATCH_ID_RE = re.compile(r"wt_[0-9a-f]{32}")
_LIMIT_RE = re.compile(r"[0-9]{1,4}")  # ASCII only: str.isdigit() accepts '²'
_WATCH_FIELDS = frozenset({"taskId", "callbackUrl", "metadata"})
# Read once, at import: a wheel that lost its package data fails at start, not on the first GET.
OPENAPI_DOCUMENT = resources.files("relay").joinpath("openapi.json").read_bytes()

routes = web.RouteTableDef()


class _RandomBytes:
    """os.urandom bytes, read 4 KiB at a time: a system call per registration let the store's
    writer thread take the GIL in the middle of the request (~5 % of a registration's samples)."""

    def __init__(self, chunk: int = 4096) -> None:
        self._chunk = chunk
        self._pool = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        if self._at + count > len(self._pool):
            self._pool, self._at = os.urandom(self._chunk), 0
        start = self._at
        self._at += count
        return self._pool[start : self._at]


_random_bytes = _RandomBytes()


def new_watch_id(now: float) -> str:
    """`wt_` + 12 hex digits of milliseconds + 20 random hex digits: ids sort by creation time."""
    return f"wt_{int(now * 1000):012x}{_random_bytes.take(10).hex()}"


def watch_json(watch: Watch) -> dict[str, Any]:
    return {
        "watchId": watch.watch_id,
        "taskId": watch.task_id,
        "callbackUrl": watch.callback_url,
        "metadata": watch.metadata,
        "state": watch.state.value,
        "taskStatus": watch.task_status,
        "polls": watch.polls,
        "nextPollAt": None if watch.next_poll_at is None else iso_utc(watch.next_poll_at),
        "deliveryAttempts": watch.delivery_attempts,
        "lastError": watch.last_error,
        "createdAt": iso_utc(watch.created_at),
        "updatedAt": iso_utc(watch.updated_at),
        "deadlineAt": iso_utc(watch.deadline_at),
    }


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=jsondata.dumps(body), content_type="application/json", headers=headers
    )


def store_unavailable(exc: StoreUnavailable) -> Problem:
    return Problem(
        503,
        "the store could not confirm this request; retry later (registering again is safe:"
        " it answers the same watch if this one was kept after all)",
        kind="store-unavailable",
        headers={"Retry-After": "5"},
    )


# --- validation -----------------------------------------------------------------------------------


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Problem(
            415, "the body must be JSON with Content-Type: application/json", kind="content-type"
        )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _too_large()
    try:
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(BODY_READ_TIMEOUT_S):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large() from None
    except TimeoutError:
        raise Problem(
            408, f"the body did not arrive within {BODY_READ_TIMEOUT_S:g} s", kind="body-timeout"
        ) from None
    except (web.RequestPayloadError, ContentEncodingError, PayloadEncodingError):
        raise Problem(
            400, "the body does not decode as its Content-Encoding says", kind="bad-encoding"
        ) from None
    except ConnectionResetError:
        # The client left halfway through its body: not the relay's failure, nothing to log.
        raise Problem(400, "the connection closed before the body ended", kind="body-cut") from None
    try:
        body = jsondata.loads(raw)  # metadata keeps every integer as registered
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc.msg}", kind="bad-json") from None
    if not isinstance(body, dict):
        raise Problem(422, "the body must be a JSON object", kind="invalid-body")
    return body


def _too_large() -> Problem:
    return Problem(413, f"the body is over {MAX_BODY_BYTES} bytes", kind="too-large")


def validate_task_id(value: Any, field: str = "taskId") -> str:
    if not isinstance(value, str):
        raise invalid_field(field, "must be a string")
    if not value.startswith(TASK_ID_PREFIX):
        raise invalid_field(field, f"must start with {TASK_ID_PREFIX!r}")
    if len(value) > MAX_TASK_ID_LENGTH:
        raise invalid_field(field, f"must be at most {MAX_TASK_ID_LENGTH} characters")
    if len(value) == len(TASK_ID_PREFIX) or not _TASK_ID_RE.fullmatch(value):
        raise invalid_field(field, "may contain only letters, digits, '-' and '_' after the prefix")
    return value


def validate_metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_field("metadata", "must be a JSON object")
    try:
        encoded = jsondata.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than any serializer here will go
        raise invalid_field("metadata", "is nested too deeply") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise invalid_field("metadata", f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


async def validate_watch(request: web.Request, body: dict[str, Any]) -> NewWatch:
    unknown = sorted(set(body) - _WATCH_FIELDS)
    if unknown:
        raise invalid_field(unknown[0], "is not a field of a watch (taskId, callbackUrl, metadata)")
    for required in ("taskId", "callbackUrl"):
        if required not in body:
            raise invalid_field(required, "is required")
    task_id = validate_task_id(body["taskId"])
    url = body["callbackUrl"]
    if not isinstance(url, str):
        raise invalid_field("callbackUrl", "must be a string")
    try:
        checked = await request.app[CALLBACK_CHECK](url)
    except CallbackUrlRejected as exc:
        raise Problem(422, exc.reason, kind="invalid-field", field="callbackUrl") from None
    return NewWatch(
        task_id=task_id, callback_url=str(checked), metadata=validate_metadata(body.get("metadata"))
    )


def watch_id_of(request: web.Request) -> str:
    watch_id = request.match_info["watch_id"]
    if not _WATCH_ID_RE.fullmatch(watch_id):
        raise _unknown_watch(watch_id)
    return watch_id


def _unknown_watch(watch_id: str) -> Problem:
    return Problem(404, "no watch has this id", kind="unknown-watch")


# --- middlewares ----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_middleware(tokens: tuple[bytes, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Every request: the bearer token on /watch, errors as problem+json, then the metrics.

    One middleware, not three: aiohttp wraps each one in its own coroutine per request.
    """

    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            try:
                if tokens and request.path.startswith("/watch"):
                    _require_token(request, tokens)
                response = await handler(request)
            except Exception as exc:
                response = _problem_for(request, exc)
            status = response.status
            return response
        except web.HTTPException as exc:  # a redirect, which _problem_for passes on
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            request.app[SERVICE].record_http(
                resource.canonical if resource is not None else "unmatched",
                method_label(request.method),
                status,
                time.perf_counter() - started,
            )

    return handle


# The methods aiohttp's C parser accepts (llhttp's list); anything else is "other" in metrics.
_KNOWN_METHODS = frozenset(
    [
        "DELETE",
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "CONNECT",
        "OPTIONS",
        "TRACE",
        "COPY",
        "LOCK",
        "MKCOL",
        "MOVE",
        "PROPFIND",
        "PROPPATCH",
        "SEARCH",
        "UNLOCK",
        "BIND",
        "REBIND",
        "UNBIND",
        "ACL",
        "REPORT",
        "MKACTIVITY",
        "CHECKOUT",
        "MERGE",
        "M-SEARCH",
        "NOTIFY",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "PATCH",
        "PURGE",
        "MKCALENDAR",
        "LINK",
        "UNLINK",
        "SOURCE",
        "QUERY",
    ]
)


def method_label(method: str) -> str:
    """The `method` label of the HTTP metrics: bounded, whatever a client sends."""
    return method if method in _KNOWN_METHODS else "other"


def _require_token(request: web.Request, tokens: tuple[bytes, ...]) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    # Compare against every token, whatever matches, so timing says nothing.
    matched = False
    # surrogateescape: aiohttp keeps a header's undecodable bytes that way; they match nothing.
    candidate = presented.strip().encode("utf-8", "surrogateescape")
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    if scheme.lower() != "bearer" or not matched:
        raise Problem(
            401,
            "a valid bearer token is required (Authorization: Bearer <token>)",
            kind="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="relay"'},
        )


def _problem_for(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The problem+json answer for `exc`, aiohttp's own 404/405/413 included; a redirect
    (an HTTPException under 400) is raised again."""
    if isinstance(exc, Problem):
        return exc.response(instance=request.path)
    if isinstance(exc, StoreUnavailable):
        request.app[SERVICE].store_failed(request.path, exc)
        return store_unavailable(exc).response(instance=request.path)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large().response(instance=request.path)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status, "http-error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return Problem(exc.status, exc.reason, kind=kind, headers=headers).response(
            instance=request.path
        )
    # A bug, not bad input: log it whole, answer a problem body that reveals nothing.
    log.error("request_crashed", exc_info=exc, extra={"path": request.path})
    return Problem(500, "the relay failed to handle this request", kind="internal").response(
        instance=request.path
    )


# --- handlers -------------------------------------------------------------------------------------


@routes.post("/watch")
async def create_watch(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    new = await validate_watch(request, body)
    watch, created = await request.app[SERVICE].register(new)
    location = {"Location": f"/watch/{watch.watch_id}"}
    return json_response(watch_json(watch), status=201 if created else 200, headers=location)


@routes.get("/watch/{watch_id}")
async def get_watch(request: web.Request) -> web.Response:
    watch_id = watch_id_of(request)
    watch = await request.app[SERVICE].get(watch_id)
    if watch is None:
        raise _unknown_watch(watch_id)
    return json_response(watch_json(watch))


@routes.delete("/watch/{watch_id}")
async def cancel_watch(request: web.Request) -> web.Response:
    watch_id = watch_id_of(request)
    try:
        watch = await request.app[SERVICE].cancel(watch_id)
    except StoreConflict as exc:
        raise Problem(409, f"cannot cancel: {exc}", kind="conflict") from None
    if watch is None:
        raise _unknown_watch(watch_id)
    return web.Response(status=204)


@routes.post("/watch/{watch_id}/redeliver")
async def redeliver(request: web.Request) -> web.Response:
    watch_id = watch_id_of(request)
    try:
        watch = await request.app[SERVICE].redeliver(watch_id)
    except StoreConflict as exc:
        raise Problem(409, f"cannot redeliver: {exc}", kind="conflict") from None
    if watch is None:
        raise _unknown_watch(watch_id)
    return json_response(watch_json(watch), status=202)


@routes.get("/watches")
async def list_watches(request: web.Request) -> web.Response:
    query = request.query
    unknown = sorted(set(query) - {"state", "taskId", "limit", "cursor"})
    if unknown:
        raise invalid_field(unknown[0], "is not a query parameter (state, taskId, limit, cursor)")
    state = None
    if "state" in query:
        try:
            state = WatchState(query["state"])
        except ValueError:
            choices = ", ".join(s.value for s in WatchState)
            raise invalid_field("state", f"must be one of {choices}") from None
    task_id = validate_task_id(query["taskId"]) if "taskId" in query else None
    limit = DEFAULT_PAGE
    if "limit" in query:
        raw = query["limit"]
        if not _LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_PAGE:
            raise invalid_field("limit", f"must be an integer from 1 to {MAX_PAGE}")
        limit = int(raw)
    cursor = query.get("cursor")
    if cursor is not None and not _WATCH_ID_RE.fullmatch(cursor):
        raise invalid_field("cursor", "is not a cursor this API returned")
    watches = await request.app[SERVICE].list_watches(
        state=state, task_id=task_id, limit=limit + 1, after=cursor
    )
    page = watches[:limit]
    next_cursor = page[-1].watch_id if len(watches) > limit else None
    return json_response({"watches": [watch_json(w) for w in page], "nextCursor": next_cursor})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    if not await request.app[SERVICE].alive():  # an API process whose relay does not answer
        return json_response({"status": "relay process not answering"}, status=503)
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[SERVICE].readiness()
    ready = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus page, in the format `Accept` asks for (the text format if it cannot be
    parsed), only the families named by `name[]` if any, gzipped if the scraper accepts it:
    what prometheus_client's own handler does, the same from every process."""
    accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
    names = request.query.getall("name[]", [])
    body, content_type = await request.app[SERVICE].metrics_page(accept, names)
    response = web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})
    response.enable_compression()
    return response


def api_application(*, tokens: tuple[bytes, ...], policy: CallbackPolicy) -> web.Application:
    """The HTTP API, its middleware and routes: the relay's app, and each API process's.
    The caller sets app[SERVICE] before it serves."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[api_middleware(tokens)])

    async def check_callback(url: str) -> URL:
        return await check_callback_url(url, policy)

    app[CALLBACK_CHECK] = check_callback
    app.add_routes(routes)
    return app


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI_DOCUMENT, content_type="application/json")
