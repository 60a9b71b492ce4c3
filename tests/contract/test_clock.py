"""Clock contract: the real clock (``provision.SystemClock``) and the FakeClock."""

from __future__ import annotations

import pytest

from orchestrator.ports import Clock
from orchestrator.provision import SystemClock
from orchestrator.testing.contracts import check_clock
from orchestrator.testing.fakes import FakeClock

pytestmark = pytest.mark.contract


@pytest.mark.parametrize("clock", [SystemClock(), FakeClock()], ids=["system", "fake"])
def test_clock_contract(clock: Clock) -> None:
    check_clock(clock)


def test_the_fake_clock_refuses_to_go_back() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="does not go back"):
        clock.forward(-1.0)
