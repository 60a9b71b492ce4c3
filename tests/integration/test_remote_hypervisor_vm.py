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

import contextlib
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.adapters import ceph
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.adapters.rados_state import RadosStateStore
from orchestrator.coordinator.write_path import FencedWriterRoles
from orchestrator.errors import DetachPending, HypervisorUnreachable
from orchestrator.ports import DiskMode, DomainEvent, DomainState
from orchestrator.provision import Provisioner
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.sandbox.vms import VmSet
from orchestrator.services import state_store
from orchestrator.testing.fakes import MemoryFencedReaderRecord
from tests.fixtures.sshd import LoopbackSshd, loopback_sshd_in
from tests.integration.test_provision import MIB, Fleet, open_fleet, render

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
            roles = FencedWriterRoles(p, MemoryFencedReaderRecord())
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


@contextlib.contextmanager
def coordinator_state(fleet: Fleet, holder: str) -> Iterator[RadosStateStore]:
    """The fleet's coordinator state in RADOS, its lease held as ``holder`` (a coordinator
    without its loop: what the role switch writes and a successor reads)."""
    store = state_store(fleet.handle, fleet.config().ceph.pool, fleet.name, 30.0, holder)
    try:
        assert store.acquire(), f"{holder}: the coordinator lease is held by someone else"
        yield store
    finally:
        store.release()
        store.close()


def test_losing_a_whole_hypervisor_host_fences_its_vms_and_the_failover_goes_on(
        fleet: Fleet, remote: LoopbackSshd, tmp_path: Path) -> None:
    """Two hypervisor hosts: vm1 (the writer) and vm3 behind one sshd, vm2 behind another.
    The first host is lost (its sshd and every session gone: libvirt there answers nothing).
    The failover fences vm1; the role switch fences vm3 too (what it holds cannot be seen)
    and gives vm2 the read-write disk without waiting for the lost host: vm1 and vm3 get EIO,
    vm2 writes. The release waits for the host; the coordinator that switched hands over to
    a successor meanwhile (the record of vm3's fence is in RADOS, not in its memory); once
    the host is back the successor re-attaches vm1 and vm3 read-only, and vm3 reads again
    through its fresh client."""
    with loopback_sshd_in(tmp_path / "host-b") as host_b:
        fleet.write("two-hosts", render(fleet.cluster, fleet.vms, fleet.name, fleet.image,
                                        uri={"vm1": host_b.uri(), "vm2": remote.uri(),
                                             "vm3": host_b.uri()}))
        fencer = fleet.fencer()
        back: LoopbackSshd | None = None
        fenced: list[str] = []
        with LibvirtHypervisor() as hv, contextlib.ExitStack() as stack:
            p = Provisioner(fleet.config("two-hosts"), ceph.RbdImageStore(fleet.handle),
                            ceph.CephxCredentialStore(fleet.handle), hv, fence_proof=fencer)
            serial = p.serial
            try:
                # set up and looked at through one URI: both "hosts" are this machine's
                # libvirtd, so each also sees the other's domains (as domains of no fleet VM),
                # which two hosts never do
                one_uri = fleet.provisioner(hv)
                one_uri.set_role("vm1", "writer")
                assert modes(fleet, one_uri) == {"vm1": DiskMode.RW, "vm2": DiskMode.RO,
                                                 "vm3": DiskMode.RO}
                fenced += fencer.clients("vm3")  # what the switch will blocklist
                host_b.stop()
                lost = time.monotonic()
                fenced += fencer.fence("vm1")  # the failover's FenceNode
                first = stack.enter_context(coordinator_state(fleet, "first"))
                roles = FencedWriterRoles(p, first, fencer)
                roles.make_writer("vm2")
                switched = time.monotonic() - lost
                assert first.fenced_readers() == {"vm3"}
                assert fencer.is_fenced("vm3")
                rc, out = fleet.write_block("vm2", fleet.device("vm2", serial), 7, "token-b")
                assert rc == 0, out
                rc, out = fleet.write_block("vm1", fleet.device("vm1", serial), 8, "token-lost")
                assert rc != 0 and "Input/output error" in out, out
                assert fleet.read_sha("vm3", fleet.device("vm3", serial), 7)[0] != 0
                with pytest.raises(HypervisorUnreachable):
                    roles.make_reader("vm1")  # the release waits for the host
                first.release()  # a takeover: the successor knows only what RADOS holds
                successor = stack.enter_context(coordinator_state(fleet, "successor"))
                roles = FencedWriterRoles(p, successor, fencer)
                back = host_b.restart()
                deadline = time.monotonic() + 90
                while True:  # retried as the coordinator's backoff does
                    try:
                        roles.make_reader("vm1")
                        break
                    except (DetachPending, HypervisorUnreachable):
                        assert time.monotonic() < deadline, "the release never completed"
                        time.sleep(1)
                assert not successor.fenced_readers() and not p.pending_detach
                assert modes(fleet, one_uri) == {"vm1": DiskMode.RO, "vm2": DiskMode.RW,
                                                 "vm3": DiskMode.RO}
                rc, sha = fleet.read_sha("vm3", fleet.device("vm3", serial), 7)
                assert rc == 0 and sha == fleet.read_sha("vm2", fleet.device("vm2", serial),
                                                         7)[1]
                print(f"\n[lost host] failover's role switch done {switched:.2f} s after "
                      f"the host was lost; blocklisted {sorted(set(fenced))}")
            finally:
                if back is not None:
                    back.stop()
                fencer.unfence(sorted(set(fenced)))


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
