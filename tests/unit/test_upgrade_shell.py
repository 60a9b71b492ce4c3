"""The rolling upgrade's shell (orchestrator/upgrade.py) over fakes: a fleet simulated in
memory, where restarting a node puts it back in sync on the package it was given (or not),
and a handover moves the writer role. The real thing on processes: tests/integration/
test_upgrade.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from agents.core.protocol import Health
from orchestrator.core.fleetmap import FleetMap, Member
from orchestrator.deploy import AgentDeployer, DeployTarget, HostResult
from orchestrator.errors import (
    AgentUnreachable,
    DeployError,
    RefusedTransition,
    UpgradeRefused,
    UpgradeStalled,
)
from orchestrator.packaging import AgentPackage
from orchestrator.testing.fakes import FakeClock
from orchestrator.upgrade import FleetUpgrade

pytestmark = pytest.mark.unit

NEW = AgentPackage(b"new", "new0000000000000")
OLD = "old0000000000000"


@dataclass(frozen=True)
class Host:
    name: str
    address: str = "127.0.0.1"


class FakeFleet:
    """The coordinator's map and the agents, in memory: a deployed node runs the package at
    once and is an in-sync reader again unless it is in ``stuck`` (down) or ``refuses``."""

    def __init__(self, spares: tuple[str, ...] = ()) -> None:
        self.map = FleetMap("f", 1, 1, "w", (
            Member("w", "w:1", "writer", False, 9), Member("r1", "r1:1", "reader", True, 9),
            Member("r2", "r2:1", "reader", True, 9),
            *(Member(s, f"{s}:1", "spare", False, 0) for s in spares)))
        self.versions = dict.fromkeys(("w", "r1", "r2", *spares), OLD)
        self.stuck: set[str] = set()
        self.refuse_handover = False
        self.log: list[str] = []

    # the coordinator
    def map_json(self) -> dict[str, Any]:
        return self.map.to_json()

    def failover(self, to: str | None) -> dict[str, Any]:
        assert to is not None
        if self.refuse_handover:
            raise RefusedTransition("illegal transition of w: writer -> out")
        self.log.append(f"handover {to}")
        self.map = self.map.begin_failover(to).complete_failover()
        return self.map.to_json()

    # the agents
    def health(self, address: str, timeout: float) -> Health:
        node = address.split(":")[0]
        if node in self.stuck:
            raise AgentUnreachable(node, address, "connection refused")
        m = self.map.member(node)
        if m.role == "spare":  # its agent waits for a disk
            return Health(node, "f", "starting", 0, -1, -1, "pending", version=self.versions[node])
        return Health(node, "f", "writer" if m.role == "writer" else "reader", self.map.epoch,
                      9, 9, "ok", version=self.versions[node])

    def restarted(self, node: str, version: str) -> None:
        self.log.append(f"restart {node}")
        self.versions[node] = version
        if node not in self.stuck and self.map.member(node).role != "spare":
            m = self.map.member(node)
            self.map = (self.map.set_role(node, "reader", in_sync=True) if m.role == "out"
                        else self.map.with_member(replace(m, in_sync=True)))


class Coordinator:
    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    def map(self, after: int = -1, wait: float = 0.0) -> dict[str, Any]:
        return self.fleet.map_json()

    def failover(self, to: str | None) -> dict[str, Any]:
        return self.fleet.failover(to)


class Deployer(AgentDeployer):
    """Deploys into the fake fleet; a node in ``broken`` fails its deploy."""

    def __init__(self, fleet: FakeFleet, broken: Sequence[str] = ()) -> None:
        super().__init__(shell=None, package=NEW)  # type: ignore[arg-type]
        self.fleet = fleet
        self.broken = set(broken)

    def deploy(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        name = targets[0].host.name
        if name in self.broken:
            raise DeployError(f"agent deploy failed on {name}", {name: HostResult(
                name, ok=False, error="agent exited right after start: boom")})
        self.fleet.restarted(name, self.package.version)
        return {name: HostResult(name, ok=True, changed=True, actions=("installed",))}

    def status(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        return {t.host.name: HostResult(t.host.name, ok=True, version=self.fleet.versions[
            t.host.name]) for t in targets}


def upgrade(fleet: FakeFleet, **deployer: Any) -> FleetUpgrade:
    def targets(m: FleetMap) -> dict[str, DeployTarget]:
        return {x.name: DeployTarget(Host(x.name)) for x in m.members}
    return FleetUpgrade(Coordinator(fleet), Deployer(fleet, **deployer), targets, fleet.health,
                        FakeClock(), node_wait=10.0, poll=1.0, progress=lambda _: None)


def test_spares_readers_then_handover_then_the_old_writer_and_a_second_run_does_nothing(
) -> None:
    fleet = FakeFleet(spares=("s",))
    report = upgrade(fleet).run()
    assert fleet.log == ["restart s", "restart r1", "restart r2", "handover r1", "restart w"]
    assert [s.step for s in report.steps] == [
        "upgrade spare s", "upgrade r1", "upgrade r2", "hand the writer role over from w to r1",
        "upgrade w"]
    assert report.handover_seconds is not None
    assert set(fleet.versions.values()) == {NEW.version}
    assert upgrade(fleet).run().steps == [] and fleet.log[-1] == "restart w"


def test_an_unhealthy_fleet_is_refused_before_anything_is_touched() -> None:
    fleet = FakeFleet()
    fleet.map = fleet.map.set_progress("r2", 3, False)
    with pytest.raises(UpgradeRefused, match="out of sync: r2"):
        upgrade(fleet).run()
    assert fleet.log == []


def test_a_node_that_is_not_back_in_time_stops_it_there_with_what_was_seen() -> None:
    fleet = FakeFleet()
    fleet.stuck.add("r1")
    with pytest.raises(UpgradeStalled, match=r"r1: not an in-sync reader running new0+ 10 s "
                       r"after its restart \(installed\); last seen: map: reader in sync, "
                       r"agent not answering") as stalled:
        upgrade(fleet).run()
    assert stalled.value.node == "r1" and fleet.log == ["restart r1"]
    assert fleet.map.writer == "w"  # nothing else touched


def test_a_failed_deploy_names_the_node_and_the_agent_error_and_a_rerun_continues() -> None:
    fleet = FakeFleet()
    with pytest.raises(UpgradeStalled, match="r1: agent exited right after start: boom"):
        upgrade(fleet, broken=["r1"]).run()
    assert fleet.log == []
    upgrade(fleet).run()
    assert fleet.log == ["restart r1", "restart r2", "handover r1", "restart w"]


def test_a_refused_handover_stops_at_the_writer() -> None:
    fleet = FakeFleet()
    fleet.refuse_handover = True
    with pytest.raises(UpgradeStalled, match="w: handover to r1 failed: illegal transition"):
        upgrade(fleet).run()
    assert fleet.log == ["restart r1", "restart r2"] and fleet.map.writer == "w"


def test_dry_run_plans_without_touching_anything() -> None:
    fleet = FakeFleet()
    assert [str(s) for s in upgrade(fleet).plan()] == [
        "upgrade r1", "upgrade r2", "hand the writer role over from w to r1", "upgrade w"]
    assert fleet.log == []
