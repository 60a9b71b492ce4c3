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
from orchestrator.errors import CoordinationError, DetachPending
from orchestrator.ports import DiskMode
from orchestrator.provision import Provisioner
from orchestrator.testing.contracts import RoleSwitchSubject, check_role_switch
from orchestrator.testing.fakes import (
    MemoryCeph,
    MemoryCredentialStore,
    MemoryFencer,
    MemoryHypervisor,
    MemoryImageStore,
)

pytestmark = pytest.mark.unit

URI = "qemu:///system"


def config(spare: bool = False) -> FleetConfig:
    vms = [{"name": f"vm{i}", "domain": f"d{i}", "address": f"10.0.0.{i}"} for i in (1, 2, 3)]
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
def fleet(spare: bool = False) -> Iterator[tuple[FencedWriterRoles, MemoryHypervisor,
                                                 MemoryFencer]]:
    """vm1 writer, vm2/vm3 readers (each VM's QEMU holding a librbd client of the image)."""
    ceph = MemoryCeph()
    hv = MemoryHypervisor()
    names = (1, 2, 3, 4) if spare else (1, 2, 3)
    for i in names:
        hv.define(URI, f"d{i}", active=True)
    proof = MemoryFencer(ceph, "rbd", "img", {f"vm{i}": vm_user("demo", f"vm{i}") for i in names})
    p = Provisioner(config(spare), MemoryImageStore(ceph), MemoryCredentialStore(ceph), hv,
                    fence_proof=proof)
    p.provision()
    with contextlib.ExitStack() as qemus:
        for i in (1, 2, 3):
            qemus.enter_context(ceph.client(vm_user("demo", f"vm{i}"), "rbd", "img"))
        hv.calls.clear()
        yield FencedWriterRoles(p), hv, proof


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
