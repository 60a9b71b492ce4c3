"""Shipped fakes for the coordinator's ports: a clock tests move by hand, an in-memory store.

The fakes keep the same guarantees as the real adapters (they pass the same contract suite in
``tests/contract``): :class:`MemoryStateStore` instances sharing one :class:`MemoryLeaseBoard`
behave like coordinators sharing one RADOS pool, with exact lease durations on the board's clock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from orchestrator.core.fleetmap import FleetMap
from orchestrator.errors import LeaseLost, StaleMap


class FakeClock:
    """Monotonic time that only moves when told; ``sleep`` moves it (kazoo's ``forward``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        """Current fake time."""
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` at once."""
        self.forward(seconds)

    def forward(self, seconds: float) -> None:
        """Advance by ``seconds`` (never backwards)."""
        if seconds < 0:
            raise ValueError("time does not go back")
        with self._lock:
            self._now += seconds


@dataclass
class _Record:
    map_bytes: bytes | None = None
    revision: int | None = None
    url: str | None = None
    holder: str | None = None
    expires: float = 0.0


class MemoryLeaseBoard:
    """The shared 'pool' of several MemoryStateStores: one record per fleet, one lock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self._records: dict[str, _Record] = {}

    def record(self, fleet: str) -> _Record:
        """The fleet's record (created empty); callers hold ``lock``."""
        return self._records.setdefault(fleet, _Record())


class MemoryStateStore:
    """StateStore in memory: lease with exact duration on a FakeClock, guarded writes."""

    def __init__(
        self, board: MemoryLeaseBoard, fleet: str, holder: str, lease_seconds: float = 2.0
    ) -> None:
        self.board = board
        self.fleet = fleet
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._held = False

    def _holds(self, rec: _Record) -> bool:
        return rec.holder == self.holder and self.board.clock.monotonic() < rec.expires

    def acquire(self) -> bool:
        """Take the lease when free or expired; renew it when held (LeaseLost if it ran out)."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            now = self.board.clock.monotonic()
            if self._held and not self._holds(rec):
                self._held = False
                raise LeaseLost(f"fleet {self.fleet}: lease lost")
            if rec.holder not in (None, self.holder) and now < rec.expires:
                return False
            rec.holder = self.holder
            rec.expires = now + self.lease_seconds
            self._held = True
            return True

    def release(self) -> None:
        """Drop the lease if we hold it."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            self._held = False
            if rec.holder == self.holder:
                rec.holder = None
                rec.expires = 0.0

    def load(self) -> FleetMap | None:
        """The stored map."""
        with self.board.lock:
            raw = self.board.record(self.fleet).map_bytes
        return None if raw is None else FleetMap.decode(raw)

    def save(self, new: FleetMap, expected_revision: int | None) -> None:
        """Guarded write: lease held and stored revision == expected, else nothing changes."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            if not self._holds(rec):
                self._held = False
                raise LeaseLost(f"fleet {self.fleet}: {self.holder} does not hold the lease")
            if rec.revision != expected_revision:
                raise StaleMap(
                    f"fleet {self.fleet}: stored revision {rec.revision}, "
                    f"expected {expected_revision}",
                    expected=expected_revision,
                    found=rec.revision,
                )
            rec.map_bytes = new.encode()
            rec.revision = new.revision

    def advertise(self, url: str) -> None:
        """Guarded write of the coordinator URL."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            if not self._holds(rec):
                raise LeaseLost(f"fleet {self.fleet}: {self.holder} does not hold the lease")
            rec.url = url

    def coordinator_url(self) -> str | None:
        """The advertised URL."""
        with self.board.lock:
            return self.board.record(self.fleet).url


__all__ = ["FakeClock", "MemoryLeaseBoard", "MemoryStateStore"]
