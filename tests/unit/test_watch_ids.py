"""Watch ids: time-ordered, random where it counts, never reused across a pool refill."""

from __future__ import annotations

from relay.api import _RandomBytes, new_watch_id


def test_ids_sort_by_creation_time_and_do_not_repeat() -> None:
    ids = [new_watch_id(1_700_000_000.0 + i / 1000) for i in range(3000)]  # several refills
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 35 and i.startswith("wt_") for i in ids)


def test_the_random_pool_hands_out_each_byte_once_then_reads_more() -> None:
    pool = _RandomBytes(chunk=25)
    taken = [pool.take(10) for _ in range(5)]  # 10 + 10, then a refill (5 bytes left over)
    assert all(len(t) == 10 for t in taken)
    assert len(set(taken)) == 5
