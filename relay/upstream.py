"""The task-API client: one `GET /v1/tasks/{id}` in, one typed PollResult out. Never raises.

A fetch may put more than one request on the wire: aiohttp silently resends an idempotent
request once after a dropped connection, and a dropped connection is retried at once, twice.
Every request after a fetch's first waits for the caller's `before_retry` (the poller's token
bucket), so an upstream that drops every connection still sees no more than the rate budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, Protocol

import aiohttp
from aiohttp_retry import ExponentialRetry, RetryClient

from relay.config import UPSTREAM_ATTEMPTS
from relay.models import PollOutcome, PollResult
from relay.policy import classify_upstream, parse_retry_after

MAX_BODY_BYTES = 4 * 1024 * 1024

# Only failures where the request most likely never reached the upstream application are retried
# at once; everything else (5xx, 429, timeouts) goes to the persisted backoff schedule.
_IMMEDIATE_RETRY_EXCEPTIONS: set[type[Exception]] = {
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientConnectorError,
    aiohttp.ClientOSError,
}


class BodyTooLargeError(Exception):
    pass


RetryGate = Callable[[], Awaitable[None]]


class TaskFetcher(Protocol):
    async def fetch(
        self, task_id: str, *, now: float, before_retry: RetryGate | None = None
    ) -> PollResult: ...


class _Requests:
    """One fetch's requests on the wire: the first is paid for; each later one waits its turn."""

    __slots__ = ("before_retry", "sent")

    def __init__(self, before_retry: RetryGate) -> None:
        self.before_retry = before_retry
        self.sent = 0


async def _on_request_on_the_wire(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
) -> None:
    # Every request takes exactly one connection (new or pooled), retries included: the one
    # place that sees aiohttp's own silent retry as well as ours.
    requests = (context.trace_request_ctx or {}).get("requests")
    if isinstance(requests, _Requests):
        requests.sent += 1
        if requests.sent > 1:
            await requests.before_retry()


def make_upstream_session(*, concurrency: int) -> aiohttp.ClientSession:
    """The session UpstreamClient needs: `concurrency` connections, every request counted."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(_on_request_on_the_wire)
    trace.on_connection_reuseconn.append(_on_request_on_the_wire)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        trace_configs=[trace],
        json_serialize=lambda obj: "",  # never used: the relay only GETs upstream
    )


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read at most `limit` bytes of a body; raise BodyTooLargeError past it."""
    if response.content_length is not None and response.content_length > limit:
        raise BodyTooLargeError
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
        self._base_url = base_url.rstrip("/")
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._client = RetryClient(
            client_session=session,
            raise_for_status=False,
            retry_options=ExponentialRetry(
                attempts=attempts,
                start_timeout=0.05,
                max_timeout=0.5,
                exceptions=_IMMEDIATE_RETRY_EXCEPTIONS,
                retry_all_server_errors=False,
            ),
        )

    async def fetch(
        self, task_id: str, *, now: float, before_retry: RetryGate | None = None
    ) -> PollResult:
        """GET the task once (retrying a dropped connection at once, each retry after
        `before_retry`) and classify the answer."""
        url = f"{self._base_url}/v1/tasks/{task_id}"
        trace = {} if before_retry is None else {"requests": _Requests(before_retry)}
        try:
            async with self._client.get(
                url,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
                trace_request_ctx=trace,
            ) as response:
                body = await read_capped(response, MAX_BODY_BYTES)
                return classify_upstream(
                    http_status=response.status,
                    body=body,
                    task_id=task_id,
                    retry_after=parse_retry_after(response.headers.get("Retry-After"), now),
                )
        except BodyTooLargeError:
            return PollResult(
                outcome=PollOutcome.INVALID_RESPONSE,
                detail=f"body over {MAX_BODY_BYTES} bytes",
            )
        except TimeoutError:
            return PollResult(outcome=PollOutcome.TIMEOUT, detail="no answer within the timeout")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return PollResult(outcome=PollOutcome.NETWORK_ERROR, detail=type(exc).__name__)
