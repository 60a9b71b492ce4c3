"""The shared disk as the use cases, the placement plan and the adapters all name it.

Plain values (no binding objects): how a VM holds the disk, what the image is, what a
domain's XML says is attached, and the serial the guest finds the disk by.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

__all__ = ["SERIAL_MAX", "AttachedDisk", "DiskMode", "ImageInfo", "fleet_serial"]


class DiskMode(enum.StrEnum):
    """How a VM holds the shared disk."""

    RW = "rw"
    RO = "ro"


@dataclass(frozen=True)
class ImageInfo:
    """An RBD image as it is."""

    pool: str
    name: str
    size: int
    features: int


@dataclass(frozen=True)
class AttachedDisk:
    """An RBD disk found in a domain's XML."""

    serial: str
    pool: str
    image: str
    user: str
    mode: DiskMode
    target: str


# virtio-blk exposes at most 20 bytes of serial (VIRTIO_BLK_ID_BYTES); longer ones are cut.
SERIAL_MAX = 20


def fleet_serial(fleet: str, pool: str, image: str) -> str:
    """The disk serial of a fleet: ``rbdfleet-`` + 11 hex digits of its identity (20 chars).

    The same on every VM of the fleet (it is one disk), different for another fleet, pool or
    image, and within virtio-blk's 20-byte limit whatever the names' lengths.
    """
    digest = hashlib.sha256(f"{fleet}\0{pool}\0{image}".encode()).hexdigest()
    return f"rbdfleet-{digest[: SERIAL_MAX - len('rbdfleet-')]}"
