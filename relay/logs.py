"""One JSON object per log line, with stable keys (`event`, `watch_id`, `task_id`, `outcome`, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import sys
import time
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
    logged on an event loop's thread wait for the end of the current turn; lines logged with no
    loop running (start-up, shutdown, other threads) are written at once, after those waiting.
    `flush()`, which `logging.shutdown()` calls at exit, writes whatever still waits; a SIGKILL
    loses at most the current turn's lines.
    """

    # Writes up to PIPE_BUF bytes to a pipe are atomic: the poll workers' lines, on the same
    # stderr, never land in the middle of one of ours.
    CHUNK_BYTES = select.PIPE_BUF

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._waiting_bytes = 0

    def emit(self, record: logging.LogRecord) -> None:  # Handler.handle holds self.lock here
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._waiting.append(line)
        self._waiting_bytes += len(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_waiting()
            return
        if len(self._waiting) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._write_waiting()

    def _write_waiting(self) -> None:
        if not self._waiting:
            return
        lines, self._waiting, self._waiting_bytes = self._waiting, [], 0
        chunk: list[str] = []
        size = 0
        # stderr gone (OSError) or closed (ValueError): nowhere left to say so, and a log line
        # is not worth a crash.
        with contextlib.suppress(OSError, ValueError):
            for line in lines:
                if chunk and size + len(line) > self.CHUNK_BYTES:
                    self._write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            self._write("".join(chunk))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


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
