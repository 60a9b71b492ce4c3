"""Hypervisor contract: ``LibvirtHypervisor`` on a real libvirtd (``qemu:///system``, a domain
defined but never started) and ``MemoryHypervisor``.

Why a stopped domain: the sandbox's VM fixture boots three TCG guests (minutes, a shared
machine); a defined domain costs milliseconds and exercises the same libvirt calls for the
persistent config. What it leaves out is the live half of attach/detach (HOT_PLUG, the
guest's release of a disk): the vm-marked integration tests cover that on real guests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.sandbox.libvirtd import SYSTEM_URI
from orchestrator.testing.contracts import (
    HypervisorSubject,
    check_hypervisor,
    check_same_characteristics,
)
from orchestrator.testing.fakes import MemoryHypervisor

pytestmark = pytest.mark.contract


def libvirt_reads_back(uri: str, uuid: str) -> bool:
    """Whether libvirt hands a secret's value to a client (it must not: private)."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.secretLookupByUUIDString(uuid).value()
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
    return True


@pytest.fixture(params=["libvirt", "memory"])
def subject(request: pytest.FixtureRequest) -> Iterator[HypervisorSubject]:
    if request.param == "memory":
        fake = MemoryHypervisor()
        fake.define(SYSTEM_URI, "d1")
        yield HypervisorSubject(fake, SYSTEM_URI, "d1",
                                lambda uri, uuid: fake.read_secret(uri, uuid) is not None)
        return
    make: Callable[[int], list[str]] = request.getfixturevalue("stopped_domains")
    [name] = make(1)
    with LibvirtHypervisor() as hv:
        yield HypervisorSubject(hv, SYSTEM_URI, name, libvirt_reads_back)


def test_hypervisor_contract(subject: HypervisorSubject) -> None:
    check_hypervisor(subject)


def test_the_fake_declares_what_the_adapter_does() -> None:
    check_same_characteristics(LibvirtHypervisor, MemoryHypervisor)
