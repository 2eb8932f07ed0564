"""The callback receiver, run as its own process: answers 204 and records when each task arrived.

    python -m bench.receiver --port P [--hang]

`POST /hook` records the wall-clock arrival time (the same clock the fake upstream stamps its
flips with: one machine) of the first callback for each `data.taskId`.
`GET /_recv/stats` answers `{"count": n, "duplicates": n, "arrivals": {taskId: epoch seconds}}`.
With `--hang` every callback is recorded and then never answered: a receiver that accepts
connections and hangs, until the relay's attempt times out.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
from aiohttp import web

from bench.serving import serve_until_stopped

HANG_S = 3600.0


class Receiver:
    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.arrivals: dict[str, float] = {}
        self.count = 0
        self.duplicates = 0

    async def hook(self, request: web.Request) -> web.Response:
        arrived = time.time()
        body = await request.read()
        self.count += 1
        try:
            task_id = orjson.loads(body)["data"]["taskId"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=400)
        if task_id in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[task_id] = arrived
        if self.hang:
            await asyncio.sleep(HANG_S)  # the relay gives up first, and closes the connection
        return web.Response(status=204)

    async def stats(self, request: web.Request) -> web.Response:
        doc = {"count": self.count, "duplicates": self.duplicates, "arrivals": self.arrivals}
        return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def serve(port: int, *, hang: bool) -> None:
    receiver = Receiver(hang=hang)
    app = web.Application()
    app.router.add_post("/hook", receiver.hook)
    app.router.add_get("/_recv/stats", receiver.stats)
    await serve_until_stopped(app, port)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.receiver")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hang", action="store_true", help="never answer a callback")
    args = parser.parse_args()
    asyncio.run(serve(args.port, hang=args.hang))
    return 0


if __name__ == "__main__":
    sys.exit(main())
