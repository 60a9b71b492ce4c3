"""orchestrator.adapters.domain_xml: golden disk/secret XML, parsing back, serials, targets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.adapters import domain_xml
from orchestrator.core import disks
from orchestrator.ports import AttachedDisk, DiskMode, DiskSpec, MonHost

pytestmark = pytest.mark.unit

SPEC = DiskSpec(pool="rbd", image="rbdfleet-demo", serial="rbdfleet-0123456789a",
                user="rbdfleet-demo-vm2", secret_uuid="6a1b2c3d-0000-4000-8000-000000000001",
                mon_hosts=(MonHost("127.0.0.1", 13300),), mode=DiskMode.RO, target="vdz")

GOLDEN_READER = """\
<disk type="network" device="disk">
  <driver name="qemu" type="raw" cache="none" discard="unmap" />
  <source protocol="rbd" name="rbd/rbdfleet-demo">
    <host name="127.0.0.1" port="13300" />
    <auth username="rbdfleet-demo-vm2">
      <secret type="ceph" uuid="6a1b2c3d-0000-4000-8000-000000000001" />
    </auth>
  </source>
  <target dev="vdz" bus="virtio" />
  <serial>rbdfleet-0123456789a</serial>
  <shareable />
  <readonly />
</disk>"""

GOLDEN_SECRET = """\
<secret ephemeral="no" private="yes">
  <description>rbdfleet client.x secret</description>
  <usage type="ceph">
    <name>client.x secret</name>
  </usage>
</secret>"""


def test_reader_disk_golden() -> None:
    assert domain_xml.disk_xml(SPEC) == GOLDEN_READER


def test_writer_disk_is_the_reader_disk_without_readonly() -> None:
    writer = domain_xml.disk_xml(DiskSpec(**{**SPEC.__dict__, "mode": DiskMode.RW}))
    assert writer == GOLDEN_READER.replace("  <readonly />\n", "")


def test_secret_golden() -> None:
    assert domain_xml.secret_xml("client.x secret", "rbdfleet client.x secret") == GOLDEN_SECRET


def _domain(*disks: str) -> str:
    file_disk = ("<disk type='file' device='disk'><source file='/x.qcow2'/>"
                 "<target dev='vda' bus='virtio'/></disk>")
    return f"<domain><name>d</name><devices>{file_disk}{''.join(disks)}</devices></domain>"


def test_parse_round_trip_and_ignores_other_disks() -> None:
    rw = domain_xml.disk_xml(DiskSpec(**{**SPEC.__dict__, "mode": DiskMode.RW,
                                          "serial": "other", "target": "vdy"}))
    xml = _domain(domain_xml.disk_xml(SPEC), rw)
    assert domain_xml.parse_disks(xml) == [
        AttachedDisk("rbdfleet-0123456789a", "rbd", "rbdfleet-demo", "rbdfleet-demo-vm2",
                     DiskMode.RO, "vdz"),
        AttachedDisk("other", "rbd", "rbdfleet-demo", "rbdfleet-demo-vm2", DiskMode.RW, "vdy"),
    ]
    assert domain_xml.targets(xml) == {"vda", "vdz", "vdy"}
    element = domain_xml.disk_element_xml(xml, "other")
    assert element is not None and "<serial>other</serial>" in element
    assert domain_xml.disk_element_xml(xml, "absent") is None


def test_parse_accepts_auth_beside_source() -> None:
    old_style = ("<disk type='network' device='disk'><source protocol='rbd' name='p/i'/>"
                 "<auth username='u'><secret type='ceph' uuid='x'/></auth>"
                 "<target dev='vdb' bus='virtio'/><serial>s</serial><shareable/></disk>")
    assert domain_xml.parse_disks(_domain(old_style)) == [
        AttachedDisk("s", "p", "i", "u", DiskMode.RW, "vdb")]


def test_free_target_skips_used_names() -> None:
    assert domain_xml.free_target({"vda"}) == "vdz"
    assert domain_xml.free_target({"vda", "vdz", "vdy"}) == "vdx"
    every_single = {f"vd{c}" for c in "abcdefghijklmnopqrstuvwxyz"}
    assert domain_xml.free_target(every_single) == "vdaa"


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=60)


@given(names, names, names)
def test_serial_fits_virtio_and_is_stable(fleet: str, pool: str, image: str) -> None:
    serial = disks.fleet_serial(fleet, pool, image)
    assert len(serial) == disks.SERIAL_MAX
    assert serial == disks.fleet_serial(fleet, pool, image)
    assert serial != disks.fleet_serial(fleet + "x", pool, image)
