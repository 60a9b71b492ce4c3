"""The sandbox VMs, for real: libvirtd, the cached guest image, TCG guests, pinned SSH.

Runtime: ~1.5-3 min on 2 busy cores with a cached image (3-VM session boot 25-75 s by load,
a second 1-VM sandbox booted twice for the fault hooks and the teardown check ~40 s,
shared-disk cross-read ~6 s). An uncached image adds ~90 s once per recipe change.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.errors import HostUnreachable
from orchestrator.sandbox import guest
from orchestrator.sandbox.state import StateFile
from orchestrator.sandbox.vms import (
    PROBES,
    SandboxVM,
    VmSet,
    boot_vms,
    guard_network,
    tear_down,
    vm_exec,
)

pytestmark = [pytest.mark.integration, pytest.mark.vm]


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_vms_answer_ssh_with_their_name_and_address(sandbox_vms: VmSet) -> None:
    assert [vm.name for vm in sandbox_vms.vms] == ["vm1", "vm2", "vm3"]
    addresses = {vm.address for vm in sandbox_vms.vms}
    assert len(addresses) == 3
    for vm in sandbox_vms.vms:
        assert ipaddress.ip_address(vm.address) in ipaddress.ip_network(sandbox_vms.subnet)
        result = sandbox_vms.exec(vm, ["sh", "-c", "hostname; ip -4 -o addr show"])
        assert result.returncode == 0, result.stderr
        hostname, addrs = result.stdout.split("\n", 1)
        assert hostname == vm.name
        assert f"inet {vm.address}/24" in addrs
        assert vm.domain == f"rbdfleet-{sandbox_vms.run_id}-{vm.name}"


def test_known_hosts_pins_exactly_the_injected_host_keys(sandbox_vms: VmSet) -> None:
    lines = sandbox_vms.known_hosts.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(v.address for v in sandbox_vms.vms)
    assert len({line.split()[2] for line in lines}) == 3  # one host key per VM
    assert sandbox_vms.ssh_key.stat().st_mode & 0o777 == 0o600
    vm = sandbox_vms.vm("vm2")
    # the key sshd presents is the pinned one (read on the guest side)
    served = sandbox_vms.exec(vm, ["cat", "/run/rbdfleet/ssh_host_ed25519_key.pub"]).stdout
    pinned = next(line for line in lines if line.startswith(vm.address + " "))
    assert pinned.split()[1:3] == served.split()[:2]


def test_a_wrong_or_missing_host_key_is_refused(sandbox_vms: VmSet, tmp_path: Path) -> None:
    vm = sandbox_vms.vm("vm1")
    impostor = tmp_path / "impostor"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)])
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"{vm.address} {' '.join(Path(f'{impostor}.pub').read_text().split()[:2])}\n")
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    for known_hosts in (wrong, empty):
        # no control_dir: a fresh handshake, not the already verified master connection
        result = vm_exec(vm, sandbox_vms.ssh_key, known_hosts, ["true"], timeout=60)
        assert result.returncode == 255
        assert "Host key verification failed" in result.stderr
    good = vm_exec(vm, sandbox_vms.ssh_key, sandbox_vms.known_hosts, ["true"], timeout=60)
    assert good.returncode == 0, good.stderr


def _disk_xml(path: Path, serial: str) -> str:
    return (
        "<disk type='file' device='disk'>"
        "<driver name='qemu' type='raw' cache='none' io='native'/>"
        f"<source file='{path}'/><target dev='vdc' bus='virtio'/>"
        f"<serial>{serial}</serial><shareable/></disk>"
    )


def _find_by_serial(vms: VmSet, vm: SandboxVM, serial: str, timeout: float = 60) -> str:
    script = (
        f'for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = {serial} ] '
        "&& echo /dev/${d##*/}; done"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = vms.exec(vm, ["sh", "-c", script]).stdout.strip()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{vm.name}: no disk with serial {serial}")


def test_shareable_file_disk_written_in_one_vm_is_read_in_another(sandbox_vms: VmSet) -> None:
    serial = f"t{secrets.token_hex(4)}"
    disk = sandbox_vms.disk_dir / f"{serial}.raw"
    with open(disk, "wb") as handle:
        handle.truncate(16 << 20)
    xml = sandbox_vms.disk_dir / f"{serial}.xml"
    xml.write_text(_disk_xml(disk, serial))
    writer, reader = sandbox_vms.vm("vm1"), sandbox_vms.vm("vm2")
    attached: list[SandboxVM] = []
    try:
        for vm in (writer, reader):
            _run(["virsh", "-q", "-c", vm.uri, "attach-device", vm.domain, str(xml), "--live"])
            attached.append(vm)
        wdev = _find_by_serial(sandbox_vms, writer, serial)
        rdev = _find_by_serial(sandbox_vms, reader, serial)
        token = secrets.token_hex(8)
        write = (
            f"(printf %s {token}; head -c 4194288 /dev/urandom) > /tmp/blk && "
            f"dd if=/tmp/blk of={wdev} bs=4M seek=1 oflag=direct status=none && "
            "sha256sum < /tmp/blk"
        )
        written = sandbox_vms.exec(writer, ["sh", "-c", write])
        assert written.returncode == 0, written.stderr
        read = (
            f"dd if={rdev} bs=4M skip=1 count=1 iflag=direct status=none > /tmp/blk && "
            "head -c 16 /tmp/blk; echo; sha256sum < /tmp/blk"
        )
        seen = sandbox_vms.exec(reader, ["sh", "-c", read])
        assert seen.returncode == 0, seen.stderr
        first, digest = seen.stdout.splitlines()
        assert first == token
        assert digest == written.stdout.strip()
    finally:
        for vm in attached:
            subprocess.run(
                ["virsh", "-q", "-c", vm.uri, "detach-device", vm.domain, str(xml), "--live"],
                capture_output=True,
                check=False,
            )
        disk.unlink(missing_ok=True)
        xml.unlink(missing_ok=True)


def test_guest_image_carries_no_keys() -> None:
    image = guest.ensure_guest_image()
    listing = _run(["debugfs", "-R", "ls -l /etc/ssh", str(image.base)])
    assert "sshd_config.d" in listing
    assert "ssh_host_" not in listing
    root_ssh = subprocess.run(
        ["debugfs", "-R", "stat /root/.ssh", str(image.base)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "File not found" in root_ssh.stderr


def _domstate(domain: str) -> str:
    return _run(["virsh", "-q", "-c", "qemu:///system", "domstate", domain]).strip()


def test_second_sandbox_coexists_survives_faults_and_teardown_leaves_nothing(
    sandbox_vms: VmSet, tmp_path: Path
) -> None:
    state = StateFile(tmp_path / "state.json")
    try:
        other = boot_vms(tmp_path, state, 1)
        assert other.subnet != sandbox_vms.subnet
        assert other.vms[0].domain != sandbox_vms.vms[0].domain
        assert other.exec("vm1", ["hostname"]).stdout.strip() == "vm1"
        # fault hooks: a paused guest answers nothing, then resumes where it was
        other.exec("vm1", ["sh", "-c", "echo before > /root/mark && sync"])
        other.pause("vm1")
        assert _domstate(other.vms[0].domain) == "paused"
        with pytest.raises(HostUnreachable):
            other.exec("vm1", ["true"], timeout=5)
        other.resume("vm1")
        assert other.exec("vm1", ["true"]).returncode == 0
        # a crashed guest boots again with the same pinned host key and the same disk
        other.crash("vm1")
        assert _domstate(other.vms[0].domain) == "shut off"
        other.start("vm1")
        again = other.exec("vm1", ["cat", "/root/mark"])
        assert again.returncode == 0 and again.stdout == "before\n"
        recorded = [r for r in state.resources if r["kind"].startswith("vm.")]
        assert {r["kind"] for r in recorded} == {
            "vm.route",
            "vm.network",
            "vm.dir",
            "vm.domain",
            "vm.ssh_master",
        }
        assert all(PROBES[r["kind"]](r) for r in recorded)
    finally:
        errors = tear_down(state)
    assert errors == []
    assert not any(PROBES[r["kind"]](r) for r in recorded)
    assert [r for r in state.resources if r["kind"].startswith("vm.")] == []
    domains = _run(["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"]).split()
    networks = _run(["virsh", "-q", "-c", "qemu:///system", "net-list", "--all", "--name"])
    routes = _run(["ip", "route", "show", "table", "all"])
    assert other.vms[0].domain not in domains
    assert other.network not in networks.split()
    assert other.subnet not in routes
    assert str(guard_network(ipaddress.IPv4Network(other.subnet))) not in routes
    assert other.bridge not in _run(["ip", "-o", "link"])
    assert not other.disk_dir.parent.exists()
    # the session's sandbox is untouched
    assert sandbox_vms.exec("vm1", ["true"]).returncode == 0
    for vm in sandbox_vms.vms:
        assert vm.domain in domains


def test_teardown_of_records_whose_resources_never_appeared_is_clean(tmp_path: Path) -> None:
    """A boot killed between ``record`` and create leaves records of nothing: down is clean."""
    state = StateFile(tmp_path / "state.json")
    ghost = f"rbdfleet-gh{secrets.token_hex(2)}"
    state.record("vm.route", subnet="10.87.254.0/23", metric=9999)
    state.record("vm.network", name=ghost, uri="qemu:///system")
    state.record("vm.dir", path=f"/var/lib/rbdfleet/vms/{ghost}")
    state.record("vm.domain", name=f"{ghost}-vm1", uri="qemu:///system")
    state.record("vm.ssh_master", control_path=str(tmp_path / "cm" / "10.87.254.11"),
                 address="10.87.254.11")
    assert tear_down(state) == []
    assert state.resources == []
