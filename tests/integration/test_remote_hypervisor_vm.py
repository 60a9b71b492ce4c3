"""A fleet of real guests reached through ``qemu+ssh://`` end to end: provision, the
coordinator's failover steps (fence, role switch, release of the fenced disk) and lifecycle
events, every libvirt call going through SSH to the hypervisor.

The session's three TCG guests (``sandbox_vms``) and Ceph cluster; their libvirtd is reached
through a loopback sshd (tests/fixtures/sshd.py) standing for a remote hypervisor host, with
its host key pinned. What the tiny domains of tests/contract/test_remote_hypervisor.py cannot
show is shown here: guests that really see the disk come, go read-only and release it, and a
fenced writer's guest that gets EIO.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest

from orchestrator.adapters import ceph
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.coordinator.write_path import FencedWriterRoles
from orchestrator.ports import DiskMode, DomainEvent, DomainState
from orchestrator.provision import Provisioner
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.sandbox.vms import VmSet
from tests.fixtures.sshd import LoopbackSshd, loopback_sshd_in
from tests.integration.test_provision import MIB, Fleet, open_fleet

pytestmark = [pytest.mark.integration, pytest.mark.vm]


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSshd]:
    with loopback_sshd_in(tmp_path_factory.mktemp("hv-sshd")) as sshd:
        yield sshd


@pytest.fixture(scope="module")
def fleet(ceph_cluster: CephCluster, sandbox_vms: VmSet, remote: LoopbackSshd,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with open_fleet(ceph_cluster, sandbox_vms, tmp_path_factory.mktemp("remote-fleet"),
                    uri=remote.uri("ssh")) as world:
        yield world


def modes(fleet: Fleet, p: Provisioner) -> dict[str, DiskMode | None]:
    return {r.vm or r.domain: r.mode for r in p.attachments()}


def test_provision_over_ssh_attaches_and_a_second_run_changes_nothing(
        fleet: Fleet, remote: LoopbackSshd) -> None:
    assert all(vm.uri.startswith("qemu+ssh://") for vm in fleet.config().vms)
    with LibvirtHypervisor() as hv:
        p = fleet.provisioner(hv)
        plan, applied = p.provision()
        assert applied, plan
        assert modes(fleet, p) == {"vm1": DiskMode.RW, "vm2": DiskMode.RO, "vm3": DiskMode.RO}
        assert p.provision()[0].empty
    deadline = time.monotonic() + 10
    while remote.connections():  # each ends with its ssh client, after the close
        assert time.monotonic() < deadline, "the adapter left an SSH session open"
        time.sleep(0.1)
    serial = p.serial
    rc, out = fleet.write_block("vm1", fleet.device("vm1", serial), 3, "token-remote-writer")
    assert rc == 0, out
    assert fleet.read_sha("vm2", fleet.device("vm2", serial), 3)[0] == 0


def test_failover_over_ssh_fence_switch_release(fleet: Fleet) -> None:
    """The coordinator's steps on real guests, every libvirt call through SSH: fence the
    writer (EIO in its guest at once), give vm2 the read-write disk without touching the
    fenced one (``FencedWriterRoles`` with the blocklist proof), then release the fenced
    writer's disk: its running guest lets the read-write disk go and gets a read-only one."""
    fencer = fleet.fencer()
    addresses = fencer.clients("vm1")
    assert addresses
    with LibvirtHypervisor() as hv:
        p = Provisioner(fleet.config(), ceph.RbdImageStore(fleet.handle),
                        ceph.CephxCredentialStore(fleet.handle), hv, fence_proof=fencer)
        serial = p.serial
        try:
            assert fencer.fence("vm1") == addresses
            rc, out = fleet.write_block("vm1", fleet.device("vm1", serial), 5, "token-fenced")
            assert rc != 0 and "Input/output error" in out, out
            roles = FencedWriterRoles(p)
            roles.make_writer("vm2")
            assert modes(fleet, p) == {"vm1": DiskMode.RW, "vm2": DiskMode.RW,
                                       "vm3": DiskMode.RO}  # vm1's is fenced, kept for now
            rc, out = fleet.write_block("vm2", fleet.device("vm2", serial), 5, "token-new")
            assert rc == 0, out
            assert fleet.host_read(5 * MIB + MIB - 64, 9) == b"token-new"
            roles.make_reader("vm1")
            deadline = time.monotonic() + 60
            while "vm1" in p.pending_detach:  # a slow guest: retried, as the coordinator does
                assert time.monotonic() < deadline, "vm1's guest never released its disk"
                time.sleep(1)
                roles.make_reader("vm1")
            assert modes(fleet, p) == {"vm1": DiskMode.RO, "vm2": DiskMode.RW,
                                       "vm3": DiskMode.RO}
            rc, out = fleet.write_block("vm1", fleet.device("vm1", serial), 6, "token-old")
            assert rc != 0, out
        finally:
            fencer.unfence(addresses)


def test_a_guest_paused_and_resumed_is_reported_over_ssh(fleet: Fleet,
                                                          remote: LoopbackSshd) -> None:
    import libvirt

    domain = fleet.vms.vm("vm3").domain
    events: queue.Queue[DomainEvent] = queue.Queue()
    with LibvirtHypervisor() as hv:
        stop = hv.watch_domains(remote.uri("ssh"), events.put)
        local = libvirt.open("qemu:///system")
        try:
            for verb, state in (("suspend", DomainState.PAUSED),
                                ("resume", DomainState.RUNNING)):
                getattr(local.lookupByName(domain), verb)()
                deadline = time.monotonic() + 20
                while True:
                    event = events.get(timeout=max(0.1, deadline - time.monotonic()))
                    if event.domain == domain:
                        assert event.state is state, event
                        break
        finally:
            if local.lookupByName(domain).state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                local.lookupByName(domain).resume()
            local.close()
            stop()
