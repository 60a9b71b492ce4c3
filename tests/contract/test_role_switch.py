"""RoleSwitch and SpareProvisioner contract: ``ProvisionerRoles`` (the provisioner over real
Ceph and a real libvirtd) and ``MemoryRoles``.

The real fleet is four domains defined but never started (see tests/contract/conftest.py):
a writer, two readers, a spare, each with its own cephx user and libvirt secret; the role
switch then re-attaches the shared disk in the domains' persistent config. The live half
(a guest releasing its disk) is covered by the vm-marked tests.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.adapters.ceph import CephxCredentialStore, RbdImageStore
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.config import from_mapping
from orchestrator.ports import DiskMode
from orchestrator.provision import Provisioner, ProvisionerRoles
from orchestrator.sandbox.libvirtd import SYSTEM_URI
from orchestrator.testing.contracts import (
    RoleSwitchSubject,
    check_role_switch,
    check_spare_provisioner,
)
from orchestrator.testing.fakes import MemoryRoles

pytestmark = pytest.mark.contract

NODES = ("vm1", "vm2", "vm3", "spare")


@contextlib.contextmanager
def provisioner(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Provisioner]:
    """A provisioned fleet of :data:`NODES` on stopped domains; deprovisioned afterwards."""
    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    make: Callable[[int], list[str]] = request.getfixturevalue("stopped_domains")
    domains = dict(zip(NODES, make(len(NODES)), strict=True))
    fleet = f"c{uuid.uuid4().hex[:8]}"
    config = from_mapping({
        "ceph": {"conf": str(cluster.conf), "keyring": str(cluster.keyring),
                 "pool": cluster.pool},
        "ssh": {"key": str(tmp_path / "key"), "known_hosts": str(tmp_path / "known_hosts")},
        "fleet": {"name": fleet, "image": f"{fleet}-image", "size": "16MiB", "writer": "vm1",
                  "secret_file": str(tmp_path / "fleet.secret")},
        "vm": [{"name": n, "domain": d, "address": f"10.99.0.{i}", "uri": SYSTEM_URI,
                "spare": n == "spare"} for i, (n, d) in enumerate(domains.items(), 1)],
    })
    with LibvirtHypervisor() as hv:
        p = Provisioner(config, RbdImageStore(admin), CephxCredentialStore(admin), hv)
        p.provision()
        try:
            yield p
        finally:
            p.deprovision(delete_image=True)


def modes(p: Provisioner) -> Callable[[str], DiskMode | None]:
    def mode_of(node: str) -> DiskMode | None:
        return next(row.mode for row in p.attachments() if row.vm == node)

    return mode_of


@pytest.fixture(params=["provisioner", "memory"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RoleSwitchSubject]:
    if request.param == "memory":
        fake = MemoryRoles("vm1", ("vm2", "vm3"), ("spare",))
        yield RoleSwitchSubject(fake, fake, "vm1", ("vm2", "vm3"), "spare", fake.mode_of)
        return
    with provisioner(request, tmp_path) as p:
        roles = ProvisionerRoles(p)
        yield RoleSwitchSubject(roles, roles, "vm1", ("vm2", "vm3"), "spare", modes(p))


def test_role_switch_contract(subject: RoleSwitchSubject) -> None:
    check_role_switch(subject)


def test_spare_provisioner_contract(subject: RoleSwitchSubject) -> None:
    check_spare_provisioner(subject)
