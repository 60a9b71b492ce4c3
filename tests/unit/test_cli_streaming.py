"""The client behind `rbdfleet get REMOTE -` and the coordinator's unreachable message, over
fake transports: a forward-only output is retried on another reader only while it is empty."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.client import (
    CoordinatorClient,
    FleetClient,
    RetryPolicy,
    StreamCut,
    Targets,
)
from orchestrator.core.fleetmap import Target
from orchestrator.errors import AgentUnreachable
from orchestrator.transport import Transport

pytestmark = pytest.mark.unit

DATA = bytes(range(256)) * 64
READERS = (Target("r1", "10.0.0.1:7480", "reader", "g1"),
           Target("r2", "10.0.0.2:7480", "reader", "g2"))


class FakeCoordinator:
    fleet = "demo"

    def __init__(self) -> None:
        self.reported: list[str] = []

    def targets(self, kind: str, path: str) -> Targets:
        return Targets(1, 1, READERS)

    def report(self, node: str, reason: str) -> None:
        self.reported.append(node)


class Body:
    """A response body that may end early while Content-Length promises the whole file."""

    def __init__(self, data: bytes, sent: int) -> None:
        self.left = io.BytesIO(data[:sent])
        self.length = len(data)

    def read(self, n: int) -> bytes:
        return self.left.read(min(n, 1000))

    def getheader(self, name: str) -> str | None:
        return str(self.length) if name == "Content-Length" else None


class ReaderTransport:
    """r1 behaves as told (refuses, or sends ``cut`` bytes of the file); r2 sends it whole."""

    def __init__(self, r1_sends: int | None) -> None:
        self.r1_sends = r1_sends
        self.asked: list[str] = []

    def request(self, node: str, address: str, method: str, path: str, *,
                sink: Callable[[Any], None] | None = None, **_: Any) -> None:
        self.asked.append(node)
        assert sink is not None
        if node == "r1" and self.r1_sends is None:
            raise AgentUnreachable(node, address, "connection refused")
        sent = self.r1_sends if node == "r1" and self.r1_sends is not None else len(DATA)
        try:
            sink(Body(DATA, sent))
        except OSError as exc:  # as the real Transport maps a broken connection
            raise AgentUnreachable(node, address, str(exc)) from exc


def client(transport: ReaderTransport) -> tuple[FleetClient, FakeCoordinator]:
    coordinator = FakeCoordinator()
    fleet = FleetClient(coordinator, transport=transport,  # type: ignore[arg-type]
                        retry=RetryPolicy(timeout=0.0, sleep=lambda _: None))
    return fleet, coordinator


class Pipe:
    """A forward-only sink: write, nothing else (no seek, tell or truncate)."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


def test_stream_moves_on_while_nothing_was_written() -> None:
    fleet, coordinator = client(ReaderTransport(r1_sends=None))
    pipe = Pipe()
    assert fleet.get_stream("/f", pipe) == len(DATA)
    assert pipe.data == DATA and coordinator.reported == ["r1"]


def test_stream_cut_mid_body_is_an_error_not_a_spliced_output() -> None:
    transport = ReaderTransport(r1_sends=3000)
    fleet, coordinator = client(transport)
    pipe = Pipe()
    with pytest.raises(StreamCut, match=r"3000 bytes of /f .* cannot be rewound") as err:
        fleet.get_stream("/f", pipe)
    assert err.value.node == "r1"
    assert pipe.data == DATA[:3000]  # what went out, and nothing from r2 after it
    assert transport.asked == ["r1"] and coordinator.reported == ["r1"]


def test_seekable_get_rewinds_and_reads_from_the_next_reader() -> None:
    transport = ReaderTransport(r1_sends=3000)
    fleet, _ = client(transport)
    sink = io.BytesIO(b"kept:")
    sink.seek(0, io.SEEK_END)
    assert fleet.get("/f", sink) == len(DATA)
    assert sink.getvalue() == b"kept:" + DATA and transport.asked == ["r1", "r2"]


class Refused:
    blocksize = 0

    def connect(self) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    def close(self) -> None:
        pass


class RefusingTransport(Transport):
    def connect(self, address: str, path: str, timeout: float) -> tuple[Any, str]:
        return Refused(), path


@pytest.mark.parametrize(("urls", "message"), [
    (["http://c1:7470"],
     "agent coordinator at http://c1:7470 unreachable: [Errno 111] Connection refused"),
    (["http://c1:7470", "http://c2:7470"],
     "agent coordinator at http://c1:7470,http://c2:7470 unreachable: "
     "http://c1:7470: [Errno 111] Connection refused; "
     "http://c2:7470: [Errno 111] Connection refused"),
])
def test_an_unreachable_coordinator_is_said_once(urls: list[str], message: str) -> None:
    coordinator = CoordinatorClient(urls, "demo", b"secret", transport=RefusingTransport())
    with pytest.raises(AgentUnreachable) as err:
        coordinator.status()
    assert str(err.value) == message


class ClosedPipe:
    def write(self, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_failing_output_is_not_blamed_on_the_reader() -> None:
    transport = ReaderTransport(r1_sends=len(DATA))
    fleet, coordinator = client(transport)
    with pytest.raises(BrokenPipeError):
        fleet.get_stream("/f", ClosedPipe())
    assert transport.asked == ["r1"] and coordinator.reported == []
