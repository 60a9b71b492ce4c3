"""Provisioning on real parts: sandbox Ceph, libvirtd, three TCG guests (issue 3).

One fleet per module on the session's VMs and cluster; tests run in file order and hand the
fleet on (writer vm1 → set-role → fence → add/remove → bad input → deprovision). Guest I/O is
``dd`` with O_DIRECT on the device found by serial with
``agents.backends.direct.find_device_by_serial``, run in the guest. Budget: ~2-3 min with the
VMs already booted (the session fixture's boot is shared with other modules).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shlex
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters import ceph
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.config import CephConfig, FleetConfig, load
from orchestrator.core.placement import Attach, fleet_user_prefix, secret_usage, vm_user
from orchestrator.errors import (
    ConfigError,
    CoordinationError,
    DomainNotFound,
    HypervisorError,
    StorageError,
)
from orchestrator.ports import DiskMode
from orchestrator.provision import Provisioner
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.sandbox.vms import VmSet

pytestmark = [pytest.mark.integration, pytest.mark.vm]

REPO = Path(__file__).resolve().parents[2]
GUEST_AGENTS = "/tmp/rbdfleet-agents"
MIB = 1 << 20
FIGURES: dict[str, float] = {}


def render(ceph_cluster: CephCluster, vms: VmSet, fleet: str, image: str, *, writer: str = "vm1",
           names: tuple[str, ...] = ("vm1", "vm2", "vm3"), size: str = "64MiB",
           pool: str = "rbd", keyring: Path | None = None, extra_vm: str = "",
           uri: str | Mapping[str, str] | None = None) -> str:
    """An rbdfleet.toml (docs/config.md) for the sandbox VMs ``names``; ``uri``: every VM's
    libvirt URI, or each one's by name (default: the VM's own)."""
    lines = [
        "[ceph]", f'conf = "{ceph_cluster.conf}"', f'keyring = "{keyring or ceph_cluster.keyring}"',
        f'pool = "{pool}"', f'mon_host = "{ceph_cluster.mon_v2}"',
        "[ssh]", f'key = "{vms.ssh_key}"', f'known_hosts = "{vms.known_hosts}"',
        "[fleet]", f'name = "{fleet}"', f'image = "{image}"', f'size = "{size}"',
        f"writer = {json.dumps(writer)}",
        'secret_file = "/nonexistent/fleet.secret"',
    ]
    for name in names:
        vm = vms.vm(name)
        vm_uri = uri.get(name, vm.uri) if isinstance(uri, Mapping) else uri or vm.uri
        lines += ["[[vm]]", f'name = "{vm.name}"', f'domain = "{vm.domain}"',
                  f'uri = "{vm_uri}"', f'address = "{vm.address}"']
    return "\n".join(lines) + "\n" + extra_vm


@dataclass
class Fleet:
    """The module's fleet: config files, a Ceph handle for checks, and guest helpers."""

    dir: Path
    cluster: CephCluster
    vms: VmSet
    handle: Any
    name: str
    image: str
    configs: dict[str, Path] = field(default_factory=dict)

    def write(self, label: str, text: str) -> Path:
        path = self.dir / f"{label}.toml"
        path.write_text(text)
        self.configs[label] = path
        return path

    def config(self, label: str = "main") -> FleetConfig:
        return load(self.configs[label], env={})

    def provisioner(self, hypervisor: LibvirtHypervisor, label: str = "main") -> Provisioner:
        return Provisioner(self.config(label), ceph.RbdImageStore(self.handle),
                           ceph.CephxCredentialStore(self.handle), hypervisor)

    def fencer(self) -> ceph.BlocklistFencer:
        cfg = self.config()
        return ceph.BlocklistFencer(self.handle, cfg.ceph.pool, cfg.fleet.image,
                                    {v.name: vm_user(self.name, v.name) for v in cfg.vms})

    def guest(self, vm: str, script: str,
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.vms.exec(vm, ["sh", "-c", script], timeout=timeout)

    def device(self, vm: str, serial: str, timeout: float = 30.0) -> str:
        """The guest's device for ``serial``, via agents.backends.direct (waits for hot-plug)."""
        code = ("import sys, time\n"
                f"sys.path.insert(0, {GUEST_AGENTS!r})\n"
                "from agents.backends.direct import find_device_by_serial\n"
                f"deadline = time.monotonic() + {timeout}\n"
                "while True:\n"
                "    try:\n"
                f"        print(find_device_by_serial({serial!r})); break\n"
                "    except Exception as exc:\n"
                "        if time.monotonic() > deadline: raise SystemExit(f'not found: {exc}')\n"
                "        time.sleep(0.2)\n")
        result = self.vms.exec(vm, ["python3", "-c", code], timeout=timeout + 30)
        assert result.returncode == 0, f"{vm}: {result.stderr.strip()}"
        return result.stdout.strip().splitlines()[-1]

    def write_block(self, vm: str, dev: str, offset_mib: int, token: str) -> tuple[int, str]:
        """O_DIRECT write of 1 MiB (random bytes + token) at ``offset_mib``: (rc, stderr)."""
        script = (f"head -c {MIB - 64} /dev/urandom > /tmp/blk && printf %-64s {token} >> /tmp/blk"
                  f" && dd if=/tmp/blk of={dev} bs=1M count=1 seek={offset_mib} oflag=direct "
                  "conv=notrunc,fsync 2>&1 >/dev/null")
        result = self.guest(vm, script)
        return result.returncode, result.stdout + result.stderr

    def guest_sha(self, vm: str, path: str) -> str:
        return self.guest(vm, f"sha256sum {path}").stdout.split()[0]

    def read_sha(self, vm: str, dev: str, offset_mib: int) -> tuple[int, str]:
        script = (f"dd if={dev} of=/tmp/rd bs=1M count=1 skip={offset_mib} iflag=direct "
                  "2>/dev/null && sha256sum /tmp/rd")
        result = self.guest(vm, script)
        return result.returncode, result.stdout.split()[0] if result.stdout else ""

    def host_read(self, offset: int, length: int) -> bytes:
        import rbd

        with self.handle.open_ioctx("rbd") as ioctx, \
                rbd.Image(ioctx, self.image, read_only=True) as image:
            return bytes(image.read(offset, length))


def push_agents(vms: VmSet, vm: str) -> None:
    """Copy the agents package to the guest (it has python3 only), as deploy would."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(REPO / "agents", arcname="agents",
                filter=lambda t: None if "__pycache__" in t.name else t)
    subprocess.run([*vms.ssh_argv(vm), shlex.join(
        ["sh", "-c", f"rm -rf {GUEST_AGENTS} && mkdir -p {GUEST_AGENTS} && "
                     f"tar -xzf - -C {GUEST_AGENTS}"])],
        input=buf.getvalue(), check=True, timeout=60, capture_output=True)


@contextlib.contextmanager
def open_fleet(ceph_cluster: CephCluster, sandbox_vms: VmSet, directory: Path,
               uri: str | None = None) -> Iterator[Fleet]:
    """A fleet of its own on the session's VMs (every libvirt call through ``uri`` when
    given), the agents pushed to the guests; deprovisioned (image deleted) after."""
    name = f"t{secrets.token_hex(3)}"
    handle = ceph.connect(CephConfig(conf=ceph_cluster.conf, keyring=ceph_cluster.keyring))
    world = Fleet(directory, ceph_cluster, sandbox_vms, handle, name, f"{name}-img")
    world.write("main", render(ceph_cluster, sandbox_vms, name, world.image, uri=uri))
    for vm in ("vm1", "vm2", "vm3"):
        push_agents(sandbox_vms, vm)
    try:
        yield world
    finally:
        try:
            with LibvirtHypervisor() as hv:
                world.provisioner(hv).deprovision(delete_image=True)
        finally:
            handle.shutdown()


@pytest.fixture(scope="module")
def fleet(ceph_cluster: CephCluster, sandbox_vms: VmSet,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with open_fleet(ceph_cluster, sandbox_vms, tmp_path_factory.mktemp("provision")) as world:
        yield world
    if FIGURES:
        print("\n[provision figures] " + json.dumps(FIGURES))


def modes(fleet: Fleet, hv: LibvirtHypervisor, label: str = "main") -> dict[str, DiskMode | None]:
    return {r.vm or r.domain: r.mode for r in fleet.provisioner(hv, label).attachments()}


def test_provision_attaches_writer_rw_readers_ro_and_second_run_is_a_noop(fleet: Fleet) -> None:
    with LibvirtHypervisor() as hv:
        p = fleet.provisioner(hv)
        t0 = time.monotonic()
        plan, applied = p.provision()
        FIGURES["provision_3_vms_first_s"] = round(time.monotonic() - t0, 3)
        assert applied and not plan.notes
        assert modes(fleet, hv) == {"vm1": DiskMode.RW, "vm2": DiskMode.RO, "vm3": DiskMode.RO}
        t0 = time.monotonic()
        plan, applied = p.provision()
        FIGURES["provision_3_vms_noop_s"] = round(time.monotonic() - t0, 3)
        assert plan.empty and applied == []
    info = ceph.RbdImageStore(fleet.handle).image_info("rbd", fleet.image)
    assert info is not None and info.size == 64 * MIB and info.features == 5
    users = ceph.CephxCredentialStore(fleet.handle).list_users(fleet_user_prefix(fleet.name))
    assert users == [f"client.{vm_user(fleet.name, v)}" for v in ("vm1", "vm2", "vm3")]


def rbdfleet(fleet: Fleet, label: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess, as an operator runs it."""
    return subprocess.run([str(REPO / ".venv" / "bin" / "rbdfleet"), *args,
                           "--config", str(fleet.configs[label])],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_reports_noop_lists_vms_and_maps_errors_to_exit_codes(fleet: Fleet) -> None:
    again = rbdfleet(fleet, "main", "provision")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    listing = json.loads(rbdfleet(fleet, "main", "vm", "list", "--json").stdout)
    assert {r["vm"]: r["mode"] for r in listing["vms"]} == {"vm1": "rw", "vm2": "ro", "vm3": "ro"}
    clients = json.loads(rbdfleet(fleet, "main", "vm", "clients", fleet.name, "vm1",
                                  "--json").stdout)
    assert len(clients["clients"]) == 1
    wrong_fleet = rbdfleet(fleet, "main", "vm", "clients", "other-fleet", "vm1")
    assert wrong_fleet.returncode == 2 and "other-fleet" in wrong_fleet.stderr
    fleet.write("cli-ghost", render(fleet.cluster, fleet.vms, fleet.name, fleet.image, extra_vm=(
        '[[vm]]\nname = "vm9"\ndomain = "no-such-domain-rbdfleet"\naddress = "10.87.9.9"\n')))
    ghost = rbdfleet(fleet, "cli-ghost", "provision", "--dry-run")
    assert ghost.returncode == 6, ghost.stderr
    assert ghost.stderr.strip().splitlines()[-1].startswith("rbdfleet: error: ")
    assert "Traceback" not in ghost.stderr


def test_writer_write_is_read_back_identical_by_every_reader(fleet: Fleet) -> None:
    serial = fleet.provisioner(LibvirtHypervisor()).serial
    devs = {vm: fleet.device(vm, serial) for vm in ("vm1", "vm2", "vm3")}
    rc, err = fleet.write_block("vm1", devs["vm1"], 3, "token-writer-1")
    assert rc == 0, err
    expected = fleet.guest_sha("vm1", "/tmp/blk")
    for reader in ("vm2", "vm3"):
        assert fleet.read_sha(reader, devs[reader], 3)[1] == expected
    assert fleet.host_read(3 * MIB + MIB - 64, 14) == b"token-writer-1"


def test_reader_write_fails_and_changes_no_byte(fleet: Fleet) -> None:
    serial = fleet.provisioner(LibvirtHypervisor()).serial
    dev = fleet.device("vm2", serial)
    before = fleet.host_read(5 * MIB, MIB)
    rc, out = fleet.write_block("vm2", dev, 5, "token-reader")
    assert rc != 0
    assert "Operation not permitted" in out or "Read-only file system" in out, out
    assert fleet.host_read(5 * MIB, MIB) == before


def test_set_role_moves_the_write_ability(fleet: Fleet) -> None:
    with LibvirtHypervisor() as hv:
        p = fleet.provisioner(hv)
        plan, applied = p.set_role("vm2", "writer")
        libvirt_s = [a.seconds for a in applied]
        FIGURES["set_role_libvirt_s_per_vm"] = round(sum(libvirt_s) / 2, 3)
        FIGURES["set_role_steps_s"] = [round(s, 3) for s in libvirt_s]  # type: ignore[assignment]
        assert modes(fleet, hv) == {"vm1": DiskMode.RO, "vm2": DiskMode.RW, "vm3": DiskMode.RO}
        # provision keeps the writer chosen by set-role, and says so
        plan, applied = p.provision()
        assert plan.empty and any("vm2 is the writer" in n for n in plan.notes)
        with pytest.raises(CoordinationError, match="vm2 is the writer"):
            p.set_role("vm2", "reader")
    serial = p.serial
    old, new = fleet.device("vm1", serial), fleet.device("vm2", serial)
    rc, out = fleet.write_block("vm1", old, 7, "token-old")
    assert rc != 0, out
    assert "Operation not permitted" in out or "Read-only file system" in out, out
    rc, out = fleet.write_block("vm2", new, 7, "token-new-writer")
    assert rc == 0, out
    assert fleet.host_read(7 * MIB + MIB - 64, 16) == b"token-new-writer"


def test_clients_and_fence_give_eio_at_once_while_readers_read(fleet: Fleet) -> None:
    fencer = fleet.fencer()
    addresses = fencer.clients("vm2")
    assert len(addresses) == 1
    everyone = {w.addr for w in ceph.RbdImageStore(fleet.handle).watchers("rbd", fleet.image)}
    assert set(addresses) < everyone  # only vm2's, not the readers'
    serial = fleet.provisioner(LibvirtHypervisor()).serial
    dev2, dev3 = fleet.device("vm2", serial), fleet.device("vm3", serial)
    t0 = time.monotonic()
    assert fencer.fence("vm2") == addresses
    fenced_at = time.monotonic()
    rc, out = fleet.write_block("vm2", dev2, 9, "token-fenced")
    FIGURES["fence_to_eio_s"] = round(time.monotonic() - t0, 3)
    FIGURES["fence_call_s"] = round(fenced_at - t0, 3)
    try:
        assert rc != 0 and "Input/output error" in out, out
        assert fleet.read_sha("vm3", dev3, 7)[0] == 0
        assert fleet.host_read(9 * MIB + MIB - 64, 12) != b"token-fenced"
        # recovery: the new writer's attach is a new librados instance
        with LibvirtHypervisor() as hv:
            fleet.provisioner(hv).set_role("vm1", "writer")
        rc, out = fleet.write_block("vm1", fleet.device("vm1", serial), 9, "token-after-fence")
        assert rc == 0, out
    finally:
        fencer.unfence(addresses)


def test_removing_and_adding_a_vm_touches_only_that_vm(fleet: Fleet) -> None:
    fleet.write("two", render(fleet.cluster, fleet.vms, fleet.name, fleet.image,
                              names=("vm1", "vm2")))
    with LibvirtHypervisor() as hv:
        before = modes(fleet, hv)
        plan, _ = fleet.provisioner(hv, "two").provision()
        user3 = vm_user(fleet.name, "vm3")
        domain3 = fleet.vms.vm("vm3").domain
        assert [(type(a).__name__, getattr(a, "domain", None)) for a in plan.actions] == [
            ("Detach", domain3), ("RemoveSecret", None), ("RemoveUser", None)]
        assert modes(fleet, hv, "two") == {"vm1": before["vm1"], "vm2": before["vm2"]}
        assert hv.secret_uuid("qemu:///system", secret_usage(user3)) is None
        assert ceph.CephxCredentialStore(fleet.handle).list_users(user3) == []
        plan, _ = fleet.provisioner(hv).provision()
        assert [(type(a).__name__, getattr(a, "vm", None)) for a in plan.actions] == [
            ("EnsureCredentials", "vm3"), ("Attach", "vm3")]
        assert modes(fleet, hv) == before


def test_stopped_domain_gets_the_disk_in_its_config_only(fleet: Fleet) -> None:
    import libvirt

    domain = f"rbdfleet-{fleet.name}-stopped"
    conn = libvirt.open("qemu:///system")
    dom = conn.defineXML(f"<domain type='qemu'><name>{domain}</name><memory unit='MiB'>64"
                         "</memory><os><type arch='x86_64'>hvm</type></os></domain>")
    try:
        fleet.write("stopped", render(fleet.cluster, fleet.vms, fleet.name, fleet.image, extra_vm=(
            f'[[vm]]\nname = "vm4"\ndomain = "{domain}"\naddress = "10.87.9.4"\n')))
        with LibvirtHypervisor() as hv:
            plan, _ = fleet.provisioner(hv, "stopped").provision()
            attaches = [a for a in plan.actions if isinstance(a, Attach)]
            assert [(a.vm, a.mode, a.live) for a in attaches] == [("vm4", DiskMode.RO, False)]
            assert not dom.isActive()
            assert fleet.provisioner(hv, "stopped").provision()[0].empty
            serial = fleet.provisioner(hv).serial
            assert f"<serial>{serial}</serial>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            # back to the three VMs: the stopped domain loses the disk, nobody else moves
            plan, _ = fleet.provisioner(hv).provision()
            assert [(type(a).__name__, getattr(a, "domain", None)) for a in plan.actions] == [
                ("Detach", domain), ("RemoveSecret", None), ("RemoveUser", None)]
            assert serial not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        dom.undefine()
        conn.close()


def _assert_unchanged(fleet: Fleet, label: str, error: type[Exception], match: str) -> None:
    with LibvirtHypervisor() as hv:
        before = fleet.provisioner(hv).observe()
        with pytest.raises(error, match=match):
            fleet.provisioner(hv, label).provision()
        assert fleet.provisioner(hv).observe() == before


def test_bad_input_is_one_clear_error_and_changes_nothing(fleet: Fleet) -> None:
    c, v, n, img = fleet.cluster, fleet.vms, fleet.name, fleet.image
    fleet.write("ghost", render(c, v, n, img, extra_vm=(
        '[[vm]]\nname = "vm9"\ndomain = "no-such-domain-rbdfleet"\naddress = "10.87.9.9"\n')))
    _assert_unchanged(fleet, "ghost", DomainNotFound, "no-such-domain-rbdfleet")
    fleet.write("size", render(c, v, n, img, size="128MiB"))
    _assert_unchanged(fleet, "size", ConfigError, "never resizes")
    fleet.write("pool", render(c, v, n, img, pool="no-such-pool"))
    _assert_unchanged(fleet, "pool", ConfigError, "does not exist")
    # a libvirt URI nobody answers (loopback, closed port)
    fleet.write("uri", render(c, v, n, img, uri="qemu+tcp://127.0.0.1:1/system"))
    _assert_unchanged(fleet, "uri", HypervisorError, "127.0.0.1:1")
    # two writers: refused by the config itself
    two = fleet.write("two-writers", render(c, v, n, img).replace(
        'writer = "vm1"', 'writer = ["vm1", "vm2"]'))
    with pytest.raises(ConfigError, match="two writers"):
        load(two, env={})
    # a keyring with a wrong key for client.admin
    bad = fleet.dir / "bad.keyring"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"[client.admin]\n\tkey = AQBbtG5mAAAAABAAx0CmJ2tPcvVaGt1mJnJ0Yg==\n")
    os.close(fd)
    with pytest.raises(StorageError, match="permission denied") as err:
        ceph.connect(load(fleet.write("key", render(c, v, n, img, keyring=bad)), env={}).ceph,
                     timeout=10)
    assert "AQBbtG5m" not in str(err.value)


def test_deprovision_delete_image_leaves_nothing(fleet: Fleet) -> None:
    with LibvirtHypervisor() as hv:
        p = fleet.provisioner(hv)
        plan, _ = p.deprovision(delete_image=True)
        assert not plan.empty
        assert all(r.mode is None for r in p.attachments())
        for vm in ("vm1", "vm2", "vm3"):
            assert hv.secret_uuid("qemu:///system", secret_usage(vm_user(fleet.name, vm))) is None
        assert p.deprovision(delete_image=True)[0].empty
    assert ceph.CephxCredentialStore(fleet.handle).list_users(fleet_user_prefix(fleet.name)) == []
    assert ceph.RbdImageStore(fleet.handle).image_info("rbd", fleet.image) is None
