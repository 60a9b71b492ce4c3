"""Journal record codec and chain rules: round trip, torn/corrupt records never decode,
placement is one rule, commit_seq tells corruption from a torn tail."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core import journal
from agents.core.record import OPS, Record
from agents.errors import ChecksumMismatch, TornRecord, UnsupportedFormat

pytestmark = pytest.mark.unit

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k != "data"), json_values, max_size=6
).flatmap(lambda d: st.one_of(st.just(d), st.binary(max_size=5000).map(lambda b: {**d, "data": b})))
records = st.builds(
    Record,
    seq=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 2**63 - 1),
    op=st.sampled_from(sorted(OPS)),
    payload=payloads,
    commit_seq=st.integers(0, 2**63 - 1),
    volume_tag=st.integers(0, 2**32 - 1),
)


@given(records)
def test_round_trip_is_exact_and_unpadded(record: Record) -> None:
    data = record.encode()
    assert len(data) == struct.unpack_from("<I", data, 8)[0]  # packed: no padding
    back = Record.decode(data)
    assert back == record
    assert (back.commit_seq, back.volume_tag) == (record.commit_seq, record.volume_tag)
    assert Record.peek_length(data) == len(data)


@given(records, st.data())
def test_truncated_record_never_decodes(record: Record, data: st.DataObject) -> None:
    raw = record.encode()
    length = len(raw)
    cut = data.draw(st.integers(0, length - 1))
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.decode(raw[:cut])
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.verify(raw[:cut])  # the end-of-journal witness check: same verdict


@given(records, st.data())
def test_flipped_bit_never_decodes(record: Record, data: st.DataObject) -> None:
    raw = bytearray(record.encode())
    length = struct.unpack_from("<I", raw, 8)[0]
    bit = data.draw(st.integers(0, length * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((TornRecord, ChecksumMismatch, UnsupportedFormat)):
        Record.verify(bytes(raw))
    try:
        got = Record.decode(bytes(raw))
    except (TornRecord, ChecksumMismatch, UnsupportedFormat):
        return
    raise AssertionError(f"flipped bit {bit} went unnoticed: decoded {got}")


@given(records)
def test_verify_gives_the_numbers_decode_gives(record: Record) -> None:
    got = Record.decode(record.encode())
    assert Record.verify(record.encode()) == (
        got.seq,
        got.epoch,
        got.commit_seq,
        got.volume_tag,
    )


@pytest.mark.parametrize("version", [1, 99])
def test_other_versions_with_valid_crc_are_unsupported(version: int) -> None:
    raw = bytearray(Record(1, 1, "mkdir", {"path": "/a"}).encode())
    length = len(raw)
    struct.pack_into("<H", raw, 4, version)
    struct.pack_into("<I", raw, length - 4, zlib.crc32(bytes(raw[: length - 4])))
    with pytest.raises(UnsupportedFormat, match=f"format {version}") as info:
        Record.decode(bytes(raw))
    assert ("format the image again" in info.value.message) == (version == 1)


def test_garbage_and_zeros_are_not_records() -> None:
    assert Record.peek_length(bytes(4096)) is None
    with pytest.raises(TornRecord):
        Record.decode(bytes(4096))


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
    encoded = [r.encode() for r in batch]
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


@given(records)
def test_peek_numbers_matches_decode(record: Record) -> None:
    raw = record.encode()
    assert Record.peek_numbers(raw) == (
        record.seq,
        record.epoch,
        record.commit_seq,
        record.volume_tag,
    )
    assert Record.peek_numbers(bytes(4096)) is None
