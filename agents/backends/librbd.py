"""BlockDevice on an RBD image through librbd: the ONLY agents module importing rados/rbd.

- A writer opens the image read-write and takes the MANAGED exclusive lock
  (``lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)``), so a second librbd writer is refused at once
  (``ReadOnlyImage`` -> DeviceError EROFS) instead of the lock silently moving to it.
- A reader opens with ``read_only=True`` (no lock, no writes possible).
- ``rbd_cache=false``: another client's writes are visible at once, and a completed write is
  on the OSDs (so flush has nothing to do and makes no call).
- After a fence (``osd blocklist``), every call raises ``ConnectionShutdown`` (108): mapped to
  DeviceError errno ESHUTDOWN. The handle cannot recover; a new RbdDevice is needed.
  The next writer's ``lock_acquire`` breaks a blocklisted owner's lock (~80 ms measured); an
  owner that died WITHOUT a fence keeps it until its watch expires (~30 s): fence first.
- Keys never appear in arguments or messages: the keyring is named by path only.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

from agents.device import ALIGN, check_discard, check_io
from agents.errors import BindingUnavailable, DeviceError

__all__ = ["RbdDevice", "load_bindings"]


def load_bindings() -> tuple[ModuleType, ModuleType]:
    """The ``rados`` and ``rbd`` modules, or BindingUnavailable naming the Debian package."""
    try:
        import rados
    except ImportError as exc:
        raise BindingUnavailable("rados", "python3-rados") from exc
    try:
        import rbd
    except ImportError as exc:
        raise BindingUnavailable("rbd", "python3-rbd") from exc
    return rados, rbd


@contextmanager
def translate_rbd_errors(op: str, rados: ModuleType, rbd: ModuleType) -> Iterator[None]:
    """Map rados/rbd errors to DeviceError(op, errno), cause chained."""
    try:
        yield
    except (rbd.Error, rados.Error) as exc:
        code = getattr(exc, "errno", None)
        if isinstance(exc, rbd.ReadOnlyImage):
            code = errno.EROFS
        elif isinstance(exc, rbd.ConnectionShutdown | rados.ConnectionShutdown):
            code = errno.ESHUTDOWN
        code = abs(code) if isinstance(code, int) and code else errno.EIO
        raise DeviceError(
            f"librbd {op} failed: {type(exc).__name__} (errno {code})", op=op, errno=code
        ) from exc


class RbdDevice:
    """An RBD image as a BlockDevice (see the module docstring)."""

    def __init__(
        self,
        conf: str,
        pool: str,
        image: str,
        user: str,
        keyring: str | None = None,
        read_only: bool = False,
        *,
        bindings: tuple[ModuleType, ModuleType] | None = None,
    ) -> None:
        self._rados, self._rbd = bindings or load_bindings()
        self.read_only = read_only
        self.pool = pool
        self.image_name = image
        options = {"rbd_cache": "false"}
        if keyring:
            options["keyring"] = keyring
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._locked = False
        try:
            with translate_rbd_errors("open", self._rados, self._rbd):
                self._cluster = self._rados.Rados(conffile=conf, rados_id=user, conf=options)
                self._cluster.connect(timeout=30)
                self._ioctx = self._cluster.open_ioctx(pool)
                self._image = self._rbd.Image(self._ioctx, image, read_only=read_only)
                self._size = self._image.size() // ALIGN * ALIGN
                if not read_only:
                    self._image.lock_acquire(self._rbd.RBD_LOCK_MODE_EXCLUSIVE)
                    self._locked = True
        except BaseException:
            self.close()
            raise

    @property
    def client_address(self) -> str:
        """This handle's RADOS address (what a fence blocklists)."""
        return str(self._cluster.get_addrs())

    def size(self) -> int:
        """Image size in bytes, rounded down to 4 KiB."""
        return int(self._size)

    def _check(self, offset: int, length: int) -> None:
        check_io(offset, length, self._size, closed=self._image is None)

    def read_at(self, offset: int, length: int) -> bytes:
        """Read from the OSDs (no client cache)."""
        self._check(offset, length)
        with translate_rbd_errors("read", self._rados, self._rbd):
            data: bytes = self._image.read(offset, length)
        if len(data) != length:
            raise DeviceError(f"short read at {offset}", op="read", errno=errno.EIO)
        return data

    def write_at(self, offset: int, data: bytes) -> None:
        """Write to the OSDs; durable when it returns (rbd_cache=false)."""
        self._check(offset, len(data))
        if self.read_only:
            raise DeviceError("write to a read-only image", op="write", errno=errno.EROFS)
        with translate_rbd_errors("write", self._rados, self._rbd):
            self._image.write(data, offset)

    def flush(self) -> None:
        """Nothing to do: with rbd_cache=false every :meth:`write_at` returned only once the
        OSDs acknowledged it (committed), and this class issues no asynchronous writes, so
        a librbd flush would be a round trip through librbd's queue for nothing (it sat
        twice on each group commit's critical path)."""
        if self._image is None:
            raise DeviceError("device is closed", op="flush", errno=errno.EBADF)

    def discard(self, offset: int, length: int) -> bool:
        """``Image.discard``: objects the range covers whole are deleted (their space goes back
        to the pool), the parts of others are zeroed (synchronous, like every call here)."""
        check_discard(offset, length, self._size, closed=self._image is None,
                      read_only=self.read_only)
        with translate_rbd_errors("discard", self._rados, self._rbd):
            self._image.discard(offset, length)
        return True

    def close(self) -> None:
        """Release the lock, close image, ioctx and cluster handle (idempotent; a fenced
        handle's lock release fails and is left to the next writer's lock break)."""
        image, self._image = self._image, None
        if image is not None:
            if self._locked:
                with suppress(self._rbd.Error, self._rados.Error):
                    image.lock_release()
                self._locked = False
            with suppress(self._rbd.Error, self._rados.Error):
                image.close()
        ioctx, self._ioctx = self._ioctx, None
        if ioctx is not None:
            ioctx.close()
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.shutdown()
