"""AgentControl contract: ``HttpAgentControl`` against real agent processes (a writer and a
reader on a file image, tests/fixtures/agents.py) and ``MemoryAgents``."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from orchestrator.adapters.agent_control import HttpAgentControl
from orchestrator.ports import AgentControl
from orchestrator.testing.contracts import AgentControlSubject, check_agent_control
from orchestrator.testing.fakes import MemoryAgents
from tests.coordinator_harness import transport
from tests.fixtures.agents import TEST_SECRET, AgentFleet, FleetFactory

pytestmark = pytest.mark.contract

FLEET = "contract"


def subject_for(fleet: AgentFleet, control: AgentControl, writer: str, reader: str
                ) -> AgentControlSubject:
    return AgentControlSubject(
        control,
        fleet.name,
        ("w", writer),
        ("r1", reader),
        fleet.grant,
        functools.partial(fleet.grant, secret=b"not-the-fleet-master-key"),
    )


@pytest.fixture(params=["http", "memory"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AgentControlSubject:
    if request.param == "memory":
        fake = MemoryAgents(FLEET, TEST_SECRET)
        fake.add("w", "10.0.0.1:7480", role="writer")
        fake.add("r1", "10.0.0.2:7480")
        return subject_for(AgentFleet(FLEET, "memory", tmp_path), fake, "10.0.0.1:7480",
                           "10.0.0.2:7480")
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    make: FleetFactory = request.getfixturevalue("fleet_factory")
    fleet = make(f"file:{image}", name=FLEET, readers=("r1",))
    return subject_for(fleet, HttpAgentControl(transport(identity=True)), fleet["w"].address,
                       fleet["r1"].address)


def test_agent_control_contract(subject: AgentControlSubject) -> None:
    check_agent_control(subject)
