"""BlockDevice on an RBD image through librbd: the ONLY agents module importing rados/rbd.

- A writer opens the image read-write and takes the MANAGED exclusive lock
  (``lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)``), so a second librbd writer is refused at once
  (``ReadOnlyImage`` -> DeviceError EROFS) instead of the lock silently moving to it.
- A reader opens with ``read_only=True`` (no lock, no writes possible).
- ``rbd_cache=false``: another client's writes are visible at once, and a completed write is
  on the OSDs (so flush has nothing to do and makes no call).
- ``rbd_skip_partial_discard=false``: a discard that does not cover whole 64 KiB pieces
  zeroes what librbd would skip, so the OSD frees it (QEMU's librbd, for the ``device:``
  backend in VMs, takes the same setting from the hypervisor's ceph.conf).
- After a fence (``osd blocklist``), every call raises ``ConnectionShutdown`` (108): mapped to
  DeviceError errno ESHUTDOWN. The handle cannot recover; a new RbdDevice is needed.
  The next writer's ``lock_acquire`` breaks a blocklisted owner's lock (~80 ms measured); an
  owner that died WITHOUT a fence keeps it until its watch expires (~30 s): fence first.
- Keys never appear in arguments or messages: the keyring is named by path only.
- I/O spanning several RADOS objects is split at object boundaries into ``aio_read`` /
  ``aio_write`` requests, at most ``aio_depth`` (8) of one call in flight (the OSD works on
  several objects at once, where one synchronous call per object waited for each in turn).
  A call returns, or raises, only once every request it issued has completed; the first
  failed completion is raised as DeviceError with its errno (a fenced handle: ESHUTDOWN, as
  from the synchronous calls). An I/O inside one object stays one synchronous call: the
  journal's small writes wait for one OSD round trip either way, and no callback hops
  through librbd's finisher thread back into Python.
- The binding takes ``bytes`` only: ``writev`` joins each object's share of its parts into
  one ``bytes`` (a part that is exactly one object's piece is passed as it is), and reads
  arrive as one ``bytes`` per object, copied into the caller's buffer by ``readinto``.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

from agents.device import ALIGN, Buffer, byte_view, check_discard, check_io, short_io
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


DEPTH = 8  # aio requests of one call in flight at once
Done = Callable[[int, bytes | None], None]  # a completion's errno (0: none) and read bytes
Land = Callable[[int, bytes], None]  # takes one object's bytes read at an offset
Submit = Callable[[Done], None]  # starts one aio request (see RbdDevice._aio)

def rbd_error(op: str, code: int | None, what: str) -> DeviceError:
    """The project's error for a librbd failure: errno kept (negative or positive), EIO when
    librbd gave none."""
    code = abs(code) if code else errno.EIO
    return DeviceError(f"librbd {op} failed: {what} (errno {code})", op=op, errno=code)


@contextmanager
def translate_rbd_errors(op: str, rados: ModuleType, rbd: ModuleType) -> Iterator[None]:
    """Map rados/rbd exceptions to DeviceError(op, errno), cause chained."""
    try:
        yield
    except (rbd.Error, rados.Error) as exc:
        code = getattr(exc, "errno", None)
        if isinstance(exc, rbd.ReadOnlyImage):
            code = errno.EROFS
        elif isinstance(exc, rbd.ConnectionShutdown | rados.ConnectionShutdown):
            code = errno.ESHUTDOWN
        raise rbd_error(op, code if isinstance(code, int) else None,
                        type(exc).__name__) from exc


class _Inflight:
    """The aio requests of one call: at most ``depth`` in flight, the first failure kept,
    read bytes queued for the calling thread (``finished`` runs on librbd's callback
    thread, which never sees the caller's buffers: a completion object, and whatever its
    callback holds, can outlive the call by a moment)."""

    def __init__(self, depth: int) -> None:
        self._depth = depth
        self._cond = threading.Condition()
        self._count = 0
        self._arrived: list[tuple[int, bytes]] = []
        self.failed: tuple[int, int] | None = None  # (offset, errno) of the first failure

    def _wait(self, until: Callable[[], bool], land: Land | None) -> None:
        """Wait until ``until()`` holds, handing arrived bytes to ``land`` meanwhile."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: until() or bool(self._arrived))
                arrived, self._arrived = self._arrived, []
                satisfied = until()
            if land is not None:
                for at, data in arrived:
                    land(at, data)
            if satisfied:
                return

    def reserve(self, land: Land | None) -> bool:
        """Wait for a free slot and take it; False (no slot taken) once a request failed."""
        self._wait(lambda: self._count < self._depth, land)
        with self._cond:
            if self.failed is not None:
                return False
            self._count += 1
            return True

    def finished(self, offset: int, code: int, data: bytes | None = None) -> None:
        """A request ended (``code`` 0, or its errno; a read's ``data``); frees its slot."""
        with self._cond:
            self._count -= 1
            if code and self.failed is None:
                self.failed = (offset, code)
            if data is not None:
                self._arrived.append((offset, data))
            self._cond.notify_all()

    def drain(self, land: Land | None) -> None:
        """Wait until no request of this call is in flight (``land`` None: drop read bytes)."""
        self._wait(lambda: self._count == 0, land)


def _joined(parts: Sequence[Buffer], pieces: Iterable[tuple[int, int]]) -> Iterator[bytes]:
    """For each ``(offset, length)`` piece, in order, its bytes out of ``parts`` laid back to
    back: a ``bytes`` part that is exactly one piece is yielded as it is, anything else is
    joined (the binding takes ``bytes`` only)."""
    index, at = 0, 0  # current part, position inside it
    for _, length in pieces:
        part = parts[index] if index < len(parts) else b""
        if at == 0 and type(part) is bytes and len(part) == length:
            index += 1
            yield part
            continue
        slices: list[memoryview] = []
        need = length
        while need:
            view = byte_view(parts[index])
            take = min(need, view.nbytes - at)
            slices.append(view[at : at + take])
            need -= take
            at += take
            if at == view.nbytes:
                index, at = index + 1, 0
        yield b"".join(slices)


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
        aio_depth: int = DEPTH,
    ) -> None:
        self._rados, self._rbd = bindings or load_bindings()
        self.read_only = read_only
        self.pool = pool
        self.image_name = image
        # a discard librbd would skip (one not covering whole rbd_discard_granularity_bytes
        # pieces) zeroes its range instead, which the OSD frees: deleted small files and the
        # journal ring given back at rest leave nothing behind (docs/format.md, "Discards")
        options = {"rbd_cache": "false", "rbd_skip_partial_discard": "false"}
        if keyring:
            options["keyring"] = keyring
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._locked = False
        self._aio_depth = aio_depth
        try:
            with translate_rbd_errors("open", self._rados, self._rbd):
                self._cluster = self._rados.Rados(conffile=conf, rados_id=user, conf=options)
                self._cluster.connect(timeout=30)
                self._ioctx = self._cluster.open_ioctx(pool)
                self._image = self._rbd.Image(self._ioctx, image, read_only=read_only)
                self._size = self._image.size() // ALIGN * ALIGN
                self._object_size = int(self._image.stat()["obj_size"])
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

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``[offset, offset+length)`` cut at RADOS object boundaries."""
        pieces = []
        end = offset + length
        while offset < end:
            stop = min(end, (offset // self._object_size + 1) * self._object_size)
            pieces.append((offset, stop - offset))
            offset = stop
        return pieces

    def _aio(self, op: str, requests: Iterable[tuple[int, Submit]],
             land: Land | None = None) -> None:
        """Issue ``(offset, submit)`` requests, ``aio_depth`` in flight; ``submit(done)``
        starts one whose completion calls ``done(code, data)`` (code 0 or an errno; a read's
        bytes, handed to ``land`` on this thread). Returns once all have ended; the first
        failure (a completion's or a refused submission's) raises."""
        inflight = _Inflight(self._aio_depth)
        try:
            for offset, submit in requests:
                if not inflight.reserve(land):
                    break

                def done(code: int, data: bytes | None = None, offset: int = offset) -> None:
                    inflight.finished(offset, code, data)

                try:
                    with translate_rbd_errors(op, self._rados, self._rbd):
                        submit(done)
                except BaseException:
                    inflight.finished(offset, 0)  # never started: its slot is free again
                    raise
            inflight.drain(land)
        finally:
            inflight.drain(None)  # after an error too: nothing of this call stays in flight
        if inflight.failed is not None:
            at, code = inflight.failed
            raise rbd_error(op, code, f"completion at {at}: {os.strerror(code)}")

    def _read(self, offset: int, length: int, land: Land) -> None:
        """Read the range, handing each object's bytes to ``land(offset, data)`` on this
        thread, in the order they arrive."""
        self._check(offset, length)
        pieces = self._pieces(offset, length)
        if len(pieces) <= 1:
            with translate_rbd_errors("read", self._rados, self._rbd):
                data: bytes = self._image.read(offset, length) if length else b""
            if len(data) != length:
                raise short_io("read", offset)
            land(offset, data)
            return

        def request(at: int, n: int) -> tuple[int, Submit]:
            def submit(done: Done) -> None:
                def landed(completion: Any, data: bytes | None) -> None:
                    code, got = errno.EIO, None
                    try:
                        ret = completion.get_return_value()
                        if ret < 0:
                            code = -ret
                        elif data is not None and len(data) == n:
                            code, got = 0, data
                    finally:
                        done(code, got)

                self._image.aio_read(at, n, landed)

            return at, submit

        self._aio("read", (request(at, n) for at, n in pieces), land)

    def read_at(self, offset: int, length: int) -> bytes:
        """Read from the OSDs (no client cache)."""
        got: dict[int, bytes] = {}
        self._read(offset, length, got.__setitem__)
        return got[offset] if len(got) == 1 else b"".join(got[at] for at in sorted(got))

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from the OSDs: each object's bytes copied in as they arrive (by this
        thread: a late callback never holds the buffer)."""
        view = byte_view(buf)

        def land(at: int, data: bytes) -> None:
            view[at - offset : at - offset + len(data)] = data

        self._read(offset, view.nbytes, land)

    def write_at(self, offset: int, data: Buffer) -> None:
        """Write to the OSDs; durable when it returns (rbd_cache=false)."""
        self.writev(offset, [data])

    def writev(self, offset: int, parts: Sequence[Buffer]) -> None:
        """Write ``parts`` back to back from ``offset``; durable when it returns."""
        length = sum(byte_view(p).nbytes for p in parts)
        self._check(offset, length)
        if self.read_only:
            raise DeviceError("write to a read-only image", op="write", errno=errno.EROFS)
        pieces = self._pieces(offset, length)
        chunks = _joined(parts, pieces)
        if len(pieces) <= 1:
            if pieces:
                with translate_rbd_errors("write", self._rados, self._rbd):
                    self._image.write(next(chunks), offset)
            return

        def request(at: int) -> tuple[int, Submit]:
            def submit(done: Done) -> None:
                chunk = next(chunks)

                # the binding keeps no reference to the data it hands librbd: the callback,
                # held by the completion until it ran, keeps ``chunk`` alive
                def written(completion: Any, _chunk: bytes = chunk) -> None:
                    code = errno.EIO
                    try:
                        ret = completion.get_return_value()
                        code = -ret if ret < 0 else 0
                    finally:
                        done(code, None)

                self._image.aio_write(chunk, at, written)

            return at, submit

        self._aio("write", (request(at) for at, _ in pieces))

    def flush(self) -> None:
        """Nothing to do: with rbd_cache=false every write returned only once the OSDs
        acknowledged it (committed), its aio requests included (each call waits for all of
        its own), so a librbd flush would be a round trip through librbd's queue for nothing
        (it sat twice on each group commit's critical path)."""
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
