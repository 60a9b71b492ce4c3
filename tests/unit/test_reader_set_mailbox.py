"""The coordinator's mailbox of reader sets for the writer: the latest only, and a set whose
send failed is sent again until it gets through or a newer one replaces it."""

from __future__ import annotations

import threading

import pytest

from agents.core.protocol import ReaderAddress, ReaderSet
from orchestrator.coordinator.service import ReaderSetMailbox
from orchestrator.errors import AgentUnreachable

pytestmark = pytest.mark.unit


def reader_set(*names: str) -> ReaderSet:
    return ReaderSet(fleet="f", epoch=1,
                     readers=tuple(ReaderAddress(n, f"{n}:7480") for n in names))


class FlakyWriter:
    """Refuses the first ``failures`` sends, then records what it is sent."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[str, ...]] = []
        self.done = threading.Condition()

    def send(self, address: str, request: ReaderSet, grant: str) -> None:
        with self.done:
            if self.failures:
                self.failures -= 1
                raise AgentUnreachable("w", address, "connection refused")
            self.received.append(tuple(r.node for r in request.readers))
            self.done.notify_all()

    def wait_for(self, names: tuple[str, ...]) -> None:
        with self.done:
            assert self.done.wait_for(lambda: names in self.received, 10), self.received


def test_a_set_whose_send_failed_is_sent_again_until_it_gets_through() -> None:
    writer = FlakyWriter(failures=3)
    box = ReaderSetMailbox(writer.send, "f", retry_s=0.01)
    try:
        box.post("w:7480", reader_set("r1", "r2"), "grant")
        writer.wait_for(("r1", "r2"))
        assert writer.received == [("r1", "r2")]  # once delivered, not again
    finally:
        box.close()


def test_a_newer_set_replaces_a_failed_one() -> None:
    writer = FlakyWriter(failures=1)
    box = ReaderSetMailbox(writer.send, "f", retry_s=60.0)  # only the newer post wakes it
    try:
        box.post("w:7480", reader_set("r1"), "grant")
        with writer.done:
            assert writer.done.wait_for(lambda: writer.failures == 0, 10)
        box.post("w:7480", reader_set("r1", "r3"), "grant")
        writer.wait_for(("r1", "r3"))
        assert writer.received == [("r1", "r3")]
    finally:
        box.close()
