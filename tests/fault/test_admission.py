"""A reader is handed to clients only once the writer waits for it (real agents, real
coordinator, file image; ~40 s).

Seen on the demo fleet: after a failover, readers rejoining (a restarted agent, the old writer
back as a reader) were marked in sync by the coordinator on their own heartbeat's applied seq,
a heartbeat older than the writes the new writer had meanwhile acknowledged without them; a
read sent to such a reader right after a put returned the version before it.

The workload is :class:`tests.read_after_ack.ReadAfterAck` (every put read back at once
from every node the coordinator hands out). Nemesis: kill -9 of the writer (failover), its
agent restarted as a reader (rejoins), then kill -9 and restart of a reader, twice, all under
the workload; the writer learns every new reader set 1 s late, as a slow guest may. On the
code before the fix this saw ~250 stale reads per run, and a healthy reader confirmed dead
with 0 failed probes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.coordinator.service import FleetService
from tests.coordinator_harness import Coordinator, coordinated_file_fleet, wait_until
from tests.fixtures.agents import AgentFleet, FleetFactory
from tests.read_after_ack import ReadAfterAck

pytestmark = pytest.mark.fault


@pytest.fixture
def coordinated(fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any,
                ceph_cluster: Any) -> Iterator[tuple[AgentFleet, Coordinator]]:
    # The writer learns each new reader set 1 s late, as a TCG guest in its hot-plug may.
    with coordinated_file_fleet(fleet_factory, tmp_path, rados_admin, ceph_cluster.pool,
                                "adm", reader_set_delay=1.0) as (fleet, coordinator, _fencer):
        yield fleet, coordinator


def _service(coordinator: Coordinator) -> FleetService:
    assert coordinator.service is not None
    return coordinator.service


def _in_sync(coordinator: Coordinator) -> set[str]:
    return {r.name for r in _service(coordinator).require_active().in_sync_readers()}


def test_rejoining_readers_never_serve_a_version_older_than_an_acknowledged_put(
    coordinated: tuple[AgentFleet, Coordinator],
) -> None:
    fleet, coordinator = coordinated
    service = _service(coordinator)
    with ReadAfterAck(fleet, coordinator) as work:
        time.sleep(1.0)
        fleet["w"].kill()
        wait_until(lambda: service.require_active().writer in ("r1", "r2"), 20, "failover")
        writer = service.require_active().writer
        assert writer is not None
        # the old writer's agent comes back as a reader and must rejoin
        fleet["w"].config.update(role="reader", readers={})
        fleet["w"].start()
        wait_until(lambda: "w" in _in_sync(coordinator), 30, "w back in sync")
        reader = next(n for n in ("r1", "r2") if n != writer)
        for _ in range(2):
            time.sleep(1.0)
            fleet[reader].kill()
            wait_until(lambda: reader not in _in_sync(coordinator), 20,
                       f"{reader} routed around")
            fleet[reader].start()
            wait_until(lambda: reader in _in_sync(coordinator), 30,
                       f"{reader} back in sync")
        time.sleep(1.5)
    assert not work.errors, work.errors
    # one fault of the writer, one new epoch; only the killed nodes were confirmed dead (a
    # reader-set delivery blocking the coordinator's loop for 1 s is no evidence of death)
    deaths = [node for _, what, node in service.timeline if what == "NodeFailed"]
    assert service.require_active().epoch == 2, service.require_active()
    assert deaths.count("w") == 1 and set(deaths) <= {"w", reader}, deaths
    assert not work.stale, f"{len(work.stale)} stale reads, first: {work.stale[:5]}"
    # the probe really read from the rejoined nodes, after many acknowledged puts
    assert work.acks > 50 and work.checked.get("w", 0) > 10, (work.acks, work.checked)
    assert work.checked.get(reader, 0) > 10, work.checked
