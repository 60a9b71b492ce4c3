"""Pure parts of the sandbox VMs: subnet choice, XML, kernel cmdline, accelerator, image cache.

Runtime: < 2 s. The cache protocol runs with a quick builder in a temp dir; the real
debootstrap build is exercised by the integration tier (tests/integration/test_sandbox_vms.py).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import SandboxError
from orchestrator.sandbox import guest
from orchestrator.sandbox.libvirtd import balance_vm_cpu_share
from orchestrator.sandbox.vms import (
    SUBNET_POOL,
    accelerator,
    choose_subnet,
    domain_xml,
    guard_network,
    network_xml,
)

pytestmark = pytest.mark.unit

Net = ipaddress.IPv4Network


def test_first_subnet_of_an_empty_machine() -> None:
    assert choose_subnet([]) == Net("10.87.0.0/24")


def test_subnet_skips_whole_guard_prefixes_in_use() -> None:
    taken = [Net("10.87.0.0/23"), Net("10.87.3.5/32"), Net("0.0.0.0/0")]
    assert choose_subnet(taken) == Net("10.87.4.0/24")


def test_default_route_does_not_count_as_taken() -> None:
    assert choose_subnet([Net("0.0.0.0/0")]) == Net("10.87.0.0/24")


def test_a_covering_route_exhausts_the_pool() -> None:
    with pytest.raises(SandboxError, match="no free"):
        choose_subnet([Net("10.0.0.0/8")])


@given(st.lists(st.builds(lambda a, p: Net((a, p), strict=False),
                          st.integers(0x0A570000, 0x0A57FFFF), st.integers(8, 32)), max_size=20))
def test_chosen_subnet_and_its_guard_never_overlap_anything_taken(taken: list[Net]) -> None:
    try:
        subnet = choose_subnet(taken)
    except SandboxError:  # only when every candidate guard prefix is taken
        assert all(any(g.overlaps(t) for t in taken) for g in SUBNET_POOL.subnets(new_prefix=23))
        return
    guard = guard_network(subnet)
    assert subnet.prefixlen == 24 and subnet.subnet_of(SUBNET_POOL)
    assert subnet.subnet_of(guard) and guard.prefixlen == 23
    assert not any(guard.overlaps(net) for net in taken if net.prefixlen > 0)


def test_network_xml_is_isolated_without_dhcp_or_dns() -> None:
    root = ET.fromstring(network_xml("rbdfleet-abc123", "rbfbr-abc123", "10.87.2.1", 24))
    assert root.findtext("name") == "rbdfleet-abc123"
    assert root.find("forward") is None
    assert root.find("ip/dhcp") is None
    assert root.find("dns").get("enable") == "no"  # type: ignore[union-attr]
    assert root.find("ip").attrib == {"address": "10.87.2.1", "prefix": "24"}  # type: ignore[union-attr]
    assert len(root.find("bridge").get("name", "")) <= 15  # type: ignore[union-attr]


def _domain(domain_type: str) -> ET.Element:
    return ET.fromstring(domain_xml(
        domain="rbdfleet-abc123-vm1", domain_type=domain_type, memory_mib=256,
        kernel=Path("/c/vmlinuz"), initrd=Path("/c/initrd.img"),
        cmdline=guest.kernel_cmdline("10.87.2.11/24", "vm1"), overlay=Path("/r/vm1.qcow2"),
        seed=Path("/r/vm1.seed"), network="rbdfleet-abc123", mac="52:54:00:87:02:0b",
        console_log=Path("/d/console/vm1.log"),
    ))


def test_domain_xml_boots_the_overlay_as_vda_with_a_readonly_seed() -> None:
    root = _domain("qemu")
    assert root.get("type") == "qemu"
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]
    assert disks[0].find("source").get("file") == "/r/vm1.qcow2"  # type: ignore[union-attr]
    assert disks[1].findtext("serial") == guest.SEED_SERIAL
    assert disks[1].find("readonly") is not None
    assert root.find("devices/interface/rom").get("enabled") == "no"  # type: ignore[union-attr]
    assert root.find("features/tcg/tb-cache").text == "128"  # type: ignore[union-attr]
    assert "guest.ip=10.87.2.11/24" in root.findtext("os/cmdline", "")
    assert root.find("devices/serial/log").get("file") == "/d/console/vm1.log"  # type: ignore[union-attr]


def test_domain_xml_caps_the_tcg_cache_only_under_tcg() -> None:
    assert _domain("kvm").find("features/tcg") is None


def test_kernel_cmdline_carries_the_guest_parameters() -> None:
    line = guest.kernel_cmdline("10.87.2.12/24", "vm2", gateway="10.87.2.1")
    params = dict(p.split("=", 1) for p in line.split() if "=" in p)
    assert params["guest.ip"] == "10.87.2.12/24"
    assert params["guest.hostname"] == "vm2"
    assert params["guest.gw"] == "10.87.2.1"
    assert "init" not in params  # the image's /sbin/init: systemd
    assert "guest.gw" not in guest.kernel_cmdline("10.87.2.12/24", "vm2")


def test_kvm_only_with_a_real_module_and_a_working_probe() -> None:
    probes: list[bool] = []

    def probe(result: bool) -> bool:
        probes.append(result)
        return result

    assert accelerator(False, lambda: probe(True)) == "qemu"
    assert probes == []  # no module: not even probed
    assert accelerator(True, lambda: probe(False)) == "qemu"
    assert accelerator(True, lambda: probe(True)) == "kvm"


def test_mirror_is_the_first_uri_of_the_debian_sources(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian http://b/\n"
                       "Suites: bookworm\n\nTypes: deb\nURIs: http://security/\n")
    assert guest.debian_mirror(sources) == "http://mirror.example/debian"
    assert guest.debian_mirror(tmp_path / "missing") == guest.FALLBACK_MIRROR


def test_recipe_key_covers_every_recipe_file() -> None:
    key = guest.recipe_key()
    assert key == guest.recipe_key() and len(key) == 16
    assert set(guest.RECIPE_INSTALL) == {p.name for p in guest.RECIPE_DIR.iterdir()}


def test_the_guest_units_are_installed_where_systemd_looks() -> None:
    for unit in guest.ENABLED_UNITS:
        assert guest.RECIPE_INSTALL[unit][0] == f"etc/systemd/system/{unit}"
    assert not set(guest.ENABLED_UNITS) & set(guest.MASKED_UNITS)


def _quick_builder(calls: list[str], delay: float = 0.2) -> guest.Builder:
    def build(work: Path, debs: Path, say: guest.Progress) -> None:
        calls.append(str(work))
        out = work / "out"
        out.mkdir(parents=True)
        time.sleep(delay)  # widen the race window for concurrent callers
        for name in ("base.raw", "vmlinuz", "initrd.img"):
            (out / name).write_bytes(b"x")
        (out / "manifest.json").write_text(json.dumps({"kernel_version": "6.1.0-test"}))

    return build


def test_concurrent_callers_build_once_and_share_the_result(tmp_path: Path) -> None:
    (tmp_path / ".build-deadbeef-1" / "rootfs").mkdir(parents=True)  # a crashed builder's
    calls: list[str] = []
    results: list[guest.GuestImage] = []
    threads = [
        threading.Thread(target=lambda: results.append(
            guest.ensure_guest_image(tmp_path, builder=_quick_builder(calls))))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 4 and len(set(results)) == 1
    image = results[0]
    assert image.key == guest.recipe_key() and image.kernel_version == "6.1.0-test"
    assert image.base.read_bytes() == b"x"
    assert list(tmp_path.glob(".build-*")) == []
    assert image.directory.stat().st_mode & 0o777 == 0o755


def test_a_failed_build_leaves_no_image_and_no_work_dir(tmp_path: Path) -> None:
    def broken(work: Path, debs: Path, say: guest.Progress) -> None:
        (work / "out").mkdir(parents=True)
        raise SandboxError("mirror unreachable")

    with pytest.raises(SandboxError, match="mirror unreachable"):
        guest.ensure_guest_image(tmp_path, builder=broken)
    assert not (tmp_path / guest.recipe_key()).exists()
    assert list(tmp_path.glob(".build-*")) == []
    calls: list[str] = []
    guest.ensure_guest_image(tmp_path, builder=_quick_builder(calls, delay=0))
    assert len(calls) == 1  # the next caller builds


def test_vm_cpu_share_weighs_one_task_per_running_domain(tmp_path: Path) -> None:
    assert balance_vm_cpu_share(3, tmp_path) is None  # no cgroup-v1 cpu controller
    machine = tmp_path / "machine"
    machine.mkdir()
    (machine / "cpu.shares").write_text("1024\n")
    assert balance_vm_cpu_share(3, tmp_path) == 3072
    assert (machine / "cpu.shares").read_text() == "3072"
    assert balance_vm_cpu_share(0, tmp_path) == 1024
