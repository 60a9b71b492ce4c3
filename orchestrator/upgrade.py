"""Rolling upgrade of a fleet's agents: the shell around :mod:`orchestrator.core.upgrade`.

The use case behind ``rbdfleet upgrade``. It observes (the coordinator's map, each agent's
``/v1/health``), asks the pure plan for the next step and runs it:

* :class:`~orchestrator.core.upgrade.Upgrade`: ``AgentDeployer.deploy`` of that node with its
  config for the current map (the new package is installed beside the old one, the agent
  stopped and started on it: ``systemctl`` where systemd runs it, the pidfile elsewhere), then
  wait until the coordinator hands it out again: an in-sync reader, its agent answering as a
  reader of the map's epoch, caught up, running the new version. The writer notices the
  restarted reader (its pushes fail) and the coordinator takes it out of the map before any
  write is acknowledged without it (docs/coordinator.md, "Admission"), so clients never read
  from it while it is down.
* :class:`~orchestrator.core.upgrade.Handover`: the coordinator's planned failover to the named
  reader (epoch+1 persisted, the old writer fenced, the reader promoted warm, the map
  published); its duration is the window in which writes are refused.

A node that does not come back (its deploy fails, or it is not in sync within ``node_wait``)
stops the upgrade with :class:`~orchestrator.errors.UpgradeStalled` naming it; nothing else is
touched, so the fleet goes on serving with the nodes it has. Running it again continues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.core.protocol import Health
from agents.errors import RbdfleetError
from orchestrator.core.fleetmap import FleetMap
from orchestrator.core.upgrade import (
    Handover,
    Observation,
    Step,
    Upgrade,
    UpgradeSpare,
    next_step,
    plan,
)
from orchestrator.deploy import AgentDeployer, DeployTarget
from orchestrator.errors import DeployError, UpgradeStalled
from orchestrator.ports import Clock

LOG = logging.getLogger(__name__)

__all__ = ["FleetCoordinator", "FleetUpgrade", "StepResult", "UpgradeReport"]


class FleetCoordinator(Protocol):
    """What the upgrade asks of the fleet's coordinator (``client.CoordinatorClient``)."""

    def map(self, after: int = -1, wait: float = 0.0) -> dict[str, Any]: ...

    def failover(self, to: str | None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StepResult:
    """One step done: what, how long (s), and what it changed."""

    step: str
    seconds: float
    detail: str = ""


@dataclass
class UpgradeReport:
    """What ``upgrade`` did. ``handover_seconds``: the planned failover's duration (writes are
    refused from the old writer's fence to the new map), None when the writer already ran
    ``version``."""

    version: str
    steps: list[StepResult] = field(default_factory=list)
    handover_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Machine-readable form (``rbdfleet upgrade --json``)."""
        return {"version": self.version, "handover_seconds": self.handover_seconds,
                "steps": [{"step": s.step, "seconds": s.seconds, "detail": s.detail}
                          for s in self.steps]}


class FleetUpgrade:
    """Upgrade every agent of one fleet to ``deployer.package`` (see the module docstring)."""

    def __init__(
        self,
        coordinator: FleetCoordinator,
        deployer: AgentDeployer,
        targets: Callable[[FleetMap], Mapping[str, DeployTarget]],
        health: Callable[[str, float], Health],
        clock: Clock,
        *,
        node_wait: float = 120.0,
        poll: float = 0.5,
        health_timeout: float = 2.0,
        progress: Callable[[str], None] = LOG.info,
    ) -> None:
        """``targets(map)``: each deployed node's DeployTarget, its config for that map (roles
        and epoch from it); ``health(address, timeout)`` probes an agent; ``node_wait``: how
        long a restarted node may take to be an in-sync reader again."""
        self.coordinator = coordinator
        self.deployer = deployer
        self.targets = targets
        self.health = health
        self.clock = clock
        self.node_wait = node_wait
        self.poll = poll
        self.health_timeout = health_timeout
        self.progress = progress

    @property
    def version(self) -> str:
        return self.deployer.package.version

    def plan(self) -> list[Step]:
        """The steps a run would take from now (``--dry-run``); UpgradeRefused if none may."""
        return plan(self._observe(installed=True)[0], self.version)

    def run(self) -> UpgradeReport:
        """Take steps until every agent runs the new version; UpgradeRefused before the first
        one if the fleet is not healthy, UpgradeStalled at a node that does not come back."""
        report = UpgradeReport(self.version)
        done: set[Step] = set()
        while (step := next_step(self._observe(installed=True)[0], self.version)) is not None:
            if step in done:  # it was back, and fell out again: not a node to go on from
                node = step.writer if isinstance(step, Handover) else step.node
                raise UpgradeStalled(node, f"{step} again: it fell out of sync after its step")
            self.progress(f"{step}")
            started = self.clock.monotonic()
            detail = self._handover(step) if isinstance(step, Handover) else self._upgrade(step)
            took = round(self.clock.monotonic() - started, 3)
            if isinstance(step, Handover):
                report.handover_seconds = took
            report.steps.append(StepResult(str(step), took, detail))
            self.progress(f"{step}: done in {took:.2f} s ({detail})")
            done.add(step)
        return report

    # steps ------------------------------------------------------------------------------------

    def _upgrade(self, step: Upgrade | UpgradeSpare) -> str:
        node = step.node
        fleet_map = self._observe()[0].map
        target = self.targets(fleet_map)[node]
        try:
            result = self.deployer.deploy([target])[node]
        except DeployError as exc:
            failed = exc.results.get(node)
            raise UpgradeStalled(node, failed.error if failed and failed.error else str(exc)) \
                from exc
        actions = ", ".join(result.actions) or "unchanged"
        deadline = self.clock.monotonic() + self.node_wait
        while True:
            seen = self._back(node, spare=isinstance(step, UpgradeSpare))
            if seen is None:
                return actions
            if self.clock.monotonic() > deadline:
                wanted = "answering" if isinstance(step, UpgradeSpare) else "an in-sync reader"
                raise UpgradeStalled(node, f"not {wanted} running {self.version} "
                                     f"{self.node_wait:.0f} s after its restart ({actions}); "
                                     f"last seen: {seen}")
            self.clock.sleep(self.poll)

    def _back(self, node: str, *, spare: bool = False) -> str | None:
        """None once ``node`` is served again on the new version (a ``spare``: answers on
        it), else what is seen instead."""
        try:
            obs, healths = self._observe()
        except RbdfleetError as exc:  # a coordinator changing hands: seen again at the next poll
            return f"no map: {exc}"
        member = obs.map.member(node)
        health = healths.get(node)
        in_map = f"map: {member.role} {'in sync' if member.in_sync else 'not in sync'}"
        if health is None:
            return f"{in_map}, agent not answering"
        ok = health.version == self.version and (spare or (
            member.role == "reader" and member.in_sync and health.role == "reader"
            and health.epoch == obs.map.epoch and not health.catching_up))
        if ok:
            return None
        return (f"{in_map}; agent: {health.role} of epoch {health.epoch}"
                f"{' catching up' if health.catching_up else ''}, "
                f"version {health.version or 'unknown'}")

    def _handover(self, step: Handover) -> str:
        try:
            new = FleetMap.from_json(self.coordinator.failover(step.to))
        except RbdfleetError as exc:
            raise UpgradeStalled(step.writer, f"handover to {step.to} failed: {exc}") from exc
        return f"epoch {new.epoch}, writer {new.writer}"

    # observation ------------------------------------------------------------------------------

    def _observe(self, *, installed: bool = False) -> tuple[Observation, dict[str, Health]]:
        """The coordinator's map and each deployed member's health (absent: no answer); with
        ``installed``, the package installed on each node out of sync (over SSH)."""
        fleet_map = FleetMap.from_json(self.coordinator.map())
        healths: dict[str, Health] = {}
        for member in fleet_map.members:
            if not member.address:
                continue
            try:
                healths[member.name] = self.health(member.address, self.health_timeout)
            except RbdfleetError:
                continue
        versions = {m.name: (healths[m.name].version if m.name in healths else None)
                    for m in fleet_map.members}
        lagging = [m.name for m in fleet_map.members if m.role in ("reader", "out")
                   and not m.in_sync]
        found: dict[str, str | None] = {}
        if installed and lagging:
            targets = self.targets(fleet_map)
            try:
                status = self.deployer.status([targets[n] for n in lagging if n in targets])
            except DeployError as exc:  # a host we cannot reach: its package is unknown
                status = exc.results
            found = {n: r.version for n, r in status.items() if r.ok}
        return Observation(fleet_map, versions, found), healths
