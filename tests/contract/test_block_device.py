"""The BlockDevice contract (agents.testing.check_block_device) and the VectoredDevice one
(check_vectored_device below: readinto, writev, unaligned edges, a write of many objects read
back) against every backend: memory (through agents.device.vectored), file (buffered, fallen
back to buffered where O_DIRECT is refused, and O_DIRECT), direct (O_DIRECT on ext4 under
/var/tmp), direct on a loop block device, and librbd on the real sandbox Ceph cluster; plus
librbd's own promises (a second writer is refused by Ceph, a fenced handle fails with
ESHUTDOWN, synchronous or aio, a failed aio completion is raised once) and a Volume round
trip on each real backend."""

from __future__ import annotations

import errno
import itertools
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.backends.direct import DirectDevice, find_device_by_serial
from agents.backends.file import FileDevice
from agents.backends.librbd import RbdDevice
from agents.device import ALIGN, BlockDevice, aligned_buffer, vectored
from agents.errors import DeviceError, NotFound
from agents.testing import MemoryDevice, check_block_device
from agents.volume import Volume
from tests.shared_disk import LoopAttachments

pytestmark = pytest.mark.contract

SIZE = 16 << 20
Maker = Callable[[bool], BlockDevice]


@pytest.fixture
def var_tmp_image() -> Iterator[Path]:
    """A sparse image file on /var/tmp (ext4 here: O_DIRECT works; tmpfs would refuse it)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="rbdfleet-test-dev-") as d:
        image = Path(d) / "image"
        with image.open("wb") as f:
            f.truncate(SIZE)
        yield image


@pytest.fixture
def loop_disks(var_tmp_image: Path) -> Iterator[LoopAttachments]:
    """Loop block devices (direct I/O) over one image file, detached after the test."""
    disks = LoopAttachments(var_tmp_image)
    try:
        yield disks
    finally:
        assert disks.close() == []


def _refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every O_DIRECT open fail with EINVAL, as on a filesystem without it."""
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)


@pytest.fixture(params=["memory", "file-buffered", "file-fallback", "file", "direct", "loop",
                        "librbd"])
def maker(request: pytest.FixtureRequest) -> Iterator[Maker]:
    """``make(read_only)`` -> a new handle on one medium, per backend (``file-fallback``: the
    file backend where O_DIRECT is refused, so it fell back to buffered I/O)."""
    kind = request.param
    if kind == "loop":  # what an agent in a VM opens: a block device, O_DIRECT
        disks = request.getfixturevalue("loop_disks")
        count = itertools.count()
        yield lambda ro: DirectDevice(disks.attach(f"n{next(count)}", writable=not ro), ro)
    elif kind == "memory":
        medium = MemoryDevice(SIZE)
        yield lambda ro: medium.reopen(read_only=ro)
    elif kind == "librbd":
        cluster, image = request.getfixturevalue("rbd_image")
        yield lambda ro: RbdDevice(
            str(cluster.conf),
            cluster.pool,
            image,
            "admin",
            keyring=str(cluster.keyring),
            read_only=ro,
        )
    else:
        path = request.getfixturevalue("var_tmp_image")
        if kind == "file-buffered":
            yield lambda ro: FileDevice(path, ro, direct=False)
        elif kind == "file-fallback":
            _refuse_o_direct(request.getfixturevalue("monkeypatch"))

            def fallback(ro: bool) -> BlockDevice:
                dev = FileDevice(path, ro)
                assert not dev.direct, "O_DIRECT was refused: the handle must be buffered"
                return dev

            yield fallback
        elif kind == "file":
            yield lambda ro: FileDevice(path, ro)
        else:
            yield lambda ro: DirectDevice(path, ro)


def test_block_device_contract(maker: Maker) -> None:
    check_block_device(maker)


def _pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ at every position from any other seed's (a misplaced byte
    shows), cheaper than os.urandom for tens of MiB."""
    unit = seed.to_bytes(2, "little") + os.urandom(4094)
    return (unit * (n // len(unit) + 1))[:n]


def check_vectored_device(make: Maker) -> None:
    """The VectoredDevice contract: ``readinto`` and ``writev`` agree with ``read_at`` and
    ``write_at`` for any buffer kind and any span, unaligned edges keep their neighbours,
    concurrent small writes sharing a block all land, and a write of many RADOS objects
    (more than librbd's queue depth) reads back whole through another handle."""
    writer, reader = vectored(make(False)), vectored(make(True))
    try:
        size = writer.size()
        base = _pattern(4 * ALIGN * 4, 1)
        writer.writev(0, [base])

        # writev: parts of every kind, empty ones too, at an aligned and an unaligned start
        mapped = aligned_buffer(2 * ALIGN)
        mapped[:] = _pattern(2 * ALIGN, 2)
        parts: list[Any] = [b"head", bytearray(_pattern(3000, 3)), b"",
                            memoryview(mapped), memoryview(bytearray(b"tail")), mapped]
        joined = b"".join(bytes(p) for p in parts)
        for at in (ALIGN, 5 * ALIGN + 123):
            writer.writev(at, parts)
            assert reader.read_at(at, len(joined)) == joined, f"writev at {at}"
            assert reader.read_at(at - 7, 7) == base[at - 7 : at], "writev reached before"
            end = at + len(joined)
            assert reader.read_at(end, 9) == base[end : end + 9], "writev reached past"
            writer.write_at(0, base)  # back to the base pattern for the next start

        # readinto: page-aligned, unaligned (bytearray) and offset-into-a-slice buffers, at
        # aligned and unaligned offsets and lengths; a reader handle sees the same bytes
        for at, n in ((0, 2 * ALIGN), (ALIGN + 1, 3 * ALIGN), (7, 100), (3 * ALIGN - 5, 10)):
            want = base[at : at + n]
            page = aligned_buffer(n)
            odd = bytearray(n + 3)
            for dev in (writer, reader):
                dev.readinto(at, memoryview(page)[:n])
                assert page[:n] == want, f"readinto an aligned buffer at {at}+{n}"
                dev.readinto(at, memoryview(odd)[3:])
                assert odd[3:] == want, f"readinto a bytearray slice at {at}+{n}"
                assert dev.read_at(at, n) == want, f"read_at at {at}+{n}"
            page.close()
        del parts  # its views of ``mapped``
        mapped.close()

        # unaligned edges: a small write across a block boundary and the device's last bytes
        small = _pattern(300, 4)
        writer.write_at(2 * ALIGN - 150, small)
        expect = bytearray(base)
        expect[2 * ALIGN - 150 : 2 * ALIGN + 150] = small
        assert reader.read_at(0, len(expect)) == bytes(expect), "unaligned write moved bytes"
        writer.write_at(size - 10, b"0123456789")
        assert reader.read_at(size - 10, 10) == b"0123456789"
        for bad in ((size - 10, 11), (-1, 2)):
            try:
                reader.read_at(*bad)
            except (ValueError, DeviceError):
                pass
            else:
                raise AssertionError(f"read at {bad} (outside the device) was accepted")

        # concurrent small writes sharing blocks (a read-modify-write must not undo another)
        records = [_pattern(100, 10 + i) for i in range(24)]

        def put(i: int) -> None:
            writer.write_at(8 * ALIGN + 37 + 170 * i, records[i])

        threads = [threading.Thread(target=put, args=(i,)) for i in range(len(records))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, record in enumerate(records):
            assert reader.read_at(8 * ALIGN + 37 + 170 * i, 100) == record, f"record {i} lost"

        # a write of many RADOS objects (4 MiB each; 10 > the aio depth of 8 where the
        # device is large enough), from an unaligned start, read back into one buffer
        span = min(40 << 20, size - (4 << 20))
        at = (1 << 20) + 512
        big = [_pattern(1 << 20, 100 + i) for i in range(span // (1 << 20) - 1)]
        writer.writev(at, big)
        total = sum(map(len, big))
        back = aligned_buffer(total)
        try:
            reader.readinto(at, memoryview(back)[:total])
            assert back[:total] == b"".join(big), "a write of many objects read back wrong"
        finally:
            back.close()
        writer.flush()
    finally:
        reader.close()
        writer.close()


def test_vectored_device_contract(maker: Maker) -> None:
    check_vectored_device(maker)


def test_volume_round_trip(maker: Maker) -> None:
    dev = maker(False)
    try:
        Volume.format(dev, fleet="contract")
        vol = Volume.open(dev)
        vol.start_epoch(1)
        data = os.urandom(3 << 20)
        vol.put("/f", [data], len(data), epoch=1, mtime=1.0)
        reader_dev = maker(True)
        try:
            reader = Volume.open(reader_dev)
            assert b"".join(reader.read("/f")) == data
            vol.put("/g", [b"small"], 5, epoch=1, mtime=2.0)
            assert [r.op for r in reader.refresh()] == ["put"]
            assert b"".join(reader.read("/g")) == b"small"
            reader.close()
        finally:
            reader_dev.close()
        assert vol.fsck() == []
        vol.close()
    finally:
        dev.close()


def test_file_device_uses_o_direct_on_ext4(var_tmp_image: Path) -> None:
    dev = FileDevice(var_tmp_image)
    try:
        assert dev.direct
    finally:
        dev.close()


def test_open_errors_keep_their_errno(tmp_path: Path) -> None:
    with pytest.raises(DeviceError) as err:
        FileDevice(tmp_path / "missing")
    assert err.value.fields == {"op": "open", "errno": errno.ENOENT}


def test_find_device_by_serial(tmp_path: Path) -> None:
    for name, serial in [("vda", "root"), ("vdb", "shared-rbd"), ("vdc", "other"), ("loop0", None)]:
        (tmp_path / name).mkdir()
        if serial is not None:
            (tmp_path / name / "serial").write_text(serial + "\n")
    assert find_device_by_serial("shared-rbd", tmp_path) == Path("/dev/vdb")
    with pytest.raises(NotFound):
        find_device_by_serial("absent", tmp_path)
    (tmp_path / "vdd").mkdir()
    (tmp_path / "vdd" / "serial").write_text("shared-rbd")
    with pytest.raises(NotFound):  # two disks claim it: never guess
        find_device_by_serial("shared-rbd", tmp_path)


def _rbd(cluster: Any, image: str, read_only: bool) -> RbdDevice:
    return RbdDevice(
        str(cluster.conf),
        cluster.pool,
        image,
        "admin",
        keyring=str(cluster.keyring),
        read_only=read_only,
    )


def test_second_librbd_writer_is_refused_by_ceph(rbd_image: tuple[Any, str]) -> None:
    cluster, image = rbd_image
    first = _rbd(cluster, image, False)
    try:
        with pytest.raises(DeviceError) as err:
            _rbd(cluster, image, False)
        assert err.value.fields["errno"] == errno.EROFS
        reader = _rbd(cluster, image, True)  # readers are never refused
        first.write_at(0, b"\x07" * 4096)
        assert reader.read_at(0, 4096) == b"\x07" * 4096
        reader.close()
    finally:
        first.close()
    second = _rbd(cluster, image, False)  # close released the lock
    second.close()


def test_fenced_librbd_writer_gets_eshutdown_and_is_replaced(
    rbd_image: tuple[Any, str], rados_admin: Any
) -> None:
    cluster, image = rbd_image
    writer = _rbd(cluster, image, False)
    try:
        writer.write_at(0, b"a" * 4096)
        addr = writer.client_address
        ret, _, status = rados_admin.mon_command(
            json.dumps(
                {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr, "expire": 60.0}
            ),
            b"",
        )
        assert ret == 0, status
        rados_admin.wait_for_latest_osdmap()
        with pytest.raises(DeviceError) as err:
            for _ in range(50):  # the fence lands within ms (notes G3); bounded, no sleep
                writer.write_at(0, b"b" * 4096)
        assert err.value.fields["errno"] == errno.ESHUTDOWN
        # the same error from the aio path: a write and a read of several objects
        with pytest.raises(DeviceError) as err:
            writer.writev(0, [bytes(12 << 20)])
        assert err.value.fields["errno"] == errno.ESHUTDOWN
        with pytest.raises(DeviceError) as err:
            writer.readinto(0, memoryview(bytearray(12 << 20)))
        assert err.value.fields["errno"] == errno.ESHUTDOWN
        # the next writer's lock_acquire breaks the fenced owner's managed lock
        successor = _rbd(cluster, image, False)
        successor.write_at(0, b"c" * 4096)
        successor.close()
    finally:
        writer.close()
        rados_admin.mon_command(
            json.dumps({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}), b""
        )


class _OneBadRequest:
    """The real librbd image, except that the aio request for ``bad`` is sent past the image's
    end, where librbd fails its completion (the submission itself succeeds); counts the
    requests submitted and the completions that ran."""

    def __init__(self, image: Any, bad: int) -> None:
        self._image = image
        self._bad = bad
        self._past = image.size() + (64 << 20)
        self.submitted = 0
        self.completed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._image, name)

    def _counted(self, oncomplete: Any) -> Any:
        self.submitted += 1

        def done(*args: Any) -> None:
            self.completed += 1  # before ours: it releases the call waiting for it
            oncomplete(*args)

        return done

    def aio_write(self, data: bytes, offset: int, oncomplete: Any) -> Any:
        return self._image.aio_write(data, self._past if offset == self._bad else offset,
                                     self._counted(oncomplete))

    def aio_read(self, offset: int, length: int, oncomplete: Any) -> Any:
        return self._image.aio_read(self._past if offset == self._bad else offset, length,
                                    self._counted(oncomplete))


def test_a_failed_aio_completion_is_raised_once_after_all_completed(
    rbd_image: tuple[Any, str],
) -> None:
    """One of ten object writes fails in librbd: writev raises that completion's errno as a
    DeviceError, only once every request it submitted has completed (no callback runs
    after it returned), no object holds anything but its old or its new bytes, and the
    handle keeps working; the same for a read."""
    cluster, image = rbd_image
    dev = _rbd(cluster, image, False)
    obj = 4 << 20
    try:
        real = dev._image
        data = [_pattern(obj, i) for i in range(10)]
        dev.writev(0, [bytes(obj)] * 10)
        for op in ("write", "read"):
            bad = _OneBadRequest(real, bad=3 * obj)
            dev._image = bad
            with pytest.raises(DeviceError) as err:
                if op == "write":
                    dev.writev(0, data)
                else:
                    dev.readinto(0, memoryview(bytearray(10 * obj)))
            assert err.value.fields == {"op": op, "errno": errno.EINVAL}
            assert 4 <= bad.submitted <= 10 and bad.completed == bad.submitted, vars(bad)
        dev._image = real
        for i, piece in enumerate(data):
            assert dev.read_at(i * obj, obj) in (bytes(obj), piece), i
        dev.writev(0, data)
        assert dev.read_at(0, 10 * obj) == b"".join(data)
    finally:
        dev.close()


def test_fsck_cli_on_an_rbd_image(
    rbd_image: tuple[Any, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from agents import fsck

    cluster, image = rbd_image
    dev = _rbd(cluster, image, False)
    try:
        Volume.format(dev, fleet="fsck")
        vol = Volume.open(dev)
        vol.start_epoch(1)
        vol.put("/f", [b"r" * 200_000], 200_000, epoch=1, mtime=0)
        args = [f"rbd:{cluster.pool}/{image}", "--conf", str(cluster.conf)]
        args += ["--user", "admin", "--keyring", str(cluster.keyring)]
        assert fsck.main(args) == 0  # a read-only handle beside the writer's lock
        offset = vol._index.get("/f").extents[0].offset
        dev.write_at(offset, bytes(4096))
        assert fsck.main(args) == 1
        assert f"file /f chunk 0 (device offset {offset}): checksum" in capsys.readouterr().out
        vol.close()
    finally:
        dev.close()


class _CachingDevice(MemoryDevice):
    """A broken backend: its reads come from a private cache, so it misses others' writes."""

    def __init__(self, medium: MemoryDevice, read_only: bool) -> None:
        self.__dict__.update(medium.reopen(read_only=read_only).__dict__)
        self._cache: dict[tuple[int, int], bytes] = {}

    def read_at(self, offset: int, length: int) -> bytes:
        return self._cache.setdefault((offset, length), super().read_at(offset, length))


class _LaxReadOnlyDevice(MemoryDevice):
    """A broken backend: its read-only handles accept writes."""

    def write_at(self, offset: int, data: bytes) -> None:
        self.read_only, was = False, self.read_only
        try:
            super().write_at(offset, data)
        finally:
            self.read_only = was


@pytest.mark.parametrize("broken", ["stale-cache", "writable-reader"])
def test_the_contract_catches_broken_backends(broken: str) -> None:
    medium = MemoryDevice(SIZE)
    if broken == "stale-cache":

        def make(ro: bool) -> BlockDevice:
            return _CachingDevice(medium, ro)
    else:

        def make(ro: bool) -> BlockDevice:
            dev = _LaxReadOnlyDevice.__new__(_LaxReadOnlyDevice)
            dev.__dict__.update(medium.reopen(read_only=ro).__dict__)
            return dev

    with pytest.raises(AssertionError):
        check_block_device(make)


def test_missing_binding_names_the_debian_package(tmp_path: Path) -> None:
    """Without system site-packages (a VM with bare python3), librbd is an install error."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = (
        "from agents.backends.librbd import RbdDevice\n"
        "from agents.errors import BindingUnavailable\n"
        "try:\n    RbdDevice('c', 'p', 'i', 'u')\n"
        "except BindingUnavailable as exc:\n    print(exc.module, exc.package)\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.split() == ["rados", "python3-rados"]
