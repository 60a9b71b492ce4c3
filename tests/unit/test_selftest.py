"""The agent's self-test names the role and epoch its checks began under, and a result that a
role change overtook is neither kept nor reported (in process, file backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.agent import Agent, AgentSettings
from agents.backends.file import FileDevice
from agents.core import roles
from agents.device import BlockDevice, short_io
from tests.unit.test_warm_promotion import _image, _old_writer

pytestmark = pytest.mark.unit


def test_a_self_test_overtaken_by_the_promotion_is_neither_kept_nor_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic self-test reads the reader's read-only disk; while it reads, the node is
    promoted and that disk unplugged, so the read fails. That failure is the old disk's, not
    the new writer's: reported as the writer's, it had failed the fleet over again."""
    image = _image(tmp_path / "image")
    _old_writer(image).close()
    promote_during_read = [False]
    agent: Agent | None = None

    class UnpluggedDuringRead(FileDevice):
        def read_at(self, offset: int, length: int) -> bytes:
            if promote_during_read[0]:
                promote_during_read[0] = False
                assert agent is not None
                agent.handle(roles.PromoteRequested(2))  # meanwhile, on another request
                raise short_io("read", offset)  # the read-only disk is gone
            return super().read_at(offset, length)

    def open_device(read_only: bool) -> BlockDevice:
        return UnpluggedDuringRead(str(image), read_only=read_only)

    agent = Agent(AgentSettings(node="r1", fleet="warm", keys=(b"k" * 32,),
                                advertise="127.0.0.1:1"), open_device)
    sent: list[object] = []
    monkeypatch.setattr(agent, "_to_coordinator", lambda _path, message: sent.append(message))
    agent.handle(roles.Started(0))
    try:
        agent._selftest_and_report()
        assert agent.selftest == "ok" and len(sent) == 1  # a plain one: kept and sent
        promote_during_read[0] = True
        agent._selftest_and_report()
        assert agent.state.role == "writer" and agent.writer is not None
        assert agent.selftest == "ok", "the old disk's failure was taken as the writer's"
        assert len(sent) == 1, "the overtaken result was reported"
        report = agent.run_selftest()  # the writer's own device
        assert (report.role, report.epoch, report.ok) == ("writer", 2, True)
    finally:
        agent.stop()
