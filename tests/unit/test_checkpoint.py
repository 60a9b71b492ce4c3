"""Checkpoints: codec round trip (index + quarantine), torn slot falls back, refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core import checkpoint as ckpt
from agents.core.allocator import Extent
from agents.core.index import Index
from agents.core.record import Record
from agents.errors import BadMagic, ChecksumMismatch, NoSpace, TornRecord

pytestmark = pytest.mark.unit


def _index(n: int) -> Index:
    index = Index()
    for i in range(n):
        index.apply(
            Record(
                i + 1,
                1,
                "put",
                {
                    "path": f"/d{i % 3}/f{i}",
                    "size": 5000,
                    "mtime": 1.5,
                    "crc": i,
                    "chunk": 1 << 20,
                    "extents": [[(i + 10) * 8192, 8192]],
                    "sums": [i],
                },
            )
        )
    index.apply(
        Record(
            n + 1,
            2,
            "put",
            {"path": "/inline", "size": 3, "mtime": 0.0, "crc": 1, "data": b"\x00\xffz"},
        )
    )
    return index


@settings(max_examples=30)
@given(st.integers(0, 50), st.lists(st.tuples(st.integers(0, 99), st.integers(1, 9)), max_size=5))
def test_round_trip(n: int, quarantine: list[tuple[int, int]]) -> None:
    index = _index(n)
    q = [(seq, Extent(k * 4096, 4096)) for seq, k in quarantine]
    raw = ckpt.encode(index, q, 12288, 1 << 20)
    assert len(raw) % 4096 == 0
    header = ckpt.decode_header(raw[:4096])
    assert (header.seq, header.epoch, header.journal_pos) == (n + 1, 2, 12288)
    back = ckpt.decode(header, raw[4096:])
    assert back.index.snapshot() == index.snapshot()
    assert back.quarantine == q


def test_torn_body_or_header_is_refused() -> None:
    raw = ckpt.encode(_index(20), [], 0, 1 << 20)
    header = ckpt.decode_header(raw[:4096])
    with pytest.raises(TornRecord):
        ckpt.decode(header, raw[4096:4100])
    body = bytearray(raw[4096:])
    body[10] ^= 0x40
    with pytest.raises(ChecksumMismatch):
        ckpt.decode(header, bytes(body))
    head = bytearray(raw[:4096])
    head[9] ^= 1
    with pytest.raises(ChecksumMismatch):
        ckpt.decode_header(bytes(head))
    with pytest.raises(BadMagic):
        ckpt.decode_header(bytes(4096))


def test_choose_prefers_the_highest_valid_seq() -> None:
    a = ckpt.decode_header(ckpt.encode(_index(1), [], 0, 1 << 20)[:4096])
    b = ckpt.decode_header(ckpt.encode(_index(3), [], 0, 1 << 20)[:4096])
    assert ckpt.choose([a, b]) == [1, 0]
    assert ckpt.choose([a, None]) == [0]
    assert ckpt.choose([None, None]) == []


def test_too_big_for_the_slot() -> None:
    with pytest.raises(NoSpace):
        ckpt.encode(_index(200), [], 0, 4096)
