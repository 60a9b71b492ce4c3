"""BlockDevice and VectoredDevice on a file or block device with ``os.preadv``/``os.pwritev``,
O_DIRECT when the filesystem allows it (not tmpfs: buffered then, logged once), fdatasync on
flush. Discard: ``BLKDISCARD`` on a block device (the
guest's virtio disk: QEMU passes it to librbd when the disk has ``discard='unmap'``), a
punched hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)`` through libc, ctypes) on a file; a medium
that answers EOPNOTSUPP is logged once and not asked again.

What it does not guarantee: without O_DIRECT (tmpfs, some FUSE filesystems) a second handle in
another process still sees writes at once (same page cache), but another *host* would not.
With O_DIRECT every buffer must be page aligned: page-aligned caller buffers
(:func:`agents.device.aligned_buffer`) are used as they are, others are staged through a small
pool of mmap buffers (see :class:`FileDevice`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

from agents.device import (
    ALIGN,
    Buffer,
    aligned_buffer,
    byte_view,
    check_discard,
    check_io,
    discard_unsupported,
    short_io,
)
from agents.errors import DeviceError

LOG = logging.getLogger(__name__)

__all__ = ["FileDevice", "device_error"]


def device_error(op: str, exc: OSError, where: str) -> DeviceError:
    """The project's error for an OSError from the medium (errno kept, path not leaked twice)."""
    code = exc.errno or errno.EIO
    return DeviceError(f"{op} {where} failed: {os.strerror(code)}", op=op, errno=code)


BLKDISCARD = 0x1277  # _IO(0x12, 119): discard a (start, length) byte range of a block device
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS)


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate`` (os.posix_fallocate cannot punch holes); None without one."""
    try:
        func = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], func)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of a file, keeping its size (reads give zeros);
    OSError as the syscall reports it (ENOSYS without a libc fallocate)."""
    fallocate = _libc_fallocate()
    if fallocate is None:
        raise OSError(errno.ENOSYS, "no fallocate in libc")
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


KEEP = 8 << 20  # staging bytes a handle keeps mapped between I/Os (idle footprint)
SMALLEST = 64 << 10  # smallest staging buffer (a size class: powers of two from here)
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


@functools.cache
def _warn_buffered(path: str) -> None:
    """Once per path and process: this file is read through the page cache."""
    LOG.warning("event=o_direct_unsupported path=%s: buffered I/O (another host would not see "
                "this host's writes at once)", path)


def _page_aligned(view: memoryview) -> bool:
    """Whether O_DIRECT can use ``view`` as it is: a writable contiguous buffer whose address
    and length are ALIGN multiples (an mmap from :func:`agents.device.aligned_buffer`, or a
    slice of one at an ALIGN multiple). Read-only buffers say no: ctypes cannot take their
    address, and ``bytes`` data is never page aligned anyway (it follows the object header)."""
    if view.readonly or not view.c_contiguous or not view.nbytes or view.nbytes % ALIGN:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


class _Pool:
    """Page-aligned staging buffers (O_DIRECT needs them for bytes, unaligned spans and
    buffers of unknown address), shared by a handle's threads: size classes are powers of
    two from SMALLEST; at most KEEP bytes stay mapped between I/Os, the rest is unmapped on
    release (the page faults of a fresh map cost less than an idle agent holding them)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0

    @contextlib.contextmanager
    def get(self, size: int) -> Iterator[memoryview]:
        """A view of exactly ``size`` bytes at the start of a page-aligned buffer."""
        cls = max(SMALLEST, 1 << (size - 1).bit_length())
        buf: mmap.mmap | None = None
        with self._lock:
            if self._free.get(cls):
                buf = self._free[cls].pop()
                self._kept -= cls
        if buf is None:
            buf = aligned_buffer(cls)
        view = memoryview(buf)[:size]
        try:
            yield view
        finally:
            view.release()
            with self._lock:
                if self._kept + cls <= self._keep:
                    self._free.setdefault(cls, []).append(buf)
                    self._kept += cls
                    buf = None
            if buf is not None:
                # a failed I/O's traceback may still hold a slice: the map goes with it then
                with contextlib.suppress(BufferError):
                    buf.close()

    def close(self) -> None:
        """Unmap every kept buffer."""
        with self._lock:
            free, self._free, self._kept = self._free, {}, 0
        for bufs in free.values():
            for buf in bufs:
                buf.close()


class FileDevice:
    """A file (or block device) as a BlockDevice and VectoredDevice: ``os.preadv`` /
    ``os.pwritev`` straight from and into the caller's buffers where the medium allows it.

    ``direct=None`` tries O_DIRECT and falls back to buffered I/O where the filesystem refuses
    it (tmpfs; logged once per path); ``True`` requires it. With O_DIRECT, a buffer that is
    not page aligned (``bytes``, a ``bytearray``) is staged through a pooled aligned one, and
    an unaligned span (a small record) is a read-modify-write of the ALIGN blocks around it,
    serialised per handle: two small records sharing a block must not both write back the
    block's old bytes. A buffered descriptor for those instead would read through this host's
    page cache, which the writer VM's writes to the shared disk never invalidate: a reader
    would serve stale bytes."""

    def __init__(self, path: str | Path, read_only: bool = False, *, direct: bool | None = None):
        self.path = Path(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = -1
        self.direct = False
        if direct is not False:
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as exc:
                if direct or exc.errno != errno.EINVAL:
                    raise device_error("open", exc, str(self.path)) from exc
                _warn_buffered(str(self.path))
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, flags)
            except OSError as exc:
                raise device_error("open", exc, str(self.path)) from exc
        try:
            self._size = os.lseek(self._fd, 0, os.SEEK_END) // ALIGN * ALIGN
            self._block = stat.S_ISBLK(os.fstat(self._fd).st_mode)
        except OSError as exc:
            os.close(self._fd)
            raise device_error("size", exc, str(self.path)) from exc
        self._can_discard = True
        self._pool = _Pool()
        self._rmw = threading.Lock()

    def size(self) -> int:
        """Size in bytes, rounded down to 4 KiB."""
        return self._size

    def _check(self, offset: int, length: int) -> None:
        check_io(offset, length, self._size, closed=self._fd < 0)

    def _preadv(self, offset: int, views: list[memoryview]) -> None:
        self._vectored("read", os.preadv, offset, views)

    def _pwritev(self, offset: int, views: list[memoryview]) -> None:
        self._vectored("write", os.pwritev, offset, views)

    def _vectored(self, op: str, call: Callable[[int, list[memoryview], int], int],
                  offset: int, views: list[memoryview]) -> None:
        """``call`` (preadv or pwritev) over ``views`` at ``offset``, IOV_MAX buffers a call;
        an error or a short transfer becomes the device's error."""
        for i in range(0, len(views), IOV_MAX):
            group = views[i : i + IOV_MAX]
            want = sum(v.nbytes for v in group)
            try:
                done = call(self._fd, group, offset)
            except OSError as exc:
                raise device_error(op, exc, f"at {offset}") from exc
            if done != want:
                raise short_io(op, offset)
            offset += want

    def read_at(self, offset: int, length: int) -> bytes:
        """Read straight from the medium (O_DIRECT) or the shared page cache."""
        self._check(offset, length)
        if not self.direct:
            try:
                data = os.pread(self._fd, length, offset)
            except OSError as exc:
                raise device_error("read", exc, f"at {offset}") from exc
            if len(data) != length:
                raise short_io("read", offset)
            return data
        start, end = offset // ALIGN * ALIGN, -(-(offset + length) // ALIGN) * ALIGN
        with self._pool.get(end - start) as stage:
            self._preadv(start, [stage])
            return bytes(stage[offset - start : offset - start + length])

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf``: no staging unless O_DIRECT cannot use it as it is (see the class)."""
        view = byte_view(buf)
        length = view.nbytes
        self._check(offset, length)
        if not self.direct or (offset % ALIGN == 0 and _page_aligned(view)):
            self._preadv(offset, [view])
            return
        start, end = offset // ALIGN * ALIGN, -(-(offset + length) // ALIGN) * ALIGN
        with self._pool.get(end - start) as stage:
            self._preadv(start, [stage])
            view[:] = stage[offset - start : offset - start + length]

    def write_at(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset`` (any length)."""
        self.writev(offset, [data])

    def writev(self, offset: int, parts: Sequence[Buffer]) -> None:
        """One ``pwritev`` of ``parts`` (staged only where O_DIRECT needs it, see the class)."""
        views = [byte_view(p) for p in parts]
        length = sum(v.nbytes for v in views)
        self._check(offset, length)
        if self.read_only:
            raise DeviceError("write to a read-only device", op="write", errno=errno.EROFS)
        if not self.direct or (offset % ALIGN == 0 and all(map(_page_aligned, views))):
            self._pwritev(offset, views)
            return
        start, end = offset // ALIGN * ALIGN, -(-(offset + length) // ALIGN) * ALIGN
        head, tail = offset - start, end - offset - length
        with self._pool.get(end - start) as stage, \
                self._rmw if head or tail else contextlib.nullcontext():
            if head:
                self._preadv(start, [stage[:ALIGN]])
            if tail and (end - ALIGN > start or not head):
                self._preadv(end - ALIGN, [stage[-ALIGN:]])
            at = head
            for v in views:
                stage[at : at + v.nbytes] = v
                at += v.nbytes
            self._pwritev(start, [stage])

    def flush(self) -> None:
        """fdatasync: completed writes are durable when it returns."""
        if self.read_only:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise device_error("flush", exc, str(self.path)) from exc

    def discard(self, offset: int, length: int) -> bool:
        """BLKDISCARD (block device) or a punched hole (file); False once the medium said
        it cannot (see the module docstring)."""
        check_discard(offset, length, self._size, closed=self._fd < 0, read_only=self.read_only)
        if not self._can_discard or not length:
            return False
        try:
            if self._block:
                fcntl.ioctl(self._fd, BLKDISCARD, struct.pack("=QQ", offset, length))
            else:
                punch_hole(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._can_discard = False
                return discard_unsupported(str(self.path), exc.errno or 0)
            raise device_error("discard", exc, f"at {offset}") from exc
        return True

    def close(self) -> None:
        """Close the file and unmap the staging buffers (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pool.close()
