"""The port every storage backend implements: a fixed-size byte device.

Offsets and lengths passed by the on-disk format are multiples of :data:`ALIGN`
(O_DIRECT needs that); backends may refuse unaligned I/O with ``ValueError``.
"""

from __future__ import annotations

import errno
import logging
from typing import Protocol

from agents.errors import DeviceError

ALIGN = 4096

LOG = logging.getLogger(__name__)


def check_io(offset: int, length: int, size: int, *, closed: bool) -> None:
    """Refuse an I/O the way every backend does: DeviceError EBADF on a closed handle,
    ValueError when ``offset``/``length`` are not ALIGN multiples or reach past ``size``."""
    if closed:
        raise DeviceError("device is closed", op="io", errno=errno.EBADF)
    if offset % ALIGN or length % ALIGN:
        raise ValueError(f"unaligned I/O at {offset}+{length}")
    if offset < 0 or offset + length > size:
        raise ValueError(f"I/O at {offset}+{length} is past the end of the device")


def check_discard(offset: int, length: int, size: int, *, closed: bool,
                  read_only: bool) -> None:
    """:func:`check_io`, and DeviceError EROFS on a read-only handle: how every backend
    refuses a discard it must not do."""
    check_io(offset, length, size, closed=closed)
    if read_only:
        raise DeviceError("discard on a read-only device", op="discard", errno=errno.EROFS)


def discard_unsupported(where: str, code: int) -> bool:
    """Log (once per handle: the caller stops asking) that ``where`` cannot discard; False."""
    LOG.warning("event=discard_unsupported device=%s errno=%d: freed space stays allocated "
                "on the medium", where, code)
    return False


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

    def discard(self, offset: int, length: int) -> bool:
        """Tell the medium ``[offset, offset+length)`` holds nothing worth keeping, so it can
        give the space back (librbd: whole objects are deleted, parts of one are zeroed).
        Afterwards the range reads as zeros or as its old bytes, never anything else. Returns
        False when the medium cannot discard (nothing happened); DeviceError when read-only.
        Synchronous: once it returns, a later write to the range is not undone by it."""
        ...

    def close(self) -> None:
        """Release the handle (and, for librbd, the exclusive lock)."""
        ...
