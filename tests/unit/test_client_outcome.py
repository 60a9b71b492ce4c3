"""A write whose first attempt's outcome is unknown is resent at the new writer, and if that
does not succeed the caller hears "unknown", never the resend's definite-sounding answer.

Seen under repeated failovers: a delete answered ``409 not_writer, outcome unknown`` by a
writer that lost its device (the record was durable) was resent, the new writer answered 404,
and the history recorded a definite failure of a delete that had happened.
"""

from __future__ import annotations

from typing import Any

import pytest

from agents.errors import NotFound, NotWriter
from orchestrator.client import (
    FleetClient,
    RequestOutcomeUnknown,
    Response,
    RetryPolicy,
    Targets,
)
from orchestrator.core.fleetmap import Target

pytestmark = pytest.mark.unit


class Coordinator:
    fleet = "demo"

    def __init__(self) -> None:
        self.epoch = 1

    def targets(self, kind: str, path: str) -> Targets:
        writer = Target(f"w{self.epoch}", f"10.0.0.{self.epoch}:7480", "writer", "g")
        return Targets(self.epoch, self.epoch, (writer,))

    def map(self, after: int = -1, wait: float = 0.0) -> dict[str, Any]:
        self.epoch += 1  # the failover the client waits for
        return {}

    def report(self, node: str, reason: str) -> None:
        pass


class Writers:
    """Each writer answers with the next of ``answers`` (an exception to raise, or a body)."""

    def __init__(self, *answers: Exception | dict[str, Any]) -> None:
        self.answers = list(answers)

    def request(self, node: str, address: str, method: str, path: str, **_: Any) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Response(200, {}, answer)


def client(writers: Writers) -> FleetClient:
    return FleetClient(Coordinator(), transport=writers,  # type: ignore[arg-type]
                       retry=RetryPolicy(timeout=5.0, sleep=lambda _: None))


LOST_DEVICE = NotWriter("w1 can no longer write (EIO)", writer=None, outcome="unknown")


def test_a_resent_delete_refused_after_an_unknown_first_attempt_is_unknown() -> None:
    writers = Writers(LOST_DEVICE, NotFound("no /k"))
    with pytest.raises(RequestOutcomeUnknown, match="outcome is unknown"):
        client(writers).delete("/k")


def test_a_resent_write_that_succeeds_is_acknowledged() -> None:
    writers = Writers(LOST_DEVICE, {"seq": 7, "epoch": 2})
    assert client(writers).delete("/k").seq == 7


def test_a_definite_refusal_alone_stays_definite() -> None:
    with pytest.raises(NotFound):
        client(Writers(NotFound("no /k"))).delete("/k")
