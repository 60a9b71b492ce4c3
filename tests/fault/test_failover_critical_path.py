"""The failover's critical path on a VM-shaped fleet: real agent processes and a real
coordinator, whose role switch (FencedWriterRoles over the provisioner) drives the fake
hypervisor and whose fence proof is the fake Ceph blocklist.

Each agent stands for a VM ``d-<node>`` (MemoryHypervisor) whose QEMU holds a librbd client of
the image (MemoryCeph); the fence SIGKILLs the agent (a file image has no storage fence) and
blocklists that client (what the role switch's proof looks at). Checked:

* the new map is published, and the new writer acknowledges puts, while the old writer's
  read-write disk is still attached: its release waits behind a guest that does not let go,
  and nothing on the critical path touches it;
* a release the hypervisor refuses does not undo the failover: it is retried with a backoff
  and shows in ``status()["releases"]`` until it succeeds;
* a domain the hypervisor reports paused is confirmed dead at once, although its agent
  still answers every probe (the hypervisor's word is the evidence).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.config import from_mapping
from orchestrator.coordinator.service import FleetService
from orchestrator.coordinator.write_path import FencedWriterRoles
from orchestrator.core.election import ElectionConfig
from orchestrator.core.placement import vm_user
from orchestrator.ports import DiskMode
from orchestrator.provision import Provisioner
from orchestrator.testing.fakes import (
    FakeClock,
    MemoryCeph,
    MemoryCredentialStore,
    MemoryFencer,
    MemoryHypervisor,
    MemoryImageStore,
    MemoryLeaseBoard,
    MemoryStateStore,
)
from tests.coordinator_harness import (
    Coordinator,
    PidFencer,
    bootstrap_map,
    file_image,
    fleet_client,
    start_api,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import AgentFleet, FleetFactory

pytestmark = pytest.mark.fault

URI = "qemu:///system"
NODES = ("w", "r1", "r2")


@dataclass
class FenceBoth:
    """Fencer: SIGKILL the node's agent and blocklist its VM's Ceph client."""

    pids: PidFencer
    ceph: MemoryFencer

    def fence(self, vm: str) -> list[str]:
        return self.ceph.fence(vm) + self.pids.fence(vm)


@dataclass
class VmFleet:
    agents: AgentFleet
    coordinator: Coordinator
    service: FleetService
    hv: MemoryHypervisor

    def stable_at(self, epoch: int) -> bool:
        m = self.service.require_active()
        return m.epoch == epoch and m.phase == "stable" and m.writer in ("r1", "r2")

    def mode(self, node: str) -> DiskMode | None:
        return next((d.mode for d in self.hv.domain(URI, f"d-{node}").disks), None)


@pytest.fixture
def vm_fleet(fleet_factory: FleetFactory, tmp_path: Path) -> Iterator[VmFleet]:
    coordinator = start_api()
    agents = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                           name=f"cp-{uuid.uuid4().hex[:8]}", coordinator=coordinator.url)
    config = from_mapping({
        "ceph": {"conf": "/c/ceph.conf", "keyring": "/c/keyring", "mon_host": "127.0.0.1:1"},
        "ssh": {"key": "/k", "known_hosts": "/kh"},
        "fleet": {"name": "cp", "image": "img", "size": "64MiB", "writer": "w",
                  "secret_file": "/s"},
        "vm": [{"name": n, "domain": f"d-{n}", "address": f"127.0.0.{i}"}
               for i, n in enumerate(NODES, 1)],
    })
    ceph, hv = MemoryCeph(), MemoryHypervisor()
    for node in NODES:
        hv.define(URI, f"d-{node}", active=True)
    proof = MemoryFencer(ceph, "rbd", "img", {n: vm_user("cp", n) for n in NODES})
    provisioner = Provisioner(config, MemoryImageStore(ceph), MemoryCredentialStore(ceph), hv,
                              fence_proof=proof)
    provisioner.provision()
    store = MemoryStateStore(MemoryLeaseBoard(FakeClock()), agents.name, "c1", 60.0)
    with contextlib.ExitStack() as qemus:
        for node in NODES:
            qemus.enter_context(ceph.client(vm_user("cp", node), "rbd", "img"))
        try:
            service = start_service(
                coordinator, store, FenceBoth(PidFencer(agents), proof), bootstrap_map(agents),
                election=ElectionConfig(release_backoff=0.2, release_backoff_max=0.8),
                role_switch=FencedWriterRoles(provisioner, store), hypervisor=hv,
                domains={n: (URI, f"d-{n}") for n in NODES})
            wait_in_sync(service, 20)
            hv.calls.clear()
            yield VmFleet(agents, coordinator, service, hv)
        finally:
            for gate in hv.detach_gate.values():
                gate.set()
            coordinator.stop()


def test_the_map_is_published_while_the_old_writers_disk_is_still_held(
        vm_fleet: VmFleet) -> None:
    f, hv = vm_fleet, vm_fleet.hv
    gate = threading.Event()
    hv.detach_gate["d-w"] = gate  # the old writer's guest does not let its disk go
    f.agents["w"].kill()
    wait_until(lambda: f.stable_at(2), 15, "a new writer published at epoch 2")
    new = f.service.require_active().writer
    assert new is not None
    ack = fleet_client([f.coordinator.url], f.agents.name).put_bytes(b"after", "/after")
    assert (ack.node, ack.epoch) == (new, 2)
    # all of that while the release is still waiting for the guest
    wait_until(lambda: "detach d-w" in hv.calls, 5, "the release under way")
    assert not gate.is_set() and f.mode("w") is DiskMode.RW
    status = f.service.status()
    assert "w" in status["releases"] and "ReleaseWritePath(w)" in status["pending"]
    # the candidate's write path came first, and was its own re-attach only
    assert hv.calls.index(f"attach d-{new} rw") < hv.calls.index("detach d-w")
    assert [c for c in hv.calls if c.startswith("attach")] == [f"attach d-{new} rw"]
    gate.set()
    wait_until(lambda: f.service.status()["releases"] == {}, 10, "the release done")
    assert f.mode("w") is DiskMode.RO and f.mode(new) is DiskMode.RW
    assert f.service.require_active().epoch == 2


def test_a_refused_release_is_retried_and_reported_and_undoes_nothing(
        vm_fleet: VmFleet) -> None:
    f, hv = vm_fleet, vm_fleet.hv
    hv.refuse_detach["d-w"] = 3
    f.agents["w"].kill()
    wait_until(lambda: f.stable_at(2), 15, "a new writer published at epoch 2")
    published = f.service.require_active()

    def failed_twice() -> bool:
        release = f.service.status()["releases"].get("w", {})
        return bool(release.get("attempts_failed", 0) >= 2)
    wait_until(failed_twice, 10, "two failed releases reported")
    release = f.service.status()["releases"]["w"]
    assert "refused by the fake" in release["last_error"]
    assert f.service.require_active() == published  # the failover stands
    wait_until(lambda: f.service.status()["releases"] == {}, 10, "the release done at last")
    assert hv.calls.count("detach d-w") == 4 and f.mode("w") is DiskMode.RO
    assert f.service.require_active().epoch == 2


def test_a_paused_domain_is_confirmed_dead_at_once_though_its_agent_answers(
        vm_fleet: VmFleet) -> None:
    f, hv = vm_fleet, vm_fleet.hv
    assert f.agents["w"].alive
    paused_at = time.monotonic()
    hv.suspend(URI, "d-w")  # its agent process runs on: only the hypervisor's word says so
    wait_until(lambda: f.stable_at(2), 10, "a new writer published at epoch 2")
    confirmed = next(t for t, what, node in f.service.timeline
                     if what == "NodeFailed" and node == "w")
    assert confirmed - paused_at < 0.5, confirmed - paused_at
    # the paused guest cannot release its disk live; fenced, it is dropped from the config,
    # and the release is not done while the guest holds the disk: it is retried (shown in
    # the status) and completes once the guest runs again
    wait_until(lambda: "w" in f.service.status()["releases"], 10, "the release pending")
    hv.resume(URI, "d-w")
    wait_until(lambda: f.service.status()["releases"] == {}, 30, "the release done")
    assert f.service.require_active().epoch == 2
