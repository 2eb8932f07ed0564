"""JSON log lines, and the handler that writes one event-loop turn's lines with one write."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from relay import logs
from relay.logs import JsonFormatter, TurnBatchingHandler


class RecordingStream(io.StringIO):
    """Keeps every write() apart, to count them; fails the next `failures` writes."""

    def __init__(self, *, fail: bool = False, failures: int = 0) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.fail = fail
        self.failures = failures

    def write(self, text: str) -> int:
        if self.fail:
            raise BrokenPipeError("stderr is gone")
        if self.failures:
            self.failures -= 1
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")
        self.writes.append(text)
        return len(text)


@pytest.fixture
def stream() -> RecordingStream:
    return RecordingStream()


@pytest.fixture
def logger(stream: RecordingStream) -> Iterator[logging.Logger]:
    handler = TurnBatchingHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("relay.test_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger
    logger.handlers[:] = []


def events(text: str) -> list[str]:
    return [orjson.loads(line)["event"] for line in text.splitlines()]


async def test_one_turns_lines_leave_in_one_write_in_order(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    for name in ("first", "second", "third"):
        logs.event(logger, name, watch_id="wt_1")
    assert [] == stream.writes  # still this turn

    await asyncio.sleep(0)  # the turn ends; the flush queued at its first line runs

    assert 1 == len(stream.writes)
    assert ["first", "second", "third"] == events(stream.writes[0])
    assert "wt_1" == orjson.loads(stream.writes[0].splitlines()[0])["watch_id"]


def test_with_no_loop_running_each_line_leaves_at_once(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logs.event(logger, "starting")
    logs.event(logger, "stopping")

    assert [["starting"], ["stopping"]] == [events(w) for w in stream.writes]


@pytest.mark.parametrize("padding", ["x" * 10, "ж" * 40], ids=["ascii", "two-byte utf-8"])
async def test_a_long_turn_is_written_in_pieces_no_larger_than_an_atomic_pipe_write(
    logger: logging.Logger, stream: RecordingStream, padding: str
) -> None:
    """PIPE_BUF counts bytes: a line of Cyrillic text is twice as long on the wire."""
    names = [f"line-{i:04d}" for i in range(300)]  # 70-160 bytes each: 21-48 KB in all
    for name in names:
        logs.event(logger, name, padding=padding)

    await asyncio.sleep(0)

    assert len(stream.writes) > 1
    assert all(len(w.encode()) <= TurnBatchingHandler.CHUNK_BYTES for w in stream.writes)
    assert all(w.endswith("\n") for w in stream.writes)
    assert names == events("".join(stream.writes))


async def test_flush_writes_what_waits_before_the_turn_ends(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    """logging.shutdown() flushes every handler: a loop stopped mid-turn loses nothing."""
    logs.event(logger, "last words")

    for handler in logger.handlers:
        handler.flush()

    assert ["last words"] == events("".join(stream.writes))


def test_a_stream_that_fails_drops_the_lines_without_raising(logger: logging.Logger) -> None:
    broken = RecordingStream(fail=True)
    handler = logger.handlers[0]
    assert isinstance(handler, TurnBatchingHandler)
    handler.setStream(broken)

    logs.event(logger, "into the void")  # would raise BrokenPipeError if it were let out

    broken.fail = False
    logs.event(logger, "after")
    assert [["after"]] == [events(w) for w in broken.writes]


async def test_an_error_is_written_at_once_after_the_lines_waiting_before_it(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logs.event(logger, "about to fail")
    logs.event(logger, "store_unavailable", logging.ERROR)

    assert ["about to fail", "store_unavailable"] == events("".join(stream.writes))


def test_lines_a_closed_loop_never_wrote_leave_with_the_next_loops_first_line(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    old = asyncio.new_event_loop()
    # Logged in the loop's last turn: the write it queues is for a turn that never comes.
    old.call_soon(lambda: (logs.event(logger, "last of the old loop"), old.stop()))
    old.run_forever()
    old.close()
    assert [] == stream.writes

    async def first_turn() -> list[str]:
        logs.event(logger, "first of the new loop")
        return events("".join(stream.writes))  # before this turn ends

    assert ["last of the old loop", "first of the new loop"] == asyncio.run(first_turn())


async def test_a_failed_write_loses_only_its_own_piece_and_never_reaches_the_caller(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    stream.failures = 1  # the first piece fails with something other than an OSError
    names = [f"line-{i:04d}" for i in range(300)]
    for name in names:
        logs.event(logger, name, padding="x" * 10)

    await asyncio.sleep(0)

    written = events("".join(stream.writes))
    assert written == names[-len(written) :]  # the pieces after the failed one, in order
    assert 0 < len(written) < len(names)
