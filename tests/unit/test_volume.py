"""Volume on MemoryDevice and FileDevice: every op round trips, readers follow by push and by
journal, versions stay consistent under overwrite, the journal wraps through checkpoints."""

from __future__ import annotations

import os
import random
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.backends.file import FileDevice
from agents.committer import COMMITS_IN_FLIGHT
from agents.core.record import Record
from agents.device import ALIGN, BlockDevice
from agents.errors import (
    AlreadyExists,
    BadPath,
    BadRequest,
    ChecksumMismatch,
    DeviceError,
    FormatError,
    NoSpace,
    NotEmpty,
    NotFound,
    NotWriter,
    SequenceGap,
    StaleEpoch,
    WrongKind,
)
from agents.follower import TREE_PAGE, JournalView
from agents.testing import MemoryDevice
from agents.volume import Volume
from tests.unit.test_replication import _until
from tests.unit.test_warm_promotion import _pushes_to

pytestmark = pytest.mark.unit

SIZE = 32 << 20
Opener = Callable[[bool], BlockDevice]


@pytest.fixture(params=["memory", "file"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """``open(read_only)`` -> a new handle on one fresh medium."""
    handles: list[BlockDevice] = []
    if request.param == "memory":
        medium = MemoryDevice(SIZE)

        def open_memory(read_only: bool) -> BlockDevice:
            dev = medium.reopen(read_only=read_only)
            handles.append(dev)
            return dev

        yield open_memory
    else:
        image = tmp_path / "image"
        with image.open("wb") as f:
            f.truncate(SIZE)

        def open_file(read_only: bool) -> BlockDevice:
            dev = FileDevice(image, read_only)
            handles.append(dev)
            return dev

        yield open_file
    for h in handles:
        h.close()


def writer(opener: Opener, epoch: int = 1, **fmt: int) -> Volume:
    dev = opener(False)
    Volume.format(dev, fleet="t", **fmt)
    vol = Volume.open(dev)
    vol.start_epoch(epoch)
    return vol


def put(vol: Volume, path: str, data: bytes, epoch: int = 1, piece: int = 100_000) -> Record:
    chunks = (data[i : i + piece] for i in range(0, len(data), piece))
    return vol.put(path, chunks, len(data), epoch=epoch, mtime=123.5)


def read(vol: Volume, path: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join(vol.read(path, offset, length))


def test_every_op_round_trips(opener: Opener) -> None:
    vol = writer(opener)
    big = os.urandom(3 * (1 << 20) + 12345)
    r = put(vol, "/dir/big", big)
    assert (r.op, r.seq, r.epoch) == ("put", 2, 1)
    put(vol, "/dir/small", b"tiny")
    put(vol, "/empty", b"")
    assert read(vol, "/dir/big") == big
    assert read(vol, "/dir/big", 1 << 20, 5) == big[1 << 20 : (1 << 20) + 5]
    assert read(vol, "/dir/big", len(big) - 10, 100) == big[-10:]
    assert read(vol, "/dir/small", 1) == b"iny"
    assert read(vol, "/empty") == b""
    st = vol.stat("/dir/big")
    assert (st.kind, st.size, st.version, st.epoch, st.mtime) == ("file", len(big), 2, 1, 123.5)
    assert st.crc == zlib.crc32(big) and vol.stat("/dir/small").crc == zlib.crc32(b"tiny")
    assert [e.path for e in vol.list("/dir")] == ["/dir/big", "/dir/small"]
    vol.mkdir("/x/y", epoch=1, parents=True)
    with pytest.raises(AlreadyExists):
        vol.mkdir("/x", epoch=1)
    vol.rename("/dir", "/x/y/moved", epoch=1)
    assert read(vol, "/x/y/moved/big") == big
    with pytest.raises(NotFound):
        vol.stat("/dir/big")
    vol.delete("/x/y/moved/small", epoch=1)
    with pytest.raises(NotFound):
        read(vol, "/x/y/moved/small")
    with pytest.raises(WrongKind):
        vol.read("/x")
    # a fresh open (what a reader or a new writer does) sees the same namespace
    again = Volume.open(opener(True))
    assert again.applied_seq == vol.applied_seq and again.epoch == 1
    assert again.stat("/x/y/moved/big") == vol.stat("/x/y/moved/big")
    assert read(again, "/x/y/moved/big") == big
    assert vol.fsck() == []


def test_overwrite_is_copy_on_write_and_quarantined(opener: Opener) -> None:
    vol = writer(opener)
    put(vol, "/f", b"a" * 100_000)
    old_extents = vol._index.get("/f").extents
    put(vol, "/f", b"b" * 100_000)
    assert vol._index.get("/f").extents != old_extents
    assert [e for _, e in vol._allocator.quarantined()] == list(old_extents)
    vol.release_through(vol.applied_seq)
    assert vol._allocator.quarantined() == []


def test_reader_sees_old_or_new_never_a_mix(opener: Opener) -> None:
    vol = writer(opener)
    old = os.urandom(4 << 20)
    put(vol, "/f", old)
    reader = Volume.open(opener(True))
    stream = reader.read("/f")
    first = next(stream)
    assert reader.safe_seq() == 2  # the read pins the version it started on
    new = os.urandom(4 << 20)
    rec = put(vol, "/f", new)
    reader.apply(rec)
    assert reader.safe_seq() == 2 and reader.applied_seq == 3
    # the writer releases only what every reader acknowledged: the old extents stay
    vol.release_through(reader.safe_seq())
    put(vol, "/g", os.urandom(4 << 20))  # first fit: would land on the old extents if free
    assert first + b"".join(stream) == old
    assert reader.safe_seq() == 3
    assert read(reader, "/f") == new


def test_reused_extents_give_checksum_errors_never_wrong_bytes(opener: Opener) -> None:
    vol = writer(opener)
    put(vol, "/f", b"x" * (2 << 20))
    stream = vol.read("/f")
    vol.delete("/f", epoch=1)
    vol.release_through(vol.applied_seq)  # a buggy caller ignoring safe_seq
    put(vol, "/g", b"y" * (2 << 20))
    with pytest.raises(ChecksumMismatch):
        b"".join(stream)


def test_reader_follows_by_push_and_by_journal(opener: Opener) -> None:
    vol = writer(opener)
    by_push = Volume.open(opener(True))
    by_disk = Volume.open(opener(True))
    pushed = [put(vol, f"/p{i}", os.urandom(5000 * (i + 1))) for i in range(5)]
    pushed.append(vol.mkdir("/d", epoch=1))
    key = vol.superblock.record_key
    for record in pushed:
        by_push.apply(Record.decode(record.encode(key), key))
    by_push.apply(pushed[0])  # duplicates are ignored
    assert [r.seq for r in by_disk.refresh()] == [r.seq for r in pushed]
    assert by_disk.refresh() == []
    for vol_r in (by_push, by_disk):
        assert vol_r.applied_seq == vol.applied_seq
        assert vol_r._index.snapshot() == vol._index.snapshot()
        assert read(vol_r, "/p3") == read(vol, "/p3")
    later = [put(vol, "/q", b"1"), put(vol, "/r", b"2")]
    with pytest.raises(SequenceGap):
        by_push.apply(later[1])
    assert vol.records_since(pushed[-1].seq) == later
    for record in vol.records_since(by_push.applied_seq):
        by_push.apply(record)
    assert by_push.applied_seq == vol.applied_seq


def test_epochs_fence_old_writers(opener: Opener) -> None:
    vol = writer(opener, epoch=3)
    with pytest.raises(StaleEpoch):
        put(vol, "/a", b"x", epoch=2)
    reader = Volume.open(opener(True))
    with pytest.raises(NotWriter):
        put(reader, "/a", b"x", epoch=3)
    with pytest.raises(DeviceError):
        reader.start_epoch(4)
    rec = put(vol, "/a", b"v3", epoch=3)
    successor = Volume.open(opener(False))
    with pytest.raises(StaleEpoch):
        successor.start_epoch(3)
    start = successor.start_epoch(4)
    assert (start.op, start.seq, start.epoch) == ("epoch-start", rec.seq + 1, 4)
    # records of an older epoch are ignored by readers
    reader.apply(rec)
    reader.apply(start)
    tag = vol.superblock.volume_tag
    stale = Record(start.seq + 1, 3, "delete", {"path": "/a"}, volume_tag=tag)
    reader.apply(stale)
    assert reader.applied_seq == start.seq and read(reader, "/a") == b"v3"


def test_bad_puts_leave_no_trace(opener: Opener) -> None:
    vol = writer(opener)
    free = vol.free_bytes()
    with pytest.raises(BadRequest):
        vol.put("/a", [b"x" * 10_000], 20_000, epoch=1, mtime=0)
    with pytest.raises(BadRequest):
        vol.put("/a", [b"x" * 30_000], 20_000, epoch=1, mtime=0)
    vol.mkdir("/d", epoch=1)
    with pytest.raises(WrongKind):
        put(vol, "/d", b"z" * 10_000)
    with pytest.raises(NoSpace):
        vol.put("/huge", iter(()), SIZE, epoch=1, mtime=0)
    assert vol.free_bytes() == free
    with pytest.raises(NotFound):
        vol.stat("/a")
    assert vol.fsck() == []


@pytest.mark.parametrize("seed", range(4))
def test_a_full_store_refuses_new_data_and_deleting_everything_gives_the_space_back(
    opener: Opener, seed: int
) -> None:
    """Filled with files of mixed sizes until NoSpace: further puts, inline ones and mkdir
    are refused too, yet every delete (in any order) goes through, because the checkpoints
    they need take tree pages the writer held back from data. Without that reserve the
    first delete of a full store failed with NoSpace and the store stayed full for good."""
    rng = random.Random(seed)
    vol = writer(opener, journal_bytes=64 << 10)  # small ring: checkpoints all along
    empty = vol.free_bytes()
    for d in range(7):
        vol.mkdir(f"/d{d}", epoch=1)
    names: list[str] = []
    for sizes in ([100, 3000, 5000, 20_000, 300_000], [3000, 20_000], [100]):  # to the brim
        with pytest.raises(NoSpace):
            for n in range(len(names), 100_000):
                put(vol, f"/d{n % 7}/f{n}", rng.randbytes(rng.choice(sizes)))
                names.append(f"/d{n % 7}/f{n}")
                if n % 10 == 0:
                    vol.release_through(vol.safe_seq())
    for refused in (lambda: put(vol, "/tiny", b"x"), lambda: vol.mkdir("/new", epoch=1)):
        with pytest.raises(NoSpace):
            refused()
    rng.shuffle(names)
    for i, name in enumerate(names):
        vol.delete(name, epoch=1)
        if i % 10 == 0:
            vol.release_through(vol.safe_seq())
    vol.checkpoint()
    vol.checkpoint()  # the first one's replaced pages join the quarantine at the second
    vol.release_through(vol.safe_seq())
    assert vol.free_bytes() >= empty - 8 * TREE_PAGE  # the tree's few pages stay in use
    put(vol, "/again", b"y" * 300_000)
    assert vol.fsck() == []


def _journal_write(vol: Volume, offset: int) -> bool:
    return vol._sb.journal_offset <= offset < vol._sb.journal_offset + vol._sb.journal_bytes


def test_group_commit_shares_journal_writes(opener: Opener) -> None:
    """Puts that arrive while COMMITS_IN_FLIGHT group commits are being written queue, and
    the next leader writes all of them in one journal write."""
    vol = writer(opener)
    n_threads = COMMITS_IN_FLIGHT + 6
    writes: list[int] = []
    real_write, real_flush = vol._device.write_at, vol._device.flush
    queued = threading.Event()

    def counting(offset: int, data: bytes) -> None:
        if _journal_write(vol, offset):
            writes.append(len(data))
        real_write(offset, data)

    def slow_flush() -> None:
        # the commits in flight hold their flush until every other put has queued behind them
        for _ in range(1000):
            if queued.is_set() or len(vol._queue) >= n_threads - COMMITS_IN_FLIGHT:
                queued.set()
                break
            threading.Event().wait(0.01)
        real_flush()

    vol._device.write_at = counting  # type: ignore[method-assign]
    vol._device.flush = slow_flush  # type: ignore[method-assign]
    errors: list[BaseException] = []
    started = threading.Barrier(n_threads)

    def work(k: int) -> None:
        try:
            started.wait()
            put(vol, f"/t{k}", os.urandom(4096))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert queued.is_set()
    assert vol.applied_seq == 1 + n_threads
    assert len(writes) <= COMMITS_IN_FLIGHT + 1, (
        f"the puts queued behind the commits in flight did not share a write: {writes}")
    reader = Volume.open(opener(True))
    assert reader._index.snapshot() == vol._index.snapshot()


def _in_thread(fn: Callable[[], Record]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its record or its exception lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_group_commits_are_written_at_once_and_acknowledged_in_order(opener: Opener) -> None:
    """The next batch is numbered and written while the one before is still being written;
    it is acknowledged only after it, and its records never claim the one before durable."""
    vol = writer(opener)
    real_write = vol._device.write_at
    journal_writes: list[int] = []
    hold_first = threading.Event()

    def held(offset: int, data: bytes) -> None:
        if _journal_write(vol, offset):
            journal_writes.append(offset)
            if len(journal_writes) == 1:
                assert hold_first.wait(10)
        real_write(offset, data)

    vol._device.write_at = held  # type: ignore[method-assign]
    first, first_out = _in_thread(lambda: put(vol, "/a", b"a"))
    _until("the first commit's journal write", lambda: len(journal_writes) == 1)
    second, second_out = _in_thread(lambda: put(vol, "/b", b"b"))
    _until("the second commit written beside the first", lambda: len(journal_writes) == 2)
    second.join(0.2)
    assert second.is_alive() and not second_out, "acknowledged before the commit before it"
    hold_first.set()
    first.join(10)
    second.join(10)
    a, b = first_out[0], second_out[0]
    assert isinstance(a, Record) and isinstance(b, Record), (a, b)
    assert b.seq == a.seq + 1 and b.commit_seq < a.seq
    reader = Volume.open(opener(True))
    assert read(reader, "/a") == b"a" and read(reader, "/b") == b"b"


def test_a_failed_commit_fails_every_commit_after_it_even_written(opener: Opener) -> None:
    """A fenced writer's journal write fails while the next commit's went through: that
    one is not acknowledged either (the chain on the image ends before it), the volume
    refuses every later write, and the image opens at the commit before, no corruption."""
    vol = writer(opener)
    put(vol, "/before", b"0")
    durable = vol.applied_seq
    real_write = vol._device.write_at
    journal_writes: list[int] = []
    second_written = threading.Event()

    def fenced_first(offset: int, data: bytes) -> None:
        if not _journal_write(vol, offset):
            real_write(offset, data)
            return
        journal_writes.append(offset)
        if len(journal_writes) == 1:
            assert second_written.wait(10)
            raise DeviceError("blocklisted (simulated)", op="write", errno=108)
        real_write(offset, data)
        second_written.set()

    vol._device.write_at = fenced_first  # type: ignore[method-assign]
    first, first_out = _in_thread(lambda: put(vol, "/a", b"a"))
    _until("the first commit's journal write", lambda: len(journal_writes) == 1)
    second, second_out = _in_thread(lambda: put(vol, "/b", b"b"))
    first.join(10)
    second.join(10)
    assert isinstance(first_out[0], DeviceError) and isinstance(second_out[0], DeviceError), (
        first_out, second_out)
    with pytest.raises(DeviceError):
        put(vol, "/c", b"c")
    reader = Volume.open(opener(True))  # no ChecksumMismatch: nothing after vouches for /a
    assert reader.applied_seq == durable
    assert [e.path for e in reader.list("/")] == ["/before"]


def test_journal_wraps_through_checkpoints(opener: Opener) -> None:
    vol = writer(opener, journal_bytes=64 << 10)  # 16 blocks: wraps every few records
    lagging = Volume.open(opener(True))
    follower = Volume.open(opener(True))
    ops: list[str] = []
    vol.set_commit_listener(lambda commit: ops.extend(r.op for r in commit.records))
    contents: dict[str, bytes] = {}
    for i in range(120):
        path = f"/w/{i % 7}"
        contents[path] = os.urandom(100 + (i * 997) % 9000)
        put(vol, path, contents[path])
        if i % 3 == 0:
            follower.refresh()
        if i % 10 == 0:
            vol.release_through(follower.safe_seq())
    # every checkpoint takes a seq: its record switches readers to its root
    assert vol.applied_seq == 121 + ops.count("checkpoint") and ops.count("checkpoint") > 1
    # a reader that fell behind past the wrap reloads the newest checkpoint
    lagging.refresh()
    follower.refresh()
    fresh = Volume.open(opener(True))
    for v in (lagging, follower, fresh):
        assert v.applied_seq == vol.applied_seq
        assert v._index.snapshot() == vol._index.snapshot()
        for path, data in contents.items():
            assert read(v, path) == data
    assert vol.fsck() == []


def test_replay_learns_released_extents_were_reused(opener: Opener) -> None:
    vol = writer(opener)
    for i in range(3):
        put(vol, f"/f{i}", b"%d" % i * 300_000)
        vol.delete(f"/f{i}", epoch=1)
        vol.release_through(vol.applied_seq)  # the next put reuses the same extents
    put(vol, "/last", b"L" * 300_000)
    reader = Volume.open(opener(True))
    assert read(reader, "/last") == b"L" * 300_000
    assert reader._allocator.quarantined() == vol._allocator.quarantined() == []
    assert vol.fsck() == []


def test_records_written_during_the_end_check_are_not_corruption(opener: Opener) -> None:
    vol = writer(opener)
    put(vol, "/a", b"1")
    reader = Volume.open(opener(True))
    with reader._lock:
        # witnesses are read first: nothing beyond the reader's end yet
        witnesses = reader._scan_witnesses(
            JournalView(reader._device, reader.superblock), reader._index.applied_seq
        )
        # the writer goes on between the reader's scan and its chain walk: /c's commit_seq
        # proves /b was durable, and the walk (after the scan) finds /b
        put(vol, "/b", b"2")
        put(vol, "/c", b"3")
        reader._refresh_locked()
        reader._check_end(witnesses)
    assert reader.applied_seq == vol.applied_seq
    assert read(reader, "/c") == b"3"


def _lay(dev: BlockDevice, offset: int, data: bytes) -> None:
    """Write ``data`` at any ``offset`` (read, patch, write the 4 KiB pages it touches)."""
    base = offset - offset % ALIGN
    pages = bytearray(dev.read_at(base, -(-(offset + len(data) - base) // ALIGN) * ALIGN))
    pages[offset - base : offset - base + len(data)] = data
    dev.write_at(base, bytes(pages))


@pytest.mark.parametrize("longer", [1, 300, -1, -300])
def test_a_window_read_before_the_writer_never_lends_its_length(longer: int) -> None:
    """A view's window read one lap earlier holds an older record's header where the writer
    has since laid a new one, of another length. When the old header's length needs a
    second read, the record found is the new one, with its own length: the old length put a
    reader's cursor bytes off, and it refused every push after (make bench, 3 runs in 6)."""
    dev = MemoryDevice(SIZE)
    Volume.format(dev, fleet="t")
    sb = Volume.open(dev).superblock
    start = 4 * ALIGN - 100  # the header in a new view's first window (16 KiB), the rest past it
    new = Record(9, 1, "put", {"path": "/new", "data": b"n" * 4000}).encode(sb.record_key)
    old = Record(1, 1, "put", {"path": "/old", "data": b"o" * (4000 + longer)}
                 ).encode(sb.record_key)
    for check in ("record", "witness"):
        _lay(dev, sb.journal_offset + start, old)
        view = JournalView(dev, sb)
        view.read(0, 1)  # the window, with the old record's header
        _lay(dev, sb.journal_offset + start, new)  # the writer's next lap, after the window
        if check == "record":
            found = view.record_at(start)
            assert found is not None
            assert (found[0].seq, found[1]) == (9, len(new))
        else:
            witness = view.witness_at(start)
            assert witness is not None and witness.seq == 9
        assert view.record_at(start + len(new)) is None  # nothing where the old one ended


def test_reformat_forgets_the_old_journal(opener: Opener) -> None:
    vol = writer(opener)
    for i in range(5):
        put(vol, f"/old{i}", b"x" * 5000)
    dev = opener(False)
    Volume.format(dev, fleet="again")  # the ring is not zeroed: the tag keeps old records out
    fresh = Volume.open(dev)
    assert (fresh.applied_seq, fresh.fleet, fresh.list("/")) == (0, "again", [])
    fresh.start_epoch(1)
    put(fresh, "/new", b"n")
    assert [e.path for e in Volume.open(opener(True)).list("/")] == ["/new"]
    assert fresh.fsck() == []
    foreign = Record(3, 1, "delete", {"path": "/new"}, volume_tag=vol.superblock.volume_tag)
    with pytest.raises(FormatError):
        fresh.apply(foreign)


vol_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from(["/a", "/b", "/d/c", "/d/e/f"]),
            st.sampled_from([0, 10, 3000, 5000, 1 << 20, 1_500_000]),
        ),
        st.tuples(st.just("delete"), st.sampled_from(["/a", "/b", "/d", "/d/c"]), st.just(0)),
        st.tuples(st.just("mkdir"), st.sampled_from(["/d", "/d/e", "/x/y"]), st.booleans()),
        st.tuples(
            st.just("rename"),
            st.sampled_from(["/a", "/d", "/b"]),
            st.sampled_from(["/b", "/z", "/d/q"]),
        ),
        st.tuples(st.just("checkpoint"), st.just(""), st.just(0)),
        st.tuples(st.just("release"), st.just(""), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vol_ops)
def test_reopen_and_push_replicas_equal_the_writer(script: list[tuple[str, Any, Any]]) -> None:
    dev = MemoryDevice(16 << 20)
    Volume.format(dev, fleet="prop", journal_bytes=64 << 10)
    vol = Volume.open(dev)
    vol.start_epoch(1)
    pushed = Volume.open(dev.reopen(read_only=True))
    # every record is pushed, checkpoint records (the writer's root switches) included
    vol.set_commit_listener(_pushes_to(pushed))
    for i, (op, a, b) in enumerate(script):
        try:
            if op == "put":
                data = bytes([i % 251]) * b
                rec = vol.put(a, [data], b, epoch=1, mtime=float(i))
            elif op == "delete":
                rec = vol.delete(a, epoch=1)
            elif op == "mkdir":
                rec = vol.mkdir(a, epoch=1, parents=b)
            elif op == "rename":
                rec = vol.rename(a, b, epoch=1)
            elif op == "checkpoint":
                vol.checkpoint()
                continue
            else:
                vol.release_through(pushed.safe_seq())
                continue
            assert pushed.applied_seq == rec.seq
        except (NotFound, AlreadyExists, WrongKind, NotEmpty, BadPath):
            continue
    fresh = Volume.open(dev.reopen(read_only=True))
    for other in (pushed, fresh):
        assert other.applied_seq == vol.applied_seq
        assert other._index.snapshot() == vol._index.snapshot()
    # a fresh open is conservative: what the writer still quarantines, it does too
    assert set(vol._allocator.quarantined()) <= set(fresh._allocator.quarantined())
    for node in vol._index.walk():
        if node.entry.kind == "file":
            assert b"".join(fresh.read(node.entry.path)) == b"".join(vol.read(node.entry.path))
    assert vol.fsck() == []


def test_put_accepts_any_bytes_like_pieces(opener: Opener) -> None:
    vol = writer(opener)
    data = os.urandom(4 << 20) + os.urandom(100)
    pieces = [bytearray(data[: 4 << 20]), memoryview(data)[4 << 20 :]]
    vol.put("/f", pieces, len(data), epoch=1, mtime=0)  # type: ignore[arg-type]
    assert read(vol, "/f") == data


@pytest.mark.parametrize(("offset", "length"), [
    (0, None), (1, None), (4 << 20, None), ((4 << 20) - 1, 2), (123_457, 5 << 20), (0, 0),
])
def test_read_views_copied_before_the_next_equal_read(opener: Opener, offset: int,
                                                      length: int | None) -> None:
    """``read_views`` reuses its buffers: each view copied as it comes (as the server sends
    it before asking for the next) gives exactly ``read``'s bytes, for any range, across
    units, on every backend; the buffers are handed back for the next stream."""
    vol = writer(opener)
    data = os.urandom((9 << 20) + 777)
    put(vol, "/f", data, piece=1 << 20)
    for _ in range(2):  # the second stream runs on buffers the first one handed back
        got = b"".join(bytes(view) for view in vol.read_views("/f", offset, length))
        end = len(data) if length is None else offset + length
        assert got == data[offset:end] == read(vol, "/f", offset, length)

