"""The writer's push grants: it keeps, per reader, the grant of the highest epoch (then the
latest expiry) the coordinator handed over, and has none once it expired."""

from __future__ import annotations

import pytest

from agents.agent import Agent, AgentSettings
from agents.core.grants import PUSH, Grant, agent_key, sign
from agents.device import BlockDevice
from agents.errors import GrantExpired

pytestmark = pytest.mark.unit

MASTER = b"master-key-for-push-grants"


def _push(reader: str, epoch: int, expires: float) -> str:
    return sign(Grant("f", reader, PUSH, epoch, expires, subject="w"),
                agent_key(MASTER, "f", reader))


def _no_device(read_only: bool) -> BlockDevice:
    raise AssertionError("no device is opened here")


def test_the_newest_epoch_wins_and_an_expired_grant_is_none() -> None:
    now = [1000.0]
    old_long = _push("r1", 1, 5000.0)  # e.g. from a config, long-lived, of epoch 1
    agent = Agent(AgentSettings(node="w", fleet="f", keys=(agent_key(MASTER, "f", "w"),),
                                advertise="127.0.0.1:1", push_grants={"r1": old_long}),
                  _no_device, clock=lambda: now[0])
    assert agent._push_grant("r1") == old_long
    new_short = _push("r1", 3, 1300.0)  # the coordinator's, after a re-promotion
    agent.take_push_grants({"r1": new_short, "r2": _push("r2", 3, 900.0), "r3": "garbage"})
    assert agent._push_grant("r1") == new_short
    agent.take_push_grants({"r1": old_long})  # an older epoch never replaces it
    assert agent._push_grant("r1") == new_short
    later = _push("r1", 3, 1600.0)
    agent.take_push_grants({"r1": later})
    assert agent._push_grant("r1") == later
    for reader in ("r2", "r3"):  # r2's had expired when it came; r3's did not decode
        with pytest.raises(GrantExpired):
            agent._push_grant(reader)
    now[0] = 1600.0
    with pytest.raises(GrantExpired):
        agent._push_grant("r1")
