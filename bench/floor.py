"""The registration floor, run as its own process: a bare aiohttp `POST /watch`, nothing else.

    python -m bench.floor --port P [--loop uvloop|asyncio]

It reads the body, parses it with orjson and answers 201 with a small JSON document, on uvloop
as the relay does by default: no validation, no store, no metrics, no logs. What the load client
gets from it on this machine is the most `POST /watch` one aiohttp process can answer here,
which puts the relay's registrations per second in scale, as the bare client's GETs put its
polls (BENCHMARKS.md). `GET /_floor/ready` answers 200 once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from aiohttp import web

from bench.serving import serve_until_stopped


async def watch(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    document = {"taskId": body["taskId"], "callbackUrl": body["callbackUrl"], "state": "watching"}
    return web.Response(status=201, body=orjson.dumps(document), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/watch", watch)
    app.router.add_get("/_floor/ready", ready)
    await serve_until_stopped(app, port)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
