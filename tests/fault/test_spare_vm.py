"""A dead reader VM is replaced by a spare VM whose disk the coordinator attaches through
libvirt, under the recorded workload.

On the session's three TCG guests and Ceph cluster, one fleet of its own: ``vm1`` writer,
``vm2`` reader, ``vm3`` a spare (``spare = true``). ``rbdfleet provision`` attaches the disk to
vm1 (read-write) and vm2 (read-only) only; ``rbdfleet deploy`` installs every agent, the
spare's too, which waits for a disk (its health says ``starting``). tests/jepsen.py's recorded
workload runs from the host.

1. vm2 is powered off (``virsh destroy``): the coordinator takes it out and attaches the
   image read-only to vm3 through libvirt (``AttachSpare``: the provisioner's reader role);
   vm3's agent sees its disk appear, starts as a reader, catches up, and the writer admits
   it: the map shows vm3 an in-sync reader of epoch 1 (a reader's replacement is not a
   failover: the epoch stays), vm2 ``out``;
2. the disk libvirt gave vm3 is read-only, and vm3 serves what was acknowledged before;
3. the history is clean under every checker, the final state read on every node handed out
   (vm3 included); fsck is clean.

Budget: ~3 min with the VMs already booted (vm2 boots again at the end for the next module).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from orchestrator.sandbox.ceph import CephCluster
from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.vms import VmSet
from tests.integration.test_mission_vm import open_mission
from tests.vm_faults import (
    Recorded,
    agent_health,
    domain_running,
    fsck,
    in_sync_reader,
    say_as,
    status_of,
)

pytestmark = [pytest.mark.fault, pytest.mark.vm]

WRITER, READER, SPARE = "vm1", "vm2", "vm3"
say = say_as("spare")


@pytest.fixture(scope="module")
def spare_mission(tmp_path_factory: pytest.TempPathFactory, ceph_cluster: CephCluster,
                  sandbox_vms: VmSet) -> Iterator[Mission]:
    """The mission's fleet with vm3 a spare."""
    with open_mission(tmp_path_factory, ceph_cluster, sandbox_vms, spares=(SPARE,)) as m:
        yield m


def _disk_mode(vms: VmSet, vm: str, serial: str) -> str | None:
    """``ro``/``rw`` of the fleet's disk in ``vm``'s live domain, None if not attached."""
    target = vms.vm(vm)
    xml = subprocess.run(["virsh", "-c", target.uri, "dumpxml", target.domain],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for disk in xml.split("<disk ")[1:]:
        if f"<serial>{serial}</serial>" in disk:
            return "ro" if "<readonly/>" in disk else "rw"
    return None


def test_a_dead_reader_vm_is_replaced_by_a_spare_attached_through_libvirt(
        spare_mission: Mission, sandbox_vms: VmSet) -> None:
    fleet = spare_mission
    fleet.provision()
    assert _disk_mode(sandbox_vms, SPARE, fleet.serial) is None  # a spare gets no disk
    fleet.deploy()
    assert agent_health(fleet, SPARE)["role"] == "starting"  # its agent waits for one
    fleet.start_coordinator(fleet.config_path.parent / "coordinator.log")
    assert {m["name"]: m["role"] for m in fleet.fleet_map()["members"]}[SPARE] == "spare"
    before = fleet.put_many(5, prefix="/spare/before")
    recorded = Recorded(fleet, root="/spare")
    recorded.start()
    fleet.wait(lambda: len(recorded.acks) >= 3, 60, "the recorded workload")
    try:
        say(f"powering {READER} off (virsh destroy)")
        killed = time.monotonic()
        sandbox_vms.crash(READER)
        fleet.wait(lambda: in_sync_reader(fleet, SPARE, 1), 180,
                   f"{SPARE} attached and an in-sync reader of epoch 1")
        log = (fleet.config_path.parent / "coordinator.log").read_text().splitlines()
        # the coordinator's own times (polling `rbdfleet status` from here lags under load)
        dead = next(x for x in log if f"node_confirmed_dead fleet={fleet.config.fleet.name} "
                    f"node={READER}" in x)
        admitted = next(x for x in log if "event=map_published" in x and SPARE in x.split()[-1])
        say(f"{SPARE} attached through libvirt and in sync (polled: "
            f"{time.monotonic() - killed:.1f} s after the power-off); coordinator: "
            f"{dead[:23]} {READER} dead, {admitted[:23]} {SPARE} in sync")
        status = status_of(fleet)
        roles = {m["name"]: m["role"] for m in status["map"]["members"]}
        assert roles == {WRITER: "writer", READER: "out", SPARE: "reader"}, roles
        assert status["map"]["epoch"] == 1  # a reader replaced: no failover
        assert _disk_mode(sandbox_vms, SPARE, fleet.serial) == "ro"
        health = agent_health(fleet, SPARE)  # (catching_up may flicker under the write stream)
        assert (health["role"], health["epoch"]) == ("reader", 1)
        fleet.wait(lambda: len(recorded.acks) >= 10, 60, "writes acknowledged with the spare")
        recorded.finish()  # every checker; the final state read on the writer and vm3
        lost = fleet.verify(before)
        assert lost == [], f"acknowledged puts lost: {lost}"
        check = fsck(fleet)
        assert check.returncode == 0, check.stdout + check.stderr
        say(f"history clean on every node, {recorded.tally()}; fsck clean")
    finally:  # the session's guest must run again for the modules after this one
        if not domain_running(sandbox_vms, READER):
            sandbox_vms.start(READER)
