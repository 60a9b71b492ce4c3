"""The block-device backends' own machinery, without a medium that could hide it: librbd's
aio queue (depth, one error raised once after every completion, refused submissions) on fake
bindings, the split of ``writev`` parts into per-object bytes, and the file backend's O_DIRECT
fallback and its copy-free path for page-aligned buffers."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agents.backends import file as file_backend
from agents.backends.direct import DirectDevice
from agents.backends.file import FileDevice
from agents.backends.librbd import RbdDevice, _joined
from agents.device import ALIGN, aligned_buffer, vectored
from agents.errors import DeviceError
from agents.testing import MemoryDevice

pytestmark = pytest.mark.unit

OBJ = 64 << 10  # the fake image's object size: small, so a test spans many objects


# ---- splitting writev parts into per-object bytes ----------------------------------------


def test_joined_cuts_parts_at_piece_boundaries() -> None:
    whole = bytes(range(256)) * 40
    parts: list[Any] = [whole[:100], bytearray(whole[100:3000]), b"", memoryview(whole[3000:])]
    pieces = [(0, 50), (50, 2950), (3000, 4000), (7000, len(whole) - 7000)]
    out = list(_joined(parts, pieces))
    assert [len(b) for b in out] == [n for _, n in pieces]
    assert b"".join(out) == whole
    assert all(type(b) is bytes for b in out)


def test_joined_passes_a_bytes_part_that_is_exactly_one_piece_as_it_is() -> None:
    first, second = os.urandom(OBJ), os.urandom(OBJ)
    out = list(_joined([first, second], [(0, OBJ), (OBJ, OBJ)]))
    assert out[0] is first and out[1] is second


# ---- librbd's aio queue, on fake bindings -------------------------------------------------


class _Completion:
    def __init__(self, ret: int) -> None:
        self.ret = ret

    def get_return_value(self) -> int:
        return self.ret


class _FakeImage:
    """An image in RAM whose aio completes on other threads after a moment; the aio request
    at ``fail_at`` completes with ``fail_code`` (negative errno) and submissions at
    ``refuse_at`` raise the binding's error."""

    def __init__(self, bindings: SimpleNamespace, size: int) -> None:
        self.bindings = bindings
        self.data = bytearray(size)
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.submitted = 0
        self.completed = 0
        self.sync_calls = 0
        self.fail_at: int | None = None
        self.fail_code = -errno.EIO
        self.refuse_at: int | None = None

    def size(self) -> int:
        return len(self.data)

    def stat(self) -> dict[str, int]:
        return {"obj_size": OBJ, "size": len(self.data)}

    def lock_acquire(self, mode: int) -> None:
        pass

    def lock_release(self) -> None:
        pass

    def close(self) -> None:
        pass

    def read(self, offset: int, length: int) -> bytes:
        self.sync_calls += 1
        return bytes(self.data[offset : offset + length])

    def write(self, data: bytes, offset: int) -> None:
        assert type(data) is bytes  # what the real binding takes
        self.sync_calls += 1
        self.data[offset : offset + len(data)] = data

    def _start(self, offset: int, finish: Callable[[_Completion], None]) -> _Completion:
        if offset == self.refuse_at:
            raise self.bindings.rbd.Error("submission refused", errno=errno.EIO)
        with self.lock:
            self.submitted += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        completion = _Completion(self.fail_code if offset == self.fail_at else 0)

        def complete() -> None:
            time.sleep(0.002)
            with self.lock:
                self.inflight -= 1
                self.completed += 1  # before the callback: it releases the waiting call
            finish(completion)

        threading.Thread(target=complete).start()
        return completion

    def aio_write(self, data: bytes, offset: int, oncomplete: Any) -> _Completion:
        assert type(data) is bytes

        def finish(completion: _Completion) -> None:
            if completion.ret == 0:
                self.data[offset : offset + len(data)] = data
            oncomplete(completion)

        return self._start(offset, finish)

    def aio_read(self, offset: int, length: int, oncomplete: Any) -> _Completion:
        def finish(completion: _Completion) -> None:
            oncomplete(completion, bytes(self.data[offset : offset + length])
                       if completion.ret == 0 else None)

        return self._start(offset, finish)


def _bindings(size: int) -> tuple[SimpleNamespace, _FakeImage]:
    class Error(Exception):
        def __init__(self, message: str, errno: int | None = None) -> None:
            super().__init__(message)
            self.errno = errno

    class ConnectionShutdown(Error):
        pass

    class ReadOnlyImage(Error):
        pass

    bindings = SimpleNamespace()
    image = _FakeImage(bindings, size)
    cluster = SimpleNamespace(connect=lambda timeout: None, get_addrs=lambda: "v2:fake",
                              shutdown=lambda: None,
                              open_ioctx=lambda pool: SimpleNamespace(close=lambda: None))
    bindings.rados = SimpleNamespace(Rados=lambda **kw: cluster, Error=Error,
                                     ConnectionShutdown=ConnectionShutdown)
    bindings.rbd = SimpleNamespace(Image=lambda ioctx, name, read_only: image, Error=Error,
                                   ConnectionShutdown=ConnectionShutdown,
                                   ReadOnlyImage=ReadOnlyImage, RBD_LOCK_MODE_EXCLUSIVE=1)
    return bindings, image


@pytest.fixture
def fake_rbd() -> Iterator[tuple[RbdDevice, _FakeImage]]:
    bindings, image = _bindings(64 * OBJ)
    dev = RbdDevice("conf", "pool", "img", "user", bindings=(bindings.rados, bindings.rbd),
                    aio_depth=4)
    try:
        yield dev, image
    finally:
        dev.close()


def test_many_objects_go_through_aio_at_most_depth_in_flight(
    fake_rbd: tuple[RbdDevice, _FakeImage],
) -> None:
    dev, image = fake_rbd
    data = os.urandom(20 * OBJ)
    dev.writev(OBJ // 2, [data[: 3 * OBJ + 5], memoryview(data)[3 * OBJ + 5 :]])
    assert image.submitted == 21 and image.completed == 21  # 20 objects, half-object shift
    assert image.max_inflight == 4, "the queue depth was not used or not respected"
    assert image.sync_calls == 0
    back = bytearray(20 * OBJ)
    dev.readinto(OBJ // 2, memoryview(back))
    assert back == data and image.max_inflight == 4
    assert dev.read_at(OBJ // 2, 20 * OBJ) == data


def test_an_io_inside_one_object_stays_synchronous(
    fake_rbd: tuple[RbdDevice, _FakeImage],
) -> None:
    dev, image = fake_rbd
    dev.write_at(OBJ + 10, b"record")
    assert dev.read_at(OBJ + 10, 6) == b"record"
    assert image.submitted == 0 and image.sync_calls == 2


@pytest.mark.parametrize("op", ["write", "read"])
def test_a_failed_completion_is_raised_once_after_every_completion(
    fake_rbd: tuple[RbdDevice, _FakeImage], op: str
) -> None:
    dev, image = fake_rbd
    image.fail_at, image.fail_code = 2 * OBJ, -errno.ESHUTDOWN  # what a fenced client gets
    with pytest.raises(DeviceError) as err:
        if op == "write":
            dev.writev(0, [bytes(12 * OBJ)])
        else:
            dev.readinto(0, memoryview(bytearray(12 * OBJ)))
    assert err.value.fields == {"op": op, "errno": errno.ESHUTDOWN}
    assert image.completed == image.submitted and image.inflight == 0
    assert image.submitted < 12, "requests kept being submitted after the failure"


def test_a_refused_submission_drains_the_others_then_raises(
    fake_rbd: tuple[RbdDevice, _FakeImage],
) -> None:
    dev, image = fake_rbd
    image.refuse_at = 3 * OBJ
    with pytest.raises(DeviceError) as err:
        dev.writev(0, [bytes(8 * OBJ)])
    assert err.value.fields == {"op": "write", "errno": errno.EIO}
    assert image.submitted == 3 and image.completed == 3


def test_memory_device_gets_the_vectored_calls_through_copies() -> None:
    dev = vectored(MemoryDevice(16 * ALIGN))
    dev.writev(100, [b"ab", memoryview(b"cd"), bytearray(b"ef")])
    buf = bytearray(6)
    dev.readinto(100, memoryview(buf))
    assert buf == b"abcdef"


# ---- the file backend ----------------------------------------------------------------------


@pytest.fixture
def image() -> Iterator[Path]:
    """A file on /var/tmp (ext4 here: O_DIRECT works)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="rbdfleet-backend-") as d:
        path = Path(d) / "image"
        with path.open("wb") as f:
            f.truncate(64 * ALIGN)
        yield path


def test_o_direct_refused_falls_back_to_buffered_logged_once(
    image: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A filesystem that refuses O_DIRECT (EINVAL at open: FUSE, older tmpfs): the file
    backend goes buffered and says so once per path; the device backend refuses."""
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    file_backend._warn_buffered.cache_clear()
    with caplog.at_level(logging.WARNING, logger="agents.backends.file"):
        devs = [FileDevice(image), FileDevice(image, read_only=True)]
    try:
        assert [d.direct for d in devs] == [False, False]
        assert [r.message.split(":")[0] for r in caplog.records] == [
            f"event=o_direct_unsupported path={image}"]
        devs[0].writev(5, [b"unaligned", bytearray(b" record")])
        got = bytearray(16)
        devs[1].readinto(5, memoryview(got))
        assert got == b"unaligned record"
    finally:
        for d in devs:
            d.close()
    with pytest.raises(DeviceError) as err:
        DirectDevice(image)
    assert err.value.fields == {"op": "open", "errno": errno.EINVAL}


def test_page_aligned_buffers_are_used_as_they_are(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT straight into and out of the caller's page-aligned buffer: the staging pool
    is never asked; a bytes object or an unaligned span is staged."""
    dev = FileDevice(image)
    staged: list[int] = []
    real_get = file_backend._Pool.get

    def spy(pool: Any, size: int) -> Any:
        staged.append(size)
        return real_get(pool, size)

    monkeypatch.setattr(file_backend._Pool, "get", spy)
    buf = aligned_buffer(4 * ALIGN)
    try:
        assert dev.direct
        buf[:] = os.urandom(4 * ALIGN)
        dev.writev(ALIGN, [memoryview(buf)[: 2 * ALIGN], memoryview(buf)[2 * ALIGN :]])
        back = aligned_buffer(4 * ALIGN)
        dev.readinto(ALIGN, memoryview(back))
        assert back[:] == buf[:]
        back.close()
        assert staged == []
        dev.write_at(0, bytes(ALIGN))  # bytes are never page aligned
        dev.read_at(10, 20)  # an unaligned span
        assert staged == [ALIGN, ALIGN]
    finally:
        buf.close()
        dev.close()


def test_the_staging_pool_keeps_a_bounded_number_of_bytes() -> None:
    pool = file_backend._Pool(keep=4 * file_backend.SMALLEST)
    with pool.get(3 * file_backend.SMALLEST) as a, pool.get(10) as b, pool.get(10) as c:
        assert len(a) == 3 * file_backend.SMALLEST and len(b) == len(c) == 10
    assert pool._kept <= 4 * file_backend.SMALLEST
    pool.close()
    assert pool._kept == 0
