"""BLKDISCARD on a real block device: a loop device (direct I/O) over a file on /var/tmp,
opened by the device backend (DirectDevice, O_DIRECT) as an agent opens /dev/vdX. The loop
driver turns the discard into a punched hole in the backing file, so the space coming back
is visible as the file's allocated blocks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.backends.direct import DirectDevice
from agents.errors import DeviceError
from tests.shared_disk import LoopAttachments

pytestmark = pytest.mark.contract

MiB = 1 << 20


@pytest.fixture
def loop() -> Iterator[tuple[LoopAttachments, Path]]:
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="rbdfleet-blkdiscard-") as d:
        image = Path(d) / "image"
        image.write_bytes(b"")
        os.truncate(image, 16 * MiB)
        disks = LoopAttachments(image)
        try:
            yield disks, image
        finally:
            assert disks.close() == []


def test_blkdiscard_gives_the_space_back(loop: tuple[LoopAttachments, Path]) -> None:
    disks, image = loop
    dev = DirectDevice(disks.attach("w", writable=True))
    try:
        dev.write_at(0, os.urandom(8 * MiB))
        dev.flush()
        before = os.stat(image).st_blocks * 512
        assert before >= 8 * MiB
        assert dev.discard(2 * MiB, 4 * MiB) is True
        assert os.stat(image).st_blocks * 512 <= before - 4 * MiB
        assert dev.read_at(2 * MiB, 4 * MiB) == bytes(4 * MiB)
        assert dev.read_at(6 * MiB, MiB) != bytes(MiB)  # the rest is kept
    finally:
        dev.close()
    reader = DirectDevice(disks.attach("r", writable=False), read_only=True)
    try:
        with pytest.raises(DeviceError):
            reader.discard(0, MiB)
    finally:
        reader.close()
