"""Superblock: round trip, a torn write of one copy leaves the other chosen, refusals."""

from __future__ import annotations

import itertools
import random
import struct
import uuid
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core.superblock import SLOTS, Superblock, choose, layout
from agents.errors import BadMagic, ChecksumMismatch, UnsupportedFormat

pytestmark = pytest.mark.unit

VID = str(uuid.UUID(int=7))


def _sb(gen: int, fleet: str = "f1") -> Superblock:
    sb = layout(1 << 30, fleet=fleet, volume_id=VID)
    return Superblock(**{**sb.__dict__, "generation": gen})


@given(st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255), st.integers(1, 2**40))
def test_round_trip(fleet: str, gen: int) -> None:
    sb = _sb(gen, fleet)
    block = sb.encode()
    assert len(block) == 4096
    assert Superblock.decode(block) == sb


@given(st.integers(2, 2**40), st.integers(0, 4096), st.none() | st.integers(0, 2**32))
def test_torn_write_of_the_next_generation_leaves_a_valid_copy(
    gen: int, cut: int, noise: int | None
) -> None:
    old, new = _sb(gen), _sb(gen + 1)
    # what the slot held before: the generation before ``old``, or random bytes
    garbage = _sb(gen - 1).encode() if noise is None else random.Random(noise).randbytes(4096)
    disk = bytearray(8192)
    disk[old.slot : old.slot + 4096] = old.encode()
    # the new generation goes to the other slot; the write tears after `cut` bytes and the
    # rest of the block holds whatever was there before (garbage)
    torn = new.encode()[:cut] + garbage[cut:]
    disk[new.slot : new.slot + 4096] = torn
    chosen = choose([bytes(disk[s : s + 4096]) for s in SLOTS])
    assert chosen in (old, new)
    if cut < 4096 and torn != new.encode():
        # only a complete write (or garbage identical to it) may win
        assert chosen == old or Superblock.decode(torn) == new


def test_geometry_is_ordered_and_aligned() -> None:
    sb = layout(256 << 20, fleet="x", volume_id=VID)
    # the ring on whole 64 KiB pieces (what a discard gives back), none shared with the
    # superblocks or checkpoint slot A, whatever journal size was asked for
    assert sb.journal_offset == 64 << 10
    for asked in (None, 1 << 20, (1 << 20) + 4096, 300 << 10):
        ring = layout(256 << 20, fleet="x", volume_id=VID, journal_bytes=asked)
        assert ring.journal_offset % (64 << 10) == ring.journal_bytes % (64 << 10) == 0
    regions = [
        (sb.journal_offset, sb.journal_bytes),
        (sb.checkpoint_offsets[0], sb.checkpoint_bytes),
        (sb.checkpoint_offsets[1], sb.checkpoint_bytes),
        (sb.data_offset, sb.data_bytes),
    ]
    for (a, n), (b, _) in itertools.pairwise(regions):
        assert a + n <= b and a % 4096 == 0 and n % 4096 == 0
    # only the data area starts after a gap: on the next RBD object (4 MiB) boundary
    assert regions[2][0] + regions[2][1] > sb.data_offset - (4 << 20)
    assert sb.data_offset % (4 << 20) == 0
    assert sb.data_offset + sb.data_bytes == 256 << 20
    with pytest.raises(ValueError):
        layout(1 << 20, fleet="x", volume_id=VID)


def test_refusals() -> None:
    block = bytearray(_sb(3).encode())
    with pytest.raises(BadMagic):
        Superblock.decode(bytes(4096))
    block[40] ^= 1
    with pytest.raises(ChecksumMismatch):
        Superblock.decode(bytes(block))
    with pytest.raises(BadMagic):
        choose([bytes(4096), bytes(4096)])


@pytest.mark.parametrize("version", [1, 2, 4])
def test_unknown_version_is_refused(version: int) -> None:
    """An image of an older format (1; 2, whose records anyone could forge) or a newer one is
    refused with one error naming its version."""
    block = bytearray(_sb(3).encode())
    struct.pack_into("<H", block, 8, version)
    end = block.index(b"f1") + 2
    struct.pack_into("<I", block, end, zlib.crc32(bytes(block[:end])))
    with pytest.raises(UnsupportedFormat) as info:
        Superblock.decode(bytes(block))
    assert f"image format {version}: this agent reads format 3" in info.value.message
    with pytest.raises(UnsupportedFormat):
        choose([bytes(block), bytes(block)])
