"""JSON for data the relay carries and does not own: task data and metadata, exact.

orjson reads an integer past 64 bits as a float (123456789012345678901234567890 becomes
1.2345678901234568e+29) and refuses to write one. A callback promises the task API's `data`
verbatim and the metadata as registered, so a document that may hold such an integer (a run of
19 digits or more: -(2**63) - 1 has 19, 2**64 has 20) is read by the standard library, which
keeps every integer exact, and a value that holds one is written by it. Everything else stays
on orjson: the check is a byte search, and poll answers that are not a task's end never come
here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import orjson

_LONG_DIGIT_RUN = re.compile(rb"[0-9]{19}")


def may_hold_a_long_integer(raw: bytes) -> bool:
    """Whether `raw` has a run of 19 or more digits (in a number, or in a string: then the
    exact path costs a little more and changes nothing)."""
    return _LONG_DIGIT_RUN.search(raw) is not None


def loads(raw: bytes | str) -> Any:
    """Parse JSON as orjson does (NaN and Infinity refused), every integer kept exact."""
    data = raw.encode() if isinstance(raw, str) else raw
    if not may_hold_a_long_integer(data):
        return orjson.loads(data)
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        # The caller handles orjson's error (a ValueError too): one kind of failure either way.
        raise orjson.JSONDecodeError(str(exc), "", 0) from None


def dumps(value: Any) -> bytes:
    """Serialize as orjson does; a value holding an integer past 64 bits goes through the
    standard library (compact, non-ASCII escaped: the same JSON value)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise
    return json.dumps(value, separators=(",", ":"), allow_nan=False, default=_as_orjson).encode()


def _as_orjson(value: Any) -> Any:
    """What orjson writes for the types the standard library does not know: a dataclass as an
    object of its fields (the API processes' calls carry Watch records)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
