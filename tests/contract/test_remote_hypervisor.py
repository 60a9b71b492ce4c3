"""VMs on other hypervisor hosts: the libvirt adapter over ``qemu+ssh://`` (and
``qemu+libssh://``) to the sandbox's libvirtd, through loopback sshds that stand for hypervisor
hosts (tests/fixtures/sshd.py; host keys pinned, never auto-accepted).

What is proven here, beyond the hypervisor contract that tests/contract/test_hypervisor.py
runs over SSH too:

* a fleet on a remote host is provisioned, and the failover's libvirt steps run through
  SSH: the role switch contract (``ProvisionerRoles``) and the coordinator's own role switch
  (``FencedWriterRoles`` with the Ceph blocklist fencer);
* a bad or unreachable hypervisor (unknown host key, a key it does not authorize, a refused
  connection, a host that never answers) is ``HypervisorUnreachable`` naming the URI without
  its query (key paths), within a bounded time, never a prompt or a hang;
* a dropped SSH connection (its sshd killed) is opened again at the next call; one lost in
  the middle of a call is ``HypervisorUnreachable``, and a domain watch reconnects by itself
  and delivers events again;
* a whole host lost: the fence (the blocklist) needs no hypervisor, the other host keeps
  answering, and a role switch that must look at the lost host says which one it is, fast.

The domains are tiny QEMU domains (conftest.py here): no guest boots.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.ceph import BlocklistFencer, CephxCredentialStore, RbdImageStore
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.config import FleetConfig, display_uri, from_mapping
from orchestrator.coordinator.write_path import FencedWriterRoles
from orchestrator.core.placement import vm_user
from orchestrator.errors import HypervisorUnreachable
from orchestrator.ports import DiskMode, DiskSpec, DomainEvent, DomainState
from orchestrator.provision import Provisioner, ProvisionerRoles
from orchestrator.sandbox.libvirtd import SYSTEM_URI
from orchestrator.testing.contracts import (
    RoleSwitchSubject,
    check_role_switch,
    check_spare_provisioner,
)
from orchestrator.testing.fakes import MemoryFencedReaderRecord
from tests.contract.test_credential_store import connected_as
from tests.fixtures.sshd import LoopbackSshd, SshdFactory

pytestmark = pytest.mark.contract

DomainMaker = Callable[..., list[str]]
# the error tests' connect timeout: short, so a silent host costs little (a working open
# takes 0.5-2 s, and more on a loaded machine: the fleets use the adapter's default)
CONNECT_TIMEOUT_S = 4.0
# an error must come within the adapter's connect timeout plus the slack of a loaded machine
ERROR_BOUND_S = CONNECT_TIMEOUT_S + 4.0


def virsh(domain: str, verb: str) -> None:
    """``virsh VERB domain`` on the local socket (what happens on the hypervisor host)."""
    import libvirt

    conn = libvirt.open(SYSTEM_URI)
    try:
        dom = conn.lookupByName(domain)
        {"suspend": dom.suspend, "resume": dom.resume}[verb]()
    finally:
        conn.close()


# -- errors ------------------------------------------------------------------------------


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port whose listener takes connections and never says a word (a host
    that swallows the session: the SSH banner never comes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_port(uri: str, sshd: LoopbackSshd, port: int) -> str:
    return uri.replace(f"127.0.0.1:{sshd.port}/", f"127.0.0.1:{port}/", 1)


@pytest.mark.parametrize("transport", ["ssh", "libssh"])
@pytest.mark.parametrize("case", ["unknown host key", "unauthorized key", "refused",
                                  "never answers"])
def test_unreachable_hypervisors_are_one_clear_error_in_bounded_time(
        loopback_sshd: LoopbackSshd, tmp_path: Path, transport: str, case: str) -> None:
    """Each case fails the open, and says so naming the URI but none of its files (every
    key and known_hosts file of the test is under ``tmp_path``)."""
    sshd = loopback_sshd
    with contextlib.ExitStack() as stack:
        if case == "unknown host key":
            empty = tmp_path / "empty_known_hosts"
            empty.write_text("")
            uri = sshd.uri(transport, known_hosts=empty)
        elif case == "unauthorized key":
            stranger = tmp_path / "stranger_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                           check=True, capture_output=True, timeout=20)
            uri = sshd.uri(transport, key=stranger)
        elif case == "refused":
            uri = with_port(sshd.uri(transport), sshd, closed_port())
        else:
            uri = with_port(sshd.uri(transport), sshd, stack.enter_context(silent_port()))
        started = time.monotonic()
        with LibvirtHypervisor(connect_timeout=CONNECT_TIMEOUT_S) as hv, \
                pytest.raises(HypervisorUnreachable) as err:
            hv.domains(uri)
        elapsed = time.monotonic() - started
    message = str(err.value)
    assert elapsed < ERROR_BOUND_S, (case, elapsed, message)
    assert err.value.uri == display_uri(uri) and display_uri(uri) in message, message
    assert "keyfile" not in message and str(tmp_path) not in message, message


# -- dropped connections -----------------------------------------------------------------


def test_a_dropped_connection_is_opened_again_at_the_next_call(
        loopback_sshd: LoopbackSshd, stopped_domains: DomainMaker) -> None:
    [name] = stopped_domains(1)
    uri = loopback_sshd.uri("ssh")
    with LibvirtHypervisor() as hv:
        assert hv.domain(uri, name).name == name
        dropped = loopback_sshd.drop_connections()
        assert dropped, "the adapter's connection had no sshd"
        time.sleep(0.5)  # the client's event loop sees the end of the session
        assert hv.domain(uri, name).name == name
        assert loopback_sshd.connections() and not set(dropped) & set(
            loopback_sshd.connections())


def test_a_watch_reconnects_after_its_ssh_connection_drops(
        loopback_sshd: LoopbackSshd, stopped_domains: DomainMaker,
        caplog: pytest.LogCaptureFixture) -> None:
    """Events of the gap are lost (the coordinator has its probes meanwhile); those after
    the watch says it is restored arrive."""
    [running] = stopped_domains(1, start=True)
    uri = loopback_sshd.uri("ssh")
    events: list[DomainEvent] = []
    seen = threading.Condition()

    def on_event(event: DomainEvent) -> None:
        if event.domain == running:
            with seen:
                events.append(event)
                seen.notify_all()

    def wait_for(state: DomainState) -> None:
        with seen:
            assert seen.wait_for(lambda: any(e.state is state for e in events), 20), events
            events.clear()

    with LibvirtHypervisor() as hv:
        stop = hv.watch_domains(uri, on_event)
        try:
            virsh(running, "suspend")
            wait_for(DomainState.PAUSED)
            with caplog.at_level(logging.WARNING, "orchestrator.adapters.libvirt"):
                dropped = set(loopback_sshd.drop_connections())
                assert dropped
                deadline = time.monotonic() + 30
                while "event=domain_watch_restored" not in caplog.text:
                    assert time.monotonic() < deadline, f"no reconnect: {caplog.text}"
                    time.sleep(0.1)
            assert "event=domain_watch_lost" in caplog.text
            assert set(loopback_sshd.connections()) - dropped
            virsh(running, "resume")
            wait_for(DomainState.RUNNING)
        finally:
            stop()


@dataclass
class LiveDisk:
    """A running tiny domain on ``uri`` and an RBD disk it can open (its user's secret)."""

    uri: str
    domain: str
    spec: DiskSpec


@pytest.fixture
def live_disk(request: pytest.FixtureRequest, loopback_sshd: LoopbackSshd,
              stopped_domains: DomainMaker) -> Iterator[LiveDisk]:
    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    image = request.getfixturevalue("rbd_image_factory")(16 << 20, features=1)
    credentials = CephxCredentialStore(admin)
    user = f"rbdfleet-remote-{uuid.uuid4().hex[:8]}"
    key = credentials.ensure_user(user, cluster.pool, image)
    [running] = stopped_domains(1, start=True)
    uri = loopback_sshd.uri("ssh")
    usage = f"rbdfleet-remote-{uuid.uuid4().hex[:8]}"
    try:
        with LibvirtHypervisor() as hv:
            secret = hv.ensure_secret(uri, usage, key)
            try:
                yield LiveDisk(uri, running, DiskSpec(
                    cluster.pool, image, "rbdfleet-remote01", user, secret,
                    credentials.mon_hosts(), DiskMode.RO))
            finally:
                hv.remove_secret(uri, usage)
    finally:
        credentials.remove_user(user)


def test_a_watch_of_a_host_down_at_the_start_begins_once_it_answers(
        loopback_sshd: LoopbackSshd, stopped_domains: DomainMaker,
        caplog: pytest.LogCaptureFixture) -> None:
    """A coordinator starting while a hypervisor host is down watches it from when it
    answers (``keep_trying``); without it the watch is HypervisorUnreachable at once."""
    [running] = stopped_domains(1, start=True)
    uri = loopback_sshd.uri("ssh")
    paused = threading.Event()

    def on_event(event: DomainEvent) -> None:
        if event.domain == running and event.state is DomainState.PAUSED:
            paused.set()

    loopback_sshd.stop()
    back: LoopbackSshd | None = None
    with LibvirtHypervisor() as hv, \
            caplog.at_level(logging.WARNING, "orchestrator.adapters.libvirt"):
        with pytest.raises(HypervisorUnreachable):
            hv.watch_domains(uri, on_event)
        stop = hv.watch_domains(uri, on_event, keep_trying=True)
        try:
            assert "event=domain_watch_failed" in caplog.text
            back = loopback_sshd.restart()
            deadline = time.monotonic() + 30
            while "event=domain_watch_restored" not in caplog.text:
                assert time.monotonic() < deadline, f"never watched: {caplog.text}"
                time.sleep(0.1)
            virsh(running, "suspend")
            assert paused.wait(20), "no event after the host answered"
        finally:
            stop()
            virsh(running, "resume")
            if back is not None:
                back.stop()


def test_a_connection_lost_in_the_middle_of_a_call_is_hypervisor_unreachable(
        loopback_sshd: LoopbackSshd, live_disk: LiveDisk) -> None:
    """The detach of a disk no guest releases waits (libvirt's unplug wait, then ours); the
    SSH connection is cut meanwhile: the call ends at once with HypervisorUnreachable, not
    DetachPending after the whole wait, and the next call works over a new connection."""
    with LibvirtHypervisor() as hv:
        hv.attach_disk(live_disk.uri, live_disk.domain, live_disk.spec)
        cut = threading.Timer(1.0, loopback_sshd.drop_connections)
        cut.start()
        started = time.monotonic()
        try:
            with pytest.raises(HypervisorUnreachable, match="connection lost"):
                hv.detach_disk(live_disk.uri, live_disk.domain, live_disk.spec.serial, 30.0)
        finally:
            cut.cancel()
        assert time.monotonic() - started < 20.0  # the whole wait: 30 s and libvirt's ~5 s
        disks = hv.domain(live_disk.uri, live_disk.domain).disks
        assert [d.serial for d in disks] == [live_disk.spec.serial], disks


# -- a fleet on remote hypervisor hosts --------------------------------------------------
#
# Every "host" here is the same libvirtd behind another sshd, so each URI lists every domain:
# a fleet spread over two of them would see each domain twice (once per URI), which no two
# real hosts do. The fleet therefore lives on one remote host; the lost-host test puts half
# of it on a second one only once the first is gone.

NODES = ("vm1", "vm2", "vm3", "spare")


@dataclass
class RemoteFleet:
    """A provisioned fleet on stopped domains, all on host A (``uri``): vm1 the writer, vm2
    and vm3 readers, a spare."""

    cluster: Any
    admin: Any
    tmp: Path
    name: str
    domains: dict[str, str]
    host: LoopbackSshd
    hv: LibvirtHypervisor
    fencer: BlocklistFencer

    def config(self, uri_of: Callable[[str], str]) -> FleetConfig:
        """The fleet's config with each VM on ``uri_of(vm)``."""
        return from_mapping({
            "ceph": {"conf": str(self.cluster.conf), "keyring": str(self.cluster.keyring),
                     "pool": self.cluster.pool},
            "ssh": {"key": str(self.tmp / "key"), "known_hosts": str(self.tmp / "known_hosts")},
            "fleet": {"name": self.name, "image": f"{self.name}-image", "size": "16MiB",
                      "writer": "vm1", "secret_file": str(self.tmp / "fleet.secret")},
            "vm": [{"name": n, "domain": d, "address": f"10.98.0.{i}", "uri": uri_of(n),
                    "spare": n == "spare"} for i, (n, d) in enumerate(self.domains.items(), 1)],
        })

    def provisioner(self, uri_of: Callable[[str], str] | None = None,
                    hv: LibvirtHypervisor | None = None) -> Provisioner:
        config = self.config(uri_of or (lambda _vm: self.host.uri("ssh")))
        return Provisioner(config, RbdImageStore(self.admin), CephxCredentialStore(self.admin),
                           hv or self.hv, fence_proof=self.fencer)

    def mode_of(self, node: str) -> DiskMode | None:
        return next(row.mode for row in self.provisioner().attachments() if row.vm == node)


@pytest.fixture
def remote_fleet(request: pytest.FixtureRequest, tmp_path: Path, loopback_sshd: LoopbackSshd,
                 stopped_domains: DomainMaker) -> Iterator[RemoteFleet]:
    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    name = f"r{uuid.uuid4().hex[:8]}"
    fencer = BlocklistFencer(admin, cluster.pool, f"{name}-image",
                             {n: vm_user(name, n) for n in NODES})
    domains = dict(zip(NODES, stopped_domains(len(NODES)), strict=True))
    with LibvirtHypervisor() as hv:
        fleet = RemoteFleet(cluster, admin, tmp_path, name, domains, loopback_sshd, hv, fencer)
        fleet.provisioner().provision()
        try:
            yield fleet
        finally:  # over the local socket: the remote host may be lost by now
            with LibvirtHypervisor() as local:
                fleet.provisioner(lambda _vm: SYSTEM_URI, local).deprovision(delete_image=True)


def test_role_switch_contract_over_ssh(remote_fleet: RemoteFleet) -> None:
    roles = ProvisionerRoles(remote_fleet.provisioner())
    subject = RoleSwitchSubject(roles, roles, "vm1", ("vm3", "vm2"), "spare",
                                remote_fleet.mode_of)
    check_role_switch(subject)
    check_spare_provisioner(subject)


@contextlib.contextmanager
def watching(client: Any, pool: str, image: str) -> Iterator[None]:
    """The image open (a watcher) through ``client``, closed afterwards if it still can be."""
    import rbd

    with client.open_ioctx(pool) as ioctx:
        handle = rbd.Image(ioctx, image)
        try:
            yield
        finally:
            with contextlib.suppress(rbd.Error, OSError):  # a fenced handle cannot close
                handle.close()


@contextlib.contextmanager
def qemu_clients(fleet: RemoteFleet, vms: tuple[str, ...]) -> Iterator[None]:
    """No guest runs: each of ``vms`` gets the Ceph client its QEMU would hold, a librbd
    handle of the image as the VM's own user (a VM without any client counts as fenced)."""
    credentials = CephxCredentialStore(fleet.admin)
    image = f"{fleet.name}-image"
    with contextlib.ExitStack() as clients:
        for vm in vms:
            user = vm_user(fleet.name, vm)
            key = credentials.ensure_user(user, fleet.cluster.pool, image)  # the same key
            client = clients.enter_context(connected_as(fleet.cluster, user, key,
                                                        fleet.tmp / f"{vm}.keyring"))
            clients.enter_context(watching(client, fleet.cluster.pool, image))
        yield


def test_failover_steps_over_ssh(remote_fleet: RemoteFleet) -> None:
    """The coordinator's steps: fence the writer (the Ceph blocklist: no hypervisor), give a
    candidate the read-write disk without touching the fenced writer's (``FencedWriterRoles``),
    then release the fenced writer's disk to read-only. No guest runs, so the writer's and
    the candidate's Ceph clients are librbd handles of the image as their VMs' users, as their
    QEMUs would hold it (a VM without any client would count as fenced)."""
    fleet = remote_fleet
    roles = FencedWriterRoles(fleet.provisioner(), MemoryFencedReaderRecord())
    earlier = set(fleet.fencer.blocklist())
    with qemu_clients(fleet, ("vm1", "vm3")):
        try:
            fleet.fencer.fence("vm1")
            assert fleet.fencer.is_fenced("vm1") and not fleet.fencer.is_fenced("vm3")
            roles.make_writer("vm3")
            modes = {n: fleet.mode_of(n) for n in NODES}
            assert modes == {"vm1": DiskMode.RW, "vm2": DiskMode.RO, "vm3": DiskMode.RW,
                             "spare": None}, modes  # vm1 keeps its fenced disk until released
            roles.make_reader("vm1")
            modes = {n: fleet.mode_of(n) for n in NODES}
            assert modes == {"vm1": DiskMode.RO, "vm2": DiskMode.RO, "vm3": DiskMode.RW,
                             "spare": None}, modes
        finally:
            fleet.fencer.unfence(sorted(set(fleet.fencer.blocklist()) - earlier))


def test_a_lost_host_is_fenced_through_ceph_and_the_switch_passes_it_over(
        remote_fleet: RemoteFleet, sshd_factory: SshdFactory) -> None:
    """The fleet as if spread over two hosts: vm1 (the writer) and vm2 on host A, vm3 and the
    spare on host B; vm1, vm2 and vm3 hold Ceph clients as their QEMUs would. Host A is lost
    (its sshd stops, connections and all). The fence is the blocklist and still works; host
    B still answers. A role switch that cannot fence what it cannot see fails at once naming
    host A (vm2 there may hold anything); the coordinator's, with the fencer, blocklists vm2
    too and gives vm3 the read-write disk through host B (docs/operations.md, "Multi-host
    layout")."""
    fleet = remote_fleet
    lost, alive = fleet.host, sshd_factory()
    on_a = {"vm1", "vm2"}
    record = MemoryFencedReaderRecord()
    earlier = set(fleet.fencer.blocklist())
    with qemu_clients(fleet, ("vm1", "vm2", "vm3")):
        try:
            lost.stop()
            fleet.fencer.fence("vm1")
            assert fleet.fencer.is_fenced("vm1") and not fleet.fencer.is_fenced("vm2")
            with LibvirtHypervisor() as hv:
                assert hv.domains(alive.uri("ssh"))
                spread = fleet.provisioner(
                    lambda vm: (lost if vm in on_a else alive).uri("ssh"), hv)
                started = time.monotonic()
                with pytest.raises(HypervisorUnreachable) as err:
                    FencedWriterRoles(spread, record).make_writer("vm3")
                assert time.monotonic() - started < 2 * ERROR_BOUND_S
                assert err.value.uri == display_uri(lost.uri("ssh")), err.value
                assert "vm2" in str(err.value)
                roles = FencedWriterRoles(spread, record, fleet.fencer)
                roles.make_writer("vm3")
                assert record.names == {"vm2"} and fleet.fencer.is_fenced("vm2")
                observed = spread.observe(tolerate_unreachable=True)
                assert observed.unreachable == {lost.uri("ssh")}
                vm3 = spread.desired.vm("vm3")
                assert observed.disks[vm3.key].mode is DiskMode.RW
        finally:
            fleet.fencer.unfence(sorted(set(fleet.fencer.blocklist()) - earlier))
