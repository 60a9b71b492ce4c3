"""FleetService and the hypervisor's lifecycle events: the fleet's domains are watched from
start to stop, their events become liveness observations, other domains' are ignored.

The loop is not started for the observations (the service is made active and they go
through the methods the loop calls, on a fake clock); ``start``/``stop`` are, to see the
watches come and go.
"""

from __future__ import annotations

import pytest

from orchestrator.coordinator.service import FleetService, ServiceSettings
from orchestrator.core.fleetmap import initial_map
from orchestrator.core.liveness import LivenessConfig, Verdict
from orchestrator.ports import CoordinatorPorts
from orchestrator.testing.fakes import (
    FakeClock,
    MemoryHypervisor,
    MemoryLeaseBoard,
    MemoryStateStore,
    NeverCalled,
)

pytestmark = pytest.mark.unit

A, B = "qemu+ssh://a/system", "qemu+ssh://b/system"


def service(hv: MemoryHypervisor) -> tuple[FleetService, FakeClock]:
    clock = FakeClock()
    store = MemoryStateStore(MemoryLeaseBoard(clock), "f", "c1", 10.0)
    bootstrap = initial_map("f", "w", {"w": ("w:1", "writer"), "r1": ("r1:1", "reader")})
    ports = CoordinatorPorts(store=store, fencer=NeverCalled(), agents=NeverCalled(),
                             clock=clock, wall=lambda: 0.0, hypervisor=hv)
    return FleetService(ports, ServiceSettings(url="http://c1", liveness=LivenessConfig()),
                        secret=b"k", bootstrap=bootstrap,
                        domains={"w": (A, "dom-w"), "r1": (B, "dom-r1")}), clock


def hypervisor() -> MemoryHypervisor:
    hv = MemoryHypervisor()
    for uri, name in ((A, "dom-w"), (B, "dom-r1"), (A, "stranger")):
        hv.define(uri, name, active=True)
    return hv


def verdict(svc: FleetService, node: str, clock: FakeClock) -> Verdict:
    svc._drain(clock.monotonic())
    return svc._liveness.verdict(node, clock.monotonic())


def test_a_domain_reported_down_is_dead_at_once_and_up_clears_it() -> None:
    hv = hypervisor()
    svc, clock = service(hv)
    assert svc.store.acquire()
    svc._become_active(clock.monotonic())
    for uri in (A, B):
        hv.watch_domains(uri, svc._domain_event)
    hv.suspend(A, "dom-w")
    assert verdict(svc, "w", clock) is Verdict.DEAD
    hv.resume(A, "dom-w")
    assert verdict(svc, "w", clock) is Verdict.ALIVE
    hv.destroy(B, "dom-r1")  # another URI, another node
    assert verdict(svc, "r1", clock) is Verdict.DEAD
    hv.destroy(A, "stranger")  # not one of the fleet's domains: nobody's observation
    svc._drain(clock.monotonic())
    assert {name for name, _ in svc._liveness.nodes} == {"w", "r1"}


def test_the_fleets_uris_are_watched_from_start_to_stop() -> None:
    hv = hypervisor()
    svc, _clock = service(hv)
    svc.start()
    try:
        assert sorted(uri for uri, _ in hv._watchers.values()) == [A, B]
    finally:
        svc.stop()
    assert hv._watchers == {}
