"""One JSON object per log line, with stable keys (`event`, `watch_id`, `task_id`, `outcome`, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import sys
import time
import traceback
from typing import Any, TextIO

import orjson

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TurnBatchingHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes the lines logged in one event-loop turn with one write.

    A write and flush per line was a third of a log call (a registration logs one line). Lines
    logged on an event loop's thread wait for the end of the current turn. Written at once,
    after whatever waits: lines logged with no loop running (start-up, shutdown, other threads),
    records of ERROR or worse, and lines from a loop other than the one a write is queued on
    (which may have closed without running it). `flush()`, which `logging.shutdown()` calls at
    exit, writes whatever still waits; a SIGKILL loses at most the current turn's INFO and
    WARNING lines.
    """

    # Writes up to PIPE_BUF bytes to a pipe are atomic: the poll workers' lines, on the same
    # stderr, never land in the middle of one of ours.
    CHUNK_BYTES = select.PIPE_BUF

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a write is queued on

    def emit(self, record: logging.LogRecord) -> None:  # Handler.handle holds self.lock here
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._waiting.append(line)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or record.levelno >= logging.ERROR or self._flush_on not in (None, loop):
            self._write_waiting()
        elif self._flush_on is None:
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._write_waiting()

    def _write_waiting(self) -> None:
        self._flush_on = None
        if not self._waiting:
            return
        lines, self._waiting = self._waiting, []
        chunk: list[str] = []
        size = 0
        for line in lines:
            length = len(line) if line.isascii() else len(line.encode())
            if chunk and size + length > self.CHUNK_BYTES:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += length
        self._write("".join(chunk))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a log line is not worth a crash; the next chunk may still go out
            # What Handler.handleError does, without a record: say so once, never raise.
            if logging.raiseExceptions:
                with contextlib.suppress(Exception):
                    traceback.print_exc(file=sys.stderr)


def configure(level: str) -> None:
    """Route every logger (aiohttp's too) to stderr as JSON lines."""
    handler = TurnBatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log repeats what relay_http_requests_total counts; keep it at warnings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime
    # The JSON line carries none of these; gathering them costs ~30 % of a log call (the
    # logging HOWTO's "Optimization" section): the caller's frame, thread, process name.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event; `fields` become top-level keys. Never pass a secret here."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra=fields)
