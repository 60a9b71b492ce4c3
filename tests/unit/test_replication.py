"""Writer ↔ reader replication logic in one process (MemoryDevice, pushes as function calls):
acks, lagging readers reported then back in sync, gap filling from the journal, the wait set
the client's reader addresses choose, quarantine release, and stop_writes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agents.core.protocol import LaggingReaderReport, PushFrame, RecordAck, RecordPush
from agents.core.record import Record
from agents.errors import BadRequest, NotFound, NotWriter, PeerUnreachable
from agents.reader import ReaderRole
from agents.testing import MemoryDevice
from agents.volume import Volume
from agents.writer import ReaderLink, WriterRole

pytestmark = pytest.mark.unit


class Cluster:
    """A writer and two readers sharing one MemoryDevice; pushes are direct calls."""

    def __init__(self) -> None:
        self.medium = MemoryDevice(16 << 20)
        Volume.format(self.medium, fleet="f")
        device = self.medium.reopen()
        volume = Volume.open(device)
        volume.start_epoch(1)
        self.readers = {n: ReaderRole(n, self._open_ro) for n in ("r1", "r2")}
        for reader in self.readers.values():
            reader.catch_up()
        self.down: set[str] = set()
        self.gates: dict[str, threading.Semaphore] = {}  # node -> one release per ack
        self.held: set[str] = set()  # nodes whose ack has been held at least once
        self.pushes: list[tuple[str, RecordPush]] = []
        self.reports: list[LaggingReaderReport] = []
        self.writer = WriterRole(node="w", fleet="f", epoch=1, device=device, volume=volume,
                                 send_push=self._send, report_lagging=self.reports.append,
                                 ack_timeout=5.0, retry_interval=0.05)
        self.writer.set_readers({"r1": "a1", "r2": "a2"}, in_sync={"r1", "r2"})

    def _open_ro(self) -> tuple[MemoryDevice, Volume]:
        device = self.medium.reopen(read_only=True)
        return device, Volume.open(device)

    def _send(self, link: ReaderLink, push: RecordPush) -> RecordAck:
        if link.node in self.down:
            raise PeerUnreachable(f"{link.node} is down", address=link.address)
        reader = self.readers[link.node]
        wire = RecordPush.decode(push.encode(), reader.volume.superblock.record_key)
        self.pushes.append((link.node, wire))
        ack = reader.receive(wire)
        gate = self.gates.get(link.node)  # the ack's way back, held until released
        if gate is not None:
            self.held.add(link.node)
        if gate is not None and not gate.acquire(timeout=10):
            raise PeerUnreachable(f"{link.node}: ack held too long", address=link.address)
        return ack

    def close(self) -> None:
        self.writer.close()
        for reader in self.readers.values():
            reader.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


def test_put_is_acked_by_both_readers(cluster: Cluster) -> None:
    ack = cluster.writer.put("/a", [b"x" * 5000], 5000, mtime=1.0)
    assert ack.acked == ("r1", "r2") and ack.lagging == ()
    for reader in cluster.readers.values():
        assert b"".join(reader.volume.read("/a")) == b"x" * 5000
        reader.check_current()


def test_unreachable_reader_is_reported_then_catches_up(cluster: Cluster) -> None:
    cluster.down.add("r2")
    ack = cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    assert ack.acked == ("r1",) and ack.lagging == ("r2",)
    assert [r.reader for r in cluster.reports] == ["r2"]
    assert cluster.reports[0].target_seq == ack.seq
    cluster.writer.put("/b", [b"2"], 1, mtime=1.0)  # no second report while lagging
    assert len(cluster.reports) == 1
    cluster.down.clear()
    pause = threading.Event()
    for _ in range(250):  # the link retries every retry_interval (0.05 s)
        if cluster.writer.readers()["r2"].in_sync:
            break
        pause.wait(0.02)
    assert cluster.writer.readers()["r2"].in_sync
    assert b"".join(cluster.readers["r2"].volume.read("/b")) == b"2"
    ack = cluster.writer.put("/c", [b"3"], 1, mtime=1.0)
    assert ack.acked == ("r1", "r2")


def test_silent_reader_is_reported_after_ack_timeout(cluster: Cluster) -> None:
    gate = threading.Event()
    original = cluster.readers["r1"].receive

    def slow(push: RecordPush) -> RecordAck:
        gate.wait(5)
        return original(push)

    cluster.readers["r1"].receive = slow  # type: ignore[method-assign]
    cluster.writer.ack_timeout = 0.3
    try:
        ack = cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    finally:
        gate.set()
    assert ack.lagging == ("r1",) and ack.acked == ("r2",)
    assert cluster.reports[0].reason.startswith("no ack within")


def test_every_in_sync_reader_is_waited_for(cluster: Cluster) -> None:
    """The writer waits for every in-sync reader, whatever readers a client named (its map may
    be a revision old): r2 down is reported lagging before the put is acknowledged without it,
    since another client may be sent to r2 right after the ack."""
    cluster.down.add("r2")
    ack = cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    assert ack.acked == ("r1",) and ack.lagging == ("r2",)
    assert [r.reader for r in cluster.reports] == ["r2"]


def test_a_new_reader_is_waited_for_only_once_it_applied_everything_acknowledged_without_it(
        cluster: Cluster) -> None:
    """A reader added while writes keep coming: its link lags, then joins, and is in sync
    (named by sync_state, which is what the coordinator admits it on) only once it applied
    every write the writer acknowledged without it."""
    cluster.readers["r3"] = ReaderRole("r3", cluster._open_ro)
    stop = threading.Event()
    acked: list[int] = []

    def writes() -> None:
        i = 0
        while not stop.is_set():
            acked.append(cluster.writer.put(f"/w{i % 7}", [b"v%d" % i], len(b"v%d" % i),
                                            mtime=0.0).seq)
            i += 1

    thread = threading.Thread(target=writes)
    thread.start()
    try:
        before = cluster.writer.sync_state()[0]
        # (no check that r3 is out of sync right after this: with a write just finished its
        # first catch-up can reach everything before the next one, a race, not the property)
        cluster.writer.set_readers({"r1": "a1", "r2": "a2", "r3": "a3"})
        deadline = time.monotonic() + 10
        while "r3" not in cluster.writer.sync_state()[1] and time.monotonic() < deadline:
            time.sleep(0.005)
        revision, in_sync = cluster.writer.sync_state()
        done = list(acked)
        applied = cluster.readers["r3"].volume.applied_seq
    finally:
        stop.set()
        thread.join(10)
    assert "r3" in in_sync and revision > before
    assert done and applied >= max(done)  # nothing acknowledged before it is missing


def _link(cluster: Cluster, node: str) -> ReaderLink:
    return cluster.writer.readers()[node]


def _until(what: str, cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_joining_reader_flips_in_sync_only_once_it_applied_every_write_acked_without_it(
        cluster: Cluster) -> None:
    """The stale read the admission fault test caught: writes queued for a joining reader
    were acknowledged without it, and its ack of an older push (past ``missed``) flipped it in
    sync with those records still in its queue: handed out, it served the older value. r3's
    acks are let back one at a time."""
    cluster.readers["r3"] = ReaderRole("r3", cluster._open_ro)
    gate = cluster.gates["r3"] = threading.Semaphore(0)
    cluster.writer.set_readers({"r1": "a1", "r2": "a2", "r3": "a3"})
    _until("r3 caught up from the journal, its ack held", lambda: "r3" in cluster.held)
    w0 = cluster.writer.put("/k", [b"0"], 1, mtime=0.0)  # r3 lagging: acked without it
    assert "r3" not in w0.acked
    gate.release()  # the ack of the catch-up from before w0: r3 joins, w0 still missed
    _until("r3 joining", lambda: _link(cluster, "r3").joining)
    # r3 is sent the next catch-up (through w0) and holds its ack; meanwhile two writes
    # are queued for it and acknowledged without it (it has not caught up: writes must not
    # stall behind a reader still reading the journal)
    w1 = cluster.writer.put("/k", [b"1"], 1, mtime=0.0)
    w2 = cluster.writer.put("/k", [b"2"], 1, mtime=0.0)
    assert "r3" not in w1.acked + w2.acked
    gate.release()  # r3 acks w0: past ``missed``, but w1 and w2 are not applied
    _until("r3's ack of w0", lambda: _link(cluster, "r3").applied_seq >= w0.seq)
    link = _link(cluster, "r3")
    assert not (link.in_sync and link.applied_seq < w2.seq), (
        f"r3 in sync at {link.applied_seq} while {w2.seq} was acknowledged without it")
    for _ in range(8):
        gate.release()
    _until("r3 in sync", lambda: _link(cluster, "r3").in_sync)
    assert _link(cluster, "r3").applied_seq >= w2.seq
    assert b"".join(cluster.readers["r3"].volume.read("/k")) == b"2"
    w3 = cluster.writer.put("/k", [b"3"], 1, mtime=0.0)  # in sync: waited for again
    assert "r3" in w3.acked


def test_a_lagging_report_that_does_not_get_through_blocks_the_ack(cluster: Cluster) -> None:
    from agents.errors import LagNotReported

    refused: list[LaggingReaderReport] = []

    def coordinator_down(report: LaggingReaderReport) -> None:
        refused.append(report)
        raise PeerUnreachable("coordinator unreachable", address="c:1")

    cluster.writer._report = coordinator_down
    cluster.down.add("r2")
    with pytest.raises(LagNotReported) as err:
        cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    assert err.value.fields["outcome"] == "unknown" and {r.reader for r in refused} == {"r2"}
    tries = len(refused)
    with pytest.raises(LagNotReported):  # still not through: still no ack, report re-sent
        cluster.writer.put("/b", [b"1"], 1, mtime=1.0)
    assert len(refused) > tries
    cluster.writer._report = cluster.reports.append  # the coordinator is back
    ack = cluster.writer.put("/c", [b"1"], 1, mtime=1.0)
    assert ack.acked == ("r1",) and [r.reader for r in cluster.reports] == ["r2"]
    assert cluster.reports[0].sync_revision == cluster.writer.sync_state()[0]


def test_an_in_sync_reader_leaving_the_reader_set_is_reported_before_any_write_skips_it(
    cluster: Cluster,
) -> None:
    """The coordinator's reader set without r2 reaches the writer late (a slow guest), when
    the coordinator may have handed r2 out again on the writer's own word: the writer must
    not acknowledge a write without r2 before the coordinator took the lagging report (else
    clients read the old value there). Once it is taken, r2's link is gone."""
    from agents.errors import LagNotReported

    refused: list[LaggingReaderReport] = []

    def coordinator_down(report: LaggingReaderReport) -> None:
        refused.append(report)
        raise PeerUnreachable("coordinator unreachable", address="c:1")

    cluster.writer._report = coordinator_down
    revision = cluster.writer.sync_state()[0]
    cluster.writer.set_readers({"r1": "a1"})
    with pytest.raises(LagNotReported):
        cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    assert {r.reader for r in refused} == {"r2"}
    assert refused[0].reason == "left the reader set"
    assert cluster.writer.sync_state() == (revision + 1, ("r1",))
    cluster.writer._report = cluster.reports.append  # the coordinator answers
    ack = cluster.writer.put("/b", [b"1"], 1, mtime=1.0)
    assert ack.acked == ("r1",) and [r.reader for r in cluster.reports] == ["r2"]
    assert "r2" not in cluster.writer.readers()


def test_a_reader_back_in_the_set_before_its_leaving_was_reported_earns_its_place_again(
    cluster: Cluster,
) -> None:
    cluster.writer.set_readers({"r1": "a1"})
    cluster.writer.set_readers({"r1": "a1", "r2": "a2"})
    ack = cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    assert "r2" in cluster.writer.readers()
    for _ in range(200):  # lagging, then joining, then in sync once it applied everything
        if cluster.writer.sync_state()[1] == ("r1", "r2"):
            break
        threading.Event().wait(0.02)
    assert cluster.writer.sync_state()[1] == ("r1", "r2")
    assert cluster.readers["r2"].volume.applied_seq >= ack.seq


def test_a_device_error_is_a_refusal_the_client_follows(cluster: Cluster) -> None:
    from agents.errors import DeviceError

    seen: list[DeviceError] = []
    cluster.writer._on_device_error = seen.append

    def eio(offset: int, data: bytes) -> None:
        raise DeviceError("write failed: EIO", errno=5)

    cluster.writer.device.write_at = eio  # type: ignore[method-assign]
    with pytest.raises(NotWriter) as err:
        cluster.writer.put("/a", [b"x" * 9000], 9000, mtime=1.0)
    assert err.value.status == 409 and err.value.fields["outcome"] == "unknown"
    assert err.value.fields["errno"] == 5 and len(seen) == 1


def test_reader_fills_a_gap_from_the_journal(cluster: Cluster) -> None:
    cluster.down.add("r1")
    cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    reader = cluster.readers["r1"]
    before = reader.volume.applied_seq
    volume = cluster.writer.volume
    later = volume.records_since(before)[-1:]
    key = volume.superblock.record_key
    push = RecordPush(fleet="f", epoch=1, writer="w", commit_seq=later[-1].seq,
                      frames=(PushFrame(volume.journal_position(later[-1].seq),
                                        later[-1].encode(key)),))
    ack = reader.receive(RecordPush.decode(push.encode(), key))
    assert ack.applied_seq == later[-1].seq
    assert b"".join(reader.volume.read("/a")) == b"1"


def test_quarantine_waits_for_reader_pins(cluster: Cluster) -> None:
    big = b"v1" * (64 << 10)
    cluster.writer.put("/f", [big], len(big), mtime=1.0)
    stream = cluster.readers["r1"].volume.read("/f")
    pinned = cluster.readers["r1"].volume.safe_seq()
    ack = cluster.writer.put("/f", [b"v2" * (64 << 10)], len(big), mtime=2.0)
    assert cluster.writer.readers()["r1"].safe_seq == pinned < ack.seq
    assert b"".join(stream) == big  # the old version is still whole
    cluster.writer.put("/g", [b"x"], 1, mtime=3.0)
    assert cluster.writer.readers()["r1"].safe_seq > pinned


def test_stop_writes_refuses_new_writes_and_aborts_a_streaming_put(cluster: Cluster) -> None:
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def chunks() -> Iterator[bytes]:
        yield b"a" * 65536
        started.set()
        release.wait(5)
        yield b"b" * 65536

    def put() -> None:
        try:
            cluster.writer.put("/big", chunks(), 131072, mtime=1.0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=put)
    thread.start()
    assert started.wait(5)
    stopper = threading.Thread(target=cluster.writer.stop_writes)
    stopper.start()
    release.set()
    thread.join(5)
    stopper.join(5)
    assert len(errors) == 1 and isinstance(errors[0], NotWriter)
    with pytest.raises(NotWriter):
        cluster.writer.put("/x", [b"1"], 1, mtime=1.0)
    with pytest.raises(NotFound):
        cluster.writer.volume.stat("/big")


def test_demoted_while_waiting_for_acks_is_not_acknowledged(cluster: Cluster) -> None:
    gate = threading.Event()
    original = cluster.readers["r1"].receive

    def slow(push: RecordPush) -> RecordAck:
        gate.wait(5)
        return original(push)

    cluster.readers["r1"].receive = slow  # type: ignore[method-assign]
    cluster.writer.ack_timeout = 0.5
    errors: list[BaseException] = []

    def put() -> None:
        try:
            cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=put)
    thread.start()
    pause = threading.Event()
    for _ in range(250):  # the put is waiting once r2 acked it
        if cluster.writer.readers()["r2"].applied_seq >= cluster.writer.volume.applied_seq:
            break
        pause.wait(0.02)
    stopper = threading.Thread(target=cluster.writer.stop_writes)
    stopper.start()
    thread.join(5)  # the put gives up after ack_timeout, r1 still silent
    gate.set()  # r1's pusher may finish now: stop_writes joins it
    stopper.join(5)
    assert len(errors) == 1 and isinstance(errors[0], NotWriter)
    assert errors[0].fields["outcome"] == "unknown"
    assert cluster.reports == []


def test_reader_set_skips_the_writer_itself(cluster: Cluster) -> None:
    cluster.writer.set_readers({"w": "self:1", "r1": "a1"})
    assert sorted(cluster.writer.readers()) == ["r1"]
    ack = cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    assert ack.acked == ("r1",) and ack.lagging == ()



def test_records_are_pushed_in_seq_order_whatever_their_put_threads_do(
        cluster: Cluster) -> None:
    # the put of seq N stalls after its commit (descheduled, say) while the put of N+1 goes
    # on: the readers must still get N before N+1, each once, without waiting for the thread
    volume = cluster.writer.volume
    start = volume.applied_seq
    real_put = volume.put

    def stalling_put(path: str, *args: Any, **kwargs: Any) -> Record:
        record = real_put(path, *args, **kwargs)
        if path == "/slow":
            time.sleep(0.3)
        return record

    volume.put = stalling_put  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def put(path: str) -> None:
        try:
            cluster.writer.put(path, [b"x" * 5000], 5000, mtime=0.0)
        except BaseException as exc:
            errors.append(exc)

    slow = threading.Thread(target=put, args=("/slow",))
    slow.start()
    while volume.applied_seq == start:
        time.sleep(0.001)
    put("/fast")
    slow.join()
    assert not errors
    for node in ("r1", "r2"):
        seqs = [pushed.record.seq for n, push in cluster.pushes if n == node
                for pushed in push.records]
        assert seqs == [start + 1, start + 2]


def test_a_reader_told_of_a_newer_commit_catches_up_instead_of_answering_503(
        cluster: Cluster) -> None:
    """In-sync readers answered 503 catching_up (n/n+1) when a read came while the record
    they were about to receive was already durable: they read the journal instead."""
    reader = cluster.readers["r1"]
    cluster.down.add("r1")  # r1 gets nothing pushed: only the journal has the new record
    ack = cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    reader.known_commit_seq = ack.seq  # what a push's commit seq or the tail told it
    assert reader.volume.applied_seq < ack.seq
    reader.check_current()  # no CatchingUp: the journal brought it there
    assert reader.volume.applied_seq == ack.seq
    assert b"".join(reader.volume.read("/a")) == b"1"


def test_a_reader_that_refuses_a_push_reads_the_journal_before_answering(
        cluster: Cluster) -> None:
    """A reader whose place in the journal was off (a byte past where its last record
    ended: make bench caught one) refused every push after. It went on answering reads from
    the state before them as current, since only an applied push told it what was
    committed. A refused push still does: the next read catches up from the journal first
    (or answers 503), never serves the older state."""
    reader = cluster.readers["r1"]
    cluster.writer.put("/a", [b"1"], 1, mtime=1.0)
    cluster.down.add("r1")
    ack = cluster.writer.put("/a", [b"2"], 1, mtime=2.0)
    volume = cluster.writer.volume
    key = volume.superblock.record_key
    record = volume.records_since(ack.seq - 1)[0]
    push = RecordPush(fleet="f", epoch=1, writer="w", commit_seq=ack.seq,
                      frames=(PushFrame(volume.journal_position(ack.seq) + 1,
                                        record.encode(key)),))
    with pytest.raises(BadRequest, match="cannot follow"):
        reader.receive(RecordPush.decode(push.encode(), key))
    assert reader.behind() and b"".join(reader.volume.read("/a")) == b"1"
    reader.check_current()  # what a read does first
    assert b"".join(reader.volume.read("/a")) == b"2"


def test_announcing_a_record_the_journal_no_longer_holds_queues_nothing(
        cluster: Cluster) -> None:
    """The epoch record is announced when the writer role starts; if the ring has wrapped
    past it meanwhile, the readers get it from a checkpoint instead of a push."""
    gone = Record(10**6, 1, "mkdir", {"path": "/gone", "parents": False, "mtime": 0.0})
    cluster.writer.announce(gone)
    assert all(not link.pending for link in cluster.writer._links.values())
    cluster.writer.put("/after", [b"a"], 1, mtime=1.0)  # pushes go on as before
    assert all(r.volume.applied_seq == cluster.writer.volume.applied_seq
               for r in cluster.readers.values())


def _no_reader(link: ReaderLink, push: RecordPush) -> RecordAck:
    raise AssertionError(f"a push to {link.node}, a reader of no reader set")


def test_small_files_go_home_ahead_once_enough_of_them_were_put() -> None:
    """The writer's pass (Volume.stage_homes, in a thread of its own) starts once
    ``stage_homes_at`` bytes of small files were acknowledged; the checkpoint then names
    them and a reader reads them from their homes."""
    medium = MemoryDevice(64 << 20)
    Volume.format(medium, fleet="f")
    device = medium.reopen()
    volume = Volume.open(device)
    volume.start_epoch(1)
    writer = WriterRole(node="w", fleet="f", epoch=1, device=device, volume=volume,
                        send_push=_no_reader,
                        report_lagging=lambda report: None, ack_timeout=5.0,
                        retry_interval=0.05, stage_homes_at=64 << 10)
    files = {f"/h/{i}": bytes([i]) * 4096 for i in range(24)}
    try:
        for path, data in list(files.items())[:8]:
            writer.put(path, [data], len(data), mtime=0.0)
        time.sleep(0.3)
        assert volume._staged == {}  # 32 KiB: below the threshold
        for path, data in list(files.items())[8:]:
            writer.put(path, [data], len(data), mtime=0.0)
        deadline = time.monotonic() + 10
        while len(volume._staged) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        # at least the first 64 KiB went; the rest (if under 64 KiB) waits for the checkpoint
        assert len(volume._staged) >= 16 and set(volume._staged) <= set(files)
        volume.checkpoint()
        assert volume._staged == {}
        reader = Volume.open(medium.reopen(read_only=True))
        assert all(b"".join(reader.read(p)) == d for p, d in files.items())
        assert volume.fsck() == []
    finally:
        writer.close()
