"""An API process's calls to the relay process (RemoteService): every way a call can end maps to
what the handlers expect, whatever the relay process answers, or if it never does."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import orjson
import pytest

from relay import apiprocs
from relay.apiprocs import (
    CALL,
    CONFIG,
    EVENTS,
    FAILED,
    RESULT,
    ApiConfig,
    ApiProcessPool,
    CallServer,
    RelayUnreachable,
    RemoteService,
)
from relay.frames import HEADER, encode
from relay.metrics import Metrics
from relay.models import NewWatch
from relay.store.base import StoreConflict, StoreUnavailable


class Sent:
    """The frames a RemoteService wrote, decoded."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, object]] = []

    def send(self, frame: bytes) -> None:
        kind, request_id, _, _ = HEADER.unpack_from(frame)
        self.frames.append((kind, request_id, orjson.loads(frame[HEADER.size :])))


NEW = NewWatch(task_id="tk-hiapi-a", callback_url="http://127.0.0.1:9/h", metadata={"n": 1})


async def _answer_first_call(remote: RemoteService, sent: Sent, kind: int, body: object) -> None:
    while not sent.frames:
        await asyncio.sleep(0)
    _, request_id, _ = sent.frames[0]
    remote.answered(kind, request_id, orjson.dumps(body))


async def test_a_registration_goes_out_as_one_call_frame_with_the_fields() -> None:
    sent = Sent()
    remote = RemoteService(sent, call_timeout_s=30.0)
    before = time.monotonic()
    call = asyncio.ensure_future(remote.register(NEW))
    await _answer_first_call(remote, sent, FAILED, ["conflict", "x"])
    with pytest.raises(StoreConflict):
        await call
    [(kind, request_id, (deadline, *call_fields))] = sent.frames  # type: ignore[misc]
    assert (CALL, 1) == (kind, request_id)
    assert ["register", "tk-hiapi-a", "http://127.0.0.1:9/h", {"n": 1}] == call_fields
    # When its child stops waiting for it, on the one monotonic clock of the machine.
    assert before + 30.0 <= deadline <= time.monotonic() + 30.0


async def test_a_call_past_its_deadline_changes_nothing_and_fails_as_busy() -> None:
    """The relay process reads a call its child has given up on (it was stalled, say): it
    answers without running it, so a 503 there is not followed by the change here."""
    now = [100.0]
    service = _PagingService(1)
    server = CallServer(service, clock=lambda: now[0])  # type: ignore[arg-type]

    kind, payload = await server.answer(orjson.dumps([99.0, "get", "w1"]))
    assert (FAILED, "busy") == (kind, orjson.loads(payload)[0])
    assert [] == service.asked

    kind, payload = await server.answer(orjson.dumps([100.0, "get", "w2"]))
    assert RESULT == kind
    assert ["w2"] == service.asked


async def test_a_busy_answer_is_a_503_for_the_relay_not_a_store_failure() -> None:
    sent = Sent()
    remote = RemoteService(sent)
    call = asyncio.ensure_future(remote.get("w1"))
    await _answer_first_call(remote, sent, FAILED, ["busy", "the relay process is busy"])
    with pytest.raises(RelayUnreachable, match="busy"):
        await call


@pytest.mark.parametrize(
    ("failure", "raised"),
    [
        (["unavailable", "sqlite: disk I/O error"], StoreUnavailable),
        (["conflict", "the watch is already failed"], StoreConflict),
        (["internal", ""], RuntimeError),
    ],
)
async def test_each_failure_the_relay_answers_is_raised_as_the_handlers_expect(
    failure: list[str], raised: type[Exception]
) -> None:
    sent = Sent()
    remote = RemoteService(sent)
    call = asyncio.ensure_future(remote.get("wt_" + "0" * 32))
    await _answer_first_call(remote, sent, FAILED, failure)
    with pytest.raises(raised) as caught:
        await call
    if failure[1]:
        assert failure[1] == str(caught.value)


async def test_a_call_the_relay_never_answers_ends_as_a_503_not_counted_as_a_store_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent = Sent()
    remote = RemoteService(sent, call_timeout_s=0.01)
    with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.01 s") as caught:
        await remote.get("wt_" + "0" * 32)
    remote.store_failed("/watch/x", caught.value)  # what the API's error path does with it
    await asyncio.sleep(0)
    assert [] == [kind for kind, _, _ in sent.frames if kind == EVENTS]
    assert ["relay_unreachable"] == [r.getMessage() for r in caplog.records]


async def test_readiness_and_liveness_say_so_when_the_relay_is_gone() -> None:
    remote = RemoteService(Sent())
    remote.relay_gone()
    assert {"relay": "unavailable"} == await remote.readiness()
    assert not await remote.alive()


async def test_when_the_relay_is_gone_waiting_and_later_calls_fail_as_store_unavailable() -> None:
    sent = Sent()
    remote = RemoteService(sent)
    waiting = asyncio.ensure_future(remote.get("wt_" + "0" * 32))
    while not sent.frames:
        await asyncio.sleep(0)
    remote.relay_gone()
    with pytest.raises(RelayUnreachable, match="gone"):
        await waiting
    with pytest.raises(StoreUnavailable, match="gone"):
        await remote.get("wt_" + "0" * 32)
    assert 1 == len(sent.frames)  # nothing more was sent to nobody


async def test_an_answer_for_no_waiting_call_is_ignored() -> None:
    remote = RemoteService(Sent())
    remote.answered(RESULT, 99, b"null")  # its call timed out, or never was


async def test_request_counts_leave_together_at_the_end_of_the_loop_turn() -> None:
    sent = Sent()
    remote = RemoteService(sent)
    remote.record_http("/watch", "POST", 201, 0.002)
    remote.record_http("/watch", "POST", 422, 0.001)
    remote.store_failed("/watch", StoreUnavailable("sqlite: locked"))
    assert [] == sent.frames
    await asyncio.sleep(0)
    assert [
        (
            EVENTS,
            0,
            [
                ["h", "/watch", "POST", 201, 0.002],
                ["h", "/watch", "POST", 422, 0.001],
                ["s", "/watch", "sqlite: locked"],
            ],
        )
    ] == sent.frames


def test_an_api_process_refuses_a_config_of_another_protocol_version() -> None:
    """Code upgraded on disk under a running relay: the new child says so and exits 2."""
    config = orjson.dumps({"protocol": 999})
    done = subprocess.run(
        [sys.executable, "-m", "relay", "api-process"],
        input=encode(CONFIG, 0, config),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert 2 == done.returncode
    assert b"frame protocol 999" in done.stderr
    assert b"" == done.stdout


class _PagingService:
    """What CallServer needs of a LocalService, with a `get` whose answer has a chosen size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.asked: list[str] = []

    async def get(self, watch_id: str) -> dict[str, str]:
        self.asked.append(watch_id)
        return {"watchId": watch_id, "pad": "x" * self.size}

    cancel = redeliver = readiness = alive = get


async def test_an_answer_too_large_for_one_frame_fails_that_call_not_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child refuses a frame over MAX_PAYLOAD: past it, it could not find the next frame and
    would have to start again, failing every request in flight. The relay answers that one call
    with a failure instead (a 500 there), and the next call is answered as usual."""
    monkeypatch.setattr(apiprocs, "MAX_PAYLOAD", 200)
    service = _PagingService(300)
    server = CallServer(service)  # type: ignore[arg-type]

    later = time.monotonic() + 60
    kind, payload = await server.answer(orjson.dumps([later, "get", "w1"]))
    assert (FAILED, ["internal", ""]) == (kind, orjson.loads(payload))

    service.size = 10
    kind, payload = await server.answer(orjson.dumps([later, "get", "w2"]))
    assert (RESULT, {"watchId": "w2", "pad": "x" * 10}) == (kind, orjson.loads(payload))


class _ChildPipe:
    """What ApiProcessPool needs of one API process: its count of calls, and its pipe."""

    def __init__(self) -> None:
        self.calls_in_flight = 0
        self.frames: list[tuple[int, int, object]] = []

    def send(self, frame: bytes) -> None:
        kind, request_id, _, _ = HEADER.unpack_from(frame)
        self.frames.append((kind, request_id, orjson.loads(frame[HEADER.size :])))


async def test_past_its_share_of_calls_an_api_process_is_answered_busy_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stalled store must not let one API process pile up unbounded work in the relay
    process: past MAX_CALLS_PER_CHILD calls in progress, the next is refused at once."""
    monkeypatch.setattr(apiprocs, "MAX_CALLS_PER_CHILD", 2)
    release = asyncio.Event()

    class Stalled(_PagingService):
        async def get(self, watch_id: str) -> dict[str, str]:
            await release.wait()
            return await super().get(watch_id)

    config = ApiConfig(
        host="127.0.0.1", port=9, api_tokens=(), callback_allow_nets=(),
        shutdown_timeout_s=1.0, event_loop="asyncio", log_level="INFO",
    )  # fmt: skip
    pool = ApiProcessPool(config, processes=0, service=Stalled(1), metrics=Metrics())  # type: ignore[arg-type]
    child = _ChildPipe()
    later = time.monotonic() + 60
    for request_id in (1, 2, 3):
        pool.answer(child, request_id, orjson.dumps([later, "get", f"w{request_id}"]))  # type: ignore[arg-type]

    assert [(FAILED, 3, ["busy", "the relay process is busy with this process's calls"])] == (
        child.frames
    )
    assert 2 == child.calls_in_flight
    release.set()
    for _ in range(100):  # a few loop turns: the two calls finish and answer
        if not child.calls_in_flight:
            break
        await asyncio.sleep(0)
    assert 0 == child.calls_in_flight
    assert [1, 2] == sorted(request_id for kind, request_id, _ in child.frames if kind == RESULT)
    await pool.close()
