"""The journal ring goes back to the medium at rest: once no write came for a while and
every in-sync reader has passed a checkpoint's record, the writer discards every ring byte
outside what recovery and readers may still read (from the checkpoint before the newest to
the head), and a quiet writer checkpoints until the ring holds little more than its last
checkpoint's record.

What must hold: the live span is never touched, whatever the positions (property test of
:func:`agents.core.journal.stale_spans`); a reader following the journal, a reader pushed
to and a fresh open see every acknowledged file, across give-backs between bursts of
writes; the give-back waits for the slowest in-sync reader, and for rest; a settled writer
leaves at most a few blocks of the ring on the medium and writes nothing more; a power cut
during a give-back loses nothing.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.committer import DISCARD_GRANULE
from agents.core import journal
from agents.device import ALIGN
from agents.errors import DeviceError
from agents.follower import Follower
from agents.testing import MemoryDevice
from agents.volume import Volume
from tests.unit.test_warm_promotion import _pushes_to

pytestmark = pytest.mark.unit

SIZE = 16 << 20
RING = 256 << 10


# ---- the arithmetic ----------------------------------------------------------------------


def _forward(start: int, length: int, ring: int) -> set[int]:
    return {(start + i) % ring for i in range(length)}


@settings(max_examples=400)
@given(st.integers(2, 64), st.data())
def test_stale_spans_never_touch_the_live_span(blocks: int, data: st.DataObject) -> None:
    """In blocks of 1: ``keep`` to ``head`` is live (shorter than the ring), ``dirty`` to
    ``keep`` stale. The pieces lie inside the ring, miss every live byte, and cover every
    stale byte the live span has not wrapped over."""
    ring = blocks
    keep = data.draw(st.integers(0, ring - 1))
    live = data.draw(st.integers(0, ring - 1))
    stale = data.draw(st.integers(0, ring - 1))
    head = keep + live  # may reach ring: a batch that ended at the ring's end
    dirty = (keep - stale) % ring
    pieces = journal.stale_spans(dirty, keep, head, ring)
    covered: set[int] = set()
    for start, length in pieces:
        assert start >= 0 and length > 0 and start + length <= ring
        covered |= set(range(start, start + length))
    live_bytes = _forward(keep, live, ring)
    assert not covered & live_bytes
    assert covered == _forward(dirty, stale, ring) - live_bytes


# ---- the writer --------------------------------------------------------------------------


def _ring_blocks_in_use(medium: MemoryDevice, vol: Volume) -> int:
    sb = vol.superblock
    raw = medium.read_at(sb.journal_offset, sb.journal_bytes)
    zero = bytes(ALIGN)
    return sum(raw[i:i + ALIGN] != zero for i in range(0, len(raw), ALIGN))


def _contents(vol: Volume) -> dict[str, bytes]:
    return {n.entry.path: b"".join(vol.read(n.entry.path)) for n in vol.walk()
            if n.entry.kind == "file"}


def _fleet(medium: MemoryDevice, ring: int = RING) -> tuple[Volume, Volume, Volume]:
    Volume.format(medium, fleet="ring", journal_bytes=ring)
    writer = Volume.open(medium)
    pushed = Volume.open(medium.reopen(read_only=True))
    tailing = Volume.open(medium.reopen(read_only=True))
    writer.set_commit_listener(_pushes_to(pushed))
    writer.start_epoch(1)
    return writer, pushed, tailing


def _release(writer: Volume, *readers: Volume) -> None:
    writer.release_through(min(writer.safe_seq(), *(r.safe_seq() for r in readers)))


def _settle(writer: Volume, *readers: Volume) -> None:
    """What the writer's agent does at rest: Writer.settle with no wait."""
    writer.checkpoint_if_idle(0.0)
    _release(writer, *readers)
    writer.give_back_ring(0.0)


def test_readers_and_a_fresh_open_see_every_file_while_the_ring_is_given_back() -> None:
    medium = MemoryDevice(SIZE)
    writer, pushed, tailing = _fleet(medium)
    rng = random.Random(3)
    for step in range(600):
        size = rng.choice([100, 4096, 20_000])
        writer.put(f"/d/{rng.randrange(50)}", [os.urandom(size)], size, epoch=1,
                   mtime=float(step))
        if step % 5 == 0:
            tailing.refresh()  # follows the ring itself: it must never meet a zeroed record
        _release(writer, pushed, tailing)
        if step % 40 == 39:  # a pause between bursts: the writer at rest
            writer.give_back_ring(0.0)
    tailing.refresh()
    want = _contents(writer)
    assert _contents(pushed) == want == _contents(tailing)
    fresh = Volume.open(medium.reopen(read_only=True))
    assert _contents(fresh) == want
    assert fresh.fsck() == []


def test_the_give_back_waits_for_the_slowest_in_sync_reader() -> None:
    medium = MemoryDevice(SIZE)
    writer, pushed, tailing = _fleet(medium)
    for i in range(200):
        writer.put(f"/f{i % 20}", [bytes([i]) * 3000], 3000, epoch=1, mtime=0.0)
    writer.checkpoint()
    writer.checkpoint()
    in_use = _ring_blocks_in_use(medium, writer)
    # the tailing reader has not read a record yet: nothing of the ring may go
    _release(writer, pushed, tailing)
    assert not writer.give_back_ring(0.0)
    assert _ring_blocks_in_use(medium, writer) == in_use
    tailing.refresh()
    _release(writer, pushed, tailing)
    assert not writer.give_back_ring(3600.0)  # not at rest: a write came just now
    assert _ring_blocks_in_use(medium, writer) == in_use
    assert writer.give_back_ring(0.0)
    assert _ring_blocks_in_use(medium, writer) < in_use
    assert _contents(tailing) == _contents(writer)


def test_a_reader_that_opened_before_the_newest_checkpoint_follows_without_reloading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader not in sync (it opened while the writer ran, so the give-back does not wait
    for it) loaded the checkpoint before the newest: the ring from there is kept, so it
    follows the journal to the end from where it stands, as it follows the old root's pages
    (a whole checkpoint interval after they are replaced)."""
    medium = MemoryDevice(SIZE)
    writer, pushed, _ = _fleet(medium, 1 << 20)  # no checkpoint but the test's own
    for i in range(50):
        writer.put(f"/a/{i}", [os.urandom(3000)], 3000, epoch=1, mtime=0.0)
    writer.checkpoint()
    for i in range(30):
        writer.put(f"/b/{i}", [os.urandom(3000)], 3000, epoch=1, mtime=0.0)
    opener = Volume.open(medium.reopen(read_only=True))
    loads: list[int] = []
    load = Follower._load_checkpoint

    def counted(volume: Follower) -> None:
        loads.append(volume.applied_seq)
        load(volume)
    monkeypatch.setattr(Follower, "_load_checkpoint", counted)
    for i in range(10):  # records the opener has yet to read, before the newest checkpoint
        writer.put(f"/b2/{i}", [os.urandom(3000)], 3000, epoch=1, mtime=0.0)
    writer.checkpoint()
    for i in range(30):
        writer.put(f"/c/{i}", [os.urandom(3000)], 3000, epoch=1, mtime=0.0)
        _release(writer, pushed)
    writer.give_back_ring(0.0)
    opener.refresh()
    assert loads == [], "it had to load a checkpoint again"
    assert _contents(opener) == _contents(writer)


def test_a_quiet_writer_settles_with_little_of_the_ring_left_and_then_writes_nothing() -> None:
    """Bursts of writes, each followed by rest, the later ones after the earlier were given
    back: the head goes over the space given back, part way round the ring (a give-back
    then must not miss what the head left behind it) or more than once."""
    medium = MemoryDevice(SIZE)
    writer, pushed, _ = _fleet(medium)
    for burst, puts in enumerate((100, 45, 75, 130)):  # a 4 KiB put: ~1/60 of the ring
        for i in range(puts):
            writer.put(f"/s/{burst}/{i}", [os.urandom(4096)], 4096, epoch=1, mtime=0.0)
        assert not writer.settled()
        assert not writer.checkpoint_if_idle(3600.0)  # a commit just now: not quiet yet
        rounds = 0
        while not writer.settled():
            rounds += 1
            assert rounds <= 4, "the writer never settles"
            _settle(writer, pushed)
        assert _ring_blocks_in_use(medium, writer) <= 3, f"after burst {burst}"
        node = writer._index.lookup(f"/s/{burst}/0")  # moved home by the idle checkpoints
        assert node is not None and node.extents and node.inline is None
    before = medium.read_at(0, medium.size())
    _settle(writer, pushed)
    assert medium.read_at(0, medium.size()) == before  # settled: the image is at rest
    reader = Volume.open(medium.reopen(read_only=True))
    assert reader.settled() and not reader.checkpoint_if_idle(0.0)  # only the writer
    assert _contents(reader) == _contents(writer)
    assert reader.fsck() == []


def test_a_writer_whose_writes_failed_stays_quiet_at_rest() -> None:
    """A fenced writer (its journal write failed) does not retry a checkpoint every look:
    nothing to write at rest, and no error each time (its self-test gets it replaced)."""
    medium = MemoryDevice(SIZE)
    writer, _, _ = _fleet(medium)
    writer.put("/f", [b"x" * 100], 100, epoch=1, mtime=0.0)
    medium_handle = writer._device
    assert isinstance(medium_handle, MemoryDevice)
    medium_handle.crash_after(0)
    with pytest.raises(DeviceError):
        writer.put("/g", [b"y" * 100], 100, epoch=1, mtime=0.0)
    assert not writer.checkpoint_if_idle(0.0)
    assert not writer.give_back_ring(0.0)


class _CutAtDiscard(MemoryDevice):
    """A medium whose discard number ``cut`` is where power goes (MemoryDevice's own power
    cut, armed for that discard: a discard is a write of zeros): it lands whole, in part, or
    not at all (``how``); every later write fails."""

    def __init__(self, size: int, cut: int, how: str) -> None:
        super().__init__(size)
        self.cut, self.how, self.discards = cut, how, 0

    def discard(self, offset: int, length: int) -> bool:
        if self.discards == self.cut:
            self.crash_after({"none": 0, "part": length // 2 // ALIGN * ALIGN,
                              "whole": length}[self.how])
        self.discards += 1
        return super().discard(offset, length)


@pytest.mark.parametrize("how", ["none", "part", "whole"])
def test_a_power_cut_during_a_give_back_loses_no_acknowledged_file(how: str) -> None:
    for cut in range(6):
        medium = _CutAtDiscard(SIZE, cut, how)
        Volume.format(medium, fleet="cut", journal_bytes=RING)
        writer = Volume.open(medium)
        writer.start_epoch(1)
        acknowledged: dict[str, bytes] = {}
        try:
            for i in range(400):
                body = os.urandom(5000)
                writer.put(f"/p/{i % 40}", [body], len(body), epoch=1, mtime=0.0)
                acknowledged[f"/p/{i % 40}"] = body
                writer.release_through(writer.safe_seq())
                if i % 20 == 19:
                    writer.give_back_ring(0.0)
        except DeviceError:
            pass  # the cut: the put in flight is not acknowledged
        assert medium.discards > cut, f"discard {cut} never came"
        after = Volume.open(medium.reopen(read_only=True))
        got = _contents(after)
        assert {p: got.get(p) for p in acknowledged} == acknowledged, f"cut {cut} ({how})"
        assert after.fsck() == [], f"cut {cut} ({how})"


# ---- discards librbd does not skip -------------------------------------------------------


class _Granular(MemoryDevice):
    """A medium whose discards act as librbd's do by default: only the whole 64 KiB pieces a
    discard covers are given back, the rest of it is skipped."""

    def discard(self, offset: int, length: int) -> bool:
        lo = -(-offset // DISCARD_GRANULE) * DISCARD_GRANULE
        hi = (offset + length) // DISCARD_GRANULE * DISCARD_GRANULE
        if lo < hi:
            super().discard(lo, hi - lo)
        return True


def _data_blocks_in_use(medium: MemoryDevice, vol: Volume) -> int:
    sb = vol.superblock
    raw = medium.read_at(sb.data_offset, sb.data_bytes)
    zero = bytes(ALIGN)
    return sum(raw[i:i + ALIGN] != zero for i in range(0, len(raw), ALIGN))


def test_small_files_deleted_one_by_one_give_their_space_back_through_librbd() -> None:
    """Each delete frees one 4 KiB block, a discard librbd skips; its discard is widened
    through the free space around it to whole 64 KiB pieces, so once the last file of a
    piece is gone the piece goes back: after deleting everything the data area holds next
    to nothing (only whole 4 MiB objects went back before: 1.7 MB of 8 were left)."""
    medium = _Granular(271 << 20)  # the storage benchmark's image for 2,000 such files
    Volume.format(medium, fleet="granule")
    writer = Volume.open(medium)
    pushed = Volume.open(medium.reopen(read_only=True))
    writer.set_commit_listener(_pushes_to(pushed))
    writer.start_epoch(1)
    for i in range(2000):
        writer.put(f"/g/{i:04d}", [os.urandom(4096)], 4096, epoch=1, mtime=0.0)
        _release(writer, pushed)
    _settle(writer, pushed)
    assert _data_blocks_in_use(medium, writer) >= 2000  # moved home, one block each
    for i in range(2000):
        writer.delete(f"/g/{i:04d}", epoch=1)
        _release(writer, pushed)
    _settle(writer, pushed)
    # widened to whole objects only, 1.25 MB of the 8 MB were left here (1.7 MB on Ceph)
    assert _data_blocks_in_use(medium, writer) <= 16
    assert Volume.open(medium.reopen(read_only=True)).fsck() == []


def test_unsettled_names_each_step_left_in_the_order_they_clear() -> None:
    """What ``unsettled`` says at each step of a writer coming to rest: its changes, then
    the readers' acknowledgement of its checkpoint, then the ring to give back; a reader
    that does not acknowledge keeps ``readers`` there (the health says whom to look at)."""
    medium = MemoryDevice(SIZE)
    writer, pushed, _ = _fleet(medium)
    while not writer.settled():  # at rest after its epoch started
        _settle(writer, pushed)
    for i in range(5):
        writer.put(f"/u/{i}", [os.urandom(4096)], 4096, epoch=1, mtime=0.0)
    _release(writer, pushed)
    assert writer.unsettled() == ("checkpoint",)
    assert writer.checkpoint_if_idle(0.0) and writer.checkpoint_if_idle(0.0)
    assert writer.unsettled() == ("readers",)
    writer.release_through(0)  # the reader's acknowledgement, held back: still waiting
    assert writer.unsettled() == ("readers",)
    _release(writer, pushed)
    assert writer.unsettled() == ("ring",)
    assert writer.give_back_ring(0.0)
    assert writer.unsettled() == () and writer.settled()
