"""The coordinator's imperative shell: one loop per fleet around the pure election.

Each :class:`FleetService` owns a thread that, every ``loop_interval``:

1. renews (active) or tries to take (standby) the fleet's lease in the StateStore; a lost
   lease makes it a standby at once, and a standby that wins loads the persisted map and
   resumes any half-done failover (:func:`orchestrator.core.election.resume`);
2. when active: folds queued events in (agent heartbeats, self-test and lagging reports,
   client failure reports, operator requests), probes every member's ``/v1/health``, turns
   confirmed deaths into ``NodeFailed``, ticks the election and runs the returned actions
   through the :class:`~orchestrator.coordinator.executor.Executor`.

The loop never waits on a node that may not answer for something only best effort: the
background steps (:data:`orchestrator.core.election.BACKGROUND`: releasing a fenced writer's
read-write disk once the new map is out, a demotion — a hypervisor re-attach, then a call to
an agent that may be paused or cut off) run on side threads, one at a time per node, and come
back as ``BatchExecuted`` events; a new reader set reaches the writer through a mailbox
thread that only ever sends the latest one. Seen on VMs and processes: the loop blocked for
seconds in a demotion or a reader-set call to a paused writer, and probed nobody meanwhile.
Probes are sent from a pool and their answers come back through the queue, so the loop never
waits on one either: a hypervisor's "paused" event queued behind a probe of that very paused
node waited the probe's whole timeout (up to a second on the VMs) before it was looked at.

Given a hypervisor and the fleet's domains, the service watches their lifecycle events: a
domain paused, shut off or crashed is reported to the liveness core as
``HypervisorReportedDown`` (evidence: the node is confirmed dead at the next iteration), a
resumed or started one as ``HypervisorReportedUp``.

Only this thread touches the election state; API threads talk to it through a queue, and
read the last published map (guarded by a condition variable that also wakes watchers).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.core.grants import READ, WRITE, Grant
from agents.core.protocol import Health, ReaderSet
from agents.errors import RbdfleetError
from orchestrator.coordinator.executor import Executor
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.core import election as el
from orchestrator.core.fleetmap import FleetMap, Member, Target
from orchestrator.core.liveness import (
    FailureReported,
    HeartbeatReceived,
    HypervisorReportedDown,
    HypervisorReportedUp,
    Liveness,
    LivenessConfig,
    Observation,
    ProbeFailed,
    ProbeSucceeded,
    SelfTestFailed,
    Verdict,
)
from orchestrator.core.reports import ReplayGuard, nonce, watch_from
from orchestrator.errors import CoordinationError, LeaseLost, NotActive, StaleMap
from orchestrator.ports import CoordinatorPorts, DomainEvent, DomainState

LOG = logging.getLogger(__name__)





@dataclass(frozen=True)
class ServiceSettings:
    """Timings and identity of one coordinator process."""

    url: str
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    election: el.ElectionConfig = field(default_factory=el.ElectionConfig)
    loop_interval: float = 0.05
    grant_ttl: float = 60.0
    max_batches_per_event: int = 8


@dataclass(frozen=True)
class _Request:
    event: el.Event
    done: threading.Event
    outcome: list[Any]


@dataclass(frozen=True)
class _ProbeAnswer:
    """A probe's outcome (``None``: it failed), for the loop; ``ticket`` tells a probe given up
    on (its answer is ignored) from the one in flight."""

    node: str
    ticket: int
    health: Health | None
    refused: bool = False  # the connection was refused: the host answered, no agent listens


@dataclass
class _Outstanding:
    ticket: int
    sent: float


class FleetService:
    """Lease, loop and events of one fleet (see the module docstring)."""

    def __init__(
        self,
        ports: CoordinatorPorts,
        settings: ServiceSettings,
        *,
        secret: bytes | tuple[bytes, ...],
        bootstrap: FleetMap | None = None,
        domains: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """``ports.hypervisor`` + ``domains`` (node -> (uri, domain)): watch those domains'
        lifecycle events as death evidence (module docstring)."""
        self.ports = ports
        self.fleet = ports.store.fleet
        # the ports the API threads use too (lease state, event times, report dates)
        self.store = ports.store
        self.clock = ports.clock
        self.wall = ports.wall
        # the master key(s): current first, then a previous one during a rotation
        self.keys = FleetKeys(self.fleet, (secret,) if isinstance(secret, bytes) else secret,
                              ports.wall)
        self.settings = settings
        self.bootstrap = bootstrap
        self._nodes_by_domain = {(uri, dom): node for node, (uri, dom) in (domains or {}).items()}
        self._unwatch: list[Callable[[], None]] = []
        self._events: queue.Queue[Observation | el.Event | _Request | _ProbeAnswer] = (
            queue.Queue()
        )
        self._published_lock = threading.Condition()
        self._published: FleetMap | None = None
        self._state: el.ElectionState | None = None
        self._executor: Executor | None = None
        self._liveness = Liveness(settings.liveness)
        # wall time this process last took the lease: its API refuses reports signed before
        # (a predecessor may have admitted them; orchestrator.core.reports)
        self.active_since: float | None = None
        self._created = ports.wall()
        # the reports admitted in the current term, and the lock that admits each report and
        # queues what it tells as one step (reports of one node reach the loop in order)
        self._replays: tuple[float | None, ReplayGuard] | None = None
        self._report_lock = threading.Lock()
        self._next_lease = 0.0
        self._next_probe = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lease_lost = threading.Event()
        self._thread: threading.Thread | None = None
        self._probes = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix=f"probe-{self.fleet}"
        )
        self._probing: dict[str, _Outstanding] = {}  # node -> the probe in flight
        self._reported: dict[str, float] = {}  # node -> when its newest report was admitted
        self._tickets = itertools.count(1)
        self._side = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix=f"side-{self.fleet}"
        )
        self._side_inflight: set[str] = set()  # nodes with a background step running
        self._reader_sets = (
            None if ports.send_reader_set is None
            else ReaderSetMailbox(ports.send_reader_set, self.fleet)
        )
        self.stats: dict[str, float] = {"failovers": 0, "terms": 0, "batches_failed": 0}
        # (monotonic time, what, node): deaths confirmed and actions done, for status/benchmarks
        self.timeline: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=4096)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Watch the fleet's domains (when given a hypervisor), start the loop thread."""
        if self.ports.hypervisor is not None:
            for uri in sorted({uri for uri, _ in self._nodes_by_domain}):
                try:  # a host that does not answer yet is watched from when it does
                    self._unwatch.append(self.ports.hypervisor.watch_domains(
                        uri, self._domain_event, keep_trying=True))
                except RbdfleetError as exc:  # detection falls back to probes and silence
                    LOG.warning("event=domain_watch_failed fleet=%s uri=%s reason=%s",
                                self.fleet, uri, exc)
        self._thread = threading.Thread(target=self._run, name=f"fleet-{self.fleet}", daemon=True)
        self._thread.start()
        self._lease_thread = threading.Thread(
            target=self._renew, name=f"lease-{self.fleet}", daemon=True
        )
        self._lease_thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop the loop and step down; release the lease so a standby takes over at once."""
        self._stop.set()
        self._wake.set()
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch.clear()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._lease_thread.join(timeout=10)
        self._probes.shutdown(wait=False, cancel_futures=True)
        self._side.shutdown(wait=False, cancel_futures=True)
        if self._reader_sets is not None:
            self._reader_sets.close()
        was_active = self._state is not None
        # answer not_active from now on: the server may still take requests on open
        # connections, and no grant may come from a coordinator whose lease a standby takes
        self._step_down("stopped", logging.INFO)  # asked to: no cause for alarm
        if release and was_active:
            try:
                self.store.release()
            except RbdfleetError as exc:
                LOG.warning("event=release_failed fleet=%s reason=%s", self.fleet, exc)

    @property
    def active(self) -> bool:
        """Whether this process is the fleet's active coordinator right now."""
        return self._state is not None

    # -- API side (any thread) ------------------------------------------------------------

    def admit_report(self, grant: Grant, token: str,
                     events: Sequence[Observation | el.Event], *, ordered: bool) -> None:
        """Admit an agent's report (its verified ``grant`` and ``token``) once, and in its
        sender's order when ``ordered`` (orchestrator.core.reports), and queue ``events``
        with it: ReportReplayed / ReportOutOfOrder instead when refused. Call it active:
        ``active_since`` is this term's."""
        with self._report_lock:
            term = self.active_since
            if self._replays is None or self._replays[0] != term:
                # a new term: what was admitted before it is unknown
                self._replays = (term, ReplayGuard(since=watch_from(self._created, term)))
            self._replays[1].admit(grant.subject, nonce(token), grant.expires, self.wall(),
                                   ordered=ordered)
            for event in events:
                self.submit(event)

    def submit(self, event: Observation | el.Event) -> None:
        """Queue an observation or election event for the loop."""
        self._events.put(event)
        self._wake.set()

    def _domain_event(self, event: DomainEvent) -> None:
        """A lifecycle event of a domain (the hypervisor's thread): the node's observation."""
        node = self._nodes_by_domain.get((event.uri, event.domain))
        if node is None:
            return  # not one of this fleet's domains
        at = self.clock.monotonic()
        LOG.info("event=hypervisor_reported fleet=%s node=%s state=%s detail=%s", self.fleet,
                 node, event.state.value, event.detail)
        if event.state is DomainState.RUNNING:
            self.submit(HypervisorReportedUp(node, at))
        else:
            self.submit(HypervisorReportedDown(node, at, event.state.value))

    def request(self, event: el.Event, timeout: float = 30.0) -> FleetMap:
        """Run an operator event (failover, fence) and wait until its batch ran.

        Raises IllegalFleetTransition when refused, NotActive on a standby, CoordinationError
        when the batch stopped at a failure.
        """
        self.require_active()
        req = _Request(event, threading.Event(), [])
        self._events.put(req)
        self._wake.set()
        if not req.done.wait(timeout):
            raise CoordinationError(f"fleet {self.fleet}: request not done within {timeout} s")
        outcome = req.outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, FleetMap)
        return outcome

    def require_active(self) -> FleetMap:
        """The published map; NotActive on a standby."""
        with self._published_lock:
            published = self._published
        if self._state is None or published is None:
            raise NotActive(self.fleet, self._advertised())
        return published

    def _advertised(self) -> str | None:
        if self._stop.is_set():  # its owner may have closed the store (a RADOS handle) by now
            return None
        try:
            return self.store.coordinator_url()
        except RbdfleetError:
            return None

    def wait_map(self, after_revision: int, timeout: float) -> FleetMap:
        """Long-poll: the published map once its revision exceeds ``after_revision``."""
        self.require_active()
        deadline = self.clock.monotonic() + timeout
        with self._published_lock:
            while True:
                m = self._published
                if m is not None and m.revision > after_revision:
                    return m
                left = deadline - self.clock.monotonic()
                if left <= 0 or self._stop.is_set():
                    break
                self._published_lock.wait(min(left, 0.5))
        return self.require_active()

    def targets(self, kind: str) -> tuple[FleetMap, list[Target]]:
        """Grants for a write (writer first, then in-sync readers) or a read (readers, writer)."""
        m = self.require_active()
        members = m.write_targets() if kind == "write" else m.read_targets()
        out = []
        for member in members:
            writer = member.name == m.writer
            purpose = WRITE if writer and kind == "write" else READ
            token = self.keys.grant(member.name, purpose, m.epoch, self.settings.grant_ttl)
            out.append(Target(member.name, member.address, "writer" if writer else "reader",
                              token))
        return m, out

    def status(self) -> dict[str, Any]:
        """Everything an operator wants to see about this fleet here."""
        now = self.clock.monotonic()
        state = self._state
        with self._published_lock:
            published = self._published
        verdicts = {n: v.value for n, v in self._liveness.verdicts(now).items()}
        return {
            "fleet": self.fleet,
            "active": state is not None,
            "coordinator": self.settings.url if state is not None else self._advertised(),
            "map": None if published is None else published.to_json(),
            "liveness": verdicts,
            # what each agent said last (probe answers, heartbeats); the map's own applied_seq
            # is only as fresh as the last change worth publishing
            "applied_seq": {} if state is None
            else {m.name: m.applied_seq for m in state.map.members},
            "pending": [] if state is None else [_describe(a) for a in el.plan(state)],
            # fenced nodes whose read-write disk is still to be released (background), with
            # the failed attempts so far
            "releases": {} if state is None else _releases(state, now),
            "last_error": "" if state is None else state.last_error,
            # nodes that keep failing, and the seconds before they may rejoin
            "held_out": {} if state is None
            else {n: round(until - now, 1) for n, until in state.held_out if until > now},
            "stats": dict(self.stats),
        }

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except (LeaseLost, StaleMap) as exc:
                self._step_down(str(exc))
            except Exception:  # a bug: keep the traceback, keep serving (a standby may win)
                LOG.exception("event=loop_error fleet=%s", self.fleet)
                self._step_down("loop error")
                self._stop.wait(self.settings.loop_interval)
            self._wake.wait(self.settings.loop_interval)
            self._wake.clear()

    def _renew(self) -> None:
        """Renew the lease every lease/4 while active, even while the loop runs a long action."""
        while not self._stop.wait(self.store.lease_seconds / 4):
            if self._state is None:
                continue
            try:
                self.store.acquire()
            except (LeaseLost, StaleMap) as exc:
                LOG.error("event=lease_lost fleet=%s reason=%s", self.fleet, exc)
                self._lease_lost.set()
                self._wake.set()
            except RbdfleetError as exc:  # transient: the OSD still refuses us once it ran out
                LOG.warning("event=lease_renewal_failed fleet=%s reason=%s", self.fleet, exc)

    def _iterate(self) -> None:
        now = self.clock.monotonic()
        if self._lease_lost.is_set():
            self._lease_lost.clear()
            raise LeaseLost(f"fleet {self.fleet}: lease renewal failed")
        if self._state is None and now >= self._next_lease:
            self._next_lease = now + self.store.lease_seconds / 4
            if self.store.acquire():
                self._become_active(now)
        if self._state is None:
            self._drain_while_standby()
            return
        self._drain(now)
        if now >= self._next_probe:
            self._next_probe = now + self.settings.liveness.probe_interval
            self._probe_all()
        self._confirm_deaths(self.clock.monotonic())
        self._feed(el.Tick(self.clock.monotonic()))

    def _become_active(self, now: float) -> None:
        self.active_since = self.wall()  # before _state: no report is served under the old one
        self._probing.clear()  # probes of an earlier term: their answers are ignored
        stored = self.store.load()
        if stored is None:
            if self.bootstrap is None:
                LOG.error("event=no_map fleet=%s reason=nothing stored, no bootstrap", self.fleet)
                self.store.release()
                return
            self.store.save(self.bootstrap, None)
            stored = self.bootstrap
        self.store.advertise(self.settings.url)
        self._state = el.resume(stored, self.settings.election)
        self._executor = Executor(
            # the writer hears reader sets through the mailbox: only ever the latest one
            dataclasses.replace(self.ports, send_reader_set=(
                None if self._reader_sets is None else self._reader_sets.post)),
            keys=self.keys,
            announce=self._announce,
            persisted=stored,
            on_done=self._record_action,
        )
        live = Liveness(self.settings.liveness)
        for m in stored.members:
            if m.role in ("writer", "reader"):
                live = live.watch(m.name, now)
        self._liveness = live
        self.stats["terms"] += 1
        LOG.info(
            "event=became_active fleet=%s epoch=%d revision=%d phase=%s",
            self.fleet,
            stored.epoch,
            stored.revision,
            stored.phase,
        )
        if stored.phase == "stable":
            self._announce(stored)
        self._execute(el.plan(self._state))

    def _step_down(self, reason: str, level: int = logging.WARNING) -> None:
        if self._state is None:
            return
        LOG.log(level, "event=stepped_down fleet=%s reason=%s", self.fleet, reason)
        self._state = None
        self._executor = None
        with self._published_lock:
            self._published = None
            self._published_lock.notify_all()

    def _record_action(self, action: el.Action) -> None:
        node = getattr(action, "node", None) or getattr(getattr(action, "map", None), "writer", "")
        self.timeline.append((self.clock.monotonic(), type(action).__name__, str(node or "")))

    def _announce(self, m: FleetMap) -> None:
        with self._published_lock:
            self._published = m
            self._published_lock.notify_all()
        LOG.info(
            "event=map_published fleet=%s epoch=%d revision=%d writer=%s in_sync=%s",
            self.fleet,
            m.epoch,
            m.revision,
            m.writer,
            ",".join(r.name for r in m.in_sync_readers()),
        )

    def _drain_while_standby(self) -> None:
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                item.outcome.append(NotActive(self.fleet, self._advertised()))
                item.done.set()

    def _drain(self, now: float) -> None:
        while self._state is not None:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                try:
                    self._feed(item.event)
                    item.outcome.append(self.require_active())
                except (LeaseLost, StaleMap):
                    raise
                except RbdfleetError as exc:
                    item.outcome.append(exc)
                finally:
                    if not item.outcome:
                        item.outcome.append(CoordinationError("request not completed"))
                    item.done.set()
            elif isinstance(
                item, HeartbeatReceived | ProbeSucceeded | ProbeFailed | SelfTestFailed
                | HypervisorReportedDown | HypervisorReportedUp
            ):
                if isinstance(item, HeartbeatReceived | SelfTestFailed):  # an agent's report
                    self._reported[item.node] = max(item.at, self._reported.get(item.node,
                                                                                item.at))
                self._liveness = self._liveness.observe(item)
            elif isinstance(item, _ProbeAnswer):
                held = self._probing.get(item.node)
                if held is not None and held.ticket == item.ticket:
                    del self._probing[item.node]
                    overtaken = held.sent < self._reported.get(item.node, float("-inf"))
                    self._observe_probe(item.node, item.health, item.refused,
                                        overtaken=overtaken)
            elif isinstance(item, FailureReported):
                self._liveness = self._liveness.observe(item)
                self._next_probe = now  # a client says it failed: probe it right now
            else:
                self._feed(item)
                if isinstance(item, el.BatchExecuted):  # a side action's outcome, folded in
                    for action in (*item.done, item.failed):
                        if isinstance(action, el.ReleaseWritePath | el.DemoteNode):
                            self._side_inflight.discard(action.node)

    def _feed(self, event: el.Event) -> None:
        state = self._state
        if state is None:
            return
        self._state, actions = el.step(state, event)
        self._execute(actions)

    def _execute(self, actions: list[el.Action]) -> None:
        batches = 0
        while actions and self._state is not None and self._executor is not None:
            batches += 1
            if batches > self.settings.max_batches_per_event:
                return  # the next tick resumes: never spin inside one event
            for side in actions:
                if isinstance(side, el.ReleaseWritePath | el.DemoteNode):
                    self._run_aside(side)
            actions = [a for a in actions if not el.is_background(a)]
            if not actions:
                return
            result = self._executor.run(actions)
            if result.lease_lost:
                raise LeaseLost(result.reason)
            if result.failed is not None:
                self.stats["batches_failed"] += 1
            for promoted in (a for a in result.done if isinstance(a, el.PromoteNode)):
                self.stats["failovers"] += 1
                self._after_promotion(promoted.node, promoted.epoch)
            ev = el.BatchExecuted(result.done, result.failed, result.reason,
                                  self.clock.monotonic(), result.infrastructure)
            self._state, actions = el.step(self._state, ev)

    def _run_aside(self, action: el.ReleaseWritePath | el.DemoteNode) -> None:
        """Run a background step on a side thread (module docstring); its outcome comes back
        as an event. One at a time per node."""
        executor = self._executor
        if executor is None or action.node in self._side_inflight:
            return
        self._side_inflight.add(action.node)

        def run() -> None:
            try:
                result = executor.run([action])
                outcome = el.BatchExecuted(result.done, result.failed, result.reason,
                                           self.clock.monotonic(), result.infrastructure)
            except Exception as exc:  # a bug: keep its traceback, and the loop going
                LOG.exception("event=side_action_error fleet=%s action=%s", self.fleet,
                              _describe(action))
                outcome = el.BatchExecuted((), action, repr(exc), self.clock.monotonic())
            self.submit(outcome)  # the loop clears the node's in-flight mark as it folds it

        self._side.submit(run)

    def _after_promotion(self, node: str, epoch: int) -> None:
        """Our own role switch swapped ``node``'s disk and the promotion held it busy: its
        answer is fresh contact, and the liveness core discounts what the swap explains."""
        self._liveness = self._liveness.promoted(node, self.clock.monotonic(), epoch)

    def _probe_all(self) -> None:
        """Send a probe to every member that has none in flight; answers come back through
        the queue (:class:`_ProbeAnswer`). A probe still unanswered a second past its own
        timeout counts as failed, and its late answer is ignored."""
        state = self._state
        if state is None:
            return
        timeout = self.settings.liveness.probe_timeout
        now = self.clock.monotonic()
        for member in state.map.members:
            if member.role == "spare":
                continue
            held = self._probing.get(member.name)
            if held is not None:
                if now - held.sent <= timeout + 1.0:
                    continue
                del self._probing[member.name]
                self._observe_probe(member.name, None)
            ticket = next(self._tickets)
            self._probing[member.name] = _Outstanding(ticket, now)
            try:
                self._probes.submit(self._probe, member, timeout, ticket)
            except RuntimeError:  # the pool is shut down: the service is stopping
                return

    def _probe(self, member: Member, timeout: float, ticket: int) -> None:
        """A probe pool thread: ask one member, queue the answer."""
        health: Health | None = None
        refused = False
        try:
            health = self.ports.agents.health(member.address, timeout)
        except RbdfleetError as exc:
            refused = isinstance(exc.__cause__, ConnectionRefusedError)
        except Exception:  # a bug: keep the traceback (a pool thread would drop it)
            LOG.exception("event=probe_error fleet=%s node=%s", self.fleet, member.name)
        self._events.put(_ProbeAnswer(member.name, ticket, health, refused))
        self._wake.set()

    def _observe_probe(self, name: str, health: Health | None, refused: bool = False, *,
                       overtaken: bool = False) -> None:
        """Fold a probe's answer in (``health`` None: it failed; ``refused``: its connection
        was refused). A refusal is the writer's quick death (the liveness core's
        ``confirm_refused``) only: a reader taken out sooner gains the failover nothing, and
        the writer's in-sync word from before its death could admit it again after a quick
        restart, before the writer heard it was out (test_admission saw stale reads so).

        ``overtaken``: a report of the node was admitted after the probe was sent. The
        answer is contact, but what it says may be older than that report (across a network
        cut TCP delivers an answer written during the cut seconds after it healed), so it
        does not roll the node's state back: the next probe or report tells the rest."""
        at = self.clock.monotonic()
        if health is None:
            before = self._liveness.record(name)
            if before is not None and before.failed_probes == 0:  # the first of a run
                LOG.info("event=probe_failed fleet=%s node=%s refused=%s", self.fleet, name,
                         refused)
            state = self._state
            quick = refused and state is not None and state.map.writer == name
            self._liveness = self._liveness.observe(ProbeFailed(name, at, quick))
            if quick:  # evidence: the confirming probe goes in this very iteration
                self._next_probe = 0.0
            return
        self._liveness = self._liveness.observe(ProbeSucceeded(name, at))
        if overtaken:
            return
        if health.selftest == "failed":
            self._liveness = self._liveness.observe(SelfTestFailed(name, at, "health",
                                                                   health.epoch))
        self._feed(el.HeartbeatObserved(name, health.role, health.epoch, health.applied_seq, at,
                                        health.selftest))
        if health.role == "writer":
            self._feed(el.WriterSyncObserved(name, health.epoch, health.sync_revision,
                                             frozenset(health.in_sync), at))

    def _confirm_deaths(self, now: float) -> None:
        state = self._state
        if state is None:
            return
        for name, verdict in self._liveness.verdicts(now).items():
            if verdict is not Verdict.DEAD:
                continue
            record = self._liveness.record(name)
            self._liveness = self._liveness.forget(name)
            if state.map.has(name) and state.map.member(name).role != "out":
                LOG.warning("event=node_confirmed_dead fleet=%s node=%s record=%s", self.fleet,
                            name, record)
                self.timeline.append((now, "NodeFailed", name))
                self._feed(el.NodeFailed(name, now))
                state = self._state
                if state is None:
                    return


class ReaderSetMailbox:
    """Sends reader sets to the writer from its own thread, the latest first and only: a
    paused writer then holds up nothing but older reader sets nobody needs. A send that
    fails is tried again every ``retry_s`` until it gets through or a newer set replaces it
    (nothing else would tell the writer: a reader it never hears of is never in sync)."""

    def __init__(self, send: Callable[[str, ReaderSet, str], None], fleet: str,
                 retry_s: float = 1.0) -> None:
        self._send = send
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._latest: tuple[str, ReaderSet, str] | None = None
        self._closed = False
        threading.Thread(target=self._run, name=f"reader-set-{fleet}", daemon=True).start()

    def post(self, address: str, request: ReaderSet, grant: str) -> None:
        """Queue ``request`` for the writer at ``address``, replacing any not sent yet."""
        with self._cond:
            self._latest = (address, request, grant)
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread (what is queued is dropped)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                latest, self._latest = self._latest, None
            assert latest is not None
            address, request, grant = latest
            try:
                self._send(address, request, grant)
            except RbdfleetError as exc:
                LOG.warning("event=reader_set_not_sent address=%s epoch=%d reason=%s "
                            "retry_in=%.1f", address, request.epoch, exc, self._retry_s)
                with self._cond:
                    if self._latest is None and not self._closed:
                        self._latest = latest
                        self._cond.wait(self._retry_s)  # a newer set, or close, ends it early


def _releases(state: el.ElectionState, now: float) -> dict[str, dict[str, Any]]:
    retries = {r[0]: r for r in state.release_retry}
    out: dict[str, dict[str, Any]] = {}
    for node in sorted(state.to_release):
        retry = retries.get(node)
        out[node] = {"attempts_failed": 0 if retry is None else retry[3],
                     "retry_in": 0.0 if retry is None else round(max(0.0, retry[1] - now), 1),
                     "last_error": "" if retry is None else retry[4]}
    return out


def _describe(action: el.Action) -> str:
    node = getattr(action, "node", None)
    return f"{type(action).__name__}({node})" if node else type(action).__name__


__all__ = ["FleetService", "NotActive", "ReaderSetMailbox", "ServiceSettings", "Target"]
