"""Journal placement and chain rules: placement is one rule, split finds exactly the packed
records, the cursor takes only the next link, commit_seq tells corruption from a torn tail.
(The record codec itself: tests/unit/test_record.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core import journal
from agents.core.record import Record
from agents.errors import TornRecord
from tests.unit.test_record import KEY, records

pytestmark = pytest.mark.unit


@given(st.integers(0, 64 * 4096), st.integers(1, 16), st.integers(16, 64))
def test_a_batch_goes_to_the_next_boundary_or_wraps_to_zero(pos: int, n_blocks: int,
                                                             ring_blocks: int) -> None:
    ring, n = ring_blocks * 4096, n_blocks * 4096
    pos = min(pos, ring)
    start = journal.place_batch(pos, n, ring)
    assert start % 4096 == 0 and start + n <= ring
    assert start == journal.align_up(pos) or start == 0
    # a follower finds it among the places it tries, after the same-batch one
    assert start in journal.candidates(pos, ring)
    used = journal.consumed(pos, start, n, ring)
    assert used == n + (start - pos if start >= pos else ring - pos)


@given(st.integers(0, 64 * 4096), st.integers(16, 64))
def test_candidates_are_same_batch_then_boundary_then_zero(pos: int, ring_blocks: int) -> None:
    ring = ring_blocks * 4096
    pos = min(pos, ring)
    expected = [p for p in dict.fromkeys((pos, -(-pos // 4096) * 4096, 0)) if p < ring]
    assert journal.candidates(pos, ring) == expected


@settings(deadline=None)  # the machine is shared: a slow example is no failure
@given(st.lists(records, min_size=1, max_size=6))
def test_split_finds_every_packed_record_and_nothing_else(batch: list[Record]) -> None:
    encoded = [r.encode(KEY) for r in batch]
    packed = b"".join(encoded)
    offsets = [sum(map(len, encoded[:i])) for i in range(len(encoded))]
    assert journal.split(packed) == list(zip(offsets, map(len, encoded), strict=True))
    if len(packed) > 1:
        with pytest.raises(TornRecord):
            journal.split(packed[:-1])  # a cut batch never splits into whole records
    with pytest.raises(TornRecord):
        journal.split(packed + bytes(8))  # nor does its padding


def test_batch_larger_than_ring_is_refused() -> None:
    with pytest.raises(ValueError):
        journal.place_batch(0, 8192, 4096)


def test_cursor_accepts_only_the_next_seq_and_no_older_epoch() -> None:
    cursor = journal.Cursor(pos=0, next_seq=5, epoch=3)
    assert cursor.accepts(Record(5, 3, "delete", {}))
    assert cursor.accepts(Record(5, 4, "delete", {}))
    assert not cursor.accepts(Record(5, 2, "delete", {}))
    assert not cursor.accepts(Record(6, 3, "delete", {}))
    cursor.advance(8192, 4096)
    assert (cursor.pos, cursor.next_seq) == (12288, 6)


def test_commit_seq_separates_corruption_from_torn_tail() -> None:
    # same batch as the missing record (commit_seq below it): a torn batch, not corruption
    assert not journal.proves_corruption(Record(11, 1, "put", {}, commit_seq=9), 10, 1)
    # a later batch that knew seq 10 was durable: corruption
    assert journal.proves_corruption(Record(12, 1, "put", {}, commit_seq=11), 10, 1)
    # a fenced writer's leftover (older epoch) proves nothing
    assert not journal.proves_corruption(Record(12, 1, "put", {}, commit_seq=11), 10, 2)
