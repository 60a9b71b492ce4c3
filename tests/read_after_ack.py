"""Read-after-ack across every node: the sharpest probe of the promise that after a put is
acknowledged, every node a client is sent to returns it (or refuses), never an older version.

Each client thread puts a counter to its own key and, as soon as the put is acknowledged, reads
the key back from EVERY node the coordinator hands out for reading at that moment. Any answer
older than the acknowledged counter is a :class:`StaleRead`. A thread that dies records its
exception in ``errors`` (the test fails on it), and ``checked`` counts the reads per node so a
test can show the probe really read from the nodes it is about.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass

from agents.errors import RbdfleetError
from orchestrator.client import CoordinatorClient, FleetClient, RetryPolicy
from tests.coordinator_harness import Coordinator, transport
from tests.fixtures.agents import TEST_CLIENT, TEST_CLIENT_SECRET, AgentFleet


@dataclass(frozen=True)
class StaleRead:
    node: str
    key: str
    got: int
    acknowledged: int
    revision: int


class ReadAfterAck:
    """Client threads: put a counter, then read it back from every read target."""

    def __init__(self, fleet: AgentFleet, coordinator: Coordinator, threads: int = 3,
                 io_timeout: float = 2.0) -> None:
        self.fleet = fleet
        # a put stuck in a paused writer gives up after io_timeout (its outcome is unknown)
        self.client = FleetClient(
            CoordinatorClient([coordinator.url], fleet.name, TEST_CLIENT_SECRET,
                              client=TEST_CLIENT, transport=transport()),
            retry=RetryPolicy(timeout=20.0), io_timeout=io_timeout)
        self.stop = threading.Event()
        self.stale: list[StaleRead] = []
        self.errors: list[BaseException] = []
        self.checked: dict[str, int] = {}  # node -> reads checked after an ack
        self.acks = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(f"/adm{i}",), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> ReadAfterAck:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, key: str) -> None:
        try:
            counter = 0
            while not self.stop.is_set():
                counter += 1
                try:
                    self.client.put_bytes(b"%d" % counter, key)
                except RbdfleetError:
                    continue  # refused or unknown: the next counter is higher anyway
                with self._lock:
                    self.acks += 1
                self._read_back(key, counter)
        except BaseException as exc:  # a dying thread fails the test
            self.errors.append(exc)

    def _read_back(self, key: str, acknowledged: int) -> None:
        try:
            targets = self.client.coordinator.targets("read", key)
        except RbdfleetError:
            return
        for target in targets.ordered:
            try:
                answer = self.fleet.client.get(target.address, key, target.grant)
            except (OSError, http.client.HTTPException):
                continue  # killed or cut off meanwhile
            if answer.status != 200:
                continue  # 503 catching up, unreachable: refusing is allowed, stale is not
            got = int(answer.body)
            with self._lock:
                self.checked[target.node] = self.checked.get(target.node, 0) + 1
                if got < acknowledged:
                    self.stale.append(StaleRead(target.node, key, got, acknowledged,
                                                targets.revision))
