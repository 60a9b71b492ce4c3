"""Checkpoints v2: codec round trip (root + free map + quarantine), torn slot falls back,
refusals."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core import checkpoint as ckpt
from agents.core.allocator import Extent
from agents.core.pages import PageRef
from agents.errors import BadMagic, ChecksumMismatch, CorruptMetadata, NoSpace, TornRecord

pytestmark = pytest.mark.unit

ROOT = PageRef(1024, 7, 0xDEADBEEF)


def _encode(seq: int = 5, *, root: PageRef | None = ROOT, free: int = 3,
            slot: int = 1 << 20) -> bytes:
    return ckpt.encode(seq, 2, root, [Extent(k * 8192, 4096) for k in range(free)], [], 0, slot)


@settings(max_examples=30)
@given(st.integers(0, 50), st.booleans(),
       st.lists(st.tuples(st.integers(0, 99), st.integers(1, 9)), max_size=5))
def test_round_trip(n: int, has_root: bool, quarantine: list[tuple[int, int]]) -> None:
    q = [(seq, Extent(k * 4096, 4096)) for seq, k in quarantine]
    free = [Extent(k * 8192, 4096) for k in range(n)]
    root = ROOT if has_root else None
    raw = ckpt.encode(n + 1, 2, root, free, q, 12288, 1 << 20)
    assert len(raw) % 4096 == 0
    header = ckpt.decode_header(raw[:4096])
    assert (header.seq, header.epoch, header.journal_pos) == (n + 1, 2, 12288)
    back = ckpt.decode(header, raw[4096:])
    assert (back.root, back.free, back.quarantine) == (root, free, q)


def test_torn_body_or_header_is_refused() -> None:
    raw = _encode(free=200)
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


@pytest.mark.parametrize("doc", [
    {"root": [1, 2], "free": [], "quarantine": []},
    {"root": None, "free": [[1, 2, 3]], "quarantine": []},
    {"root": None, "free": [[-1, 4096]], "quarantine": []},
    {"root": None, "free": [], "quarantine": [[1, 2]]},
    {"root": None, "quarantine": []},
    [],
])
def test_malformed_bodies_are_refused(doc: object) -> None:
    body = zlib.compress(json.dumps(doc).encode())
    header = ckpt.CheckpointHeader(1, 1, 0, len(body), zlib.crc32(body))
    with pytest.raises(CorruptMetadata):
        ckpt.decode(header, body)


def test_choose_prefers_the_highest_valid_seq() -> None:
    a = ckpt.decode_header(_encode(1)[:4096])
    b = ckpt.decode_header(_encode(3)[:4096])
    assert ckpt.choose([a, b]) == [1, 0]
    assert ckpt.choose([a, None]) == [0]
    assert ckpt.choose([None, None]) == []


def test_too_big_for_the_slot() -> None:
    with pytest.raises(NoSpace):
        _encode(free=2000, slot=4096)
