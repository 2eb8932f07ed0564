"""Properties of the upstream envelope parser: any answer at all classifies without raising, and a
valid envelope for the task reaches the snapshot exactly as sent, whatever else it carries."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from relay.models import PollOutcome, TaskStatus
from relay.policy import classify_upstream
from tests import strategies

TASK = "tk-hiapi-props-1"
STATUSES = [status.value for status in TaskStatus if status is not TaskStatus.UNKNOWN]


@given(
    strategies.http_statuses(),
    st.one_of(strategies.envelope_bodies(), st.binary(max_size=500)),
    st.one_of(st.none(), st.floats(0, 1e6)),
)
@example(200, b'{"code": 1e400, "data": {}}', None)  # orjson refuses a number that overflows
@example(200, b'{"code": 200, "data": {"taskId": "\\ud800"}}', None)  # a lone surrogate
@example(200, b"\xef\xbb\xbf{}", None)  # a byte-order mark
def test_any_answer_classifies_to_an_outcome_without_raising(
    http_status: int, body: bytes, retry_after: float | None
) -> None:
    """Arbitrary bytes or JSON under any status: a PollOutcome, never an exception."""
    actual = classify_upstream(
        http_status=http_status, body=body, task_id=TASK, retry_after=retry_after
    )

    assert actual.outcome in set(PollOutcome)
    assert http_status == actual.http_status
    assert (actual.outcome is PollOutcome.OK) == (actual.snapshot is not None)


@given(
    st.sampled_from([200, 201, 204, 299]),
    st.one_of(st.sampled_from(STATUSES), st.text()),
    strategies.json_objects(),
    strategies.json_objects(),
)
def test_a_valid_envelope_reaches_the_snapshot_verbatim_with_any_extra_fields(
    http_status: int, status: str, extra_data: dict[str, Any], extra_envelope: dict[str, Any]
) -> None:
    """Extra fields in `data` and beside it change nothing: the snapshot's data is `data` as sent."""
    data = {**extra_data, "taskId": TASK, "status": status}
    body = orjson.dumps({**extra_envelope, "code": 200, "data": data})

    actual = classify_upstream(http_status=http_status, body=body, task_id=TASK)

    assert actual.snapshot is not None
    assert (PollOutcome.OK, status, TaskStatus.parse(status)) == (
        actual.outcome,
        actual.snapshot.raw_status,
        actual.snapshot.status,
    )
    # The same bytes once forwarded: same keys, same order, same values.
    assert orjson.dumps(data) == orjson.dumps(actual.snapshot.data)


@given(strategies.json_objects(), st.text().filter(lambda t: t != TASK))
def test_an_envelope_for_another_task_is_never_taken_for_this_one(
    extra_data: dict[str, Any], other: str
) -> None:
    """Code 200 with another task's id is an invalid response, never an OK for this task."""
    body = orjson.dumps({"code": 200, "data": {**extra_data, "taskId": other, "status": "success"}})

    actual = classify_upstream(http_status=200, body=body, task_id=TASK)

    assert (PollOutcome.INVALID_RESPONSE, None) == (actual.outcome, actual.snapshot)
