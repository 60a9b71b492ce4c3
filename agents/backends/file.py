"""BlockDevice on a file or block device with pread/pwrite, O_DIRECT when the filesystem
allows it (not tmpfs), fdatasync on flush. Discard: ``BLKDISCARD`` on a block device (the
guest's virtio disk: QEMU passes it to librbd when the disk has ``discard='unmap'``), a
punched hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)`` through libc, ctypes) on a file; a medium
that answers EOPNOTSUPP is logged once and not asked again.

What it does not guarantee: without O_DIRECT (tmpfs, some FUSE filesystems) a second handle in
another process still sees writes at once (same page cache), but another *host* would not.
With O_DIRECT every buffer must be page aligned: data is staged through an mmap buffer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from agents.device import ALIGN, check_discard, check_io, discard_unsupported
from agents.errors import DeviceError

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


KEEP = 1 << 20  # staging bytes kept per thread between I/Os (idle footprint)


class _Buffers(threading.local):
    """Page-aligned staging buffers (O_DIRECT needs them): up to KEEP bytes stay mapped per
    thread; a bigger I/O maps a temporary one (its page faults cost less than an idle agent
    holding 4 MiB per I/O thread)."""

    def __init__(self) -> None:
        self.kept: mmap.mmap | None = None

    @contextlib.contextmanager
    def get(self, size: int) -> Iterator[mmap.mmap]:
        if size > KEEP:
            buf = mmap.mmap(-1, size)
            try:
                yield buf
            finally:
                buf.close()
            return
        if self.kept is None:
            self.kept = mmap.mmap(-1, KEEP)
        yield self.kept


class FileDevice:
    """A file (or block device) as a BlockDevice. ``direct=None`` tries O_DIRECT and falls
    back to buffered I/O where the filesystem refuses it; ``True`` requires it."""

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
        self._buffers = _Buffers()

    def size(self) -> int:
        """Size in bytes, rounded down to 4 KiB."""
        return self._size

    def _check(self, offset: int, length: int) -> None:
        check_io(offset, length, self._size, closed=self._fd < 0)

    def read_at(self, offset: int, length: int) -> bytes:
        """Read straight from the medium (O_DIRECT) or the shared page cache."""
        self._check(offset, length)
        try:
            if not self.direct:
                data = os.pread(self._fd, length, offset)
            else:
                with self._buffers.get(length) as buf:
                    view = memoryview(buf)[:length]
                    try:
                        got = os.preadv(self._fd, [view], offset)
                        data = bytes(view[:got])
                    finally:
                        view.release()
        except OSError as exc:
            raise device_error("read", exc, f"at {offset}") from exc
        if len(data) != length:
            raise DeviceError(f"short read at {offset}", op="read", errno=errno.EIO)
        return data

    def write_at(self, offset: int, data: bytes) -> None:
        """Write ``data`` (a multiple of 4 KiB) at ``offset``."""
        self._check(offset, len(data))
        if self.read_only:
            raise DeviceError("write to a read-only device", op="write", errno=errno.EROFS)
        try:
            if not self.direct:
                done = os.pwrite(self._fd, data, offset)
            else:
                with self._buffers.get(len(data)) as buf:
                    view = memoryview(buf)[: len(data)]
                    try:
                        view[:] = data
                        done = os.pwritev(self._fd, [view], offset)
                    finally:
                        view.release()
        except OSError as exc:
            raise device_error("write", exc, f"at {offset}") from exc
        if done != len(data):
            raise DeviceError(f"short write at {offset}", op="write", errno=errno.EIO)

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
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
