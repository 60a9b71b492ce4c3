"""The coordinator's Prometheus series, on the agents' :class:`agents.metrics.Registry`.

Everything is read at scrape time from each fleet's :meth:`FleetService.status`, its
``stats`` and its ``timeline``; nothing here runs in the service's loop. Series about the
fleet's map, plan and nodes come from the active coordinator only (a standby has no map);
``active``, the counters and the failover histogram come from every coordinator.

Failover duration is measured on the service's timeline (entries ``(monotonic time, what,
node)``: ``NodeFailed`` when a death is confirmed, then the class name of every action done):
from the death that started the failover — or, for an operator's failover or fence, the
first step this process ran, as the request itself is not on the timeline — to the
``PublishMap`` naming the newly promoted writer. A writerless map published meanwhile (no
reader was in sync) does not end it; a failed promotion followed by another candidate is
still the same failover.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.metrics import Gauge, Registry
from orchestrator.coordinator.service import FleetService
from orchestrator.core.fleetmap import ROLES
from orchestrator.core.liveness import Verdict

__all__ = [
    "FAILOVER_BUCKETS",
    "CoordinatorMetrics",
    "FailoverTimer",
    "TimelineCursor",
    "coordinator_metrics",
]

Entry = tuple[float, str, str]

# Seconds; dense around the 3 s target so its p99 alert reads a real bucket boundary.
FAILOVER_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0,
                    30.0, 60.0)
# Steps of a failover that start timing it when no confirmed death came first.
_FAILOVER_STEPS = frozenset({"PersistEpoch", "FenceNode", "PromoteNode"})
VERDICTS = tuple(v.value for v in Verdict)
_Values = dict[Gauge, dict[tuple[str, ...], float]]


class TimelineCursor:
    """Hands out each entry of a bounded, append-only timeline once across snapshots.

    While the deque is not full the entries already seen are a prefix; once it is full, old
    entries fall off the left, so the last entry seen is looked up from the right.
    """

    def __init__(self) -> None:
        self._seen = 0
        self._last: Entry | None = None

    def new(self, snapshot: Sequence[Entry], maxlen: int | None) -> Sequence[Entry]:
        """The entries of ``snapshot`` not handed out before (``maxlen``: the deque's)."""
        if maxlen is None or len(snapshot) < maxlen:
            fresh = snapshot[self._seen:]
        else:
            at = next((i for i in range(len(snapshot) - 1, -1, -1)
                       if snapshot[i] == self._last), -1)
            fresh = snapshot[at + 1:]  # not found: more than maxlen came, take what is left
        if fresh:
            self._seen, self._last = len(snapshot), fresh[-1]
        return fresh


@dataclass
class FailoverTimer:
    """Turns timeline entries into failover durations (module docstring). Pure."""

    started: float | None = None
    death: float | None = None  # the last confirmed death not yet part of a failover
    promoted: str | None = None

    def feed(self, entry: Entry) -> float | None:
        """Fold one entry in; the failover's duration when ``entry`` completes one."""
        at, what, node = entry
        if what == "NodeFailed":
            if self.started is None:
                self.death = at
        elif what in _FAILOVER_STEPS:
            if self.started is None:
                self.started = self.death if self.death is not None else at
            if what == "PromoteNode":
                self.promoted = node
        elif what == "PublishMap" and (node or self.started is None):
            # A map with a writer ends whatever was running; a writerless one is a failover
            # still waiting for a reader to catch up.
            started, promoted = self.started, self.promoted
            self.started = self.death = self.promoted = None
            if started is not None and promoted is not None and promoted == node:
                return at - started
        return None


class _Serving(Protocol):
    @property
    def services(self) -> Mapping[str, FleetService]: ...


@dataclass
class _Tracked:
    """What one fleet's series carry over between scrapes for one FleetService object."""

    service: FleetService
    cursor: TimelineCursor = field(default_factory=TimelineCursor)
    timer: FailoverTimer = field(default_factory=FailoverTimer)
    mirrored: dict[str, float] = field(default_factory=dict)


class CoordinatorMetrics:
    """The series of every fleet in ``services`` (read live: fleets may be added later)."""

    def __init__(self, services: Mapping[str, FleetService]) -> None:
        self.services = services
        self.registry = r = Registry()
        self._lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        fleet = ("fleet",)

        def per_fleet(name: str, help: str) -> Gauge:
            return r.gauge(f"rbdfleet_coordinator_{name}", help, labelnames=fleet)

        self.active = per_fleet(
            "active", "1 while this process holds the fleet's lease (the active coordinator)")
        self.writer_present = per_fleet(
            "writer_present",
            "1 while the published map names a writer and no failover away from it is under way")
        self.epoch = per_fleet("epoch", "Epoch of the published map")
        self.revision = per_fleet("map_revision", "Revision of the published map")
        self.in_sync = per_fleet("in_sync_readers", "Readers in sync in the published map")
        self.fence_pending = per_fleet(
            "fence_pending",
            "FenceNode actions still to run (a writer is not promoted before they succeed)")
        self.pending = per_fleet("pending_actions", "Actions still to run towards the intended map")
        self.last_error = per_fleet(
            "last_error_present",
            "1 while the last batch of actions stopped at a failure (see /v1/status)")
        self.liveness = r.gauge(
            "rbdfleet_coordinator_node_liveness",
            "Failure detector's verdict per watched node: 1 for the current one",
            labelnames=("fleet", "node", "verdict"))
        self.role = r.gauge("rbdfleet_coordinator_node_role",
                            "Role per member of the published map: 1 for the current one",
                            labelnames=("fleet", "node", "role"))
        self.failovers = r.counter("rbdfleet_coordinator_failovers_total",
                                   "Writers promoted by this process", fleet)
        self.terms = r.counter("rbdfleet_coordinator_terms_total",
                               "Times this process became the fleet's active coordinator", fleet)
        self.batches_failed = r.counter(
            "rbdfleet_coordinator_batches_failed_total",
            "Batches of actions that stopped at a failed step (retried after retry_delay)",
            fleet)
        self.duration = r.histogram(
            "rbdfleet_coordinator_failover_duration_seconds",
            "From the writer confirmed dead (or the first step of a requested failover) to "
            "the map naming the new writer published", fleet, buckets=FAILOVER_BUCKETS)
        self._mirrors = {"failovers": self.failovers, "terms": self.terms,
                         "batches_failed": self.batches_failed}

    def render(self) -> str:
        """The /metrics body: every fleet's state read now."""
        with self._lock:
            self._collect()
            return self.registry.render()

    def _collect(self) -> None:
        values: _Values = {g: {} for g in (
            self.active, self.writer_present, self.epoch, self.revision, self.in_sync,
            self.fence_pending, self.pending, self.last_error, self.liveness, self.role)}
        for name, service in sorted(self.services.items()):
            status = service.status()
            self._follow(name, service, status["stats"])
            values[self.active][(name,)] = float(status["active"])
            if status["active"]:
                self._active_fleet(name, status, values)
        for gauge, series in values.items():
            gauge.replace(series)

    def _active_fleet(self, name: str, status: dict[str, Any], values: _Values) -> None:
        """The plan's, liveness' and map's series of a fleet this process is active for."""
        pending = [_split_action(str(p)) for p in status["pending"]]
        kinds = [kind for kind, _ in pending]
        # None until a coordinator that took over mid-failover publishes its first map.
        m = status["map"]
        writer = m["writer"] if m is not None and m["phase"] == "stable" else None
        # The published writer counts only while no failover is under way: once it is
        # confirmed dead its fence (then a promotion) is pending, and clients sent to it fail.
        present = (writer is not None and "PromoteNode" not in kinds
                   and ("FenceNode", writer) not in pending)
        for gauge, value in (
            (self.writer_present, present),
            (self.fence_pending, kinds.count("FenceNode")),
            (self.pending, len(kinds)),
            (self.last_error, bool(status["last_error"])),
        ):
            values[gauge][(name,)] = float(value)
        for node, verdict in status["liveness"].items():
            for v in VERDICTS:
                values[self.liveness][(name, node, v)] = float(v == verdict)
        if m is None:
            return
        members = m["members"]
        values[self.epoch][(name,)] = float(m["epoch"])
        values[self.revision][(name,)] = float(m["revision"])
        values[self.in_sync][(name,)] = float(
            sum(x["role"] == "reader" and x["in_sync"] for x in members))
        for member in members:
            for role in ROLES:
                values[self.role][(name, member["name"], role)] = float(role == member["role"])

    def _follow(self, name: str, service: FleetService, stats: Mapping[str, float]) -> None:
        """Carry the service's own totals and new timeline entries into the series."""
        tracked = self._tracked.get(name)
        if tracked is None or tracked.service is not service:
            # A new service object starts its stats and timeline afresh; the series go on.
            tracked = self._tracked[name] = _Tracked(service)
        for key, counter in self._mirrors.items():
            total = float(stats.get(key, 0.0))
            counter.inc(name, amount=max(0.0, total - tracked.mirrored.get(key, 0.0)))
            tracked.mirrored[key] = total
        self.duration.declare(name)
        timeline = service.timeline
        for entry in tracked.cursor.new(tuple(timeline), timeline.maxlen):
            seconds = tracked.timer.feed(entry)
            if seconds is not None:
                self.duration.observe(seconds, name)


def _split_action(described: str) -> tuple[str, str]:
    """``"FenceNode(w)"`` (as FleetService.status lists pending actions) -> ("FenceNode", "w")."""
    kind, _, rest = described.partition("(")
    return kind, rest.removesuffix(")")


_BY_OWNER: weakref.WeakKeyDictionary[_Serving, CoordinatorMetrics] = weakref.WeakKeyDictionary()
_BY_OWNER_LOCK = threading.Lock()


def coordinator_metrics(owner: _Serving) -> CoordinatorMetrics:
    """The one CoordinatorMetrics of ``owner`` (a CoordinatorAPI), made at its first scrape
    and kept as long as ``owner`` lives: counters and the histogram accumulate across scrapes."""
    with _BY_OWNER_LOCK:
        found = _BY_OWNER.get(owner)
        if found is None:
            found = _BY_OWNER[owner] = CoordinatorMetrics(owner.services)
        return found
