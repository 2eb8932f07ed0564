"""JSON that keeps every integer: orjson's bytes and errors, exact past 64 bits."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay import jsondata

BIG = 123456789012345678901234567890

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_within_64_bits_it_is_orjson_byte_for_byte(value: object) -> None:
    encoded = jsondata.dumps(value)
    assert orjson.dumps(value) == encoded
    assert orjson.loads(encoded) == jsondata.loads(encoded)


@given(json_values, st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1))
@example(value=None, big=-(2**63) - 1)  # 19 digits: the shortest integer orjson gets wrong
@example(value=None, big=2**64)
def test_integers_past_64_bits_round_trip_exact(value: object, big: int) -> None:
    document = {"value": value, "big": big, "nested": [{"big": big}]}

    assert document == jsondata.loads(jsondata.dumps(document))


def test_orjson_alone_would_turn_them_into_floats_and_refuse_to_write_them() -> None:
    """What this module is for: if orjson ever keeps them exact, it can go."""
    assert isinstance(orjson.loads(str(BIG).encode()), float)
    with pytest.raises(orjson.JSONEncodeError, match="64-bit"):
        orjson.dumps(BIG)
    assert BIG == jsondata.loads(str(BIG))
    assert str(BIG).encode() == jsondata.dumps(BIG)


def test_a_long_digit_run_in_a_string_changes_nothing() -> None:
    raw = b'{"taskId":"tk-hiapi-123456789012345678901234567890","n":1.5,"s":"\\u00e9"}'
    assert orjson.loads(raw) == jsondata.loads(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"big": 123456789012345678901234567890, "x": NaN}',
        b'{"big": 123456789012345678901234567890, "x": Infinity}',
        b'{"big": 123456789012345678901234567890',
        b"[123456789012345678901234567890] trailing",
    ],
)
def test_the_exact_path_refuses_what_orjson_refuses_with_orjsons_error(raw: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw.replace(b"123456789012345678901234567890", b"1"))
    with pytest.raises(orjson.JSONDecodeError):
        jsondata.loads(raw)


def test_writing_a_dataclass_with_a_long_integer_gives_its_fields() -> None:
    @dataclasses.dataclass(slots=True)
    class Record:
        name: str
        metadata: dict[str, int]

    record = Record(name="w", metadata={"big": BIG})
    assert b'{"name":"w","metadata":{"big":123456789012345678901234567890}}' == jsondata.dumps(
        record
    )


def test_other_encode_errors_are_orjsons_own() -> None:
    with pytest.raises(orjson.JSONEncodeError):
        jsondata.dumps({"not json": object()})
    with pytest.raises(orjson.JSONEncodeError):
        jsondata.dumps({1j: 1})  # a key that is not a string
