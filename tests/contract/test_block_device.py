"""The BlockDevice contract (agents.testing.check_block_device) against every backend: memory,
file (buffered and O_DIRECT), direct (O_DIRECT on ext4 under /var/tmp) and librbd on the real
sandbox Ceph cluster; plus librbd's own promises (a second writer is refused by Ceph, a fenced
handle fails with ESHUTDOWN) and a Volume round trip on each real backend."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.backends.direct import DirectDevice, find_device_by_serial
from agents.backends.file import FileDevice
from agents.backends.librbd import RbdDevice
from agents.device import BlockDevice
from agents.errors import DeviceError, NotFound
from agents.testing import MemoryDevice, check_block_device
from agents.volume import Volume

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


@pytest.fixture(params=["memory", "file-buffered", "file", "direct", "librbd"])
def maker(request: pytest.FixtureRequest) -> Iterator[Maker]:
    """``make(read_only)`` -> a new handle on one medium, per backend."""
    kind = request.param
    if kind == "memory":
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
        elif kind == "file":
            yield lambda ro: FileDevice(path, ro)
        else:
            yield lambda ro: DirectDevice(path, ro)


def test_block_device_contract(maker: Maker) -> None:
    check_block_device(maker)


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
        # the next writer's lock_acquire breaks the fenced owner's managed lock
        successor = _rbd(cluster, image, False)
        successor.write_at(0, b"c" * 4096)
        successor.close()
    finally:
        writer.close()
        rados_admin.mon_command(
            json.dumps({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}), b""
        )


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
