"""orchestrator.provision.Provisioner over small in-memory ports: the order it applies a plan,
what it reports when an action fails midway, and that it never hands a key to a log."""

from __future__ import annotations

import logging

import pytest

from orchestrator.config import FleetConfig, from_mapping
from orchestrator.core.placement import Attach, Plan
from orchestrator.errors import CoordinationError, DetachPending, DeviceAttachError
from orchestrator.ports import (
    AttachedDisk,
    ClientSession,
    DiskMode,
    DiskSpec,
    DomainInfo,
    ImageInfo,
    MonHost,
    SecretKey,
    Watcher,
)
from orchestrator.provision import FENCED_DETACH_WAIT_S, Provisioner, check_partial, undo_hint

pytestmark = pytest.mark.unit

KEY = b"k" * 16


def config() -> FleetConfig:
    return from_mapping({
        "ceph": {"conf": "/c/ceph.conf", "keyring": "/c/keyring", "mon_host": "127.0.0.1:1"},
        "ssh": {"key": "/k", "known_hosts": "/kh"},
        "fleet": {"name": "demo", "image": "img", "size": "64MiB", "writer": "vm1",
                  "secret_file": "/s"},
        "vm": [{"name": f"vm{i}", "domain": f"d{i}", "address": f"10.0.0.{i}"}
               for i in (1, 2, 3)],
    })


class MemoryImages:
    def __init__(self) -> None:
        self.images: dict[tuple[str, str], ImageInfo] = {}

    def pool_exists(self, pool: str) -> bool:
        return pool == "rbd"

    def create_pool(self, pool: str) -> None:
        raise AssertionError("not expected")

    def image_info(self, pool: str, name: str) -> ImageInfo | None:
        return self.images.get((pool, name))

    def create_image(self, pool: str, name: str, size: int, features: int) -> None:
        self.images[(pool, name)] = ImageInfo(pool, name, size, features)

    def remove_image(self, pool: str, name: str) -> None:
        del self.images[(pool, name)]

    def watchers(self, pool: str, name: str) -> list[Watcher]:
        return []


class MemoryCredentials:
    def __init__(self) -> None:
        self.users: set[str] = set()

    def list_users(self, prefix: str) -> list[str]:
        return sorted(f"client.{u}" for u in self.users if u.startswith(prefix))

    def ensure_user(self, user: str, pool: str) -> SecretKey:
        self.users.add(user)
        return SecretKey(KEY)

    def remove_user(self, user: str) -> None:
        self.users.discard(user)

    def sessions(self) -> list[ClientSession]:
        return []

    def mon_hosts(self) -> tuple[MonHost, ...]:
        raise AssertionError("config.ceph.mon_host is set: the monmap is not asked")


class MemoryHypervisor:
    def __init__(self, failing_domain: str | None = None) -> None:
        self.disks: dict[str, list[AttachedDisk]] = {f"d{i}": [] for i in (1, 2, 3)}
        self.secrets: dict[str, SecretKey] = {}
        self.calls: list[str] = []
        self.failing_domain = failing_domain
        self.paused: set[str] = set()  # their guests cannot release a disk
        self.timeouts: list[float | None] = []

    def domain(self, uri: str, name: str) -> DomainInfo:
        return DomainInfo(uri, name, True, tuple(self.disks[name]))

    def domains(self, uri: str) -> list[DomainInfo]:
        return [self.domain(uri, n) for n in sorted(self.disks)]

    def secret_uuid(self, uri: str, usage: str) -> str | None:
        return f"uuid-{usage}" if usage in self.secrets else None

    def ensure_secret(self, uri: str, usage: str, key: SecretKey) -> str:
        self.secrets[usage] = key
        return f"uuid-{usage}"

    def remove_secret(self, uri: str, usage: str) -> None:
        self.secrets.pop(usage, None)

    def attach_disk(self, uri: str, domain: str, disk: DiskSpec) -> None:
        if domain == self.failing_domain:
            raise DeviceAttachError(f"attach to {domain}: refused")
        assert disk.mon_hosts == (MonHost("127.0.0.1", 1),)
        self.calls.append(f"attach {domain} {disk.mode}")
        self.disks[domain].append(AttachedDisk(disk.serial, disk.pool, disk.image, disk.user,
                                               disk.mode, disk.target))

    def detach_disk(self, uri: str, domain: str, serial: str,
                    live_timeout: float | None = None) -> None:
        self.calls.append(f"detach {domain}")
        self.timeouts.append(live_timeout)
        if domain in self.paused:
            raise DetachPending(f"detach from {domain}: paused", domain)
        self.disks[domain] = [d for d in self.disks[domain] if d.serial != serial]


class ListedFences:
    """FenceProof: the VMs named in ``fenced`` are blocklisted."""

    def __init__(self) -> None:
        self.fenced: set[str] = set()

    def is_fenced(self, vm: str) -> bool:
        return vm in self.fenced


def test_role_switch_goes_past_a_paused_writer_only_when_it_is_fenced(
        caplog: pytest.LogCaptureFixture) -> None:
    hv, proof = MemoryHypervisor(), ListedFences()
    p = Provisioner(config(), MemoryImages(), MemoryCredentials(), hv, fence_proof=proof)
    p.provision()
    hv.paused.add("d1")
    hv.calls.clear()
    with pytest.raises(DetachPending):  # not fenced: vm1 could still write, stop here
        p.set_role("vm2", "writer")
    assert hv.calls == ["detach d1"] and hv.timeouts == [None]
    proof.fenced.add("vm1")
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


def test_a_new_writer_is_never_attached_next_to_an_unfenced_one() -> None:
    hv, proof = MemoryHypervisor(), ListedFences()
    p = Provisioner(config(), MemoryImages(), MemoryCredentials(), hv, fence_proof=proof)
    p.provision()
    proof.fenced.add("vm1")
    assert p.set_role("vm1", "writer")[0].empty
    observed = p.observe()  # one read-write holder: its fence is not even asked about
    assert observed.fenced == frozenset()
    rw = Attach("qemu:///system", "d2", "vm2", "u", "s", DiskMode.RW, True)
    with pytest.raises(CoordinationError, match="two VMs"):
        p.apply(Plan((rw,)), observed)
    assert hv.calls[-1] == "attach d1 rw"  # nothing attached since provision


def test_provision_set_role_and_deprovision_in_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    images, creds, hv = MemoryImages(), MemoryCredentials(), MemoryHypervisor()
    p = Provisioner(config(), images, creds, hv)
    plan, applied = p.provision()
    assert len(applied) == len(plan.actions) == 7
    assert hv.calls == ["attach d2 ro", "attach d3 ro", "attach d1 rw"]
    assert p.provision()[0].empty
    hv.calls.clear()
    p.set_role("vm3", "writer")
    assert hv.calls == ["detach d1", "detach d3", "attach d1 ro", "attach d3 rw"]
    p.deprovision(delete_image=True)
    assert images.images == {} and creds.users == set() and hv.secrets == {}
    assert all(not disks for disks in hv.disks.values())
    assert KEY.decode() not in caplog.text


def test_a_failure_midway_reports_what_was_done_and_how_to_undo() -> None:
    p = Provisioner(config(), MemoryImages(), MemoryCredentials(),
                    MemoryHypervisor(failing_domain="d3"))
    with pytest.raises(DeviceAttachError) as err:
        p.provision()
    done = [str(a.action) for a in check_partial(err.value)]
    assert done[0].startswith("create image rbd/img")
    assert done[-1].startswith("attach ro disk to d2")
    assert "rbdfleet deprovision" in undo_hint(check_partial(err.value), "demo")
    assert undo_hint([], "demo") == "nothing was changed"


def test_dry_run_changes_nothing() -> None:
    images, creds, hv = MemoryImages(), MemoryCredentials(), MemoryHypervisor()
    plan, applied = Provisioner(config(), images, creds, hv).provision(dry_run=True)
    assert len(plan.actions) == 7 and applied == []
    assert images.images == {} and creds.users == set() and hv.calls == []
