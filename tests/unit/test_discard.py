"""Freed space goes back to the medium: the allocator's held state (take_released,
claim_around), the writer's discards when extents leave quarantine (whole objects where free
space allows, never racing a reuse), readers that never discard, and the file backend's
punched holes."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.backends.file import FileDevice
from agents.committer import DISCARD_UNIT, reserve_pages
from agents.core.allocator import Allocator, Extent
from agents.errors import DeviceError, NoSpace, NotFound
from agents.follower import TREE_PAGE
from agents.testing import MemoryDevice
from agents.volume import Volume

pytestmark = pytest.mark.unit

B = 4096
MiB = 1 << 20


# ---- allocator ---------------------------------------------------------------------------


def test_take_released_holds_extents_until_given_back() -> None:
    alloc = Allocator(0, 64 * B)
    a, b, c = alloc.allocate(4 * B)[0], alloc.allocate(4 * B)[0], alloc.allocate(4 * B)[0]
    alloc.quarantine(5, [a, b])
    alloc.quarantine(7, [c])
    held = alloc.take_released(6)
    assert held == [Extent(0, 8 * B)]  # adjacent extents of one release come back merged
    assert alloc.quarantined() == [(7, c)]
    assert alloc.free_extents() == [Extent(12 * B, 52 * B)]  # held: not free yet
    assert alloc.allocate(52 * B) == [Extent(12 * B, 52 * B)]  # all the free bytes, not held
    with pytest.raises(Exception, match="no space"):
        alloc.allocate(B)
    alloc.give_back(held)
    assert alloc.allocate(8 * B) == [Extent(0, 8 * B)]


def test_claim_around_widens_to_whole_units_only_through_free_space() -> None:
    unit = 8 * B
    alloc = Allocator(0, 64 * B)
    used = alloc.allocate(64 * B)[0]
    alloc.give_back([Extent(0, 3 * B), Extent(5 * B, 11 * B), Extent(20 * B, 2 * B)])
    alloc.quarantine(1, [Extent(3 * B, 2 * B), Extent(18 * B, 2 * B)])
    first, second = alloc.take_released(1)
    # [3, 5) + free [0, 3) and [5, 16): both unit boundaries (0 and 8) are reached
    assert alloc.claim_around(first, unit) == Extent(0, 8 * B)
    # [18, 20): free [20, 22) does not reach 24 and [16, 18) is in use: not widened
    assert alloc.claim_around(second, unit) == Extent(18 * B, 2 * B)
    assert alloc.free_extents() == [Extent(8 * B, 8 * B), Extent(20 * B, 2 * B)]
    alloc.give_back([Extent(0, 8 * B), Extent(18 * B, 2 * B)])
    assert alloc.free_extents() == [Extent(0, 16 * B), Extent(18 * B, 4 * B)]
    assert used.length == 64 * B


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "release"]), st.integers(1, 24)),
                max_size=60))
def test_held_bytes_are_never_handed_out_and_none_is_lost(script: list[tuple[str, int]]) -> None:
    """Whatever the history, while a release's extents (widened) are held nothing allocated
    overlaps them, and free + in use + quarantined + held is always the whole area."""
    unit, start, end = 8 * B, 3 * B, 3 * B + 96 * B
    alloc = Allocator(start, end)
    used: list[Extent] = []

    def blocks(extents: list[Extent]) -> set[int]:
        return {b for e in extents for b in range(e.offset, e.end, B)}

    for seq, (op, n) in enumerate(script, start=1):
        if op == "alloc":
            with contextlib.suppress(NoSpace):
                used += alloc.allocate(n * B)
        elif op == "free" and used:
            alloc.quarantine(seq, [used.pop(n % len(used))])
        elif op == "release":
            held = [alloc.claim_around(e, unit) for e in alloc.take_released(seq - n % 4)]
            got: list[Extent] = []
            with contextlib.suppress(NoSpace):
                got = alloc.allocate(n * B)  # racing the discard of ``held``
            assert not blocks(got) & blocks(held)
            parts = [alloc.free_extents(), used, [e for _, e in alloc.quarantined()], held, got]
            every = [b for part in parts for b in sorted(blocks(part))]
            assert sorted(every) == list(range(start, end, B))  # each block exactly once
            alloc.give_back(held)
            used += got


# ---- the writer's discards ---------------------------------------------------------------


class RecordingDevice(MemoryDevice):
    """Remembers each discard; ``gate`` (when set) holds discards until it opens."""

    def __init__(self, size: int, *, same_medium_as: MemoryDevice | None = None,
                 read_only: bool = False) -> None:
        super().__init__(size)
        if same_medium_as is not None:
            self.__dict__.update(same_medium_as.reopen(read_only=read_only).__dict__)
        self.discards: list[tuple[int, int]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def discard(self, offset: int, length: int) -> bool:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.discards.append((offset, length))
        return super().discard(offset, length)


def _writer(device: RecordingDevice) -> Volume:
    Volume.format(device, fleet="t")
    vol = Volume.open(device)
    vol.start_epoch(1)
    return vol


def _put(vol: Volume, path: str, size: int, fill: int = 1) -> None:
    vol.put(path, [bytes([fill]) * size], size, epoch=1, mtime=0)


def test_extents_are_discarded_when_they_leave_quarantine_not_before() -> None:
    device = RecordingDevice(64 * MiB)
    vol = _writer(device)
    counted: list[int] = []
    vol.set_discard_listener(counted.append)
    for i in range(8):
        _put(vol, f"/f{i}", MiB)
    extents = {i: vol._index.get(f"/f{i}").extents for i in range(8)}
    for i in range(8):
        vol.delete(f"/f{i}", epoch=1)
    assert device.discards == []  # quarantined: a reader may still read them
    vol.release_through(vol.applied_seq)
    assert device.discards
    for i in range(8):
        for e in extents[i]:
            assert device.read_at(e.offset, e.length) == bytes(e.length)
            assert any(o <= e.offset and e.end <= o + n for o, n in device.discards)
    # the freed run was widened to whole DISCARD_UNITs wherever free space reached them
    data = vol.superblock.data_offset
    first_unit = -(-data // DISCARD_UNIT) * DISCARD_UNIT
    assert any(o <= first_unit and first_unit + DISCARD_UNIT <= o + n
               for o, n in device.discards)
    assert counted == [sum(n for _, n in device.discards)]
    assert vol.free_bytes() == vol.superblock.data_bytes  # all given back


def test_a_put_short_of_space_waits_for_the_discard_in_flight_then_reuses_its_extent() -> None:
    device = RecordingDevice(64 * MiB)
    vol = _writer(device)
    data = vol.superblock.data_bytes
    # leaves 2 MiB free besides the pages held for metadata
    _put(vol, "/big", data - reserve_pages(data) * TREE_PAGE - 2 * MiB)
    _put(vol, "/small", MiB)
    old = vol._index.get("/small").extents
    _put(vol, "/small", MiB, fill=2)  # the old version is quarantined
    device.gate = threading.Event()
    releasing = threading.Thread(target=vol.release_through, args=(vol.applied_seq,))
    releasing.start()
    assert device.entered.wait(10)
    # the only free MiB is held by the discard in flight: the put waits for it, and only
    # then reuses it (never while the discard could still zero it)
    putting = threading.Thread(target=_put, args=(vol, "/other", MiB, 3))
    putting.start()
    putting.join(0.5)
    assert putting.is_alive()
    with pytest.raises(NotFound):
        vol.stat("/other")
    device.gate.set()
    releasing.join(10)
    putting.join(10)
    assert vol._index.get("/other").extents == old
    assert b"".join(vol.read("/other")) == b"\x03" * MiB


def test_readers_never_discard() -> None:
    device = RecordingDevice(64 * MiB)
    writer = _writer(device)
    _put(writer, "/f", MiB)
    writer.delete("/f", epoch=1)
    reader_dev = RecordingDevice(B, same_medium_as=device, read_only=True)
    reader = Volume.open(reader_dev)
    reader.release_through(reader.applied_seq)
    assert reader_dev.discards == []
    assert reader._allocator.quarantined() == []  # released all the same


class FailingDiscard(MemoryDevice):
    """A medium whose discards fail (a fenced writer's EIO)."""

    def discard(self, offset: int, length: int) -> bool:
        raise DeviceError("fenced", op="discard", errno=5)


def test_a_failed_discard_still_frees_the_extents() -> None:
    device = FailingDiscard(64 * MiB)
    Volume.format(device, fleet="t")
    vol = Volume.open(device)
    vol.start_epoch(1)
    vol.put("/f", [b"x" * MiB], MiB, epoch=1, mtime=0)
    vol.delete("/f", epoch=1)
    vol.release_through(vol.applied_seq)
    assert vol._allocator.quarantined() == []
    assert vol.free_bytes() == vol.superblock.data_bytes


# ---- the file backend --------------------------------------------------------------------


@pytest.fixture
def image() -> Iterator[Path]:
    """A file on /var/tmp (ext4 here: punching holes works)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="rbdfleet-discard-") as d:
        path = Path(d) / "image"
        path.write_bytes(b"")
        os.truncate(path, 16 * MiB)
        yield path


def test_file_discard_punches_a_hole(image: Path) -> None:
    dev = FileDevice(image)
    try:
        dev.write_at(0, os.urandom(8 * MiB))
        dev.flush()
        allocated = os.stat(image).st_blocks * 512
        assert allocated >= 8 * MiB
        assert dev.discard(MiB, 4 * MiB) is True
        assert os.stat(image).st_blocks * 512 <= allocated - 4 * MiB
        assert dev.read_at(MiB, 4 * MiB) == bytes(4 * MiB)
        assert os.stat(image).st_size == 16 * MiB  # the size is kept
        with pytest.raises(ValueError):
            dev.discard(1, B)
    finally:
        dev.close()
    ro = FileDevice(image, read_only=True)
    try:
        with pytest.raises(DeviceError):
            ro.discard(0, B)
    finally:
        ro.close()


def test_a_medium_that_cannot_discard_is_asked_once(
    image: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """BLKDISCARD (block devices) answering EOPNOTSUPP: False, logged once, not asked again;
    another errno is a DeviceError."""
    import errno

    from agents.backends import file as file_backend

    calls: list[tuple[int, bytes]] = []
    answer = [errno.EOPNOTSUPP]

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        calls.append((request, arg))
        raise OSError(answer[0], os.strerror(answer[0]))

    monkeypatch.setattr(file_backend.fcntl, "ioctl", ioctl)
    dev = FileDevice(image)
    dev._block = True  # as if on /dev/vdX: the discard is an ioctl
    try:
        with caplog.at_level("WARNING"):
            assert dev.discard(B, 2 * B) is False
            assert dev.discard(B, 2 * B) is False
        assert calls == [(0x1277, (B).to_bytes(8, "little") + (2 * B).to_bytes(8, "little"))]
        assert sum("discard_unsupported" in r.getMessage() for r in caplog.records) == 1
    finally:
        dev.close()
    dev = FileDevice(image)
    dev._block = True
    answer[0] = errno.EIO
    try:
        with pytest.raises(DeviceError) as err:
            dev.discard(0, B)
        assert err.value.fields["errno"] == errno.EIO
    finally:
        dev.close()
