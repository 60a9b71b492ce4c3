"""orchestrator.provision.Provisioner over small in-memory ports: the order it applies a plan,
what it reports when an action fails midway, and that it never hands a key to a log."""

from __future__ import annotations

import base64
import contextlib
import logging

import pytest

from orchestrator.config import FleetConfig, from_mapping
from orchestrator.core.placement import USER_PREFIX, Attach, Plan, vm_user
from orchestrator.errors import (
    AdapterChosenPoorly,
    CoordinationError,
    DetachPending,
    DeviceAttachError,
)
from orchestrator.ports import Characteristics, DiskMode, MonHost
from orchestrator.provision import FENCED_DETACH_WAIT_S, Provisioner, check_partial, undo_hint
from orchestrator.testing.fakes import (
    MemoryCeph,
    MemoryCredentialStore,
    MemoryFencer,
    MemoryHypervisor,
    MemoryImageStore,
)

pytestmark = pytest.mark.unit

def config() -> FleetConfig:
    return from_mapping({
        "ceph": {"conf": "/c/ceph.conf", "keyring": "/c/keyring", "mon_host": "127.0.0.1:1"},
        "ssh": {"key": "/k", "known_hosts": "/kh"},
        "fleet": {"name": "demo", "image": "img", "size": "64MiB", "writer": "vm1",
                  "secret_file": "/s"},
        "vm": [{"name": f"vm{i}", "domain": f"d{i}", "address": f"10.0.0.{i}"}
               for i in (1, 2, 3)],
    })


URI = "qemu:///system"


def hypervisor(failing_domain: str | None = None) -> MemoryHypervisor:
    hv = MemoryHypervisor(failing_domain)
    for i in (1, 2, 3):
        hv.define(URI, f"d{i}", active=True)
    return hv


def ports(failing_domain: str | None = None
          ) -> tuple[MemoryCeph, MemoryImageStore, MemoryCredentialStore, MemoryHypervisor]:
    ceph = MemoryCeph()
    return ceph, MemoryImageStore(ceph), MemoryCredentialStore(ceph), hypervisor(failing_domain)


def fencer(ceph: MemoryCeph) -> MemoryFencer:
    return MemoryFencer(ceph, "rbd", "img", {f"vm{i}": vm_user("demo", f"vm{i}")
                                             for i in (1, 2, 3)})


def test_role_switch_goes_past_a_paused_writer_only_when_it_is_fenced(
        caplog: pytest.LogCaptureFixture) -> None:
    ceph, images, creds, hv = ports()
    proof = fencer(ceph)
    p = Provisioner(config(), images, creds, hv, fence_proof=proof)
    p.provision()
    qemus = contextlib.ExitStack()  # every VM's QEMU holds the image (a librbd client each)
    for i in (1, 2, 3):
        qemus.enter_context(ceph.client(vm_user("demo", f"vm{i}"), "rbd", "img"))
    hv.paused.add("d1")
    hv.calls.clear()
    with pytest.raises(DetachPending):  # not fenced: vm1 could still write, stop here
        p.set_role("vm2", "writer")
    assert hv.calls == ["detach d1"] and hv.timeouts == [None]
    assert proof.fence("vm1")
    hv.calls.clear()
    caplog.set_level(logging.WARNING)
    p.set_role("vm2", "writer")
    # vm1's read-only re-attach waits until its guest runs again; vm2 is the writer
    assert hv.calls == ["detach d1", "detach d2", "attach d2 rw"]
    assert hv.timeouts[-2] == FENCED_DETACH_WAIT_S and p.pending_detach == {"vm1"}
    assert "still holds a fenced read-write disk" in caplog.text  # never silently
    assert {vm.vm: vm.mode for vm in p.attachments()} == {
        "vm1": DiskMode.RW, "vm2": DiskMode.RW, "vm3": DiskMode.RO}
    assert p.set_role("vm2", "writer")[0].empty  # the fenced holder is no writer
    hv.paused.clear()  # the guest runs again: the coordinator's demotion completes it
    hv.calls.clear()
    p.set_role("vm1", "reader")
    assert hv.calls == ["detach d1", "attach d1 ro"] and p.pending_detach == set()
    assert p.provision()[0].empty
    qemus.close()


def test_a_new_writer_is_never_attached_next_to_an_unfenced_one() -> None:
    ceph, images, creds, hv = ports()
    p = Provisioner(config(), images, creds, hv, fence_proof=fencer(ceph))
    p.provision()
    assert p.set_role("vm1", "writer")[0].empty
    observed = p.observe()  # one read-write holder: its fence is not even asked about
    assert observed.fenced == frozenset()
    rw = Attach("qemu:///system", "d2", "vm2", "u", "s", DiskMode.RW, True)
    with pytest.raises(CoordinationError, match="two VMs"):
        p.apply(Plan((rw,)), observed)
    assert hv.calls[-1] == "attach d1 rw"  # nothing attached since provision


def test_a_fence_proof_that_does_not_wait_for_the_osds_is_refused() -> None:
    class Hasty:
        """Answers from the blocklist alone, before the OSDs enforce it."""

        CHARACTERISTICS = Characteristics.FENCES_BY_CLIENT_ADDRESS

        def is_fenced(self, vm: str) -> bool:
            return True

    _, images, creds, hv = ports()
    with pytest.raises(AdapterChosenPoorly, match=r"Hasty.*WAITS_FOR_OSDMAP"):
        Provisioner(config(), images, creds, hv, fence_proof=Hasty())


def test_provision_set_role_and_deprovision_in_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ceph, images, creds, hv = ports()
    p = Provisioner(config(), images, creds, hv)
    plan, applied = p.provision()
    assert len(applied) == len(plan.actions) == 7
    assert hv.calls == ["attach d2 ro", "attach d3 ro", "attach d1 rw"]
    assert p.provision()[0].empty
    hv.calls.clear()
    p.set_role("vm3", "writer")
    assert hv.calls == ["detach d1", "detach d3", "attach d1 ro", "attach d3 rw"]
    keys = [k.reveal() for k in (creds.ensure_user(vm_user("demo", f"vm{i}"), "rbd", "img")
                                 for i in (1, 2, 3))]
    assert all(spec.mon_hosts == (MonHost("127.0.0.1", 1),) for spec in hv.specs)
    p.deprovision(delete_image=True)
    assert ceph.images == {} and creds.list_users(USER_PREFIX) == [] and hv.secrets == {}
    assert all(not disks for disks in hv.disks.values())
    for key in keys:
        assert key.hex() not in caplog.text
        assert base64.b64encode(key).decode() not in caplog.text


def test_a_failure_midway_reports_what_was_done_and_how_to_undo() -> None:
    _, images, creds, hv = ports(failing_domain="d3")
    p = Provisioner(config(), images, creds, hv)
    with pytest.raises(DeviceAttachError) as err:
        p.provision()
    done = [str(a.action) for a in check_partial(err.value)]
    assert done[0].startswith("create image rbd/img")
    assert done[-1].startswith("attach ro disk to d2")
    assert "rbdfleet deprovision" in undo_hint(check_partial(err.value), "demo")
    assert undo_hint([], "demo") == "nothing was changed"


def test_dry_run_changes_nothing() -> None:
    ceph, images, creds, hv = ports()
    plan, applied = Provisioner(config(), images, creds, hv).provision(dry_run=True)
    assert len(plan.actions) == 7 and applied == []
    assert ceph.images == {} and creds.list_users("rbdfleet-") == [] and hv.calls == []
