"""A reader whose device stops reading (its Ceph client fenced, the disk pulled from under it)
lets the handle go at its self-test, and its tail loop opens the device again once a fresh
one reads: how a reader on a lost hypervisor host comes back after the coordinator's fresh
read-only attach (in process, file backend)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agents.agent import Agent, AgentSettings
from agents.backends.file import FileDevice
from agents.core import roles
from agents.device import BlockDevice, short_io
from tests.unit.test_warm_promotion import _image, _old_writer

pytestmark = pytest.mark.unit


class FencedFileDevice(FileDevice):
    """Reads fail with EIO while the shared ``fenced`` flag is up, as a blocklisted client's."""

    def __init__(self, path: str, fenced: list[bool]) -> None:
        super().__init__(path, read_only=True)
        self.fenced = fenced

    def read_at(self, offset: int, length: int) -> bytes:
        if self.fenced[0]:
            raise short_io("read", offset)
        return super().read_at(offset, length)

    def readinto(self, offset: int, buf: memoryview) -> None:
        if self.fenced[0]:
            raise short_io("read", offset)
        super().readinto(offset, buf)


def test_a_reader_that_cannot_read_its_device_reopens_it_once_it_reads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    old.put("/a", [b"a"], 1, epoch=1, mtime=0.0)
    fenced = [False]
    opened: list[BlockDevice] = []

    def open_device(read_only: bool) -> BlockDevice:
        opened.append(FencedFileDevice(str(image), fenced))
        return opened[-1]

    agent = Agent(AgentSettings(node="r1", fleet="warm", keys=(b"k" * 32,),
                                advertise="127.0.0.1:1"), open_device)
    agent.handle(roles.Started(0))
    try:
        assert agent.reader is not None and agent.run_selftest().ok
        fenced[0] = True
        with caplog.at_level(logging.INFO, logger="agents.agent"):
            assert not agent.run_selftest().ok
            assert agent.reader is None and "event=reader_device_dropped" in caplog.text
            with pytest.raises(Exception, match="short read"):
                agent._tail()  # still fenced: nothing to open yet
            assert agent.reader is None
            old.put("/b", [b"b"], 1, epoch=1, mtime=0.0)
            fenced[0] = False  # the fresh attach
            agent._tail()
            assert "event=reader_reopened" in caplog.text
        assert agent.reader is not None and agent.run_selftest().ok
        assert [e.path for e in agent.reader.volume.list("/")] == ["/a", "/b"]
        assert len(opened) == 3  # the first, the one that failed, the fresh one
    finally:
        old.close()
        agent.stop()
