"""Checkpoints of format v2 under power cuts, and readers following a writer across many
root switches.

- A power cut at every write of a checkpoint (tree pages, checkpoint slot, its record), the
  cut write landing whole, torn or not at all: the image opens with every acknowledged
  record, fsck finds nothing, and a new writer goes on from it (the old root stays valid
  until a checkpoint naming the new one is durable; an orphaned new root is announced by the
  next writer before it reuses what that commit freed).
- Readers pushed to and readers following the journal switch roots in journal order while
  the writer frees and reuses tree pages: their lookups and listings never meet a reused
  page.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random

import pytest

from agents.device import ALIGN
from agents.errors import DeviceError, NotFound
from agents.testing import MemoryDevice
from agents.volume import Volume
from tests.unit.test_warm_promotion import _pushes_to

pytestmark = pytest.mark.fault

SIZE = 16 << 20


class CutDevice:
    """A writable handle on ``medium`` that loses power at write number ``cut``: that write
    lands whole, torn (its first half) or not at all (``how``), and every later I/O fails."""

    def __init__(self, medium: MemoryDevice, cut: int, how: str) -> None:
        self.read_only = False
        self._medium = medium
        self._cut = cut
        self._how = how
        self.writes = 0
        self.dead = False

    def size(self) -> int:
        return self._medium.size()

    def _check(self) -> None:
        if self.dead:
            raise DeviceError("power cut", op="io", errno=errno.EIO)

    def read_at(self, offset: int, length: int) -> bytes:
        self._check()
        return self._medium.read_at(offset, length)

    def write_at(self, offset: int, data: bytes) -> None:
        self._check()
        if self.writes == self._cut:
            self.dead = True
            if self._how == "whole":
                self._medium.write_at(offset, data)
            elif self._how == "torn":
                half = max(len(data) // 2 // ALIGN * ALIGN, ALIGN)
                self._medium.write_at(offset, data[:half])
            raise DeviceError("power cut", op="write", errno=errno.EIO)
        self.writes += 1
        self._medium.write_at(offset, data)

    def discard(self, offset: int, length: int) -> bool:
        self._check()
        return self._medium.discard(offset, length)

    def flush(self) -> None:
        self._check()

    def close(self) -> None:
        pass


def _copy(medium: MemoryDevice) -> MemoryDevice:
    """A new medium holding what ``medium`` holds."""
    copy = MemoryDevice(medium.size())
    copy.write_at(0, medium.read_at(0, medium.size()))
    return copy


def _contents(vol: Volume) -> dict[str, bytes | None]:
    """Every path's bytes (None for a directory)."""
    return {n.entry.path: (b"".join(vol.read(n.entry.path)) if n.entry.kind == "file"
                           else None) for n in vol.walk()}


def _load(vol: Volume, rng: random.Random, n: int, tag: str) -> None:
    for i in range(n):
        size = rng.choice([10, 3000, 5000, 70_000])
        path = f"/d{i % 5}/f{rng.randrange(60)}"
        vol.put(path, [os.urandom(size)], size, epoch=vol.writer_epoch or 0, mtime=float(i))
    for i in range(5):
        if rng.random() < 0.5:
            vol.rename(f"/d{i}", f"/{tag}{i}", epoch=vol.writer_epoch or 0)


def _prepared(seed: int) -> tuple[MemoryDevice, int]:
    """An image with a checkpointed tree and records after it; the writes a checkpoint
    (and its record) then makes, counted on a copy."""
    medium = MemoryDevice(SIZE)
    Volume.format(medium, fleet="cut", journal_bytes=1 << 20)
    vol = Volume.open(medium)
    vol.start_epoch(1)
    rng = random.Random(seed)
    _load(vol, rng, 150, "r")
    vol.checkpoint()
    _load(vol, rng, 60, "s")
    vol.close()
    probe = CutDevice(_copy(medium), 1 << 30, "none")
    counted = Volume.open(probe)
    counted.start_epoch(2)
    before = probe.writes
    counted.checkpoint()
    return medium, probe.writes - before


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("how", ["none", "torn", "whole"])
def test_a_power_cut_at_any_write_of_a_checkpoint_keeps_the_old_root(seed: int,
                                                                      how: str) -> None:
    medium, writes = _prepared(seed)
    assert writes >= 3  # tree pages, the checkpoint slot, the record at least
    reference = Volume.open(medium.reopen(read_only=True))
    want = _contents(reference)
    for cut in range(writes):
        copy = _copy(medium)
        dev = CutDevice(copy, 1 << 30, how)
        vol = Volume.open(dev)
        vol.start_epoch(2)
        dev._cut = dev.writes + cut  # the cut falls inside the checkpoint
        with pytest.raises(DeviceError):
            vol.checkpoint()
        after = Volume.open(copy.reopen(read_only=True))
        assert _contents(after) == want, f"cut at checkpoint write {cut}"
        assert after.fsck() == [], f"cut at checkpoint write {cut}"
        # a new writer goes on from whatever root is newest, and readers with it
        reader = Volume.open(copy.reopen(read_only=True))
        writer = Volume.open(copy.reopen(read_only=False))
        writer.set_commit_listener(_pushes_to(reader))
        writer.start_epoch(3)
        for i in range(40):
            writer.put(f"/n/{i % 7}", [bytes([i]) * 5000], 5000, epoch=3, mtime=0.0)
            writer.release_through(min(writer.safe_seq(), reader.safe_seq()))
        writer.checkpoint()
        assert _contents(reader) == _contents(writer)
        assert writer.fsck() == []



@pytest.mark.parametrize("how", ["none", "torn", "whole"])
def test_a_power_cut_while_small_files_go_home_ahead_loses_nothing(how: str) -> None:
    """A cut at every write of a pass that writes small files home ahead of the checkpoint
    (Volume.stage_homes) and of the checkpoint that names them: their bytes are still in
    their records until a durable checkpoint names their homes, so every file reads back
    and fsck counts every byte of the data area."""
    medium, _ = _prepared(3)

    def writer_with_small_files(dev: CutDevice) -> Volume:
        vol = Volume.open(dev)
        vol.start_epoch(2)  # the new writer's first checkpoint moves what it found home
        for i in range(30):  # so these are the pass's, acknowledged: durable in the journal
            vol.put(f"/small/{i % 20}", [bytes([i]) * 5000], 5000, epoch=2, mtime=0.0)
        return vol

    probe = CutDevice(_copy(medium), 1 << 30, "none")
    counted = writer_with_small_files(probe)
    want = _contents(counted)
    before = probe.writes
    assert counted.stage_homes(0) == 20 * 8192
    counted.checkpoint()
    writes = probe.writes - before
    assert writes >= 4  # the pass's run, the tree pages, the checkpoint slot, its record
    for cut in range(writes):
        copy = _copy(medium)
        dev = CutDevice(copy, 1 << 30, how)
        vol = writer_with_small_files(dev)
        dev._cut = dev.writes + cut
        with pytest.raises(DeviceError):
            vol.stage_homes(0)
            vol.checkpoint()
        after = Volume.open(copy.reopen(read_only=True))
        assert _contents(after) == want, f"cut at write {cut}"
        assert after.fsck() == [], f"cut at write {cut}"

def test_readers_follow_a_writer_across_many_root_switches() -> None:
    medium = MemoryDevice(SIZE)
    Volume.format(medium, fleet="follow", journal_bytes=256 << 10)
    writer = Volume.open(medium)
    pushed = Volume.open(medium.reopen(read_only=True))
    tailing = Volume.open(medium.reopen(read_only=True))
    writer.set_commit_listener(_pushes_to(pushed))
    writer.start_epoch(1)
    rng = random.Random(7)
    roots = set()
    for step in range(400):
        path = f"/t/{rng.randrange(40):02d}/{rng.randrange(40)}"
        if rng.random() < 0.2:
            with contextlib.suppress(NotFound):
                writer.delete(path, epoch=1)
        else:
            writer.put(path, [b"x" * (step % 97)], step % 97, epoch=1, mtime=float(step))
        if step % 7 == 0:
            writer.checkpoint()
        if step % 3 == 0:
            tailing.refresh()
        # pages freed by a checkpoint are reused once both readers passed its record
        writer.release_through(min(writer.safe_seq(), pushed.safe_seq(), tailing.safe_seq()))
        roots.add(pushed._index.root)
        if step % 50 == 0:
            tailing.refresh()
            assert pushed.list("/t") == writer.list("/t") == tailing.list("/t")
    tailing.refresh()
    assert len(roots) > 40
    assert _contents(pushed) == _contents(writer) == _contents(tailing)
    assert writer.fsck() == []
