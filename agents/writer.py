"""Writer role (shell): grant already checked → write through the volume → push the record to
the readers → answer once every in-sync reader acked or was reported lagging.

Replication (patent S305): one :class:`ReaderLink` per reader of the fleet, each with its own
pusher thread that sends queued records in seq order, batched. A link is in one of three
states:

* ``in sync``: every group commit is queued for it and every write waits for its ack;
* ``lagging``: nothing is queued for it (each commit only raises its ``missed`` seq); its
  pusher sends it the commit seq every ``retry_interval`` so it catches up from the journal;
* ``joining``: once a lagging reader acked a commit seq, commits are queued for it again,
  and writes do not wait for it; each write acknowledged without it raises its ``owed`` seq.
  Once its ack reaches ``missed`` (every record it was not sent) it is *caught up*: writes
  wait for it from then on, so ``owed`` stops moving; it is in sync once its ack also reaches
  ``owed``. So when it flips, it has applied every write acknowledged without it. (Flipping at
  ``missed`` alone let a write queued for it be acknowledged, the reader flip in sync with that
  record still in its queue, be handed out and serve the older value: a stale read the fault
  tests caught. Waiting for it as soon as it joins, instead, stalled writes behind a reader
  still reading the journal. Flipping a lagging reader straight to in sync would never happen
  under a steady write load: each round trip lets ``missed`` move on.)

Every write waits for every in-sync link, whatever readers the client named. A reader that
fails a push or does not ack within ``ack_timeout`` is dropped from the in-sync set and
reported to the coordinator (``report_lagging``) *before* any write is acknowledged without
it; the coordinator answers only once the map it hands out no longer names that reader, and
a write is not acknowledged while that report has not been accepted. The in-sync set's
changes are counted (``sync_revision``); the coordinator hands a reader out again only on the
writer's word (its heartbeat) of a revision newer than the lagging report.

Quarantine: after each write, extents freed by records up to the minimum ``safe_seq`` of the
writer's own reads and of every in-sync reader are released for reuse.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from agents.committer import Commit
from agents.core.protocol import (
    MAX_PUSH_RECORDS,
    LaggingReaderReport,
    PushFrame,
    ReaderAddress,
    RecordAck,
    RecordPush,
    WriteAck,
)
from agents.core.record import Record
from agents.device import BlockDevice
from agents.errors import AgentError, DeviceError, JournalWrapped, LagNotReported, NotWriter
from agents.volume import Volume

__all__ = ["QueuedCommit", "ReaderLink", "WriterRole"]

LOG = logging.getLogger(__name__)

# bytes of small files put since the last pass past which the writer writes them home ahead of
# the checkpoint (Volume.stage_homes): a run this long is one sequential write, and the
# checkpoint, during which every put waits, is left to name them (1 MiB left it ~15 ms of
# moving per checkpoint, 256 KiB ~5 ms)
STAGE_HOMES_AT = 256 << 10


@dataclass(frozen=True)
class QueuedCommit:
    """One group commit waiting to be pushed: seqs ``first..last`` and its frame, encoded
    once and shared by every reader's queue."""

    first: int
    last: int
    frame: PushFrame


@dataclass
class ReaderLink:
    """The writer's view of one reader (guarded by the writer's condition variable).

    ``joining``: commits are queued for it but writes do not wait for it yet (module
    docstring); ``missed``: the highest seq committed while nothing was queued for it;
    ``unreported``: it was dropped from the in-sync set but the coordinator has not accepted
    the report yet, so no write may be acknowledged.
    """

    node: str
    address: str
    in_sync: bool = True
    applied_seq: int = -1
    safe_seq: int = -1
    reporting: bool = False
    pending: list[QueuedCommit] = field(default_factory=list)
    retired: bool = False
    leaving: bool = False  # retired from the reader set with a lagging report still to send
    pusher: int = 0  # the pusher thread that serves it (a link back in the set gets a new one)
    joining: bool = False
    missed: int = -1
    caught_up: bool = False  # joining, and acked past ``missed``: writes wait for it
    owed: int = -1  # highest seq acknowledged without it while it was joining
    unreported: LaggingReaderReport | None = None


def _holds_up(link: ReaderLink, seq: int) -> bool:
    """Whether a write of ``seq`` must wait for ``link``'s ack: an in-sync reader, or a
    caught-up joining one (module docstring), that has not applied it yet."""
    counts = link.in_sync or (link.joining and link.caught_up)
    return counts and link.applied_seq < seq


def _owe(links: Iterable[ReaderLink], seq: int) -> None:
    """A write of ``seq`` is being acknowledged (caller holds the condition): each joining
    link that has not applied it must apply it before it may flip in sync."""
    for link in links:
        if link.joining and link.applied_seq < seq:
            link.owed = max(link.owed, seq)


@dataclass
class _AckWait:
    """A write waiting for its readers' acks of ``seq``: woken by :meth:`WriterRole._notify`
    only once its wait is over, never by every ack."""

    seq: int
    nodes: frozenset[str]
    wake: threading.Event = field(default_factory=threading.Event)


SendPush = Callable[[ReaderLink, RecordPush], RecordAck]
ReportLagging = Callable[[LaggingReaderReport], None]
OnDeviceError = Callable[[DeviceError], None]


class WriterRole:
    """The writer side of one agent for one epoch. Thread-safe."""

    def __init__(
        self,
        *,
        node: str,
        fleet: str,
        epoch: int,
        device: BlockDevice,
        volume: Volume,
        send_push: SendPush,
        report_lagging: ReportLagging,
        ack_timeout: float,
        retry_interval: float,
        on_device_error: OnDeviceError | None = None,
        clock: Callable[[], float] = time.monotonic,
        stage_homes_at: int = STAGE_HOMES_AT,
    ) -> None:
        self.node, self.fleet, self.epoch = node, fleet, epoch
        self.device, self.volume = device, volume
        self._send, self._report = send_push, report_lagging
        self._on_device_error = on_device_error
        self.ack_timeout, self.retry_interval, self._clock = ack_timeout, retry_interval, clock
        self._cond = threading.Condition()
        self._links: dict[str, ReaderLink] = {}
        self._threads: list[threading.Thread] = []
        self._accepting = True
        self._inflight = 0
        self._sync_revision = 0
        self._ack_waits: list[_AckWait] = []  # writes in await_acks
        # each group commit's records are queued for the readers by the journal leader, in
        # seq order and all at once: one push carries a whole group commit, never a gap
        volume.set_commit_listener(self._queue)
        self._homes_due, self._stage_homes_at = threading.Event(), stage_homes_at
        homes = threading.Thread(target=self._stage_homes, name="homes", daemon=True)
        self._threads.append(homes)
        homes.start()

    # -- readers -------------------------------------------------------------------------

    def set_readers(self, readers: Mapping[str, str],
                    in_sync: Iterable[str] | None = None) -> None:
        """Make ``readers`` (node → address) the fleet's reader set; links start or retire.
        The writer's own node is skipped (a map may list every member).

        A new link starts lagging (it must earn its place in the in-sync set), except those
        named in ``in_sync``: at promotion, the map's in-sync readers, which acked every write
        acknowledged so far. A known node at a new address keeps its link's state: its acks
        speak for what it serves, whichever process sends them.

        An in-sync reader that leaves the set is reported lagging like one that missed an ack,
        and writes are not acknowledged without it before the report got through: the set
        may reach this writer late (a slow guest), after the coordinator handed the reader
        out again on this writer's own word, and clients must not read there what they did
        not write there. Its link stays (retired, not pushed to) until the report is taken.
        """
        readers = {node: address for node, address in readers.items() if node != self.node}
        trusted = set(in_sync or ())
        leaving: list[ReaderLink] = []
        with self._cond:
            for node, link in list(self._links.items()):
                if node in readers:
                    link.address = readers[node]
                    if link.leaving:  # back before its leaving was reported: pushed again
                        link.retired = link.leaving = False
                        self._start_pusher(link)
                elif link.leaving:
                    continue
                elif link.in_sync or link.unreported is not None:
                    # kept until its lagging report is taken (in sync: made just below)
                    link.retired = link.leaving = True
                    if link.in_sync:
                        leaving.append(link)
                else:
                    link.retired = True
                    del self._links[node]
            for node, address in readers.items():
                if node not in self._links:
                    synced = node in trusted
                    link = ReaderLink(node, address, in_sync=synced,
                                      missed=-1 if synced else self.volume.applied_seq)
                    self._sync_revision += int(synced)
                    self._links[node] = link
                    self._start_pusher(link)
            self._notify()
        # reported from a thread of its own (the coordinator answers once its published map
        # no longer names the reader); meanwhile the link still counts in sync, so writes
        # wait for it as before
        target = self.volume.applied_seq
        for link in leaving:
            threading.Thread(target=self._mark_lagging, args=(link, target, "left the reader set"),
                             name=f"leave-{link.node}", daemon=True).start()

    def _start_pusher(self, link: ReaderLink) -> None:
        link.pusher += 1
        thread = threading.Thread(target=self._pusher, args=(link, link.pusher),
                                  name=f"push-{link.node}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def readers(self) -> dict[str, ReaderLink]:
        """Snapshot of the links of the reader set (node → copy of its state); not those that
        left it and are still to be reported."""
        with self._cond:
            return {n: ReaderLink(lk.node, lk.address, lk.in_sync, lk.applied_seq, lk.safe_seq,
                                  joining=lk.joining, missed=lk.missed)
                    for n, lk in self._links.items() if not lk.leaving}

    def sync_state(self) -> tuple[int, tuple[str, ...]]:
        """(revision, names) of the in-sync set, read together."""
        with self._cond:
            names = tuple(sorted(n for n, lk in self._links.items() if lk.in_sync))
            return self._sync_revision, names

    def _notify(self) -> None:
        """Caller holds ``_cond`` and changed a link or the role: wake the pushers and the
        drain (on the condition) and, of the writes waiting for acks, only those whose wait
        is over now (each on its own event): an ack wakes the writes it acknowledges."""
        self._cond.notify_all()
        for wait in self._ack_waits:
            if self._wait_over(wait):
                wait.wake.set()

    def _wait_over(self, wait: _AckWait) -> bool:
        """:meth:`await_acks`'s test, bar its deadline: no link of ``wait`` holds its seq up
        and none is being reported."""
        links = [self._links[n] for n in wait.nodes if n in self._links]
        return not any(_holds_up(lk, wait.seq) or lk.reporting for lk in links)

    # -- writes --------------------------------------------------------------------------

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """One write: counted for :meth:`stop_writes`; a device error (EIO once fenced, a
        read-only or detached disk) becomes a refusal the client follows to the next writer
        (409 ``not_writer``, outcome unknown) instead of a 500, and stops this writer."""
        with self._cond:
            if not self._accepting:
                raise NotWriter(f"{self.node} no longer accepts writes", writer=None)
            self._inflight += 1
        failed: DeviceError | None = None
        try:
            yield
        except DeviceError as exc:
            failed = exc
        finally:
            with self._cond:
                self._inflight -= 1
                self._notify()
        if failed is not None:
            if self._on_device_error is not None:
                self._on_device_error(failed)  # outside the count: it stops writes
            raise NotWriter(f"{self.node} can no longer write ({failed.message}); ask the "
                            "coordinator for the writer", writer=None, outcome="unknown",
                            errno=failed.fields.get("errno")) from failed

    def _guarded(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if not self._accepting:
                raise NotWriter(f"{self.node} stopped accepting writes mid-request", writer=None)
            yield chunk

    def put(self, path: str, chunks: Iterable[bytes], size: int, *, mtime: float) -> WriteAck:
        """Store ``size`` bytes streamed from ``chunks`` at ``path``; acknowledged as above."""
        with self._operation():
            record = self.volume.put(path, self._guarded(chunks), size, epoch=self.epoch,
                                     mtime=mtime)
            return self._replicate(record, path=path, size=size,
                                   crc=record.payload.get("crc"))

    def delete(self, path: str) -> WriteAck:
        """Delete the file or empty directory at ``path``."""
        with self._operation():
            return self._replicate(self.volume.delete(path, epoch=self.epoch), path=path)

    def mkdir(self, path: str, *, parents: bool,
              readers: tuple[ReaderAddress, ...] = ()) -> WriteAck:
        """Create the directory ``path`` (and its parents when asked)."""
        with self._operation():
            record = self.volume.mkdir(path, epoch=self.epoch, parents=parents)
            return self._replicate(record, path=path)

    def rename(self, src: str, dst: str) -> WriteAck:
        """Rename ``src`` to ``dst`` in one record."""
        with self._operation():
            record = self.volume.rename(src, dst, epoch=self.epoch)
            return self._replicate(record, path=src, dst=dst)

    # -- replication ---------------------------------------------------------------------

    def _replicate(self, record: Record, *,
                   path: str, size: int = 0, crc: int | None = None,
                   dst: str | None = None) -> WriteAck:
        # Every in-sync link is waited for, whatever readers the client named (its
        # X-Rbdfleet-Readers): a client whose map is a revision old must not make this write
        # skip a reader another client is sent to.
        with self._cond:
            wait_for = set(self._links)
        acked, lagging = self.await_acks(record.seq, wait_for)
        self._release()
        return WriteAck(op=record.op, path=path, seq=record.seq, epoch=record.epoch, size=size,
                        crc=crc, dst=dst, acked=tuple(sorted(acked)),
                        lagging=tuple(sorted(lagging)))

    def await_acks(self, seq: int, nodes: set[str]) -> tuple[set[str], set[str]]:
        """Wait until each reader in ``nodes`` acked ``seq`` or was reported lagging."""
        deadline = self._clock() + self.ack_timeout
        wait = _AckWait(seq, frozenset(nodes))
        with self._cond:
            self._ack_waits.append(wait)
        try:
            while True:
                with self._cond:
                    links = [self._links[n] for n in nodes if n in self._links]
                    waiting = [lk for lk in links if _holds_up(lk, seq)]
                    reporting = [lk for lk in links if lk.reporting]
                    if not waiting and not reporting:
                        _owe(links, seq)
                        break
                    remaining = deadline - self._clock()
                    if remaining <= 0 and not reporting:
                        _owe(links, seq)
                        break
                    wait.wake.clear()  # a change from here on sets it again (_notify)
                wait.wake.wait(remaining if remaining > 0 else 0.05)
        finally:
            with self._cond:
                self._ack_waits.remove(wait)
        for link in waiting:
            self._mark_lagging(link, seq, f"no ack within {self.ack_timeout}s")
        for link in links:
            if link.unreported is not None:
                self._deliver_report(link)  # an earlier report did not get through: again
        with self._cond:
            acked = {lk.node for lk in links if lk.applied_seq >= seq}
            if not self._accepting and acked != {lk.node for lk in links}:
                # Demoted mid-wait: the missing readers were neither acked nor reported, so
                # this write cannot be acknowledged; its record is durable (outcome unknown).
                raise NotWriter(f"{self.node} stopped writing before every reader acked "
                                f"seq {seq}; the write's outcome is unknown", writer=None,
                                seq=seq, outcome="unknown")
            unreported = sorted(lk.node for lk in links if lk.unreported is not None)
        if unreported:
            raise LagNotReported(
                f"readers {', '.join(unreported)} missed seq {seq} and the coordinator has not "
                "taken them out of the map yet; the write's outcome is unknown",
                seq=seq, readers=unreported, outcome="unknown")
        return acked, {lk.node for lk in links} - acked

    def _mark_lagging(self, link: ReaderLink, target: int, reason: str) -> None:
        """Drop ``link`` to lagging; if it was in sync, report it (module docstring)."""
        with self._cond:
            if (link.retired and not link.leaving) or not (link.in_sync or link.joining):
                return
            was_in_sync = link.in_sync
            link.in_sync = link.joining = link.caught_up = False
            link.pending.clear()
            link.missed = max(link.missed, self.volume.applied_seq)
            if not was_in_sync:
                return  # a joining reader was never handed out: nothing to report
            self._sync_revision += 1
            link.reporting = True
            link.unreported = LaggingReaderReport(
                fleet=self.fleet, writer=self.node, epoch=self.epoch, reader=link.node,
                address=link.address, applied_seq=link.applied_seq, target_seq=target,
                reason=reason, sync_revision=self._sync_revision)
        LOG.warning("event=reader_lagging node=%s reader=%s applied_seq=%d target_seq=%d "
                    "reason=%r", self.node, link.node, link.unreported.applied_seq, target,
                    reason)
        self._deliver_report(link)

    def _deliver_report(self, link: ReaderLink) -> None:
        """Send ``link``'s pending lagging report; it stays pending if it does not get through."""
        report = link.unreported
        if report is None:
            return
        with self._cond:
            link.reporting = True
        try:
            self._report(report)
        except AgentError as exc:
            LOG.error("event=lagging_report_failed reader=%s error=%s", link.node, exc.code)
        else:
            with self._cond:
                if link.unreported is report:
                    link.unreported = None
                    if link.leaving and self._links.get(link.node) is link:
                        del self._links[link.node]  # it left the reader set: reported now
        finally:
            with self._cond:
                link.reporting = False
                self._notify()

    def _pusher(self, link: ReaderLink, me: int) -> None:
        """Send ``link``'s queued records in seq order; keep a lagging reader catching up.
        Ends when the link is retired, or served by a newer pusher (``me`` is not its own)."""
        while True:
            with self._cond:
                while link.in_sync and not link.pending and not link.retired and self._accepting:
                    self._cond.wait()
                if link.retired or not self._accepting or link.pusher != me:
                    return
                if not link.in_sync and not link.joining:
                    self._cond.wait(self.retry_interval)
                    if link.retired or not self._accepting or link.in_sync or link.joining:
                        continue
                batch, link.pending = link.pending, []
            if batch and batch[-1].last - batch[0].first < MAX_PUSH_RECORDS:
                frames = tuple(q.frame for q in batch)
                commit = batch[-1].last
            else:  # catching up, or too far behind for a push: the reader reads the journal
                frames, commit = (), self.volume.applied_seq
            push = RecordPush(fleet=self.fleet, epoch=self.epoch, writer=self.node,
                              commit_seq=commit, frames=frames)
            try:
                ack = self._send(link, push)
            except AgentError as exc:
                self._mark_lagging(link, commit, f"push failed: {exc.code}: {exc.message}")
                continue
            except Exception as exc:  # a bug must not end this reader's pusher silently
                LOG.exception("event=push_error node=%s reader=%s", self.node, link.node)
                self._mark_lagging(link, commit, f"push failed: {type(exc).__name__}")
                continue
            with self._cond:
                link.applied_seq = max(link.applied_seq, ack.applied_seq)
                link.safe_seq = ack.safe_seq
                if not link.in_sync and not link.joining and ack.applied_seq >= commit:
                    link.joining = True  # commits are queued for it from now on
                if link.joining and link.applied_seq >= link.missed:
                    link.caught_up = True  # writes wait for it now: ``owed`` stops moving
                if link.joining and link.caught_up and link.applied_seq >= link.owed:
                    link.joining, link.caught_up, link.in_sync = False, False, True
                    self._sync_revision += 1
                    LOG.info("event=reader_in_sync node=%s reader=%s applied_seq=%d "
                             "sync_revision=%d", self.node, link.node, link.applied_seq,
                             self._sync_revision)
                self._notify()

    def _queue(self, commit: Commit) -> None:
        """Queue a durable group commit for every in-sync or joining reader (its push frame
        made once, here, for all of them); for the others, remember what they missed."""
        queued = QueuedCommit(commit.records[0].seq, commit.records[-1].seq,
                              PushFrame(commit.start, commit.data))
        with self._cond:
            for link in self._links.values():
                if link.in_sync or link.joining:
                    link.pending.append(queued)
                else:
                    link.missed = max(link.missed, queued.last)
            self._notify()
        self._homes_due.set()

    def _stage_homes(self) -> None:
        """After group commits, in a thread of its own: small files put since the last
        pass go home once there are ``stage_homes_at`` bytes of them."""
        while True:
            self._homes_due.wait()
            self._homes_due.clear()
            if not self._accepting:
                return
            try:
                self.volume.stage_homes(self._stage_homes_at)
            except AgentError as exc:
                LOG.warning("event=stage_homes_failed node=%s error=%s", self.node, exc.message)

    def announce(self, record: Record) -> None:
        """Queue ``record`` (e.g. the epoch-start record, committed before this role
        existed) for every in-sync reader; no wait."""
        try:
            start = self.volume.journal_position(record.seq)
        except JournalWrapped:  # long overwritten: a reader finds it in a checkpoint
            LOG.info("event=announce_skipped node=%s seq=%d", self.node, record.seq)
            return
        key = self.volume.superblock.record_key
        self._queue(Commit([record], start, memoryview(record.encode(key))))

    def settle(self, idle: float) -> None:
        """At rest (no write for ``idle`` seconds): checkpoint when that changes something,
        release what the readers' acks allow (no write would trigger it now), and give the
        journal ring back."""
        self.volume.checkpoint_if_idle(idle)
        self._release()
        self.volume.give_back_ring(idle)

    def _release(self) -> None:
        with self._cond:
            floors = [lk.safe_seq for lk in self._links.values() if lk.in_sync]
        floor = min([self.volume.safe_seq(), *floors])
        if floor > 0:
            self.volume.release_through(floor)

    # -- stopping ------------------------------------------------------------------------

    def stop_writes(self, drain_timeout: float = 30.0) -> None:
        """Refuse new writes at once; wait (bounded) for in-flight ones to fail or finish."""
        deadline = self._clock() + drain_timeout
        self.volume.set_commit_listener(None)
        with self._cond:
            self._accepting = False
            for link in self._links.values():
                link.retired = True
            self._notify()
            self._homes_due.set()  # its thread ends
            while self._inflight and self._clock() < deadline:
                self._cond.wait(0.05)
            if self._inflight:
                LOG.error("event=drain_timeout node=%s inflight=%d", self.node, self._inflight)
        for thread in self._threads:
            thread.join(timeout=self.ack_timeout + 1)

    @property
    def accepting(self) -> bool:
        """True until :meth:`stop_writes`."""
        return self._accepting

    def close(self) -> None:
        """Stop writes, then close the read-write handle (librbd: release the lock)."""
        self.stop_writes()
        self.volume.close()
        self.device.close()
