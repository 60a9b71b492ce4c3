"""Small files travel in their put record and move to data extents at the next checkpoint.

What must hold: a small put is acknowledged by one journal write (no data write first); after a
checkpoint its bytes cost whole 4 KiB blocks in the data area, read back identical from the
writer, a reader that followed the pushes and a fresh open; the space a checkpoint moved files
to is known to every follower (a later free of it is quarantined once, not twice); with no
room left the files stay inline and nothing fails.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable

import pytest

from agents.committer import LEAF_DATA_MAX
from agents.core.superblock import INLINE_MAX
from agents.device import ALIGN
from agents.errors import DeviceError
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



# ---- written home ahead of the checkpoint (Volume.stage_homes) ---------------------------

def _overlapping(writes: list[tuple[int, int]], extents: list[tuple[int, int]]) -> bool:
    return any(o < x + n and x < o + length for o, length in writes for x, n in extents)


def test_files_written_home_ahead_are_only_named_by_the_checkpoint() -> None:
    medium = MemoryDevice(SIZE)
    vol, dev = _writer(medium)
    files = {f"/a/{i}": os.urandom(4096 + i) for i in range(40)}
    for path, data in files.items():
        _put(vol, path, data)
    padded = sum(-(-len(d) // ALIGN) * ALIGN for d in files.values())
    assert vol.stage_homes(padded + 1) == 0  # below the threshold: nothing written
    dev.writes.clear()
    assert vol.stage_homes(padded) == padded
    homes = [(x.offset, x.length) for x in (vol._staged[p].home.extents for p in files)
             for x in x]
    assert dev.writes == [(min(o for o, _ in homes), padded)]  # one sequential run
    assert all(vol._index.lookup(p).inline == d for p, d in files.items())  # type: ignore[union-attr]
    assert vol.stage_homes(0) == 0  # staged already: nothing left to write
    dev.writes.clear()
    vol.checkpoint()
    assert not _overlapping(dev.writes, homes)  # named, not written again
    for path, data in files.items():
        node = vol._index.lookup(path)
        assert node is not None and node.inline is None and _read(vol, path) == data
    assert sorted((x.offset, x.length) for p in files
                  for x in vol._index.lookup(p).extents) == sorted(homes)  # type: ignore[union-attr]
    assert vol.fsck() == []
    vol.close()
    fresh = Volume.open(medium.reopen(read_only=True))
    assert all(_read(fresh, p) == d for p, d in files.items()) and fresh.fsck() == []


def test_a_file_changed_after_it_went_home_ahead_keeps_its_new_version_and_no_space_leaks(
        ) -> None:
    """Overwritten (small, or big), deleted, renamed after its bytes went home ahead: the
    checkpoint names the current version only, and the space of the stale homes goes back
    to the free map (fsck counts every byte of the data area: a leaked home fails it)."""
    medium = MemoryDevice(SIZE)
    vol, _ = _writer(medium)
    reader = Volume.open(medium.reopen(read_only=True))
    vol.set_commit_listener(_pushes_to(reader))
    want = {f"/c/{i}": os.urandom(5000) for i in range(8)}
    for path, data in want.items():
        _put(vol, path, data)
    assert vol.stage_homes(0) > 0
    want["/c/0"] = os.urandom(6000)
    _put(vol, "/c/0", want["/c/0"])
    want["/c/1"] = os.urandom(3 * INLINE_MAX)  # big now: data extents of its own
    _put(vol, "/c/1", want["/c/1"])
    vol.delete("/c/2", epoch=1)
    del want["/c/2"]
    vol.rename("/c/3", "/c/moved", epoch=1)
    want["/c/moved"] = want.pop("/c/3")
    assert vol.stage_homes(0) > 0  # /c/0's new version (the others are home already)
    _put(vol, "/c/4", want["/c/4"][::-1])
    want["/c/4"] = want["/c/4"][::-1]
    vol.checkpoint()
    assert vol._staged == {}
    for vol_ in (vol, reader):
        assert {p: _read(vol_, p) for p in want} == want
    assert vol.fsck() == [] and reader.fsck() == []
    # everything deleted and released: all of it is free again, checkpoint after checkpoint
    free_before = vol.free_bytes()
    for path in want:
        vol.delete(path, epoch=1)
    vol.release_through(reader.safe_seq())
    vol.checkpoint()
    vol.release_through(reader.safe_seq())
    vol.checkpoint()
    assert vol.free_bytes() > free_before and vol.fsck() == []
    assert reader.applied_seq == vol.applied_seq and reader.fsck() == []


def test_a_checkpoint_while_files_go_home_ahead_loses_nothing() -> None:
    """Puts, passes ahead and checkpoints at once from three threads: whatever a pass finds
    changed (moved by a checkpoint meanwhile, overwritten) goes back; every file reads back
    and the data area is accounted for."""
    medium = MemoryDevice(SIZE)
    vol, _ = _writer(medium)
    done = threading.Event()
    errors: list[BaseException] = []

    def loop(step: Callable[[], object]) -> None:
        try:
            while not done.is_set():
                step()
        except BaseException as exc:  # the test fails on it below
            errors.append(exc)

    rng = random.Random(7)
    want: dict[str, bytes] = {}
    threads = [threading.Thread(target=loop, args=(lambda: vol.stage_homes(0),)),
               threading.Thread(target=loop, args=(vol.checkpoint,))]
    for t in threads:
        t.start()
    try:
        for i in range(600):
            path = f"/t/{rng.randrange(120)}"
            data = os.urandom(rng.choice([100, 4000, 9000, 16000]))
            _put(vol, path, data)
            want[path] = data
            if i % 50 == 49:
                victim = sorted(want)[rng.randrange(len(want))]
                vol.delete(victim, epoch=1)
                del want[victim]
    finally:
        done.set()
        for t in threads:
            t.join()
    assert errors == []
    vol.release_through(vol.safe_seq())
    vol.checkpoint()
    assert {p: _read(vol, p) for p in want} == want
    assert vol.fsck() == []
    vol.close()
    fresh = Volume.open(medium.reopen(read_only=True))
    assert {p: _read(fresh, p) for p in want} == want and fresh.fsck() == []


def test_a_checkpoint_during_a_pass_saves_its_space_as_free() -> None:
    """A checkpoint taken while a pass writes (the pass holds no lock then): its space is
    named by no record, so that checkpoint saves it as free, as the image is after a crash
    right then; the pass then finds its files moved by the checkpoint and gives it back."""
    medium = MemoryDevice(SIZE)
    vol, dev = _writer(medium)
    for i in range(10):
        _put(vol, f"/m/{i}", os.urandom(4096))
    run = 10 * 4096
    write_at = dev.write_at

    def checkpoint_first(offset: int, data: bytes) -> None:
        if len(data) == run:  # the pass's run (the checkpoint's own run would be too)
            dev.write_at = write_at  # type: ignore[method-assign]
            vol.checkpoint()
        write_at(offset, data)

    dev.write_at = checkpoint_first  # type: ignore[method-assign]
    free = vol.free_bytes()
    assert vol.stage_homes(0) == run
    assert vol._staged == {}  # all moved by the checkpoint: the pass's space went back
    assert vol.fsck() == []  # the durable image, as a crash right after the pass finds it
    assert free - vol.free_bytes() >= run  # the checkpoint's own homes
    vol.close()
    assert Volume.open(medium.reopen(read_only=True)).fsck() == []


def test_a_pass_whose_write_fails_gives_its_space_back_and_says_so() -> None:
    medium = MemoryDevice(SIZE)
    vol, dev = _writer(medium)
    for i in range(4):
        _put(vol, f"/e/{i}", os.urandom(4096))
    free = vol.free_bytes()
    write_at = dev.write_at

    def failing(offset: int, data: bytes) -> None:
        dev.write_at = write_at  # type: ignore[method-assign]
        raise DeviceError("write refused", op="write", errno=errno.EIO)

    dev.write_at = failing  # type: ignore[method-assign]
    with pytest.raises(DeviceError):
        vol.stage_homes(0)
    assert vol.free_bytes() == free and vol._staged == {} and vol._outside == {}
    vol.checkpoint()  # the checkpoint moves them itself
    assert all(vol._index.lookup(f"/e/{i}").extents for i in range(4))  # type: ignore[union-attr]
    assert vol.fsck() == []
