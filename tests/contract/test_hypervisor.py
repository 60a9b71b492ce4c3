"""Hypervisor contract: ``LibvirtHypervisor`` on a real libvirtd (``qemu:///system``) and
``MemoryHypervisor``.

The sandbox's VM fixture boots three TCG guests (minutes, on a shared machine), so the real
run uses two tiny domains instead (tests/contract/conftest.py): one defined and never started
(the persistent-config half of attach/detach), one started with nothing to boot, so QEMU really
opens the RBD disk with the VM user's cephx key from a private secret (HOT_PLUG) and no guest
ever releases it (DetachPending; libvirt waits ~5 s for the unplug before that). A guest that
does release its disk is covered by the vm-marked tests. Lifecycle events need no guest
either: a third tiny domain is paused, resumed, destroyed and started through libvirt itself,
as ``virsh`` would, while the adapter watches.

The real adapter runs twice: over the local socket (``qemu:///system``) and over SSH to the
same libvirtd (``qemu+ssh://root@127.0.0.1:PORT/system`` through a loopback sshd that pins its
host key, tests/fixtures/sshd.py): the same contract on both transports, as for a VM on
another hypervisor host.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from orchestrator.adapters.ceph import CephxCredentialStore
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.ports import DiskMode, DiskSpec, MonHost, SecretKey
from orchestrator.sandbox.libvirtd import SYSTEM_URI
from orchestrator.testing.contracts import (
    HypervisorSubject,
    LifecycleTarget,
    LiveTarget,
    check_hypervisor,
    check_hypervisor_events,
    check_same_characteristics,
)
from orchestrator.testing.fakes import MemoryHypervisor
from tests.fixtures.sshd import LoopbackSshd

pytestmark = pytest.mark.contract

TRANSPORTS = ["local", "ssh"]


def transport_uri(request: pytest.FixtureRequest, transport: str) -> str:
    """The sandbox's libvirtd over ``transport``: its socket, or SSH through a loopback sshd."""
    if transport == "local":
        return SYSTEM_URI
    sshd: LoopbackSshd = request.getfixturevalue("loopback_sshd")
    return sshd.uri("ssh")


def libvirt_reads_back(uri: str, secret: str) -> bool:
    """Whether libvirt hands a secret's value to a client (it must not: private)."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.secretLookupByUUIDString(secret).value()
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
    return True


@pytest.fixture(params=["libvirt", "libvirt+ssh", "memory"])
def subject(request: pytest.FixtureRequest) -> Iterator[HypervisorSubject]:
    if request.param == "memory":
        fake = MemoryHypervisor()
        fake.define(SYSTEM_URI, "d1")
        fake.define(SYSTEM_URI, "d2", active=True)
        fake.paused.add("d2")  # its guest cannot release a disk
        live = LiveTarget("d2", SecretKey(b"k" * 16), lambda secret: DiskSpec(
            "rbd", "img", "rbdfleet-contract02", "u", secret, (MonHost("127.0.0.1", 1),),
            DiskMode.RO))
        yield HypervisorSubject(fake, SYSTEM_URI, "d1",
                                lambda uri, secret: fake.read_secret(uri, secret) is not None, live)
        return
    uri = transport_uri(request, "ssh" if request.param == "libvirt+ssh" else "local")
    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    image = request.getfixturevalue("rbd_image_factory")(16 << 20, features=1)
    credentials = CephxCredentialStore(admin)
    user = f"rbdfleet-contract-{uuid.uuid4().hex[:8]}"
    key = credentials.ensure_user(user, cluster.pool, image)
    mons = credentials.mon_hosts()
    make: Callable[..., list[str]] = request.getfixturevalue("stopped_domains")
    [stopped] = make(1)
    [running] = make(1, start=True)
    live = LiveTarget(running, key, lambda secret: DiskSpec(
        cluster.pool, image, "rbdfleet-contract02", user, secret, mons, DiskMode.RO))
    try:
        with LibvirtHypervisor() as hv:
            yield HypervisorSubject(hv, uri, stopped, libvirt_reads_back, live)
    finally:
        credentials.remove_user(user)


def test_hypervisor_contract(subject: HypervisorSubject) -> None:
    check_hypervisor(subject)


def virsh(domain: str) -> Callable[[str], None]:
    """``act(verb)`` on ``domain`` through libvirt directly, as ``virsh VERB`` does."""
    import libvirt

    def act(verb: str) -> None:
        conn = libvirt.open(SYSTEM_URI)
        try:
            dom = conn.lookupByName(domain)
            {"suspend": dom.suspend, "resume": dom.resume, "destroy": dom.destroy,
             "start": dom.create}[verb]()
        finally:
            conn.close()
    return act


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_lifecycle_events_of_libvirt(stopped_domains: Callable[..., list[str]],
                                     request: pytest.FixtureRequest, transport: str) -> None:
    uri = transport_uri(request, transport)
    [running] = stopped_domains(1, start=True)
    with LibvirtHypervisor() as hv:
        check_hypervisor_events(hv, uri, LifecycleTarget(running, virsh(running)))


def test_lifecycle_events_of_the_fake() -> None:
    fake = MemoryHypervisor()
    fake.define(SYSTEM_URI, "d3", active=True)
    fake.define(SYSTEM_URI, "other", active=True)

    def act(verb: str) -> None:
        fake.suspend(SYSTEM_URI, "other")  # another domain's events are no business of d3's
        getattr(fake, verb)(SYSTEM_URI, "d3")
    check_hypervisor_events(fake, SYSTEM_URI, LifecycleTarget("d3", act))


def test_the_fake_declares_what_the_adapter_does() -> None:
    check_same_characteristics(LibvirtHypervisor, MemoryHypervisor)


def test_a_disk_only_in_a_running_domains_config_is_seen_and_detached(
        stopped_domains: Callable[..., list[str]]) -> None:
    """A disk in the persistent config of a running domain but not in the live one (it would
    come live at the next start) is listed with the domain's disks, and a detach removes it:
    a deprovision that missed it would leave the domain naming a secret it removed, unable
    to start."""
    import libvirt

    from orchestrator.adapters import domain_xml

    [running] = stopped_domains(1, start=True)
    spec = DiskSpec("rbd", "contract-image", "rbdfleet-contract03", "rbdfleet-contract-u",
                    str(uuid.uuid4()), (MonHost("127.0.0.1", 3300),), DiskMode.RW, "vdq")
    conn = libvirt.open(SYSTEM_URI)
    try:
        dom = conn.lookupByName(running)
        dom.attachDeviceFlags(domain_xml.disk_xml(spec), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        with LibvirtHypervisor() as hv:
            held = [d for d in hv.domain(SYSTEM_URI, running).disks if d.serial == spec.serial]
            assert [d.mode for d in held] == [DiskMode.RW], held
            hv.detach_disk(SYSTEM_URI, running, spec.serial)
            assert not [d for d in hv.domain(SYSTEM_URI, running).disks
                        if d.serial == spec.serial]
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert domain_xml.disk_element_xml(inactive, spec.serial) is None
    finally:
        conn.close()
