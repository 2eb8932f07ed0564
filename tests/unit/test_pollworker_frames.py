"""The frames between the relay and its poll worker processes: whatever way the pipe splits the
bytes, the same frames come out, in order; a stream that is not frames is refused."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.pollworkers import (
    ANSWER,
    CONFIG,
    FETCH,
    HEADER,
    MAX_PAYLOAD,
    READY,
    WANT_TOKEN,
    FrameDecoder,
    FrameError,
    encode,
)

frames = st.lists(
    st.tuples(
        st.integers(CONFIG, WANT_TOKEN),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**16 - 1),
        st.binary(max_size=300),
    ),
    max_size=20,
)


@given(frames=frames, cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_frames_survive_any_split_of_the_byte_stream(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(
        encode(kind, rid, payload, small=small) for kind, rid, small, payload in frames
    )
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = FrameDecoder(last_kind=READY, max_payload=MAX_PAYLOAD)
    out = []
    for start, end in itertools.pairwise(bounds):
        out += decoder.feed(stream[start:end])
    assert out == frames


def test_a_frame_bigger_than_any_answer_is_refused_before_its_bytes_arrive() -> None:
    with pytest.raises(FrameError):
        FrameDecoder(last_kind=READY, max_payload=MAX_PAYLOAD).feed(
            HEADER.pack(ANSWER, 1, 200, MAX_PAYLOAD + 1)
        )


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(FrameError):
        FrameDecoder(last_kind=READY, max_payload=MAX_PAYLOAD).feed(encode(99, 1, b"x"))


def test_a_frame_is_held_until_its_last_byte() -> None:
    frame = encode(FETCH, 7, b"tk-hiapi-1")
    decoder = FrameDecoder(last_kind=READY, max_payload=MAX_PAYLOAD)
    assert decoder.feed(frame[:-1]) == []
    assert decoder.feed(frame[-1:]) == [(FETCH, 7, 0, b"tk-hiapi-1")]
