"""Writer role (shell): grant already checked → write through the volume → push the record to
the readers → answer once every in-sync reader acked or was reported lagging.

Replication (patent S305): one :class:`ReaderLink` per reader of the fleet, each with its own
pusher thread that sends queued records in seq order, batched. A reader that fails a push or
does not ack within ``ack_timeout`` is reported to the coordinator (``report_lagging``) and
dropped from the in-sync set; its link keeps sending it the commit seq every
``retry_interval`` so it catches up from the journal, and it is in sync again once its ack
reaches the writer's commit seq.

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

from agents.core.protocol import LaggingReaderReport, ReaderAddress, RecordAck, RecordPush, WriteAck
from agents.device import BlockDevice
from agents.errors import AgentError, NotWriter
from agents.volume import Record, Volume

__all__ = ["ReaderLink", "WriterRole"]

LOG = logging.getLogger(__name__)

MAX_PUSH_BATCH = 256  # beyond this a push sends only the commit seq; the reader reads the journal


@dataclass
class ReaderLink:
    """The writer's view of one reader (guarded by the writer's condition variable)."""

    node: str
    address: str
    in_sync: bool = True
    applied_seq: int = -1
    safe_seq: int = -1
    reporting: bool = False
    pending: list[Record] = field(default_factory=list)
    retired: bool = False


SendPush = Callable[[ReaderLink, RecordPush], RecordAck]
ReportLagging = Callable[[LaggingReaderReport], None]


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node, self.fleet, self.epoch = node, fleet, epoch
        self.device, self.volume = device, volume
        self._send, self._report = send_push, report_lagging
        self.ack_timeout, self.retry_interval, self._clock = ack_timeout, retry_interval, clock
        self._cond = threading.Condition()
        self._links: dict[str, ReaderLink] = {}
        self._threads: list[threading.Thread] = []
        self._accepting = True
        self._inflight = 0
        # each group commit's records are queued for the readers by the journal leader, in
        # seq order and all at once: one push carries a whole group commit, never a gap
        volume.set_commit_listener(self._queue)

    # -- readers -------------------------------------------------------------------------

    def set_readers(self, readers: Mapping[str, str]) -> None:
        """Make ``readers`` (node → address) the fleet's reader set; links start or retire.
        The writer's own node is skipped (a map may list every member)."""
        readers = {node: address for node, address in readers.items() if node != self.node}
        with self._cond:
            for node, link in list(self._links.items()):
                if readers.get(node) != link.address:
                    link.retired = True
                    del self._links[node]
            for node, address in readers.items():
                if node not in self._links:
                    link = ReaderLink(node, address)
                    self._links[node] = link
                    thread = threading.Thread(target=self._pusher, args=(link,),
                                              name=f"push-{node}", daemon=True)
                    self._threads.append(thread)
                    thread.start()
            self._cond.notify_all()

    def readers(self) -> dict[str, ReaderLink]:
        """Snapshot of the links (node → copy of its state)."""
        with self._cond:
            return {n: ReaderLink(lk.node, lk.address, lk.in_sync, lk.applied_seq, lk.safe_seq)
                    for n, lk in self._links.items()}

    def _wait_set(self, client_readers: tuple[ReaderAddress, ...]) -> set[str]:
        """Readers to wait for: the client's when they all match the fleet's, else all."""
        fleet = {n: lk.address for n, lk in self._links.items()}
        if client_readers and all(fleet.get(r.node) == r.address for r in client_readers):
            return {r.node for r in client_readers}
        return set(fleet)

    # -- writes --------------------------------------------------------------------------

    @contextmanager
    def _operation(self) -> Iterator[None]:
        with self._cond:
            if not self._accepting:
                raise NotWriter(f"{self.node} no longer accepts writes", writer=None)
            self._inflight += 1
        try:
            yield
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _guarded(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if not self._accepting:
                raise NotWriter(f"{self.node} stopped accepting writes mid-request", writer=None)
            yield chunk

    def put(self, path: str, chunks: Iterable[bytes], size: int, *, mtime: float,
            readers: tuple[ReaderAddress, ...] = ()) -> WriteAck:
        """Store ``size`` bytes streamed from ``chunks`` at ``path``; acknowledged as above."""
        with self._operation():
            record = self.volume.put(path, self._guarded(chunks), size, epoch=self.epoch,
                                     mtime=mtime)
            return self._replicate(record, readers, path=path, size=size,
                                   crc=record.payload.get("crc"))

    def delete(self, path: str, readers: tuple[ReaderAddress, ...] = ()) -> WriteAck:
        """Delete the file or empty directory at ``path``."""
        with self._operation():
            return self._replicate(self.volume.delete(path, epoch=self.epoch), readers, path=path)

    def mkdir(self, path: str, *, parents: bool,
              readers: tuple[ReaderAddress, ...] = ()) -> WriteAck:
        """Create the directory ``path`` (and its parents when asked)."""
        with self._operation():
            record = self.volume.mkdir(path, epoch=self.epoch, parents=parents)
            return self._replicate(record, readers, path=path)

    def rename(self, src: str, dst: str, readers: tuple[ReaderAddress, ...] = ()) -> WriteAck:
        """Rename ``src`` to ``dst`` in one record."""
        with self._operation():
            record = self.volume.rename(src, dst, epoch=self.epoch)
            return self._replicate(record, readers, path=src, dst=dst)

    # -- replication ---------------------------------------------------------------------

    def _replicate(self, record: Record, client_readers: tuple[ReaderAddress, ...], *,
                   path: str, size: int = 0, crc: int | None = None,
                   dst: str | None = None) -> WriteAck:
        with self._cond:
            wait_for = self._wait_set(client_readers)
        acked, lagging = self.await_acks(record.seq, wait_for)
        self._release()
        return WriteAck(op=record.op, path=path, seq=record.seq, epoch=record.epoch, size=size,
                        crc=crc, dst=dst, acked=tuple(sorted(acked)),
                        lagging=tuple(sorted(lagging)))

    def await_acks(self, seq: int, nodes: set[str]) -> tuple[set[str], set[str]]:
        """Wait until each reader in ``nodes`` acked ``seq`` or was reported lagging."""
        deadline = self._clock() + self.ack_timeout
        with self._cond:
            while True:
                links = [self._links[n] for n in nodes if n in self._links]
                waiting = [lk for lk in links if lk.in_sync and lk.applied_seq < seq]
                reporting = [lk for lk in links if lk.reporting]
                if not waiting and not reporting:
                    break
                remaining = deadline - self._clock()
                if remaining <= 0 and not reporting:
                    break
                self._cond.wait(remaining if remaining > 0 else 0.05)
        for link in waiting:
            self._mark_lagging(link, seq, f"no ack within {self.ack_timeout}s")
        with self._cond:
            acked = {lk.node for lk in links if lk.applied_seq >= seq}
            if not self._accepting and acked != {lk.node for lk in links}:
                # Demoted mid-wait: the missing readers were neither acked nor reported, so
                # this write cannot be acknowledged; its record is durable (outcome unknown).
                raise NotWriter(f"{self.node} stopped writing before every reader acked "
                                f"seq {seq}; the write's outcome is unknown", writer=None,
                                seq=seq, outcome="unknown")
        return acked, {lk.node for lk in links} - acked

    def _mark_lagging(self, link: ReaderLink, target: int, reason: str) -> None:
        with self._cond:
            if not link.in_sync or link.retired:
                return
            link.in_sync, link.reporting = False, True
            link.pending.clear()
            applied = link.applied_seq
        LOG.warning("event=reader_lagging node=%s reader=%s applied_seq=%d target_seq=%d "
                    "reason=%r", self.node, link.node, applied, target, reason)
        try:
            self._report(LaggingReaderReport(
                fleet=self.fleet, writer=self.node, epoch=self.epoch, reader=link.node,
                address=link.address, applied_seq=applied, target_seq=target, reason=reason))
        except AgentError as exc:
            LOG.error("event=lagging_report_failed reader=%s error=%s", link.node, exc.code)
        finally:
            with self._cond:
                link.reporting = False
                self._cond.notify_all()

    def _pusher(self, link: ReaderLink) -> None:
        """Send ``link``'s queued records in seq order; keep a lagging reader catching up."""
        while True:
            with self._cond:
                while link.in_sync and not link.pending and not link.retired and self._accepting:
                    self._cond.wait()
                if link.retired or not self._accepting:
                    return
                if not link.in_sync:
                    self._cond.wait(self.retry_interval)
                    if link.retired or not self._accepting or link.in_sync:
                        continue
                batch, link.pending = link.pending, []
            if batch and len(batch) <= MAX_PUSH_BATCH:
                records = tuple(RecordPush.pack(r.encode()) for r in batch)
                commit = batch[-1].seq
            else:  # catching up, or too far behind for a push: the reader reads the journal
                records, commit = (), self.volume.applied_seq
            push = RecordPush(fleet=self.fleet, epoch=self.epoch, writer=self.node,
                              records=records, commit_seq=commit)
            try:
                ack = self._send(link, push)
            except AgentError as exc:
                self._mark_lagging(link, commit, f"push failed: {exc.code}: {exc.message}")
                continue
            with self._cond:
                link.applied_seq = max(link.applied_seq, ack.applied_seq)
                link.safe_seq = ack.safe_seq
                if not link.in_sync and ack.applied_seq >= commit:
                    link.in_sync = True
                    LOG.info("event=reader_in_sync node=%s reader=%s applied_seq=%d",
                             self.node, link.node, ack.applied_seq)
                self._cond.notify_all()

    def _queue(self, records: list[Record]) -> None:
        """Queue durable ``records`` (seq order) for every in-sync reader."""
        with self._cond:
            for link in self._links.values():
                if link.in_sync:
                    link.pending.extend(records)
            self._cond.notify_all()

    def announce(self, record: Record) -> None:
        """Queue ``record`` (e.g. the epoch-start record, committed before this role
        existed) for every in-sync reader; no wait."""
        self._queue([record])

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
            self._cond.notify_all()
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
