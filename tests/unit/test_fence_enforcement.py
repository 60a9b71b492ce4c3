"""BlocklistFencer waits until every up OSD has the osdmap holding its blocklist entries
(``wait_for_latest_osdmap`` alone only updates the fencer's own map), over a scripted handle."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.adapters.ceph import BlocklistFencer
from orchestrator.errors import StorageError
from orchestrator.testing.fakes import FakeClock

pytestmark = pytest.mark.unit

EPOCH = 40


class Cluster:
    """A handle whose osd.0 reaches ``EPOCH`` after ``lag`` status answers, osd.2 at once
    (osd.1 is down)."""

    def __init__(self, lag: int) -> None:
        self.lag = lag
        self.asked: dict[int, int] = {}
        self.log: list[str] = []

    def mon_command(self, cmd: str, inbuf: bytes, timeout: int = 0,
                    target: str | None = None) -> tuple[int, bytes, str]:
        prefix = json.loads(cmd)["prefix"]
        self.log.append(prefix)
        if prefix == "osd dump":
            osds = [{"osd": 0, "up": 1}, {"osd": 1, "up": 0}, {"osd": 2, "up": 1}]
            return 0, json.dumps({"epoch": EPOCH, "osds": osds}).encode(), ""
        return 0, b"", ""

    def wait_for_latest_osdmap(self) -> None:
        self.log.append("wait_for_latest_osdmap")

    def osd_command(self, osd: int, cmd: str, inbuf: bytes, timeout: int = 0
                    ) -> tuple[int, bytes, str]:
        assert osd != 1, "a down OSD serves nobody: not asked"
        self.asked[osd] = self.asked.get(osd, 0) + 1
        newest = EPOCH if osd == 2 or self.asked[osd] > self.lag else EPOCH - 1
        return 0, json.dumps({"newest_map": newest}).encode(), ""


def fencer(handle: Any, clock: FakeClock) -> BlocklistFencer:
    return BlocklistFencer(handle, "rbd", "img", {"vm1": "u1"}, enforce_timeout=5.0,
                           monotonic=clock.monotonic, sleep=clock.sleep)


def test_the_wait_ends_once_every_up_osd_has_the_blocklist_epoch() -> None:
    handle, clock = Cluster(lag=3), FakeClock()
    fencer(handle, clock)._wait_enforced("fence vm1")
    assert handle.asked == {0: 4, 2: 1}  # osd.0 lagged 3 answers, osd.2 had it
    assert handle.log[:2] == ["wait_for_latest_osdmap", "osd dump"]


def test_an_osd_that_never_catches_up_fails_the_fence() -> None:
    handle, clock = Cluster(lag=10**9), FakeClock()
    with pytest.raises(StorageError, match=r"osd\.0 is at osdmap epoch 39, not yet 40"):
        fencer(handle, clock)._wait_enforced("fence vm1")
    assert clock.monotonic() > 1000.0 + 5.0
