"""The agent: one node of a fleet. Checks grants, runs the role state machine's actions, and
hands requests to the reader or writer role. The HTTP layer (agents.server) calls it; the
daemon (agents.daemon) builds it from the config.

Grants on requests (every /v1 request but health carries one). Each is MACed with THIS
node's key (audience = this node), so only the coordinator, which derives every node's key
from the fleet's master key, can make one (docs/security.md):

==================  ==========================  =====================  =======================
request             grant purpose               grant subject          grant epoch
==================  ==========================  =====================  =======================
put/delete/mkdir/   write                       any                    == current (newer: the
rename                                                                 writer steps down, 409)
get/list/stat       read (or write)             any                    >= current (newer: the
                                                                       reader catches up first)
records (push)      push                        the pushing writer     == the push's, >= current
promote / demote /  promote / demote / readers  any                    the epoch asked for
readers
==================  ==========================  =====================  =======================

Outgoing requests: reports to the coordinator carry a grant the agent makes with its own key
(purpose ``report``, audience ``coordinator``, subject this node, the body's digest,
``grant_ttl`` seconds); a
writer's pushes carry the push grant the coordinator made for that reader (in the promote and
reader-set requests and in the answer to each heartbeat, or ``push_grants`` in the config of a
fleet without a coordinator). The agent never holds another node's key.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.core import roles
from agents.core.grants import (
    COORDINATOR,
    DEMOTE,
    PROMOTE,
    PUSH,
    READ,
    READERS,
    REPORT,
    WRITE,
    Grant,
    body_digest,
    peek,
    sign,
    verify,
)
from agents.core.index import check_extents_within
from agents.core.protocol import (
    PUSH_CONTENT_TYPE,
    DemoteRequest,
    Health,
    Heartbeat,
    LaggingReaderReport,
    Message,
    PromoteRequest,
    ReaderSet,
    RecordAck,
    RecordPush,
    SelfTestCheck,
    SelfTestReport,
)
from agents.core.record import Record
from agents.device import ALIGN, BlockDevice
from agents.errors import (
    AgentError,
    CatchingUp,
    DecodeError,
    DeviceError,
    ForeignGrant,
    FormatError,
    GrantExpired,
    IllegalTransition,
    NotFound,
    NotWriter,
    RbdfleetError,
    StaleEpoch,
)
from agents.metrics import Registry
from agents.peers import CoordinatorLink, Peer, PeerSession
from agents.reader import ReaderRole
from agents.volume import Volume
from agents.writer import ReaderLink, WriterRole

__all__ = ["Agent", "AgentSettings", "OpenDevice"]

LOG = logging.getLogger(__name__)


def _release() -> str:
    """The deployed package version this process imports: both deployers unpack a package into
    ``opt/rbdfleet/releases/<version>`` and run it from there (never via ``current``, which an
    install may already have moved on); ``""`` when run from anywhere else."""
    release = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.basename(release) if os.path.basename(os.path.dirname(release)) == "releases" \
        else ""


RELEASE = _release()

OpenDevice = Callable[[bool], BlockDevice]  # read_only -> device

DEVICE_POLL_S = 0.5  # a spare's look for its disk
DEVICE_WAIT_LOG_S = 60.0  # a spare logs that it is still waiting this often


def _device_absent(exc: NotFound | DeviceError) -> bool:
    """The device is not there (yet): no node, or one udev has not handed to us yet."""
    return isinstance(exc, NotFound) or exc.fields.get("errno") in (
        errno.ENOENT, errno.ENXIO, errno.EACCES)


@dataclass(frozen=True)
class AgentSettings:
    """What the daemon's config gives the agent (see docs/agent.md)."""

    node: str
    fleet: str
    # this node's own key(s): the current one first, a previous one during a rotation
    keys: tuple[bytes, ...] = field(repr=False)
    advertise: str
    readers: dict[str, str] = field(default_factory=dict)
    # the fleet's coordinators (an active one and its standbys); none: no reports at all
    coordinators: tuple[str, ...] = ()
    tls: bool = False
    ca_file: str | None = None
    # this node's certificate and key (PEM files), presented on its pushes and reports
    cert_file: str | None = None
    key_file: str | None = None
    crl_file: str | None = None  # the fleet CA's revocation list (revoked peers refused)
    ack_timeout: float = 2.0
    retry_interval: float = 0.5
    tail_interval: float = 0.5
    # a writer whose journal saw no commit for this long checkpoints what changed (small
    # files go home, readers' overlays empty, the ring is given back): Writer.settle
    idle_checkpoint: float = 5.0
    heartbeat_interval: float = 1.0
    selftest_interval: float = 10.0
    report_timeout: float = 2.0
    grant_ttl: float = 60.0
    # reader -> push grant, for a writer started without a coordinator (config push_grants)
    push_grants: dict[str, str] = field(default_factory=dict, repr=False)


def _check_push_extents(push: RecordPush, volume: Volume) -> None:
    """Refuse (400, nothing applied) a push with a record whose extents leave the volume's
    data area: even a writer's valid grant does not make such a record something to serve."""
    sb = volume.superblock
    try:
        for pushed in push.records:
            check_extents_within(pushed.record, sb.data_offset, sb.data_offset + sb.data_bytes)
    except FormatError as exc:
        raise DecodeError(f"record push: {exc.message}", field="records") from exc


class Agent:
    """One agent. Thread-safe; role changes are serialized by one lock."""

    def __init__(self, settings: AgentSettings, open_device: OpenDevice,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._open_device = open_device
        self._clock = clock
        self.state = roles.initial()
        self._role_lock = threading.RLock()
        self.reader: ReaderRole | None = None
        self.writer: WriterRole | None = None
        self._promoting: tuple[BlockDevice, Volume] | None = None
        self._epoch_record: Record | None = None
        # the reader set a promotion hands the new writer: node -> address, and the in-sync
        # ones (None: bootstrap without a coordinator, the configured readers, all trusted)
        self._promote_readers: tuple[dict[str, str], frozenset[str]] | None = None
        # reader -> (token, (epoch, expires)) of the newest push grant the coordinator handed
        # over: a newer epoch's wins whatever the expiry of an older one
        self._push_grants: dict[str, tuple[str, tuple[int, float]]] = {}
        self._push_lock = threading.Lock()
        self.take_push_grants(settings.push_grants)
        self._sessions: dict[tuple[str, str], PeerSession] = {}  # one per reader link thread
        self._coordinator = (CoordinatorLink(settings.coordinators, self._peer,
                                             settings.report_timeout)
                             if settings.coordinators else None)
        # closes the handles of readers a promotion replaced, at stop: reads in flight on
        # them go on meanwhile
        self._retired: list[Callable[[], None]] = []
        self.writer_hint: tuple[str | None, str | None] = (None, None)  # node, address
        self.selftest = "pending"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics = Registry()
        self._build_metrics()

    # -- metrics -------------------------------------------------------------------------

    def _build_metrics(self) -> None:
        m = self.metrics
        self.m_requests = m.counter("rbdfleet_agent_requests_total", "HTTP requests answered",
                                    ("method", "route", "status"))
        self.m_latency = m.histogram("rbdfleet_agent_request_seconds",
                                     "HTTP request duration", ("route",))
        self.m_bytes_in = m.counter("rbdfleet_agent_bytes_written_total",
                                    "File bytes received by puts")
        self.m_bytes_out = m.counter("rbdfleet_agent_bytes_read_total", "File bytes served")
        self.m_checksum = m.counter("rbdfleet_agent_checksum_errors_total",
                                    "Reads refused because data or a record failed its checksum")
        self.m_lagging = m.counter("rbdfleet_agent_lagging_reports_total",
                                   "Readers reported lagging to the coordinator")
        self.m_pushes = m.counter("rbdfleet_agent_pushes_total", "Record pushes sent", ("result",),
                                  labelsets=[("ok",), ("failed",)])
        self.m_discarded = m.counter("rbdfleet_agent_discarded_bytes_total",
                                     "Bytes the writer discarded (given back to Ceph): "
                                     "freed data and tree pages, the journal ring at rest")
        self.m_promotions = m.counter(
            "rbdfleet_agent_promotions_total",
            "Promotions to writer: warm (the reader's state kept) or cold (volume reopened)",
            ("mode",), labelsets=[("warm",), ("cold",)])
        m.gauge("rbdfleet_agent_epoch", "Highest epoch this agent knows", lambda: self.state.epoch)
        m.gauge("rbdfleet_agent_is_writer", "1 while this agent accepts writes",
                lambda: float(self.state.accepts_writes))
        m.gauge("rbdfleet_agent_applied_seq", "Last journal seq applied", lambda: self.applied_seq)
        m.gauge("rbdfleet_agent_selftest_ok", "1 when the last self-test passed",
                lambda: float(self.selftest == "ok"))
        m.gauge("rbdfleet_agent_in_sync_readers", "Readers in the writer's in-sync set",
                lambda: float(len(self._links(True))))

    # -- state views ---------------------------------------------------------------------

    @property
    def volume(self) -> Volume | None:
        """The volume requests are served from (the writer's, else the reader's)."""
        if self.writer is not None:
            return self.writer.volume
        return self.reader.volume if self.reader is not None else None

    @property
    def applied_seq(self) -> int:
        """Last seq applied by the serving volume (-1 before the device is open)."""
        volume = self.volume
        return volume.applied_seq if volume is not None else -1

    def _links(self, in_sync: bool) -> list[ReaderLink]:
        writer = self.writer
        if writer is None:
            return []
        return [lk for lk in writer.readers().values() if lk.in_sync == in_sync]

    def sync_state(self) -> tuple[int, tuple[str, ...]]:
        """The writer's (revision, names) of its in-sync readers; (0, ()) on a reader."""
        writer = self.writer
        return writer.sync_state() if writer is not None else (0, ())

    def health(self) -> Health:
        """The /v1/health answer."""
        volume = self.volume
        catching_up = False
        if self.reader is not None and self.writer is None:
            catching_up = self.reader.behind()
        revision, in_sync = self.sync_state()
        unsettled = () if self.writer is None else self.writer.volume.unsettled()
        return Health(
            node=self.settings.node, fleet=self.settings.fleet, role=self.state.role,
            epoch=self.state.epoch,
            applied_seq=volume.applied_seq if volume else -1,
            safe_seq=volume.safe_seq() if volume else -1, selftest=self.selftest,
            catching_up=catching_up, in_sync=in_sync,
            lagging=tuple(sorted(lk.node for lk in self._links(False))),
            sync_revision=revision, version=RELEASE,
            settled=not unsettled, unsettled=unsettled,
        )

    # -- role changes --------------------------------------------------------------------

    def handle(self, event: roles.Event) -> None:
        """Step the role machine and run its actions in order; feed back what they produce."""
        with self._role_lock:
            queue: list[roles.Event] = [event]
            while queue:
                current = queue.pop(0)
                before = self.state
                self.state, actions = roles.step(self.state, current)
                if self.state != before:
                    LOG.info("event=role_changed node=%s from=%s/%d to=%s/%d cause=%s",
                             self.settings.node, before.role, before.epoch, self.state.role,
                             self.state.epoch, type(current).__name__)
                for action in actions:
                    try:
                        follow = self._run(action)
                    except AgentError as exc:
                        if self.state.role != "promoting":
                            raise
                        LOG.error("event=promotion_failed node=%s action=%s error=%s",
                                  self.settings.node, type(action).__name__, exc.code)
                        self.state, undo = roles.step(self.state,
                                                      roles.PromotionFailed(exc.code))
                        for step in undo:
                            self._run(step)
                        raise
                    if follow is not None:
                        queue.append(follow)

    def _open_reader(self) -> None:
        if self.reader is None:
            def open_ro() -> tuple[BlockDevice, Volume]:
                device = self._open_device(True)
                try:
                    return device, Volume.open(device)
                except BaseException:
                    device.close()
                    raise
            self.reader = ReaderRole(self.settings.node, open_ro)
            self.reader.catch_up()

    def _run(self, action: roles.Action) -> roles.Event | None:
        """Run one action; an event to feed back, if the action produced one."""
        match action:
            case roles.OpenReadOnly():
                self._open_reader()
                assert self.reader is not None
                if self.reader.volume.epoch > self.state.epoch:
                    return roles.NewerEpochSeen(self.reader.volume.epoch)
            case roles.OpenReadWrite():
                device = self._open_device(False)
                try:
                    self._promoting = (device, self._volume_to_promote(device))
                except BaseException:
                    device.close()
                    raise
            case roles.ReplayJournalTail():
                volume = self._promoting[1] if self._promoting else self._writer_volume()
                volume.refresh()
            case roles.WriteEpochRecord(epoch=epoch):
                if self._promoting is None:  # re-elected writer: reuse its handle
                    assert self.writer is not None
                    self._promoting = (self.writer.device, self.writer.volume)
                    self.writer = None
                record = self._promoting[1].start_epoch(epoch)
                self._epoch_record = record
                LOG.info("event=epoch_record node=%s epoch=%d seq=%d", self.settings.node,
                         epoch, record.seq)
                return roles.EpochRecordWritten(epoch)
            case roles.AcceptWrites(epoch=epoch):
                assert self._promoting is not None
                device, volume = self._promoting
                self._promoting = None
                self.writer = WriterRole(
                    node=self.settings.node, fleet=self.settings.fleet, epoch=epoch,
                    device=device, volume=volume, send_push=self._send_push,
                    report_lagging=self._report_lagging, ack_timeout=self.settings.ack_timeout,
                    retry_interval=self.settings.retry_interval,
                    on_device_error=self.fenced)
                volume.set_discard_listener(lambda n: self.m_discarded.inc(amount=n))
                readers, in_sync = self._promote_readers or (
                    self.settings.readers, frozenset(self.settings.readers))
                self._promote_readers = None
                self.writer.set_readers(readers, in_sync)
                if self._epoch_record is not None:
                    self.writer.announce(self._epoch_record)
                    self._epoch_record = None
                if self.reader is not None:  # reads in flight keep their handle until stop
                    # warm: the writer serves from the reader's volume; only its handle goes
                    self._retired.append(self.reader.device.close
                                         if self.reader.volume is volume else self.reader.close)
                    self.reader = None
            case roles.StopWrites():
                if self.writer is not None:
                    self.writer.stop_writes()
            case roles.CloseReadWrite():
                if self.writer is not None:
                    self.writer.close()
                    self.writer = None
                for session in self._sessions.values():
                    session.close()
                self._sessions.clear()
                if self._promoting is not None:
                    device, volume = self._promoting
                    self._promoting = None
                    if self.reader is not None and self.reader.volume is volume:
                        self._undo_warm(self.reader, device)
                    else:
                        volume.close()
                        device.close()
            case roles.CloseDevice():
                for close in [*self._retired, *([self.reader.close] if self.reader else [])]:
                    close()
                self._retired.clear()
                self.reader = None
        return None

    def _volume_to_promote(self, device: BlockDevice) -> Volume:
        """Warm promotion: the reader's own volume, moved onto the read-write ``device`` with
        its state checked against the image (:meth:`Volume.adopt`). When the state does not
        match the image (or there is no reader), the volume opened again from ``device``:
        the cold path, logged with the reason and counted."""
        reader = self.reader
        reason: str | None = "no_reader"
        if reader is not None:
            started = time.monotonic()
            try:
                reason = reader.volume.adopt(device)
            except AgentError as exc:  # the cold open below meets the same image: it decides
                reason = exc.code
            if reason is None:
                self.m_promotions.inc("warm")
                LOG.info("event=promotion_warm node=%s applied_seq=%d seconds=%.3f",
                         self.settings.node, reader.volume.applied_seq,
                         time.monotonic() - started)
                return reader.volume
        LOG.warning("event=promotion_cold node=%s reason=%s", self.settings.node, reason)
        volume = Volume.open(device)
        self.m_promotions.inc("cold")
        return volume

    def _undo_warm(self, reader: ReaderRole, device: BlockDevice) -> None:
        """A warm promotion failed: the reader serves from its own handle again, unless the
        volume began writing (then the reader goes, and OpenReadOnly opens the image anew)."""
        if not reader.volume.return_to(reader.device):
            LOG.warning("event=promotion_undo_reopens node=%s", self.settings.node)
            self.reader = None
            reader.close()
        device.close()

    def _writer_volume(self) -> Volume:
        if self.writer is None:
            raise NotWriter("not the writer", writer=self.writer_hint[0])
        return self.writer.volume

    def note_epoch(self, epoch: int) -> None:
        """A record, push or grant carried ``epoch``: a writer of an older epoch steps down."""
        if epoch > self.state.epoch:
            try:
                self.handle(roles.NewerEpochSeen(epoch))
            except IllegalTransition as exc:
                LOG.warning("event=epoch_ignored epoch=%d error=%s", epoch, exc.message)

    def fenced(self, exc: DeviceError) -> None:
        """A write failed on the device (EIO after a blocklist, EROFS, a detached disk): stop
        writing, and tell the coordinator this node's device failed (if it was fenced on
        purpose the report is of an epoch already over and changes nothing; if not, it is the
        evidence that gets a new writer elected).

        Only the writer's own failure counts: a write that was in flight when this agent was
        demoted meets the read-only disk after the step-down, and reporting that (in the new
        epoch) would get a healthy reader confirmed dead (seen under repeated pauses).

        A failed *read* is no such evidence: a read that began on a reader's read-only disk,
        unplugged for its promotion, fails right after the node became the writer, and
        taking it for a fence stepped the new writer down and failed the fleet over again
        (seen on the sandbox VMs). The writer's own device is checked by its self-test."""
        if exc.fields.get("op") == "read":
            LOG.warning("event=device_read_failed node=%s role=%s errno=%s error=%r",
                        self.settings.node, self.state.role, exc.fields.get("errno"),
                        exc.message)
            return
        with self._role_lock:
            if self.state.role != "writer":
                LOG.info("event=device_error_after_step_down node=%s role=%s errno=%s",
                         self.settings.node, self.state.role, exc.fields.get("errno"))
                return
            LOG.error("event=device_fenced node=%s errno=%s", self.settings.node,
                      exc.fields.get("errno"))
            epoch = self.state.epoch
            with contextlib.suppress(IllegalTransition):  # another request handled the fence
                self.handle(roles.DeviceFenced(int(exc.fields.get("errno") or 0)))
        self.selftest = "failed"
        check = SelfTestCheck("device-write", False, exc.message)
        self._spawn(lambda: self._send_selftest(SelfTestReport(
            node=self.settings.node, fleet=self.settings.fleet, role="writer", epoch=epoch,
            ok=False, checks=(check,), at=self._clock())))

    # -- grants --------------------------------------------------------------------------

    def _verify(self, token: str, *, purposes: set[str], epoch: int | None, newer_ok: bool,
                subject: str | None = None) -> Grant:
        return verify(token, self.settings.keys, now=self._clock(), fleet=self.settings.fleet,
                      audience=self.settings.node, purposes=purposes, epoch=epoch,
                      newer_epoch_ok=newer_ok, subject=subject)

    def writer_for(self, token: str) -> WriterRole:
        """The writer role, if ``token`` is a write grant for this node and current epoch."""
        grant = self._verify(token, purposes={WRITE}, epoch=self.state.epoch, newer_ok=True)
        if grant.epoch > self.state.epoch:
            current = self.state.epoch
            self.note_epoch(grant.epoch)
            raise StaleEpoch(f"this agent is at epoch {current}, the grant at {grant.epoch}",
                             current=current, got=grant.epoch)
        writer = self.writer
        if writer is None or not writer.accepting or not self.state.accepts_writes:
            node, address = self.writer_hint
            raise NotWriter(f"{self.settings.node} is not the writer ({self.state.role})",
                            writer=node, writer_address=address, epoch=self.state.epoch)
        return writer

    def volume_for_read(self, token: str) -> Volume:
        """The volume to read from, if ``token`` is a read or write grant for this node."""
        grant = self._verify(token, purposes={READ, WRITE}, epoch=self.state.epoch,
                             newer_ok=True)
        reader = self.reader
        if grant.epoch > self.state.epoch and reader is not None:
            reader.catch_up()
            self.note_epoch(reader.volume.epoch)
            if self.state.epoch < grant.epoch:
                raise CatchingUp(f"reader at epoch {self.state.epoch}, grant at {grant.epoch}",
                                 applied=reader.volume.applied_seq, target=-1)
        writer = self.writer
        if writer is not None:
            return writer.volume
        if reader is None:
            raise CatchingUp("agent is starting", applied=-1, target=-1)
        reader.check_current()
        return reader.volume

    def receive_push(self, token: str, push: RecordPush) -> RecordAck:
        """Apply a writer's push (this agent is a reader of the same or an older epoch)."""
        grant = self._verify(token, purposes={PUSH}, epoch=self.state.epoch, newer_ok=True,
                             subject=push.writer)
        if grant.epoch != push.epoch or push.fleet != self.settings.fleet:
            raise ForeignGrant("push does not match its grant", field="epoch")
        self.note_epoch(push.epoch)
        # under the role lock: a promotion takes the reader's volume over (warm promotion)
        # and must see every record in it checked against the image, none pushed meanwhile
        with self._role_lock:
            reader = self.reader
            if reader is None or self.writer is not None or self.state.role != "reader":
                raise NotWriter(f"{self.settings.node} is {self.state.role}, not a reader",
                                writer=self.settings.node, epoch=self.state.epoch)
            _check_push_extents(push, reader.volume)
            ack = reader.receive(push)
            self.note_epoch(reader.volume.epoch)
        if self.writer_hint[0] != push.writer:
            self.writer_hint = (push.writer, None)
        return ack

    def _control(self, token: str, purpose: str, fleet: str, node: str, epoch: int) -> None:
        grant = self._verify(token, purposes={purpose}, epoch=None, newer_ok=False)
        if fleet != self.settings.fleet or node != self.settings.node or grant.epoch != epoch:
            raise ForeignGrant("control request does not match its grant", field="epoch")

    def take_push_grants(self, grants: dict[str, str]) -> None:
        """Keep the push grants the coordinator made for this writer (reader -> token): per
        reader the one of the highest epoch, then the latest expiry. They are MACed with the
        readers' keys, which this agent does not hold: it only reads their epoch and expiry
        (:func:`peek`) to pick one and to drop it in time."""
        now = self._clock()
        with self._push_lock:
            for reader, token in grants.items():
                try:
                    claimed = peek(token)
                except AgentError:
                    LOG.warning("event=push_grant_malformed reader=%s", reader)
                    continue
                rank = (claimed.epoch, claimed.expires)
                held = self._push_grants.get(reader)
                if claimed.expires > now and (held is None or held[1] < rank):
                    self._push_grants[reader] = (token, rank)

    def _push_grant(self, reader: str) -> str:
        """The held push grant for ``reader``; GrantExpired when there is none still valid
        (the pusher retries, and reports the reader lagging, as for any failed push)."""
        with self._push_lock:
            held = self._push_grants.get(reader)
        if held is None or held[1][1] <= self._clock():
            raise GrantExpired(f"no valid push grant for reader {reader}; the coordinator "
                               "hands them to the writer", reader=reader)
        return held[0]

    def promote(self, token: str, request: PromoteRequest) -> Health:
        """Become the writer of ``request.epoch`` (control grant)."""
        self._control(token, PROMOTE, request.fleet, request.node, request.epoch)
        self.take_push_grants(request.push_grants)
        if request.readers:
            self._promote_readers = ({r.node: r.address for r in request.readers},
                                     frozenset(request.in_sync))
        self.handle(roles.PromoteRequested(request.epoch))
        self.writer_hint = (self.settings.node, self.settings.advertise)
        self.run_selftest()  # the role change reopened the device: an older result is moot
        return self.health()

    def demote(self, token: str, request: DemoteRequest) -> Health:
        """Stop writing at once and become a reader of ``request.epoch`` (control grant)."""
        self._control(token, DEMOTE, request.fleet, request.node, request.epoch)
        self.handle(roles.DemoteRequested(request.epoch))
        self.writer_hint = (request.writer, request.writer_address)
        self.run_selftest()  # tells at once whether the device it now reads works
        return self.health()

    def set_readers(self, token: str, request: ReaderSet) -> Health:
        """Replace the writer's reader set (control grant of the current epoch)."""
        self._control(token, READERS, request.fleet, self.settings.node, request.epoch)
        self.take_push_grants(request.push_grants)
        writer = self.writer
        if writer is None or request.epoch != self.state.epoch:
            raise NotWriter(f"{self.settings.node} is not the writer of epoch {request.epoch}",
                            writer=self.writer_hint[0], epoch=self.state.epoch)
        writer.set_readers({r.node: r.address for r in request.readers})
        return self.health()

    # -- outgoing ------------------------------------------------------------------------

    def report_grant(self, message: Message) -> str:
        """The grant for one report to the coordinator, made with this agent's own key and
        bound to the report's body (a captured one cannot carry another report)."""
        grant = Grant(self.settings.fleet, COORDINATOR, REPORT, self.state.epoch,
                      self._clock() + self.settings.grant_ttl, subject=self.settings.node,
                      digest=body_digest(message.encode()))
        return sign(grant, self.settings.keys[0])

    def _peer(self, address: str) -> Peer:
        settings = self.settings
        return Peer(address, tls=settings.tls, ca_file=settings.ca_file,
                    cert_file=settings.cert_file, key_file=settings.key_file,
                    crl_file=settings.crl_file)

    def _send_push(self, link: ReaderLink, push: RecordPush) -> RecordAck:
        key = (link.node, link.address)
        session = self._sessions.get(key)
        if session is None:  # only this link's pusher thread uses it
            session = PeerSession(self._peer(link.address), self.settings.ack_timeout)
            self._sessions[key] = session
        try:
            answer = session.post_body("/v1/records", push.parts(), PUSH_CONTENT_TYPE,
                                       grant=self._push_grant(link.node))
        except AgentError:
            self.m_pushes.inc("failed")
            raise
        self.m_pushes.inc("ok")
        return RecordAck.from_json(answer)

    def _to_coordinator(self, path: str, message: Message) -> dict[str, Any]:
        if self._coordinator is None:
            return {}
        return self._coordinator.post(path, message, grant=self.report_grant(message))

    def _report_lagging(self, report: LaggingReaderReport) -> None:
        self.m_lagging.inc()
        if self._coordinator is None:
            LOG.warning("event=lagging_not_reported reader=%s reason=no_coordinator",
                        report.reader)
            return
        self._to_coordinator("/v1/lagging", report)

    def report_corruption(self, path: str, error: AgentError) -> None:
        """A checksum failed while reading ``path``: count, log, tell the coordinator."""
        self.m_checksum.inc()
        LOG.error("event=checksum_error node=%s path=%r error=%s detail=%r", self.settings.node,
                  path, error.code, error.message)
        check = SelfTestCheck("data-checksum", False, f"{path}: {error.message}")
        self._spawn(lambda: self._send_selftest(SelfTestReport(
            node=self.settings.node, fleet=self.settings.fleet, role=self.state.role,
            epoch=self.state.epoch, ok=False, checks=(check,), at=self._clock())))

    def report_start_failure(self, exc: Exception) -> None:
        """Tell the coordinator (when configured) this agent could not open its volume."""
        check = SelfTestCheck("open-volume", False, f"{type(exc).__name__}: {exc}")
        self.selftest = "failed"
        self._send_selftest(SelfTestReport(
            node=self.settings.node, fleet=self.settings.fleet, role=self.state.role,
            epoch=self.state.epoch, ok=False, checks=(check,), at=self._clock()))

    def _send_selftest(self, report: SelfTestReport) -> None:
        try:
            self._to_coordinator("/v1/selftest", report)
        except AgentError as exc:
            LOG.warning("event=selftest_report_failed error=%s", exc.code)

    # -- self-test and background loops --------------------------------------------------

    def run_selftest(self) -> SelfTestReport:
        """Check the device and the journal can be read, and that the role is settled.

        The report names the role and epoch the checks began under. When those changed
        while they ran (a promotion or a demotion reopened the device), the result says
        nothing of the new role: it is not kept (:attr:`selftest` stays) and
        :meth:`_selftest_and_report` does not send it. A periodic self-test that began on a
        reader's read-only disk, unplugged for its promotion, had otherwise been reported as
        the new writer's failure and failed the fleet over again (seen on the sandbox VMs)."""
        started = (self.state.role, self.state.epoch)
        checks = []
        role = self.writer or self.reader
        if role is None:
            checks.append(SelfTestCheck("device-read", False, "no device open"))
        else:
            for name, probe in (("device-read", lambda: role.device.read_at(0, ALIGN)),
                                ("journal-read",
                                 lambda: role.volume.records_since(role.volume.applied_seq))):
                try:
                    probe()
                    checks.append(SelfTestCheck(name, True))
                except (AgentError, OSError) as exc:
                    checks.append(SelfTestCheck(name, False, f"{type(exc).__name__}: {exc}"))
        checks.append(SelfTestCheck("role", self.state.role in ("reader", "writer"),
                                    self.state.role))
        report = SelfTestReport(node=self.settings.node, fleet=self.settings.fleet,
                                role=started[0], epoch=started[1],
                                ok=all(c.ok for c in checks), checks=tuple(checks),
                                at=self._clock())
        if self._moot(report):
            LOG.info("event=selftest_moot node=%s began_as=%s/%d now=%s/%d ok=%s",
                     self.settings.node, started[0], started[1], self.state.role,
                     self.state.epoch, report.ok)
            return report
        self.selftest = "ok" if report.ok else "failed"
        if not report.ok:
            LOG.error("event=selftest_failed node=%s checks=%s", self.settings.node,
                      ",".join(c.name for c in checks if not c.ok))
            if not checks[0].ok:
                self._drop_unreadable_reader()
        return report

    def _drop_unreadable_reader(self) -> None:
        """A reader whose device no longer reads (its Ceph client fenced, the disk gone)
        lets its handle go: the tail loop opens the device found by serial again, which
        succeeds once the coordinator has attached a fresh one."""
        with self._role_lock:
            reader = self.reader
            if reader is None or self.writer is not None or self.state.role != "reader":
                return
            self.reader = None
        LOG.warning("event=reader_device_dropped node=%s", self.settings.node)
        reader.close()

    def _spawn(self, target: Callable[[], None]) -> None:
        threading.Thread(target=target, daemon=True).start()

    def _loop(self, name: str, interval: float, body: Callable[[], None]) -> None:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    body()
                except AgentError as exc:
                    LOG.warning("event=%s_failed node=%s error=%s message=%r", name,
                                self.settings.node, exc.code, exc.message)
                except Exception:  # a bug, or an image nothing decodes: log, keep looping
                    LOG.exception("event=%s_crashed node=%s", name, self.settings.node)
        thread = threading.Thread(target=run, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _tail(self) -> None:
        if self.state.role == "reader" and self.reader is None:
            # OpenReadOnly failed earlier (device gone, e.g. right after a fence): retry here
            with self._role_lock:
                if self.state.role == "reader" and self.reader is None:
                    self._open_reader()
                    LOG.info("event=reader_reopened node=%s", self.settings.node)
        reader = self.reader
        if reader is not None and self.writer is None:
            reader.catch_up()
            self.note_epoch(reader.volume.epoch)
        writer = self.writer
        if writer is not None:
            writer.settle(self.settings.idle_checkpoint)

    def _heartbeat(self) -> None:
        volume = self.volume
        revision, in_sync = self.sync_state()
        answer = self._to_coordinator("/v1/heartbeat", Heartbeat(
            node=self.settings.node, fleet=self.settings.fleet, role=self.state.role,
            epoch=self.state.epoch, applied_seq=volume.applied_seq if volume else -1,
            safe_seq=volume.safe_seq() if volume else -1, selftest=self.selftest,
            address=self.settings.advertise, sent_at=self._clock(), in_sync=in_sync,
            sync_revision=revision))
        # the coordinator renews the writer's push grants in every answer to its heartbeat
        grants = answer.get("push_grants")
        if isinstance(grants, dict):
            self.take_push_grants({str(k): v for k, v in grants.items() if isinstance(v, str)})

    def _moot(self, report: SelfTestReport) -> bool:
        """Whether the role or epoch changed since ``report``'s checks began."""
        return (report.role, report.epoch) != (self.state.role, self.state.epoch)

    def _selftest_and_report(self) -> None:
        report = self.run_selftest()
        if not self._moot(report):
            self._to_coordinator("/v1/selftest", report)

    def start(self, *, become_writer_at: int | None = None,
              on_late_failure: Callable[[RbdfleetError], None] | None = None) -> None:
        """Open the device read-only, catch up, optionally promote, start background loops.

        ``become_writer_at``: bootstrap without a coordinator (config ``role = "writer"``);
        the epoch is raised above the journal's if needed.

        ``on_late_failure`` makes this a *spare* (config ``role = "spare"``): its disk comes
        when the coordinator attaches it in place of a failed reader, maybe never. Until then
        the agent heartbeats (alive, role ``starting``) and serves no file; a background
        thread waits for the device and then starts as above, calling ``on_late_failure``
        if that start fails (the daemon exits, as it would at once without the wait).
        """
        if on_late_failure is None:
            self._open_and_run(become_writer_at)
            self._start_heartbeats()
            return
        self._start_heartbeats()
        thread = threading.Thread(target=self._start_once_attached, args=(on_late_failure,),
                                  name="device-wait", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _open_and_run(self, become_writer_at: int | None) -> None:
        self.handle(roles.Started(0))
        if become_writer_at is not None:
            self.handle(roles.PromoteRequested(max(become_writer_at, self.state.epoch + 1)))
            self.writer_hint = (self.settings.node, self.settings.advertise)
        self.run_selftest()
        self._loop("tail", self.settings.tail_interval, self._tail)
        self._loop("selftest", self.settings.selftest_interval, self._selftest_and_report)

    def _start_heartbeats(self) -> None:
        if self._coordinator is not None:
            self._loop("heartbeat", self.settings.heartbeat_interval, self._heartbeat)

    def _start_once_attached(self, on_failure: Callable[[RbdfleetError], None]) -> None:
        """A spare: wait for the device, however long, then start as a reader."""
        waiting_since = time.monotonic()
        told = -math.inf
        while not self._stop.is_set():
            try:
                self._open_device(True).close()
                break
            except (NotFound, DeviceError) as exc:
                if not _device_absent(exc):
                    on_failure(exc)
                    return
                if time.monotonic() - told >= DEVICE_WAIT_LOG_S:
                    told = time.monotonic()
                    LOG.info("event=waiting_for_device node=%s waited_s=%.0f error=%s",
                             self.settings.node, told - waiting_since, exc.code)
            self._stop.wait(DEVICE_POLL_S)
        else:
            return
        LOG.info("event=device_attached node=%s waited_s=%.1f", self.settings.node,
                 time.monotonic() - waiting_since)
        try:
            self._open_and_run(None)
        except RbdfleetError as exc:
            on_failure(exc)

    def stop(self) -> None:
        """Stop the loops, stop writes, close every handle (SIGTERM path)."""
        self._stop.set()
        with contextlib.suppress(IllegalTransition):  # already stopped
            self.handle(roles.StopRequested())
        for thread in self._threads:
            thread.join(timeout=5)
