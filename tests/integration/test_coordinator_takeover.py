"""A coordinator takeover, on real agent processes and two in-process coordinators sharing
one lease: agents given both report to whichever is active; and replay across the takeover
(docs/security.md, "Coordinator API").

Coordinator A admits an agent's report; A stops and standby B, running since before that
report was signed, takes the lease. The same report sent to B is refused (409
``replayed_report``): B never saw what A admitted, so it refuses every report signed before it
took the lease (plus the skew margin), while a freshly signed one is news as usual.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from agents.core.protocol import Heartbeat
from agents.peers import post_message
from orchestrator.coordinator.service import FleetService
from orchestrator.core.election import Event
from orchestrator.core.liveness import HeartbeatReceived, Observation
from orchestrator.core.reports import TAKEOVER_SKEW
from orchestrator.errors import NotActive, ReplayedReport
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore
from tests.coordinator_harness import (
    PidFencer,
    bootstrap_map,
    file_image,
    start_api,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import AgentFleet, FleetFactory, node_peer

pytestmark = pytest.mark.integration


def _heartbeat(fleet: AgentFleet, node: str) -> Heartbeat:
    """A heartbeat of ``node`` saying what its agent says (so it changes nothing)."""
    health = fleet.health(node)
    return Heartbeat(node=node, fleet=fleet.name, role=health["role"], epoch=health["epoch"],
                     applied_seq=health["applied_seq"], safe_seq=health["safe_seq"],
                     selftest="ok", address=fleet[node].address, sent_at=time.time())


def _past_skew(took_lease: float | None) -> None:
    """Wait until reports signed now are past a term's skew margin."""
    assert took_lease is not None
    wait_until(lambda: time.time() > took_lease + TAKEOVER_SKEW, TAKEOVER_SKEW + 5,
               "the skew margin over")


def test_a_report_admitted_by_the_old_coordinator_is_refused_by_the_one_taking_over(
        fleet_factory: FleetFactory, tmp_path: Path) -> None:
    a, b = start_api(), start_api()  # b: a standby, up before the report below is signed
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"tk-{uuid.uuid4().hex[:8]}", coordinator=a.url)
    board = MemoryLeaseBoard(FakeClock())  # the lease never runs out: only a release moves it
    try:
        service_a = start_service(a, MemoryStateStore(board, fleet.name, "a", 2.0),
                                  PidFencer(fleet), bootstrap_map(fleet))
        wait_in_sync(service_a, 20)
        _past_skew(service_a.active_since)  # A, too, refuses what was signed before its term
        service_b = start_service(b, MemoryStateStore(board, fleet.name, "b", 2.0),
                                  PidFencer(fleet), bootstrap_map(fleet))
        report = _heartbeat(fleet, "r1")
        grant = fleet.report_grant("r1", report)
        accepted = post_message(node_peer(a.url, "r1"), "/v1/heartbeat", report, grant=grant,
                                timeout=10)
        assert accepted["epoch"] == 1 and accepted["writer"] == "w"  # A counted it

        a.stop(release=True)  # B takes the lease at its next try
        wait_until(lambda: service_b.active, 10, "B active")
        to_b = node_peer(b.url, "r1")
        with pytest.raises(ReplayedReport) as refused:
            post_message(to_b, "/v1/heartbeat", report, grant=grant, timeout=10)
        assert refused.value.status == 409 and "taking of the lease" in str(refused.value)

        # a report signed once B took the lease (past the skew margin) is news as usual
        _past_skew(service_b.active_since)
        fresh = _heartbeat(fleet, "r1")
        fresh_grant = fleet.report_grant("r1", fresh)
        answer = post_message(to_b, "/v1/heartbeat", fresh, grant=fresh_grant, timeout=10)
        assert answer["epoch"] == 1 and answer["writer"] == "w"
        with pytest.raises(ReplayedReport):  # and it, in turn, is admitted once
            post_message(to_b, "/v1/heartbeat", fresh, grant=fresh_grant, timeout=10)
    finally:
        a.stop(release=False)
        b.stop(release=False)


def _heartbeats_taken(service: FleetService) -> set[str]:
    """The nodes whose heartbeats ``service`` takes from now on (filled as they come)."""
    beating: set[str] = set()
    submit = service.submit

    def count(event: Observation | Event) -> None:
        if isinstance(event, HeartbeatReceived):
            beating.add(event.node)
        submit(event)
    service.submit = count  # type: ignore[method-assign]
    return beating


def test_agents_given_both_coordinators_report_to_the_active_one_and_follow_a_takeover(
        fleet_factory: FleetFactory, tmp_path: Path) -> None:
    """The standby B is listed first: the agents' heartbeats reach the active A only by
    following B's ``not_active`` answer. Once A stops, it answers ``not_active`` on the
    connections still open to it (or nothing), and they pass on to B, active by then."""
    a, b = start_api(), start_api()
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"tp-{uuid.uuid4().hex[:8]}", coordinator=[b.url, a.url])
    board = MemoryLeaseBoard(FakeClock())
    nodes = {"w", "r1", "r2"}
    try:
        service_a = start_service(a, MemoryStateStore(board, fleet.name, "a", 2.0),
                                  PidFencer(fleet), bootstrap_map(fleet))
        at_a = _heartbeats_taken(service_a)
        service_b = start_service(b, MemoryStateStore(board, fleet.name, "b", 2.0),
                                  PidFencer(fleet), bootstrap_map(fleet))
        wait_in_sync(service_a, 20)
        assert not service_b.active
        wait_until(lambda: at_a == nodes, 20, "every agent's heartbeats at A, past B")
        at_b = _heartbeats_taken(service_b)
        a.stop(release=True)
        with pytest.raises(NotActive):  # stopped: nothing more from A, open connections too
            service_a.require_active()
        wait_until(lambda: service_b.active, 10, "B active")
        wait_until(lambda: at_b == nodes, 20, "every agent's heartbeats at B, once A is gone")
        wait_in_sync(service_b, 20)
    finally:
        a.stop(release=False)
        b.stop(release=False)
