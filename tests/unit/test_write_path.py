"""The coordinator's role switch (FencedWriterRoles) over the provisioner and in-memory ports:
the candidate's write path costs only its own re-attach once the old writer is proven fenced,
and the old writer's disk goes when the election releases it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from orchestrator.config import FleetConfig, from_mapping
from orchestrator.coordinator.write_path import FencedWriterRoles
from orchestrator.core.placement import vm_user
from orchestrator.errors import CoordinationError, DetachPending, HypervisorUnreachable
from orchestrator.ports import DiskMode
from orchestrator.provision import Provisioner
from orchestrator.testing.contracts import RoleSwitchSubject, check_role_switch
from orchestrator.testing.fakes import (
    FakeClock,
    MemoryCeph,
    MemoryCredentialStore,
    MemoryFencedReaderRecord,
    MemoryFencer,
    MemoryHypervisor,
    MemoryImageStore,
    MemoryLeaseBoard,
    MemoryStateStore,
)

pytestmark = pytest.mark.unit

URI = "qemu:///system"


LOST = "qemu+ssh://root@hv-b.example/system"  # vm1 and vm3's hypervisor in the two-host fleet


def config(spare: bool = False, two_hosts: bool = False) -> FleetConfig:
    vms: list[dict[str, object]] = [
        {"name": f"vm{i}", "domain": f"d{i}", "address": f"10.0.0.{i}",
         "uri": LOST if two_hosts and i != 2 else URI} for i in (1, 2, 3)]
    if spare:
        vms.append({"name": "vm4", "domain": "d4", "address": "10.0.0.4", "spare": True})
    return from_mapping({
        "ceph": {"conf": "/c/ceph.conf", "keyring": "/c/keyring", "mon_host": "127.0.0.1:1"},
        "ssh": {"key": "/k", "known_hosts": "/kh"},
        "fleet": {"name": "demo", "image": "img", "size": "64MiB", "writer": "vm1",
                  "secret_file": "/s"},
        "vm": vms,
    })


@contextlib.contextmanager
def fleet(spare: bool = False, two_hosts: bool = False
          ) -> Iterator[tuple[FencedWriterRoles, MemoryHypervisor, MemoryFencer]]:
    """vm1 writer, vm2/vm3 readers (each VM's QEMU holding a librbd client of the image);
    ``two_hosts``: vm1 and vm3 on the hypervisor :data:`LOST`, vm2 on :data:`URI`."""
    ceph = MemoryCeph()
    hv = MemoryHypervisor()
    cfg = config(spare, two_hosts)
    for vm in cfg.vms:
        hv.define(vm.uri, vm.domain, active=True)
    proof = MemoryFencer(ceph, "rbd", "img", {vm.name: vm_user("demo", vm.name)
                                              for vm in cfg.vms})
    p = Provisioner(cfg, MemoryImageStore(ceph), MemoryCredentialStore(ceph), hv,
                    fence_proof=proof)
    p.provision()
    with contextlib.ExitStack() as qemus:
        for i in (1, 2, 3):
            qemus.enter_context(ceph.client(vm_user("demo", f"vm{i}"), "rbd", "img"))
        hv.calls.clear()
        yield FencedWriterRoles(p, MemoryFencedReaderRecord(), proof), hv, proof


def modes(roles: FencedWriterRoles) -> dict[str | None, DiskMode | None]:
    return {a.vm: a.mode for a in roles.provisioner.attachments()}


def test_a_fenced_writer_costs_the_critical_path_no_hot_plug_of_its_own() -> None:
    with fleet() as (roles, hv, proof):
        assert proof.fence("vm1")
        roles.make_writer("vm2")
        assert hv.calls == ["detach d2", "attach d2 rw"]  # the candidate's re-attach only
        assert modes(roles) == {"vm1": DiskMode.RW, "vm2": DiskMode.RW, "vm3": DiskMode.RO}
        roles.make_writer("vm2")  # idempotent: the fenced holder is no writer
        assert hv.calls == ["detach d2", "attach d2 rw"]
        roles.make_reader("vm1")  # the election's release, after the map is published
        assert hv.calls[2:] == ["detach d1", "attach d1 ro"]
        assert modes(roles) == {"vm1": DiskMode.RO, "vm2": DiskMode.RW, "vm3": DiskMode.RO}
        with pytest.raises(CoordinationError):
            roles.make_reader("vm2")  # the writer: the fleet would have none


def test_an_unfenced_writer_is_detached_first_never_two_unfenced_writers() -> None:
    with fleet() as (roles, hv, _proof):
        roles.make_writer("vm2")
        assert hv.calls == ["detach d1", "detach d2", "attach d1 ro", "attach d2 rw"]
        assert modes(roles) == {"vm1": DiskMode.RO, "vm2": DiskMode.RW, "vm3": DiskMode.RO}


def test_a_fenced_writer_whose_guest_is_paused_holds_up_nothing() -> None:
    with fleet() as (roles, hv, proof):
        hv.suspend(URI, "d1")
        assert proof.fence("vm1")
        roles.make_writer("vm3")
        assert hv.calls == ["detach d3", "attach d3 rw"]
        # paused: the config drops it, the live detach waits, and the release is not done
        # (DetachPending: the coordinator retries it with its backoff)
        with pytest.raises(DetachPending):
            roles.make_reader("vm1")
        assert roles.provisioner.pending_detach == {"vm1"}
        hv.resume(URI, "d1")
        roles.make_reader("vm1")
        assert modes(roles)["vm1"] is DiskMode.RO and not roles.provisioner.pending_detach


def test_the_role_switch_contract_holds() -> None:
    with fleet(spare=True) as (roles, _hv, _proof):
        def mode_of(node: str) -> DiskMode | None:
            return modes(roles)[node]
        check_role_switch(RoleSwitchSubject(roles, roles, "vm1", ("vm2", "vm3"), "vm4",
                                            mode_of))


def test_preparing_the_candidate_takes_only_its_read_only_disk() -> None:
    """Beside the fence: the candidate's <readonly/> disk goes, nobody gets a write path; the
    grant after the fence then costs one attach."""
    with fleet() as (roles, hv, proof):
        roles.prepare_writer("vm2")
        assert hv.calls == ["detach d2"]
        assert modes(roles) == {"vm1": DiskMode.RW, "vm2": None, "vm3": DiskMode.RO}
        roles.prepare_writer("vm2")  # nothing left to take
        roles.prepare_writer("vm1")  # a read-write holder is not the preparation's business
        assert hv.calls == ["detach d2"]
        assert proof.fence("vm1")
        roles.make_writer("vm2")
        assert hv.calls == ["detach d2", "attach d2 rw"]
        assert modes(roles) == {"vm1": DiskMode.RW, "vm2": DiskMode.RW, "vm3": DiskMode.RO}


def test_losing_the_writers_hypervisor_fences_what_it_hides_and_the_failover_goes_on() -> None:
    """vm1 (the writer) and vm3 lost with their host: vm1 is fenced by the failover, vm3 is
    fenced by the role switch (nobody can see what it holds), vm2 gets the read-write disk;
    the release waits for the host and then re-attaches both read-only (fresh clients)."""
    with fleet(two_hosts=True) as (roles, hv, proof):
        hv.unreachable.add(LOST)
        assert proof.fence("vm1")  # the failover's FenceNode
        roles.make_writer("vm2")
        assert proof.fenced == ["vm1", "vm3"]
        assert hv.calls == ["detach d2", "attach d2 rw"]
        with pytest.raises(HypervisorUnreachable):
            roles.make_reader("vm1")  # the release, retried by the election's backoff
        hv.unreachable.clear()
        roles.make_reader("vm1")
        assert hv.calls[2:] == ["detach d1", "attach d1 ro", "detach d3", "attach d3 ro"]
        assert modes(roles) == {"vm1": DiskMode.RO, "vm2": DiskMode.RW, "vm3": DiskMode.RO}
        assert not roles.record.fenced_readers() and not roles.provisioner.pending_detach


def test_a_coordinator_taking_over_re_attaches_the_readers_its_predecessor_fenced() -> None:
    """The readers fenced for a lost host are recorded in the state store before the fence:
    a successor that takes the lease while the host is still lost re-attaches them once it
    answers (from memory alone, they would stay blocklisted, unreadable, for good)."""
    with fleet(two_hosts=True) as (roles, hv, proof):
        board = MemoryLeaseBoard(FakeClock())
        first, successor = (MemoryStateStore(board, "demo", name) for name in ("a", "b"))
        assert first.acquire()
        hv.unreachable.add(LOST)
        assert proof.fence("vm1")
        FencedWriterRoles(roles.provisioner, first, proof).make_writer("vm2")
        assert proof.fenced == ["vm1", "vm3"]
        first.release()
        assert successor.acquire()
        taken_over = FencedWriterRoles(roles.provisioner, successor, proof)
        with pytest.raises(HypervisorUnreachable):
            taken_over.make_reader("vm1")
        hv.unreachable.clear()
        taken_over.make_reader("vm1")
        assert hv.calls[2:] == ["detach d1", "attach d1 ro", "detach d3", "attach d3 ro"]
        assert successor.fenced_readers() == frozenset()


def test_a_fenced_reader_dropped_from_the_config_is_forgotten() -> None:
    with fleet() as (roles, _hv, _proof):
        roles.record.record_fenced_readers(frozenset({"gone"}))
        roles.make_reader("vm3")
        assert roles.record.fenced_readers() == frozenset()


def test_a_lost_hypervisor_without_a_fencer_holds_the_switch_and_never_two_writers() -> None:
    with fleet(two_hosts=True) as (roles, hv, proof):
        hv.unreachable.add(LOST)
        proof.fence("vm1")
        blind = FencedWriterRoles(roles.provisioner, roles.record)  # no fencer: vm3 stays unproven
        with pytest.raises(HypervisorUnreachable, match="vm3"):
            blind.make_writer("vm2")
        assert hv.calls == []
        with pytest.raises(HypervisorUnreachable):
            roles.make_writer("vm3")  # a candidate on the lost host cannot get a disk


def test_a_reader_elsewhere_is_attached_while_a_hypervisor_is_lost() -> None:
    with fleet(two_hosts=True) as (roles, hv, _proof):
        hv.unreachable.add(LOST)
        roles.provisioner.set_role("vm2", "reader")  # already one: nothing to do, no error
        hv.detach_disk(URI, "d2", roles.provisioner.serial)
        roles.attach_spare("vm2")
        assert hv.calls[-1] == "attach d2 ro"
        with pytest.raises(HypervisorUnreachable):
            roles.provisioner.set_role("vm2", "writer")  # a writer needs every hypervisor


def test_making_the_configured_writer_a_reader_never_gives_it_a_writable_disk() -> None:
    """No read-write holder seen (the writer detached by hand): the configured writer made a
    reader gets a read-only disk, not the one its config would name."""
    with fleet() as (roles, hv, _proof):
        hv.detach_disk(URI, "d1", roles.provisioner.serial)
        roles.provisioner.set_role("vm1", "reader")
        assert hv.calls[-1] == "attach d1 ro"
