"""The task-API client: one `GET /v1/tasks/{id}` in, one typed PollResult out. Never raises.

A fetch may put more than one request on the wire: aiohttp silently resends an idempotent
request once after a dropped connection, and a dropped connection is retried at once, twice.
Every request after a fetch's first waits for the caller's `before_retry` (the poller's token
bucket), so an upstream that drops every connection still sees no more than the rate budget.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import NamedTuple, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp_retry import ExponentialRetry, RetryClient
from yarl import URL

from relay.config import UPSTREAM_ATTEMPTS
from relay.models import PollOutcome, PollResult
from relay.policy import classify_upstream, parse_retry_after

MAX_BODY_BYTES = 4 * 1024 * 1024

# Only failures where the request most likely never reached the upstream application are retried
# at once; everything else (5xx, 429, timeouts) goes to the persisted backoff schedule.
_IMMEDIATE_RETRY_EXCEPTIONS = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientConnectorError,
    aiohttp.ClientOSError,
)
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


class BodyTooLargeError(Exception):
    pass


class Answer(NamedTuple):
    """One HTTP answer of the task API, before classification."""

    http_status: int
    body: bytes
    retry_after: str | None

    def classify(self, task_id: str, now: float) -> PollResult:
        return classify_upstream(
            http_status=self.http_status,
            body=self.body,
            task_id=task_id,
            retry_after=parse_retry_after(self.retry_after, now),
        )


RetryGate = Callable[[], Awaitable[None]]
# Answers as they come in: (the caller's key for the poll, what the upstream answered, or the
# transport failure already classified). Called with every answer ready at once, never raising.
Deliver = Callable[[list[tuple[int, "Answer | PollResult"]]], None]


class PollTransport(Protocol):
    """Puts polls on the wire and hands their answers back in batches.

    The poller does per batch of answers what it would otherwise do per poll (one callback
    instead of a task and two futures each): half its event loop's time per poll, measured.
    """

    @property
    def available(self) -> bool:
        """False while no poll can be made at all (no poll worker running): claim nothing."""
        ...

    def submit(
        self, polls: Sequence[tuple[int, str]], *, before_retry: RetryGate, deliver: Deliver
    ) -> None:
        """GET each (key, task id). Each poll's answer reaches `deliver` exactly once, later
        (never from within this call), unless `cancel_all` comes first."""

    async def cancel_all(self) -> None:
        """Stop every poll in flight: no answer of theirs reaches `deliver` any more."""


class _Requests:
    """One fetch's requests on the wire: the first is paid for; each later one waits its turn."""

    __slots__ = ("before_retry", "sent")

    def __init__(self, before_retry: RetryGate) -> None:
        self.before_retry = before_retry
        self.sent = 0


# The fetch in progress on this asyncio task; the middleware below runs in the same task.
_current_fetch: ContextVar[_Requests | None] = ContextVar("relay_upstream_fetch", default=None)


async def _count_requests(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    # A client middleware runs once per request put on the wire, aiohttp's own silent retry of
    # a dropped keep-alive connection included: the one place that sees both kinds of retry.
    # (A TraceConfig saw them too, at ~5 % of the relay's CPU per poll.)
    requests = _current_fetch.get()
    if requests is not None:
        requests.sent += 1
        if requests.sent > 1:
            await requests.before_retry()
    return await handler(request)


def make_upstream_session(*, concurrency: int) -> aiohttp.ClientSession:
    """The session UpstreamClient needs: `concurrency` connections, every request counted."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        middlewares=(_count_requests,),
        json_serialize=lambda obj: "",  # never used: the relay only GETs upstream
    )


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read at most `limit` bytes of a body; raise BodyTooLargeError past it."""
    length = response.content_length
    if length is not None:
        if length > limit:
            raise BodyTooLargeError
        # A declared length within the limit: aiohttp reads exactly that much, never more.
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError
        chunks.append(chunk)
    return b"".join(chunks)


class UpstreamClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        attempts: int = UPSTREAM_ATTEMPTS,
    ) -> None:
        self._base = URL(base_url)
        self._tasks_path = f"{self._base.raw_path.rstrip('/')}/v1/tasks/"
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        # The first request goes straight to the session; only a dropped connection goes on to
        # aiohttp-retry, for the remaining attempts on its exponential schedule. Its wrapper on
        # every request cost ~6 % of the relay's CPU per poll, for the rare poll that retries.
        self._retries = (
            RetryClient(
                client_session=session,
                raise_for_status=False,
                retry_options=ExponentialRetry(
                    attempts=attempts - 1,
                    start_timeout=0.05,
                    max_timeout=0.5,
                    exceptions=set(_IMMEDIATE_RETRY_EXCEPTIONS),
                    retry_all_server_errors=False,
                ),
            )
            if attempts > 1
            else None
        )

    @property
    def available(self) -> bool:
        return True

    def _task_url(self, task_id: str) -> URL:
        # Registered task ids are [A-Za-z0-9_-] (api.py): already a valid path segment, so yarl
        # can skip its parse and quoting (2.5 us of a ~120 us poll). Anything else is quoted.
        segment = task_id if _SAFE_SEGMENT.fullmatch(task_id) else quote(task_id, safe="")
        return self._base.with_path(self._tasks_path + segment, encoded=True)

    async def _get(self, url: URL) -> aiohttp.ClientResponse:
        headers, timeout = self._headers, self._timeout
        try:
            return await self._session.get(
                url, headers=headers, timeout=timeout, allow_redirects=False
            )
        except _IMMEDIATE_RETRY_EXCEPTIONS:
            if self._retries is None:
                raise
        return await self._retries.get(url, headers=headers, timeout=timeout, allow_redirects=False)

    async def fetch(
        self, task_id: str, *, now: float, before_retry: RetryGate | None = None
    ) -> PollResult:
        """GET the task once (retrying a dropped connection at once, each retry after
        `before_retry`) and classify the answer."""
        answer = await self.fetch_answer(task_id, before_retry=before_retry)
        if isinstance(answer, PollResult):
            return answer
        return answer.classify(task_id, now)

    async def fetch_answer(
        self, task_id: str, *, before_retry: RetryGate | None = None
    ) -> Answer | PollResult:
        """The wire half of `fetch`: the upstream's answer as received, or the transport failure
        already classified. Poll worker processes run only this half (relay/pollworkers.py)."""
        counting = _current_fetch.set(None if before_retry is None else _Requests(before_retry))
        try:
            async with await self._get(self._task_url(task_id)) as response:
                body = await read_capped(response, MAX_BODY_BYTES)
                return Answer(response.status, body, response.headers.get("Retry-After"))
        except BodyTooLargeError:
            return PollResult(
                outcome=PollOutcome.INVALID_RESPONSE,
                detail=f"body over {MAX_BODY_BYTES} bytes",
            )
        except TimeoutError:
            return PollResult(outcome=PollOutcome.TIMEOUT, detail="no answer within the timeout")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return PollResult(outcome=PollOutcome.NETWORK_ERROR, detail=type(exc).__name__)
        finally:
            _current_fetch.reset(counting)


class InProcessPolls:
    """A PollTransport on this process's event loop: one asyncio task per poll (aiohttp's client
    needs one), the answers that came in during one turn of the loop delivered together."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._polls: set[asyncio.Task[None]] = set()
        self._ready: list[tuple[Deliver, int, Answer | PollResult]] = []
        self._generation = 0  # cancel_all moves it on: answers of older polls are dropped

    @property
    def available(self) -> bool:
        return True

    def submit(
        self, polls: Sequence[tuple[int, str]], *, before_retry: RetryGate, deliver: Deliver
    ) -> None:
        for key, task_id in polls:
            task = asyncio.create_task(
                self._poll(key, task_id, before_retry, deliver, self._generation)
            )
            self._polls.add(task)
            task.add_done_callback(self._polls.discard)

    async def _poll(
        self, key: int, task_id: str, before_retry: RetryGate, deliver: Deliver, generation: int
    ) -> None:
        try:
            answer = await self._client.fetch_answer(task_id, before_retry=before_retry)
        except Exception as exc:  # fetch_answer classifies what it expects; an answer is owed
            answer = PollResult(outcome=PollOutcome.NETWORK_ERROR, detail=type(exc).__name__)
        if generation != self._generation:
            return  # cancelled meanwhile
        if not self._ready:
            asyncio.get_running_loop().call_soon(self._deliver_ready)
        self._ready.append((deliver, key, answer))

    def _deliver_ready(self) -> None:
        ready, self._ready = self._ready, []
        deliver_grouped(ready)

    async def cancel_all(self) -> None:
        self._generation += 1
        self._ready.clear()  # before the await: nothing reaches `deliver` from here on
        for task in self._polls:
            task.cancel()
        await asyncio.gather(*self._polls, return_exceptions=True)


def deliver_grouped(ready: Sequence[tuple[Deliver, int, Answer | PollResult]]) -> None:
    """One call of each Deliver with all of its answers (there is one poller: one call)."""
    if not ready:
        return
    grouped: dict[Deliver, list[tuple[int, Answer | PollResult]]] = {}
    for deliver, key, answer in ready:
        grouped.setdefault(deliver, []).append((key, answer))
    for deliver, answers in grouped.items():
        try:
            deliver(answers)
        except Exception:  # a bug in the caller: logged; the transport's own state stays sound
            _log.exception("poll_answers_not_delivered", extra={"count": len(answers)})


_log = logging.getLogger("relay.upstream")
