"""Failure detection from three sources, confirmed before anyone acts. Pure; time is an input.

Sources (the patent's three): the coordinator's own probes and the agents' heartbeats, failure
reports from clients, and self-test reports from the agents themselves; on VMs a fourth, the
hypervisor's own word on the domain (libvirt lifecycle events: paused, shut off, crashed).

Invariants:

* No death without evidence. A node with no failed probe, no failed self-test of its own
  and whatever number of client reports is never ``DEAD``: silence alone only makes it
  ``SUSPECT``, because silence may be the coordinator's own (its loop blocked in a slow
  hot-plug, its process paused) rather than the node's. Seen on VMs: a healthy writer
  confirmed dead the moment a seconds-long demotion of a resumed ex-writer returned, with 0
  failed probes, which fenced it and cascaded through four epochs.
* The hypervisor's word is evidence, not silence: :class:`HypervisorReportedDown` (the node's
  domain was paused, shut off or crashed) makes it ``DEAD`` at once, whatever the probes say,
  since a paused or stopped guest cannot run its agent. Only :class:`HypervisorReportedUp`
  (resumed, started) clears it: a heartbeat or probe answer that was on the wire before the
  pause says nothing about the domain now.
* One lost packet never kills a node: a single failed probe, a single client report or a
  late heartbeat only makes it ``SUSPECT``. ``DEAD`` needs ``confirm_failures`` consecutive
  failed probes with no contact for ``suspect_after`` (a node whose heartbeats still arrive is
  slow, not dead), or at least one failed probe after ``dead_after`` of silence, or the node's
  own failed self-test (a report that a lost packet cannot forge).
* A refused connection is evidence, not a loss: the node's host answered (a TCP reset) and no
  agent listens on its port, which a slow or starved agent never causes (its kernel still
  accepts the connection; an overflowing backlog drops the SYN, it does not refuse it). So
  ``confirm_refused`` consecutive refused probes (:attr:`ProbeFailed.refused`) are ``DEAD``
  without waiting for ``suspect_after`` of silence: an agent killed in a running VM is
  confirmed by two probes a few milliseconds apart (the service sends the second at once)
  instead of after ``suspect_after`` and a third probe. A single refusal only makes it
  ``SUSPECT``, and the promotion grace below discounts refusals as any failed probe.
* Any successful contact (heartbeat or probe) resets the failure count and the reports, and
  clears a failed self-test only when the heartbeat says the self-test passes again.
* Right after the coordinator swapped a node's disk to promote it (:meth:`Liveness.promoted`),
  what the swap explains is not held against it: probes failing within ``dead_after`` of the
  promotion (a TCG guest digesting its hot-plug answers slowly for ~1 s), and failed
  self-tests observed before the promotion or reported in an older epoch (the reader's
  self-test failed while its disk was swapped, and the report landed after the promotion).
* ``verdict`` is a function of the recorded observations and ``now`` alone.

Defaults meet the failover target (writer killed -> new writer accepting writes <= 3 s p99 on
processes): a killed agent refuses connections at once, so two refused probes (the first sped
up by a client's report) confirm it within a probe interval of the kill; a paused one times
out each probe (0.3 s) and is confirmed after three of them once ``suspect_after`` = 0.5 s
passed since its last heartbeat. That leaves > 1.5 s for fence (~0.1 s), promotion (journal
replay) and announcement.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from orchestrator.errors import ConfigError


class Verdict(enum.Enum):
    """What the detector believes about a node."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True)
class LivenessConfig:
    """Timings in seconds; see the module docstring for why these defaults."""

    probe_interval: float = 0.2
    probe_timeout: float = 0.3
    suspect_after: float = 0.5
    dead_after: float = 1.2
    confirm_failures: int = 3
    confirm_refused: int = 2

    def __post_init__(self) -> None:
        for name in ("probe_interval", "probe_timeout", "suspect_after", "dead_after"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"coordinator.{name}", "must be > 0")
        if self.confirm_failures < 2:
            raise ConfigError("coordinator.confirm_failures", "must be >= 2: one loss is no death")
        if self.confirm_refused < 2:
            raise ConfigError("liveness.confirm_refused", "must be >= 2: one refusal is no death")
        if self.dead_after <= self.suspect_after:
            raise ConfigError("coordinator.dead_after", "must exceed suspect_after")


# -- observations (events, past tense) ---------------------------------------------------


@dataclass(frozen=True)
class HeartbeatReceived:
    """The agent's periodic heartbeat arrived (``selftest_ok`` from its own self-test;
    ``epoch`` the one the agent sent it in, when known)."""

    node: str
    at: float
    selftest_ok: bool = True
    epoch: int | None = None


@dataclass(frozen=True)
class ProbeSucceeded:
    node: str
    at: float


@dataclass(frozen=True)
class ProbeFailed:
    """A probe got no answer; ``refused``: its connection was refused (module docstring)."""

    node: str
    at: float
    refused: bool = False


@dataclass(frozen=True)
class FailureReported:
    """A client could not use ``node`` (connection refused, timeout, 5xx)."""

    node: str
    at: float
    reporter: str = ""


@dataclass(frozen=True)
class SelfTestFailed:
    """The agent on ``node`` reports its own device or journal is broken (``epoch``: the one
    it reported in, when known)."""

    node: str
    at: float
    reason: str = ""
    epoch: int | None = None


@dataclass(frozen=True)
class HypervisorReportedDown:
    """The hypervisor reports ``node``'s domain ``state``: ``paused``, ``stopped`` or
    ``crashed`` (a lifecycle event; ``at``: when the coordinator received it)."""

    node: str
    at: float
    state: str


@dataclass(frozen=True)
class HypervisorReportedUp:
    """The hypervisor reports ``node``'s domain running again (resumed or started)."""

    node: str
    at: float


Observation = (HeartbeatReceived | ProbeSucceeded | ProbeFailed | FailureReported
               | SelfTestFailed | HypervisorReportedDown | HypervisorReportedUp)


@dataclass(frozen=True)
class NodeRecord:
    """What has been seen of one node since its last successful contact.

    ``promoted_at``/``promoted_epoch``: when and to which epoch the coordinator last promoted
    it (failure evidence the promotion explains is ignored, see the module docstring);
    ``hypervisor_down``: the domain state the hypervisor last reported it down in ("" when
    none, or when it reported it running again).
    """

    last_ok: float
    failed_probes: int = 0
    refused_probes: int = 0  # the latest failed probes in a row that were refused
    reports: int = 0
    selftest_failed: bool = False
    hypervisor_down: str = ""
    promoted_at: float | None = None
    promoted_epoch: int = 0


@dataclass(frozen=True)
class Liveness:
    """The detector's state: one record per watched node."""

    config: LivenessConfig = field(default_factory=LivenessConfig)
    nodes: tuple[tuple[str, NodeRecord], ...] = ()

    def record(self, node: str) -> NodeRecord | None:
        """The record of ``node`` or None when not watched."""
        for name, rec in self.nodes:
            if name == node:
                return rec
        return None

    def watch(self, node: str, now: float) -> Liveness:
        """Start watching ``node`` as if it had just answered (a grace period of dead_after)."""
        if self.record(node) is not None:
            return self
        return self._put(node, NodeRecord(last_ok=now))

    def promoted(self, node: str, now: float, epoch: int) -> Liveness:
        """``node`` was just promoted to ``epoch`` by a disk swap: its answer is fresh contact
        and what the swap explains is moot (module docstring)."""
        return self._put(node, NodeRecord(last_ok=now, promoted_at=now, promoted_epoch=epoch))

    def forget(self, node: str) -> Liveness:
        """Stop watching ``node``."""
        return replace(self, nodes=tuple((n, r) for n, r in self.nodes if n != node))

    def observe(self, obs: Observation) -> Liveness:
        """Fold one observation in; observations about unwatched nodes start watching them."""
        rec = self.record(obs.node) or NodeRecord(last_ok=obs.at)
        if isinstance(obs, HeartbeatReceived):
            failed = not obs.selftest_ok and not self._explained(rec, obs.at, obs.epoch)
            rec = replace(rec, last_ok=max(rec.last_ok, obs.at), failed_probes=0,
                          refused_probes=0, reports=0, selftest_failed=failed)
        elif isinstance(obs, ProbeSucceeded):
            rec = replace(rec, last_ok=max(rec.last_ok, obs.at), failed_probes=0,
                          refused_probes=0, reports=0)
        elif isinstance(obs, ProbeFailed):
            if rec.promoted_at is not None and obs.at < rec.promoted_at + self.config.dead_after:
                return self._put(obs.node, rec)  # the swap's own slowness
            rec = replace(rec, failed_probes=rec.failed_probes + 1,
                          refused_probes=rec.refused_probes + 1 if obs.refused else 0)
        elif isinstance(obs, FailureReported):
            rec = replace(rec, reports=rec.reports + 1)
        elif isinstance(obs, HypervisorReportedDown):
            rec = replace(rec, hypervisor_down=obs.state)
        elif isinstance(obs, HypervisorReportedUp):
            rec = replace(rec, hypervisor_down="")
        elif not self._explained(rec, obs.at, obs.epoch):
            rec = replace(rec, selftest_failed=True)
        return self._put(obs.node, rec)

    @staticmethod
    def _explained(rec: NodeRecord, at: float, epoch: int | None) -> bool:
        """A failed self-test from before the node's promotion (by time or by epoch)."""
        if rec.promoted_at is None:
            return False
        return at < rec.promoted_at or (epoch is not None and epoch < rec.promoted_epoch)

    def verdict(self, node: str, now: float) -> Verdict:
        """ALIVE / SUSPECT / DEAD for ``node`` at ``now`` (unwatched nodes are ALIVE)."""
        rec = self.record(node)
        if rec is None:
            return Verdict.ALIVE
        cfg = self.config
        silence = now - rec.last_ok
        if rec.selftest_failed or rec.hypervisor_down:
            return Verdict.DEAD
        if rec.refused_probes >= cfg.confirm_refused:
            return Verdict.DEAD  # its host answers, its agent does not listen
        if rec.failed_probes >= cfg.confirm_failures and silence >= cfg.suspect_after:
            return Verdict.DEAD  # probes fail AND no heartbeat came meanwhile
        if rec.failed_probes and silence >= cfg.dead_after:
            return Verdict.DEAD  # long silence, and the last probe after it failed too
        if rec.failed_probes or rec.reports or silence >= cfg.suspect_after:
            return Verdict.SUSPECT
        return Verdict.ALIVE

    def verdicts(self, now: float) -> dict[str, Verdict]:
        """Every watched node's verdict at ``now``."""
        return {name: self.verdict(name, now) for name, _ in self.nodes}

    def _put(self, node: str, rec: NodeRecord) -> Liveness:
        rest = tuple((n, r) for n, r in self.nodes if n != node)
        return replace(self, nodes=tuple(sorted((*rest, (node, rec)), key=lambda p: p[0])))


__all__ = [
    "FailureReported",
    "HeartbeatReceived",
    "HypervisorReportedDown",
    "HypervisorReportedUp",
    "Liveness",
    "LivenessConfig",
    "NodeRecord",
    "Observation",
    "ProbeFailed",
    "ProbeSucceeded",
    "SelfTestFailed",
    "Verdict",
]
