"""A write whose first attempt's outcome is unknown is resent at the new writer, and if that
does not succeed the caller hears "unknown", never the resend's definite-sounding answer.

Seen under repeated failovers: a delete answered ``409 not_writer, outcome unknown`` by a
writer that lost its device (the record was durable) was resent, the new writer answered 404,
and the history recorded a definite failure of a delete that had happened.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from agents.errors import NotFound, NotWriter
from orchestrator.client import (
    FleetClient,
    RequestOutcomeUnknown,
    RetryPolicy,
    Superseded,
    Targets,
)
from orchestrator.core.fleetmap import Target
from orchestrator.transport import Cancel, Response, Transport

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


class SilentFirstWriter:
    """w1 takes the request and never answers (paused) until its socket is shut down; w2
    answers. Stands in for Transport with a real Cancel."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def request(self, node: str, address: str, method: str, path: str, *,
                cancel: Cancel | None = None, **_: Any) -> Response:
        self.asked.append(node)
        if node == "w1":
            assert cancel is not None
            deadline = time.monotonic() + 30
            while cancel.reason is None and time.monotonic() < deadline:
                time.sleep(0.01)
            raise Superseded(node, address, cancel.reason or "never cancelled")
        return Response(200, {}, {"seq": 9, "epoch": 2})


class FailingOver(Coordinator):
    """The map names w2 at epoch 2 once someone long-polls it."""

    def __init__(self) -> None:
        super().__init__()
        self.polled = 0
        self.polled_by_caller = 0  # not by the client's writer watch

    def map(self, after: int = -1, wait: float = 0.0) -> dict[str, Any]:
        self.polled += 1
        if threading.current_thread().name != "writer-watch":
            self.polled_by_caller += 1
        self.epoch = 2
        return {"epoch": 2, "revision": 2, "writer": "w2", "phase": "stable"}


def test_a_write_held_by_a_silent_writer_is_abandoned_when_the_map_moves_on() -> None:
    """A put in flight to a paused writer used to wait out the 30 s I/O timeout; it is
    abandoned as soon as the map names another writer, and resent there."""
    coordinator, writers = FailingOver(), SilentFirstWriter()
    fleet = FleetClient(coordinator, transport=writers,  # type: ignore[arg-type]
                        retry=RetryPolicy(timeout=10.0, sleep=lambda _: None),
                        io_timeout=30.0, abandon_after=0.2)
    started = time.monotonic()
    result = fleet.delete("/k")
    assert result.seq == 9 and writers.asked == ["w1", "w2"] and coordinator.polled >= 1
    # only the watch long-polled: the resend asked for the new targets at once
    assert coordinator.polled_by_caller == 0
    assert time.monotonic() - started < 5


def test_cancel_shuts_the_socket_of_a_real_connection_down() -> None:
    server = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: a paused agent
    try:
        cancel = Cancel()
        host, port = server.getsockname()
        transport = Transport()
        threading.Timer(0.3, cancel.cancel, args=("the map moved on",)).start()
        started = time.monotonic()
        with pytest.raises(Superseded, match="the map moved on"):
            transport.request("w1", f"{host}:{port}", "DELETE", "/v1/files/k", timeout=30.0,
                              cancel=cancel)
        assert time.monotonic() - started < 5
    finally:
        server.close()
