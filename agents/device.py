"""The port every storage backend implements: a fixed-size byte device.

Offsets and lengths passed by the on-disk format are multiples of :data:`ALIGN`
(O_DIRECT needs that); backends may refuse unaligned I/O with ``ValueError``.
"""

from __future__ import annotations

import errno
from typing import Protocol

from agents.errors import DeviceError

ALIGN = 4096


def check_io(offset: int, length: int, size: int, *, closed: bool) -> None:
    """Refuse an I/O the way every backend does: DeviceError EBADF on a closed handle,
    ValueError when ``offset``/``length`` are not ALIGN multiples or reach past ``size``."""
    if closed:
        raise DeviceError("device is closed", op="io", errno=errno.EBADF)
    if offset % ALIGN or length % ALIGN:
        raise ValueError(f"unaligned I/O at {offset}+{length}")
    if offset < 0 or offset + length > size:
        raise ValueError(f"I/O at {offset}+{length} is past the end of the device")


class BlockDevice(Protocol):
    """A shared disk seen from one VM. Errors from the medium raise ``DeviceError``."""

    read_only: bool

    def size(self) -> int:
        """Usable size in bytes (a multiple of ALIGN)."""
        ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` straight from the medium (no stale cache)."""
        ...

    def write_at(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``; raises DeviceError when the device is read-only."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def close(self) -> None:
        """Release the handle (and, for librbd, the exclusive lock)."""
        ...
