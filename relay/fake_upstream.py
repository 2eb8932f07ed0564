"""A local simulator of the hiapi task API, for development, the relay's tests and the benchmark.

It serves ``GET /v1/tasks/{taskId}`` like the real API: an envelope
``{"code": 200, "message": "success", "data": {...}}`` whose ``data`` holds ``taskId``,
``model``, ``status`` (queued, handling, archiving, success, fail), ``created``,
``completed`` (0 until terminal), ``output`` (success only) and ``error`` (fail only).
An unknown task answers ``{"code": 404, "message": "task not found", "data": null}``.

Tasks need no setup: the first GET of an id starting with ``tk-hiapi-`` creates it, and its
status then follows the clock through the `Schedule` (queued -> handling -> archiving -> end).
Ids without that prefix are never created this way and answer not found.

Directives in the task id script its behaviour, so a demo needs nothing but an id:

- ``-fail-``     the task ends in ``fail`` with an error object instead of ``success``
- ``-vanish-``   the task answers not found, always
- ``-slow-``     the schedule is ten times longer
- ``-429-``      the 1st, 3rd, 5th... GET answers HTTP 429 with ``Retry-After: 1``
- ``-500-``      the 1st, 3rd, 5th... GET answers HTTP 500
- ``-garbage-``  the 1st, 3rd, 5th... GET answers HTTP 200 with a body that is not JSON

For example ``tk-hiapi-slow-fail-7`` fails after 35 s with the default schedule.

The control API under ``/_fake/`` (JSON in, JSON out, no api key) steers it from tests:

- ``PUT /_fake/tasks/{taskId}`` ``{"status": ..., "output"?: [...], "error"?: {...}}`` pins
  the task to that status from now on, creating it if needed, and records the flip time.
- ``DELETE /_fake/tasks/{taskId}`` makes the task answer not found until it is pinned again.
- ``POST /_fake/script/{taskId}`` ``{"responses": [...]}`` queues answers, one per GET, before
  normal behaviour resumes. Each entry combines: ``status`` (HTTP status, plausible envelope),
  ``retryAfter`` (header), ``delayS`` (sleep first; alone, then answer normally), ``reset``
  (drop the connection), ``body`` (raw text), ``json`` (this exact JSON body, HTTP 200 unless
  ``status`` says otherwise). aiohttp's client silently retries a GET once after a dropped
  connection, so script two resets in a row for an aiohttp caller to see one.
- ``POST /_fake/fail-all`` ``{"status": 401, "count"?: n, "retryAfter"?: s}`` makes every GET
  answer that status (for n GETs, or until ``{"status": null}``).
- ``POST /_fake/chaos`` ``{"rate": 0.3, "seed": 7, "kinds"?: [...], "hangS"?: s}`` makes that
  fraction of GETs fail, each with a kind drawn from a random generator seeded with ``seed``
  (every kind when ``kinds`` is left out; ``{"rate": 0}`` stops it). The kinds: ``500``, ``502``,
  ``503``, ``401`` and ``429`` (envelope errors), ``429-retry-after`` (with ``Retry-After: 1``),
  ``hang`` (sleep ``hangS``, default 30 s, before answering: past any sane client timeout),
  ``reset`` (drop the connection), ``truncated`` (half the promised body, then close),
  ``not-json`` (HTTP 200 with a proxy's HTML page), ``wrong-shape`` (a success envelope whose
  ``data`` is not this task: a list, no status, another task's id...) and ``backwards`` (a
  status earlier than the task's current one, never a terminal one). ``GET /_fake/chaos``
  answers the settings and ``injected``, the faults answered so far by kind.
- ``GET /_fake/stats`` counts GETs: ``requests``, ``perTask``, ``maxConcurrentPerTask``,
  ``overlaps``, ``maxRps1s``, ``flips``.
- ``POST /_fake/reset`` forgets tasks, scripts, fail-all, chaos and stats.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from relay.models import TASK_ID_PREFIX

MODEL = "video-gen-1"
# .invalid never resolves, so a demo that follows an output URL can't reach a real host.
CDN_BASE = "https://cdn.example.invalid"
OUTPUT_TTL_S = 86_400
STATUSES = frozenset({"queued", "handling", "archiving", "success", "fail"})
TERMINAL_STATUSES = frozenset({"success", "fail"})
DEFAULT_ERROR = {"code": "generation_failed", "message": "the model could not render this task"}
# A complete body cut mid-object: invalid JSON that still looks like the real thing.
GARBAGE_BODY = b'{"code": 200, "message": "succ'
SLOW_FACTOR = 10.0
# The statuses a task passes through before its end, in order: `backwards` answers one of them.
PROGRESS = ("queued", "handling", "archiving")
CHAOS_KINDS = (
    "500",
    "502",
    "503",
    "429",
    "429-retry-after",
    "hang",
    "reset",
    "truncated",
    "not-json",
    "wrong-shape",
    "backwards",
    "401",
)
CHAOS_HANG_S = 30.0
# What a proxy in front of the API answers when the API behind it is gone.
PROXY_PAGE = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """Seconds an auto-created task spends in each non-terminal status."""

    queued_s: float = 1.0
    handling_s: float = 2.0
    archiving_s: float = 0.5

    def __post_init__(self) -> None:
        if min(self.queued_s, self.handling_s, self.archiving_s) < 0:
            raise ValueError("schedule durations must be >= 0")

    @property
    def total_s(self) -> float:
        return self.queued_s + self.handling_s + self.archiving_s

    def scaled(self, factor: float) -> Schedule:
        """This schedule with every duration multiplied by `factor`."""
        return Schedule(
            queued_s=self.queued_s * factor,
            handling_s=self.handling_s * factor,
            archiving_s=self.archiving_s * factor,
        )


def lifecycle_status(schedule: Schedule, elapsed: float, *, ends_in_fail: bool) -> str:
    """The status of a task `elapsed` seconds after its creation."""
    if elapsed < schedule.queued_s:
        return "queued"
    if elapsed < schedule.queued_s + schedule.handling_s:
        return "handling"
    if elapsed < schedule.total_s:
        return "archiving"
    return "fail" if ends_in_fail else "success"


def default_output(task_id: str, completed: int) -> list[dict[str, Any]]:
    """The outputs of a successful task: one video and its thumbnail."""
    expire_at = completed + OUTPUT_TTL_S
    return [
        {"url": f"{CDN_BASE}/{task_id}/video.mp4", "type": "video", "expireAt": expire_at},
        {"url": f"{CDN_BASE}/{task_id}/thumbnail.jpg", "type": "thumbnail", "expireAt": expire_at},
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Pin:
    status: str
    at: float
    output: list[dict[str, Any]] | None
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Task:
    task_id: str
    created: float
    schedule: Schedule
    ends_in_fail: bool
    fault: str | None  # "429", "500" or "garbage": answered on every other GET
    vanished: bool = False
    pin: _Pin | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Scripted:
    status: int | None = None
    retry_after: float | None = None
    delay_s: float = 0.0
    reset: bool = False
    body: str | None = None
    json: Any = None
    has_json: bool = False  # `json: null` is a legitimate body, so presence is tracked apart

    @property
    def delay_only(self) -> bool:
        return self.status is None and not (self.reset or self.has_json) and self.body is None


@dataclass(frozen=True, slots=True, kw_only=True)
class _FailAll:
    status: int
    retry_after: float | None
    remaining: int | None  # None: until cleared


@dataclass(slots=True, kw_only=True)
class _Chaos:
    """Faults at a rate, drawn from a seeded generator so a chaos run can be repeated."""

    rate: float
    seed: int
    kinds: tuple[str, ...]
    hang_s: float
    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)

    def draw(self) -> str | None:
        """The fault for the next GET, or None to answer it normally."""
        if self.rng.random() >= self.rate:
            return None
        kind = self.rng.choice(self.kinds)
        self.injected[kind] += 1
        return kind

    def as_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "seed": self.seed,
            "kinds": list(self.kinds),
            "hangS": self.hang_s,
            "injected": dict(sorted(self.injected.items())),
        }


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    per_task: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    max_concurrent: dict[str, int] = field(default_factory=dict)
    overlaps: int = 0
    bucket: int = 0
    bucket_count: int = 0
    max_rps_1s: int = 0
    flips: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "perTask": self.per_task,
            "maxConcurrentPerTask": self.max_concurrent,
            "overlaps": self.overlaps,
            "maxRps1s": self.max_rps_1s,
            "flips": self.flips,
        }


class _BadRequestError(Exception):
    pass


def _json_response(payload: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _envelope_error(
    status: int, *, message: str | None = None, retry_after: float | None = None
) -> web.Response:
    if message is None:
        message = _MESSAGES.get(status) or _phrase(status)
    response = _json_response({"code": status, "message": message, "data": None}, status=status)
    if retry_after is not None:
        response.headers["Retry-After"] = _format_seconds(retry_after)
    return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def _format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


_MESSAGES = {401: "unauthorized", 404: "task not found"}
_NOT_FOUND_BODY = orjson.dumps({"code": 404, "message": "task not found", "data": None})
_UNAUTHORIZED_BODY = orjson.dumps({"code": 401, "message": "unauthorized", "data": None})


class FakeUpstream:
    """The simulator's state and handlers; one per app, reachable as ``app[FAKE_UPSTREAM_KEY]``."""

    def __init__(
        self,
        *,
        api_key: str | None,
        clock: Callable[[], float],
        schedule: Schedule,
        not_found_http_status: int,
    ) -> None:
        self._expected_auth = None if api_key is None else f"Bearer {api_key}"
        self._clock = clock
        self._schedule = schedule
        self._not_found_status = not_found_http_status
        self._tasks: dict[str, _Task] = {}
        self._scripts: dict[str, deque[_Scripted]] = {}
        self._fail_all: _FailAll | None = None
        self._chaos: _Chaos | None = None
        self._stats = _Stats()

    def stats(self) -> dict[str, Any]:
        """The same document `GET /_fake/stats` answers."""
        return self._stats.as_json()

    def status_of(self, task_id: str) -> str | None:
        """The task's true status now (what a fault-free GET would say); None if not found."""
        task = self._tasks.get(task_id)
        if task is None or task.vanished:
            return None
        return str(self._task_data(task, self._clock())["status"])

    def ended_at(self, task_id: str) -> float | None:
        """When the task reached success or fail (clock seconds); None if it has not ended."""
        task = self._tasks.get(task_id)
        if task is None or self.status_of(task_id) not in TERMINAL_STATUSES:
            return None
        return task.pin.at if task.pin is not None else task.created + task.schedule.total_s

    # -- the task API ---------------------------------------------------------------------

    async def get_task(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["taskId"]
        now = self._clock()
        stats = self._stats
        stats.requests += 1
        nth = stats.per_task.get(task_id, 0) + 1
        stats.per_task[task_id] = nth
        bucket = int(now)
        if bucket != stats.bucket:
            stats.bucket, stats.bucket_count = bucket, 0
        stats.bucket_count += 1
        stats.max_rps_1s = max(stats.max_rps_1s, stats.bucket_count)

        in_flight = stats.in_flight
        concurrent = in_flight.get(task_id, 0) + 1
        if concurrent > 1:
            stats.overlaps += 1
        in_flight[task_id] = concurrent
        if concurrent > stats.max_concurrent.get(task_id, 0):
            stats.max_concurrent[task_id] = concurrent
        try:
            return await self._answer(request, task_id, nth, now)
        finally:
            # `in_flight` is this GET's own stats object even if reset() swapped in a new one.
            left = in_flight.get(task_id, 0) - 1
            if left > 0:
                in_flight[task_id] = left
            else:
                in_flight.pop(task_id, None)

    async def _answer(
        self, request: web.Request, task_id: str, nth: int, now: float
    ) -> web.StreamResponse:
        if (
            self._expected_auth is not None
            and request.headers.get("Authorization") != self._expected_auth
        ):
            return web.Response(
                body=_UNAUTHORIZED_BODY, status=401, content_type="application/json"
            )

        fail_all = self._fail_all
        if fail_all is not None:
            if fail_all.remaining is not None:
                left = fail_all.remaining - 1
                self._fail_all = replace(fail_all, remaining=left) if left > 0 else None
            return _envelope_error(fail_all.status, retry_after=fail_all.retry_after)

        script = self._scripts.get(task_id)
        if script:
            entry = script.popleft()
            if not script:
                del self._scripts[task_id]
            if entry.delay_s > 0:
                await asyncio.sleep(entry.delay_s)
                now = self._clock()
            if not entry.delay_only:
                return self._scripted(request, entry)

        chaos = self._chaos
        kind = None if chaos is None else chaos.draw()
        if chaos is not None and kind == "hang":
            await asyncio.sleep(chaos.hang_s)
            now = self._clock()
        elif kind is not None:
            return await self._chaotic(request, kind, task_id, now)

        task = self._tasks.get(task_id)
        if task is None:
            if not task_id.startswith(TASK_ID_PREFIX):
                return self._not_found()
            task = self._auto_create(task_id, now)
        if task.vanished:
            return self._not_found()
        if task.fault is not None and nth % 2 == 1:
            return self._fault(task.fault)
        return _json_response(
            {"code": 200, "message": "success", "data": self._task_data(task, now)}
        )

    async def _chaotic(
        self, request: web.Request, kind: str, task_id: str, now: float
    ) -> web.StreamResponse:
        if kind == "429-retry-after":
            return _envelope_error(429, retry_after=1)
        if kind.isdigit():
            return _envelope_error(int(kind))
        if kind == "reset":
            return self._scripted(request, _Scripted(reset=True))
        if kind == "not-json":
            return web.Response(text=PROXY_PAGE, content_type="text/html")
        task = self._tasks.get(task_id)
        if task is None and task_id.startswith(TASK_ID_PREFIX):
            task = self._auto_create(task_id, now)
        data = None if task is None or task.vanished else self._task_data(task, now)
        if kind == "wrong-shape":
            return _json_response(
                {"code": 200, "message": "success", "data": self._misshapen(data, task_id)}
            )
        if kind == "backwards":
            if data is None:
                return self._not_found()
            return _json_response(
                {"code": 200, "message": "success", "data": self._backwards(data)}
            )
        # truncated: promise the whole answer, send half, close.
        whole = (
            _NOT_FOUND_BODY
            if data is None
            else orjson.dumps({"code": 200, "message": "success", "data": data})
        )
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(whole)
        await response.prepare(request)
        await response.write(whole[: len(whole) // 2])
        if request.transport is not None:
            request.transport.close()  # unlike abort(), sends what was written first
        return response

    def _misshapen(self, data: dict[str, Any] | None, task_id: str) -> Any:
        assert self._chaos is not None
        base = data or {"taskId": task_id, "model": MODEL, "created": 0, "completed": 0}
        shapes: list[Any] = [
            [],
            "success",
            {k: v for k, v in base.items() if k != "status"},
            {**base, "status": 7},
            # Another task's end: a relay that skipped the id check would finish the wrong one.
            {**base, "taskId": f"{task_id}-other", "status": "success", "completed": 1},
            {**base, "taskId": None, "status": "fail"},
        ]
        return self._chaos.rng.choice(shapes)

    def _backwards(self, data: dict[str, Any]) -> dict[str, Any]:
        assert self._chaos is not None
        status = data["status"]
        earlier = PROGRESS[: PROGRESS.index(status)] if status in PROGRESS else PROGRESS
        back = self._chaos.rng.choice(earlier) if earlier else status
        return {k: v for k, v in data.items() if k not in ("output", "error")} | {
            "status": back,
            "completed": 0,
        }

    def _auto_create(self, task_id: str, now: float) -> _Task:
        fault = next((f for f in ("429", "500", "garbage") if f"-{f}-" in task_id), None)
        schedule = self._schedule
        if "-slow-" in task_id:
            schedule = schedule.scaled(SLOW_FACTOR)
        task = _Task(
            task_id=task_id,
            created=now,
            schedule=schedule,
            ends_in_fail="-fail-" in task_id,
            fault=fault,
            vanished="-vanish-" in task_id,
        )
        self._tasks[task_id] = task
        return task

    def _not_found(self) -> web.Response:
        return web.Response(
            body=_NOT_FOUND_BODY, status=self._not_found_status, content_type="application/json"
        )

    @staticmethod
    def _fault(fault: str) -> web.Response:
        if fault == "429":
            return _envelope_error(429, retry_after=1)
        if fault == "500":
            return _envelope_error(500)
        return web.Response(body=GARBAGE_BODY, content_type="application/json")

    @staticmethod
    def _scripted(request: web.Request, entry: _Scripted) -> web.StreamResponse:
        if entry.reset:
            if request.transport is not None:
                # abort() drops unsent data and closes at once: the client sees a reset, not EOF
                # after a response. aiohttp then fails to write the response below and treats
                # it as a premature client disconnect, quietly.
                request.transport.abort()
            return web.Response()
        status = 200 if entry.status is None else entry.status
        if entry.has_json:
            response = _json_response(entry.json, status=status)
        elif entry.body is not None:
            response = web.Response(text=entry.body, status=status, content_type="text/plain")
        else:
            return _envelope_error(status, retry_after=entry.retry_after)
        if entry.retry_after is not None:
            response.headers["Retry-After"] = _format_seconds(entry.retry_after)
        return response

    def _task_data(self, task: _Task, now: float) -> dict[str, Any]:
        pin = task.pin
        if pin is None:
            status = lifecycle_status(
                task.schedule, now - task.created, ends_in_fail=task.ends_in_fail
            )
            done_at = task.created + task.schedule.total_s
        else:
            status, done_at = pin.status, pin.at
        completed = int(done_at) if status in TERMINAL_STATUSES else 0
        data: dict[str, Any] = {
            "taskId": task.task_id,
            "model": MODEL,
            "status": status,
            "created": int(task.created),
            "completed": completed,
        }
        if status == "success":
            output = None if pin is None else pin.output
            data["output"] = default_output(task.task_id, completed) if output is None else output
        elif status == "fail":
            error = None if pin is None else pin.error
            data["error"] = DEFAULT_ERROR if error is None else error
        return data

    # -- the control API ------------------------------------------------------------------

    async def put_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["taskId"]
        try:
            status, output, error = _parse_pin(await _read_object(request))
        except _BadRequestError as exc:
            return _envelope_error(400, message=str(exc))
        now = self._clock()
        task = self._tasks.get(task_id) or self._auto_create(task_id, now)
        task = replace(
            task, vanished=False, pin=_Pin(status=status, at=now, output=output, error=error)
        )
        self._tasks[task_id] = task
        self._stats.flips[task_id] = now
        return _json_response(
            {"code": 200, "message": "success", "data": self._task_data(task, now)}
        )

    async def delete_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["taskId"]
        task = self._tasks.get(task_id) or self._auto_create(task_id, self._clock())
        self._tasks[task_id] = replace(task, vanished=True)
        return _json_response({"taskId": task_id, "vanished": True})

    async def post_script(self, request: web.Request) -> web.Response:
        task_id = request.match_info["taskId"]
        try:
            entries = _parse_script(await _read_object(request))
        except _BadRequestError as exc:
            return _envelope_error(400, message=str(exc))
        queue = self._scripts.setdefault(task_id, deque())
        queue.extend(entries)
        return _json_response({"taskId": task_id, "queued": len(queue)})

    async def post_fail_all(self, request: web.Request) -> web.Response:
        try:
            fail_all = _parse_fail_all(await _read_object(request))
        except _BadRequestError as exc:
            return _envelope_error(400, message=str(exc))
        self._fail_all = fail_all
        if fail_all is None:
            return _json_response({"status": None, "remaining": None})
        return _json_response({"status": fail_all.status, "remaining": fail_all.remaining})

    async def post_chaos(self, request: web.Request) -> web.Response:
        try:
            self._chaos = _parse_chaos(await _read_object(request))
        except _BadRequestError as exc:
            return _envelope_error(400, message=str(exc))
        return await self.get_chaos(request)

    async def get_chaos(self, request: web.Request) -> web.Response:
        if self._chaos is None:
            return _json_response({"rate": 0, "injected": {}})
        return _json_response(self._chaos.as_json())

    async def get_stats(self, request: web.Request) -> web.Response:
        return _json_response(self._stats.as_json())

    async def post_reset(self, request: web.Request) -> web.Response:
        self._tasks.clear()
        self._scripts.clear()
        self._fail_all = None
        self._chaos = None
        self._stats = _Stats()
        return _json_response({"reset": True})


def _parse_pin(
    doc: dict[str, Any],
) -> tuple[str, list[dict[str, Any]] | None, dict[str, Any] | None]:
    status = doc.get("status")
    if not isinstance(status, str) or status not in STATUSES:
        raise _BadRequestError(f"status must be one of {sorted(STATUSES)}")
    output = doc.get("output")
    if output is not None and not (
        isinstance(output, list) and all(isinstance(o, dict) for o in output)
    ):
        raise _BadRequestError("output must be an array of objects")
    error = doc.get("error")
    if error is not None and not isinstance(error, dict):
        raise _BadRequestError("error must be an object")
    return status, output, error


def _parse_fail_all(doc: dict[str, Any]) -> _FailAll | None:
    if "status" not in doc:
        raise _BadRequestError("status is required (null to stop)")
    status = doc["status"]
    if status is None:
        return None
    _check_status(status)
    count = doc.get("count")
    if count is not None and not (_is_int(count) and count > 0):
        raise _BadRequestError("count must be a positive integer")
    retry_after = doc.get("retryAfter")
    if retry_after is not None and not _is_seconds(retry_after):
        raise _BadRequestError("retryAfter must be a number of seconds >= 0")
    return _FailAll(status=status, retry_after=retry_after, remaining=count)


def _parse_chaos(doc: dict[str, Any]) -> _Chaos | None:
    unknown = set(doc) - {"rate", "seed", "kinds", "hangS"}
    if unknown:
        raise _BadRequestError(f"unknown chaos keys: {sorted(unknown)}")
    rate = doc.get("rate")
    if not (isinstance(rate, int | float) and not isinstance(rate, bool) and 0 <= rate <= 1):
        raise _BadRequestError("rate must be a number from 0 to 1")
    if rate == 0:
        return None
    seed = doc.get("seed", 0)
    if not _is_int(seed):
        raise _BadRequestError("seed must be an integer")
    kinds = doc.get("kinds", list(CHAOS_KINDS))
    if not (isinstance(kinds, list) and kinds and all(k in CHAOS_KINDS for k in kinds)):
        raise _BadRequestError(f"kinds must be a non-empty array of {list(CHAOS_KINDS)}")
    hang_s = doc.get("hangS", CHAOS_HANG_S)
    if not _is_seconds(hang_s):
        raise _BadRequestError("hangS must be a number of seconds >= 0")
    return _Chaos(
        rate=float(rate),
        seed=seed,
        kinds=tuple(kinds),
        hang_s=float(hang_s),
        rng=random.Random(seed),  # noqa: S311 -- repeatable chaos, not a secret
    )


def _parse_script(doc: dict[str, Any]) -> list[_Scripted]:
    raw = doc.get("responses")
    if not isinstance(raw, list) or not raw:
        raise _BadRequestError("responses must be a non-empty array")
    return [_parse_scripted(item) for item in raw]


_SCRIPT_KEYS = frozenset({"status", "retryAfter", "delayS", "reset", "body", "json"})


def _parse_scripted(item: Any) -> _Scripted:
    if not isinstance(item, dict) or not item:
        raise _BadRequestError("each response must be a non-empty object")
    unknown = set(item) - _SCRIPT_KEYS
    if unknown:
        # A typo like "delay" would otherwise script a plain normal answer, silently.
        raise _BadRequestError(f"unknown response keys: {sorted(unknown)}")
    status = item.get("status")
    if status is not None:
        _check_status(status)
    retry_after = item.get("retryAfter")
    delay_s = item.get("delayS", 0.0)
    if retry_after is not None and not _is_seconds(retry_after):
        raise _BadRequestError("retryAfter must be a number of seconds >= 0")
    if not _is_seconds(delay_s):
        raise _BadRequestError("delayS must be a number of seconds >= 0")
    reset = item.get("reset", False)
    if not isinstance(reset, bool):
        raise _BadRequestError("reset must be a boolean")
    body = item.get("body")
    if body is not None and not isinstance(body, str):
        raise _BadRequestError("body must be a string")
    if body is not None and "json" in item:
        raise _BadRequestError("body and json are exclusive")
    return _Scripted(
        status=status,
        retry_after=retry_after,
        delay_s=float(delay_s),
        reset=reset,
        body=body,
        json=item.get("json"),
        has_json="json" in item,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _check_status(value: Any) -> None:
    if not (_is_int(value) and 100 <= value <= 599):
        raise _BadRequestError("status must be an HTTP status code (100-599)")


async def _read_object(request: web.Request) -> dict[str, Any]:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _BadRequestError("body must be JSON") from None
    if not isinstance(doc, dict):
        raise _BadRequestError("body must be a JSON object")
    return doc


FAKE_UPSTREAM_KEY = web.AppKey("fake_upstream", FakeUpstream)


def create_fake_upstream_app(
    *,
    api_key: str | None = None,
    clock: Callable[[], float] = time.time,
    schedule: Schedule = Schedule(),  # frozen, so one shared default is safe
    not_found_http_status: int = 404,
) -> web.Application:
    """The simulator as an aiohttp app; `clock` drives every task's lifecycle."""
    fake = FakeUpstream(
        api_key=api_key,
        clock=clock,
        schedule=schedule,
        not_found_http_status=not_found_http_status,
    )
    app = web.Application()
    app[FAKE_UPSTREAM_KEY] = fake
    app.router.add_get("/v1/tasks/{taskId}", fake.get_task)
    app.router.add_put("/_fake/tasks/{taskId}", fake.put_task)
    app.router.add_delete("/_fake/tasks/{taskId}", fake.delete_task)
    app.router.add_post("/_fake/script/{taskId}", fake.post_script)
    app.router.add_post("/_fake/fail-all", fake.post_fail_all)
    app.router.add_post("/_fake/chaos", fake.post_chaos)
    app.router.add_get("/_fake/chaos", fake.get_chaos)
    app.router.add_get("/_fake/stats", fake.get_stats)
    app.router.add_post("/_fake/reset", fake.post_reset)
    return app


async def run_fake_upstream(
    host: str, port: int, *, api_key: str | None, schedule: Schedule, stop: asyncio.Event
) -> None:
    """Serve the simulator on host:port until `stop` is set; prints and logs nothing per request."""
    app = create_fake_upstream_app(api_key=api_key, schedule=schedule)
    # No access log: at benchmark rates it would cost more than the answers themselves.
    # A short shutdown bound: a scripted delayS must not hold the process open.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
