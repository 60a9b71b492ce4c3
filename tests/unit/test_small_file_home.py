"""Small files travel in their put record and move to data extents at the next checkpoint.

What must hold: a small put is acknowledged by one journal write (no data write first); after a
checkpoint its bytes cost whole 4 KiB blocks in the data area, read back identical from the
writer, a reader that followed the pushes and a fresh open; the space a checkpoint moved files
to is known to every follower (a later free of it is quarantined once, not twice); with no
room left the files stay inline and nothing fails.
"""

from __future__ import annotations

import os

import pytest

from agents.committer import LEAF_DATA_MAX
from agents.core.superblock import INLINE_MAX
from agents.device import ALIGN
from agents.testing import MemoryDevice
from agents.volume import Volume
from tests.unit.test_warm_promotion import _pushes_to

pytestmark = pytest.mark.unit

SIZE = 32 << 20


class _Recording:
    """A handle on ``medium`` that records (offset, length) of every write."""

    def __init__(self, medium: MemoryDevice) -> None:
        self._dev = medium.reopen()
        self.read_only = False
        self.writes: list[tuple[int, int]] = []

    def size(self) -> int:
        return self._dev.size()

    def read_at(self, offset: int, length: int) -> bytes:
        return self._dev.read_at(offset, length)

    def write_at(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, len(data)))
        self._dev.write_at(offset, data)

    def flush(self) -> None:
        self._dev.flush()

    def discard(self, offset: int, length: int) -> bool:
        return self._dev.discard(offset, length)

    def close(self) -> None:
        self._dev.close()


def _writer(medium: MemoryDevice) -> tuple[Volume, _Recording]:
    dev = _Recording(medium)
    Volume.format(dev, fleet="t")
    vol = Volume.open(dev)
    vol.start_epoch(1)
    return vol, dev


def _put(vol: Volume, path: str, data: bytes) -> None:
    vol.put(path, [data], len(data), epoch=1, mtime=1.0)


def _read(vol: Volume, path: str) -> bytes:
    return b"".join(vol.read(path))


def test_a_small_put_is_one_journal_write_and_moves_home_at_the_checkpoint() -> None:
    medium = MemoryDevice(SIZE)
    vol, dev = _writer(medium)
    sb = vol._sb
    journal = range(sb.journal_offset, sb.journal_offset + sb.journal_bytes)
    data_area = range(sb.data_offset, sb.data_offset + sb.data_bytes)
    files = {f"/s/{i}": os.urandom(size) for i, size in
             enumerate((LEAF_DATA_MAX + 1, 4096, 5000, INLINE_MAX))}
    dev.writes.clear()
    for path, data in files.items():
        _put(vol, path, data)
    assert [off in journal for off, _ in dev.writes] == [True] * len(files)
    assert all(vol._index.lookup(p).inline == d for p, d in files.items())  # type: ignore[union-attr]

    free = vol.free_bytes()
    dev.writes.clear()
    vol.checkpoint()
    homes = [(off, n) for off, n in dev.writes if off in data_area]
    padded = sum(-(-len(d) // ALIGN) * ALIGN for d in files.values())
    assert sum(n for _, n in homes) >= padded  # the run of data, plus the tree's pages
    for path, data in files.items():
        node = vol._index.lookup(path)
        assert node is not None and node.inline is None
        assert sum(x.length for x in node.extents) == -(-len(data) // ALIGN) * ALIGN
        assert _read(vol, path) == data
    assert free - vol.free_bytes() >= padded
    assert vol.fsck() == []
    vol.close()
    fresh = Volume.open(medium.reopen(read_only=True))
    assert all(_read(fresh, p) == d for p, d in files.items())
    assert fresh.fsck() == []


def test_a_file_of_a_leaf_stays_in_its_leaf() -> None:
    vol, _ = _writer(MemoryDevice(SIZE))
    data = os.urandom(LEAF_DATA_MAX)
    _put(vol, "/tiny", data)
    vol.checkpoint()
    node = vol._index.lookup("/tiny")
    assert node is not None and node.inline == data and node.extents == ()


def test_followers_learn_the_space_a_checkpoint_moved_files_to() -> None:
    """A moved file deleted, its space released and moved to again, deleted again: a reader
    that follows by push quarantines that space twice unless the checkpoint told it the space
    was in use again (as a put naming it would). Without the checkpoint's extents the second
    delete failed the reader with 'already quarantined'."""
    medium = MemoryDevice(SIZE)
    vol, _ = _writer(medium)
    reader = Volume.open(medium.reopen(read_only=True))
    vol.set_commit_listener(_pushes_to(reader))
    first = None
    for _ in range(3):
        data = os.urandom(4096)
        _put(vol, "/f", data)
        vol.checkpoint()
        node = vol._index.lookup("/f")
        assert node is not None and node.extents
        first = first or node.extents
        assert _read(reader, "/f") == data
        vol.delete("/f", epoch=1)
        vol.release_through(reader.safe_seq())
        vol.checkpoint()
    assert node.extents == first  # the released block was moved to again
    assert reader.applied_seq == vol.applied_seq
    assert reader.fsck() == [] and vol.fsck() == []
    assert Volume.open(medium.reopen(read_only=True)).fsck() == []


def test_with_no_room_the_files_stay_inline_and_nothing_fails() -> None:
    medium = MemoryDevice(SIZE)
    vol, _ = _writer(medium)
    # leaves 64 KiB (and the metadata reserve): less than the checkpoint's page estimate
    big = vol._allocator.free_bytes() - (64 << 10)
    vol.put("/big", [bytes(big)], big, epoch=1, mtime=0.0)
    data = os.urandom(8000)
    _put(vol, "/small", data)
    vol.checkpoint()
    node = vol._index.lookup("/small")
    assert node is not None and node.inline == data
    assert _read(vol, "/small") == data
    assert vol.fsck() == []
    vol.close()
    assert _read(Volume.open(medium.reopen(read_only=True)), "/small") == data

