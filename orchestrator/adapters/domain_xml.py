"""Pure builders and readers of the libvirt XML for the shared RBD disk and its ceph secret.

The disk is ``type='network'``, protocol ``rbd``, raw, ``cache='none'`` (QEMU then runs
librbd with ``rbd_cache=false``: no host cache that could serve stale data), ``<shareable/>``
(without it QEMU's image locking refuses a second attach) and carries a ``<serial>`` unique
to the fleet, by which the guest finds it (``/sys/block/*/serial``). A reader's disk adds
``<readonly/>``. Authentication uses the VM's own cephx user through a libvirt secret.

No I/O here: strings in, strings or values out. Golden tests in tests/unit/test_domain_xml.py.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from orchestrator.ports import AttachedDisk, DiskMode, DiskSpec

__all__ = [
    "disk_element_xml",
    "disk_xml",
    "free_target",
    "parse_disks",
    "secret_xml",
    "targets",
]

def disk_xml(disk: DiskSpec) -> str:
    """The ``<disk>`` element for ``disk`` (hot-plug or persistent config)."""
    root = ET.Element("disk", type="network", device="disk")
    # discard='unmap' passes the guest's discards (the writer's freed extents) to librbd,
    # so deleted space goes back to Ceph; QEMU ignores it on a read-only disk
    ET.SubElement(root, "driver", name="qemu", type="raw", cache="none", discard="unmap")
    source = ET.SubElement(root, "source", protocol="rbd", name=f"{disk.pool}/{disk.image}")
    for mon in disk.mon_hosts:
        ET.SubElement(source, "host", name=mon.host, port=str(mon.port))
    auth = ET.SubElement(source, "auth", username=disk.user)
    ET.SubElement(auth, "secret", type="ceph", uuid=disk.secret_uuid)
    ET.SubElement(root, "target", dev=disk.target, bus="virtio")
    ET.SubElement(root, "serial").text = disk.serial
    ET.SubElement(root, "shareable")
    if disk.mode is DiskMode.RO:
        ET.SubElement(root, "readonly")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def secret_xml(usage: str, description: str) -> str:
    """A private, persistent ``ceph`` secret (its value cannot be read back from libvirt)."""
    root = ET.Element("secret", ephemeral="no", private="yes")
    ET.SubElement(root, "description").text = description
    usage_el = ET.SubElement(root, "usage", type="ceph")
    ET.SubElement(usage_el, "name").text = usage
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def parse_disks(domain_xml: str) -> list[AttachedDisk]:
    """The RBD network disks of a domain's XML (other disks are not ours)."""
    result = []
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        source = disk.find("source")
        if disk.get("type") != "network" or source is None or source.get("protocol") != "rbd":
            continue
        pool, _, image = (source.get("name") or "").partition("/")
        auth = source.find("auth")
        if auth is None:  # older libvirt puts <auth> beside <source>
            auth = disk.find("auth")
        target = disk.find("target")
        result.append(
            AttachedDisk(
                serial=(disk.findtext("serial") or "").strip(),
                pool=pool,
                image=image,
                user=auth.get("username", "") if auth is not None else "",
                mode=DiskMode.RO if disk.find("readonly") is not None else DiskMode.RW,
                target=target.get("dev", "") if target is not None else "",
            )
        )
    return result


def disk_element_xml(domain_xml: str, serial: str) -> str | None:
    """The exact ``<disk>`` element with ``serial`` (what detach must be given), or None."""
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        if (disk.findtext("serial") or "").strip() == serial:
            return ET.tostring(disk, encoding="unicode")
    return None


def targets(domain_xml: str) -> set[str]:
    """Every ``<target dev>`` in use by the domain's disks."""
    return {t.get("dev", "") for t in ET.fromstring(domain_xml).findall("./devices/disk/target")}


def free_target(used: set[str]) -> str:
    """A virtio target name the domain does not use, from ``vdz`` downwards (only a hint:
    the guest names disks by probe order, which is why the serial identifies the disk)."""
    for letter in "zyxwvutsrqponmlkjihgfedcb":
        if f"vd{letter}" not in used:
            return f"vd{letter}"
    for first in "abcdefghijklmnopqrstuvwxyz":
        for second in "abcdefghijklmnopqrstuvwxyz":
            if f"vd{first}{second}" not in used:
                return f"vd{first}{second}"
    raise ValueError("no free virtio target name")
