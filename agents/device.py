"""The port every storage backend implements: a fixed-size byte device.

Reads and writes may start and end anywhere inside the device: the on-disk format keeps its
structures on :data:`ALIGN` boundaries, but a small record need not fill a block, and each
backend makes an unaligned request work (O_DIRECT by a read-modify-write of the aligned span,
see :mod:`agents.backends.file`). Discards take ALIGN multiples only.

:class:`VectoredDevice` adds the copy-free calls large files need (``readinto`` a caller's
buffer, ``writev`` from several buffers without joining them); every backend in
:mod:`agents.backends` has them, and :func:`vectored` gives any other BlockDevice (a test
double) the same calls through ``read_at``/``write_at``, so a caller can rely on them.
"""

from __future__ import annotations

import errno
import logging
import mmap
from collections.abc import Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from agents.errors import DeviceError

ALIGN = 4096

LOG = logging.getLogger(__name__)

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap
"""What ``writev`` takes (``readinto`` takes a writable ``memoryview``)."""


def check_io(offset: int, length: int, size: int, *, closed: bool) -> None:
    """Refuse an I/O the way every backend does: DeviceError EBADF on a closed handle,
    ValueError when ``[offset, offset+length)`` is not inside the device."""
    if closed:
        raise DeviceError("device is closed", op="io", errno=errno.EBADF)
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"I/O at {offset}+{length} is past the end of the device")


def check_discard(offset: int, length: int, size: int, *, closed: bool,
                  read_only: bool) -> None:
    """:func:`check_io`, ValueError when the range is not ALIGN multiples, and DeviceError
    EROFS on a read-only handle: how every backend refuses a discard it must not do."""
    check_io(offset, length, size, closed=closed)
    if offset % ALIGN or length % ALIGN:
        raise ValueError(f"unaligned discard at {offset}+{length}")
    if read_only:
        raise DeviceError("discard on a read-only device", op="discard", errno=errno.EROFS)


def discard_unsupported(where: str, code: int) -> bool:
    """Log (once per handle: the caller stops asking) that ``where`` cannot discard; False."""
    LOG.warning("event=discard_unsupported device=%s errno=%d: freed space stays allocated "
                "on the medium", where, code)
    return False


def aligned_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of ``size`` bytes (anonymous mmap): what an O_DIRECT
    backend reads into and writes from without staging. Close it when done."""
    return mmap.mmap(-1, max(size, 1))


def byte_view(buf: Buffer) -> memoryview:
    """``buf`` as a view of unsigned bytes (what slices, lengths and offsets count in)."""
    view = memoryview(buf)
    return view if view.format == "B" else view.cast("B")


def short_io(op: str, offset: int) -> DeviceError:
    """The error of a read or write that moved fewer bytes than asked (EIO)."""
    return DeviceError(f"short {op} at {offset}", op=op, errno=errno.EIO)


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


@runtime_checkable
class VectoredDevice(BlockDevice, Protocol):
    """A BlockDevice that reads into and writes from the caller's buffers (no staging copy
    where the medium allows it: page-aligned buffers from :func:`aligned_buffer` on O_DIRECT,
    any buffer elsewhere)."""

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` (writable) with the ``len(buf)`` bytes at ``offset`` (no stale cache);
        a short read is DeviceError EIO."""
        ...

    def writev(self, offset: int, parts: Sequence[Buffer]) -> None:
        """Write ``parts`` back to back from ``offset``, as one write of their concatenation
        (never joined into one bytes object by the caller); DeviceError when read-only."""
        ...


class _ThroughCopies:
    """:class:`VectoredDevice` over a plain BlockDevice: ``readinto`` copies ``read_at``'s
    bytes, ``writev`` joins the parts for one ``write_at``."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.read_only = device.read_only

    def size(self) -> int:
        return self.device.size()

    def read_at(self, offset: int, length: int) -> bytes:
        return self.device.read_at(offset, length)

    def write_at(self, offset: int, data: bytes) -> None:
        self.device.write_at(offset, data)

    def flush(self) -> None:
        self.device.flush()

    def discard(self, offset: int, length: int) -> bool:
        return self.device.discard(offset, length)

    def close(self) -> None:
        self.device.close()

    def readinto(self, offset: int, buf: memoryview) -> None:
        data = self.device.read_at(offset, len(buf))
        if len(data) != len(buf):
            raise short_io("read", offset)
        buf[:] = data

    def writev(self, offset: int, parts: Sequence[Buffer]) -> None:
        self.device.write_at(offset, b"".join(parts))


def vectored(device: BlockDevice) -> VectoredDevice:
    """``device`` itself when it has ``readinto``/``writev``, else an adapter that does them
    through ``read_at``/``write_at`` (one copy each way)."""
    if isinstance(device, VectoredDevice):
        return device
    return _ThroughCopies(device)
