"""A concurrent HTTP load client, run as its own process; prints one JSON result on stdout.

    python -m bench.load get   --url URL --ids PREFIX --id-count N  [--header K:V] ...
    python -m bench.load watch --url URL --ids PREFIX --callback URL [--count N] ...

`get` is the ceiling: a bare aiohttp loop, keep-alive, GET `URL + PREFIX + i` for i cycling
over `--id-count` ids. `watch` POSTs `{"taskId": PREFIX + i, "callbackUrl": ...}`, each i once,
by default with `RawClient` (`--client aiohttp` to compare): a load generator should cost the
machine as little as it can, since the relay under test shares the cores with it.
Both keep `--concurrency` requests in flight for `--duration` seconds (or until `--count`
requests were sent); requests started during the first `--warmup` seconds are not measured.
Both run on uvloop, as the relay does by default (`--loop asyncio` to compare).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections import Counter
from itertools import count as counter
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from bench.stats import latency_summary

REQUEST_TIMEOUT_S = 30.0


class RawClient:
    """Minimal HTTP/1.1 keep-alive POSTs on one connection, in the way wrk drives a server.

    Knows only what the relay answers: a status line, headers with Content-Length, a body (a
    chunked answer would fail to parse, and count as an error, never as a success). `headers`
    must be complete when it is made: Content-Type included.
    About a fifth of aiohttp's client CPU per request here, which leaves the cores to the relay.
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._head = f"POST {target} HTTP/1.1\r\nHost: {host}:{self._port}\r\n{head}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> int:
        """POST `body`; the answer's status once its whole body has arrived."""
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._reader, self._writer
        try:
            writer.write(f"{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if b"connection: close" in head.lower():
                self.close()
            return status
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def client_of(args: argparse.Namespace) -> str:
    """The client the run uses: `get` (the ceiling) is always a bare aiohttp loop."""
    return args.client if args.mode == "watch" else "aiohttp"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    numbers = counter()
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    measured = 0
    total_ok = 0
    start = time.perf_counter()
    warm = start + args.warmup
    end = start + args.duration
    limit = args.count

    def next_request() -> tuple[str, bytes | None] | None:
        i = next(numbers)
        if limit is not None and i >= limit:
            return None
        if args.mode == "get":
            return f"{args.url}{args.ids}{i % args.id_count}", None
        body = orjson.dumps({"taskId": f"{args.ids}{i}", "callbackUrl": args.callback})
        return args.url, body

    client = client_of(args)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal measured, total_ok
        raw = RawClient(args.url, headers) if client == "raw" else None
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            request = next_request()
            if request is None:
                return
            url, body = request
            try:
                if raw is not None and body is not None:  # raw is only made for watch
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        status = await raw.post(body)
                elif body is None:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        status = response.status
                else:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                key = str(status)
            except (
                aiohttp.ClientError,
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as exc:
                status, key = 0, type(exc).__name__
            t1 = time.perf_counter()
            statuses[key] += 1
            ok = 200 <= status < 300
            total_ok += ok
            if t0 >= warm and t1 <= end:
                measured += 1
                if ok:
                    latencies.append(t1 - t0)

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers.setdefault("Content-Type", "application/json")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    finished = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    # With --count the run may end before --duration: measure up to the last answer.
    window = max(1e-9, min(end, finished) - warm)
    return {
        "mode": args.mode,
        "concurrency": args.concurrency,
        "measured_requests": measured,
        "window_s": window,
        "rate_per_s": measured / window,
        "ok_total": total_ok,
        "sent_total": sum(statuses.values()),
        "statuses": dict(statuses),
        "latency_ms": latency_summary(latencies),
        "elapsed_s": finished - start,
        "client_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "client_process_cpu_s": cpu1.ru_utime + cpu1.ru_stime,  # start-up and imports included
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.load")
    parser.add_argument("mode", choices=("get", "watch"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--ids", required=True, help="task id prefix; the request number follows")
    parser.add_argument("--id-count", type=int, default=1000, help="get: ids to cycle over")
    parser.add_argument("--callback", default="http://127.0.0.1:9/hook")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, required=True, help="upper bound, seconds")
    parser.add_argument("--warmup", type=float, default=0.0)
    parser.add_argument("--count", type=int, default=None, help="stop after this many requests")
    parser.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="watch: the HTTP client (get always uses aiohttp: the ceiling is a bare aiohttp loop)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop; uvloop (the relay's default) makes the ceiling the most one process"
        " can do here",
    )
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    result["loop"] = args.loop
    result["client"] = client_of(args)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
