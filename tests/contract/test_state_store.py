"""StateStore contract: one suite, run against the real RADOS store and the in-memory fake.

The RADOS run uses the sandbox cluster and real time (leases of 1 s, so it sleeps ~3 s in
all); the memory run moves a FakeClock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from orchestrator.adapters.rados_state import RadosStateStore
from orchestrator.core.fleetmap import FleetMap, initial_map
from orchestrator.errors import LeaseLost, StaleMap
from orchestrator.ports import StateStore
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore

pytestmark = pytest.mark.contract

LEASE = 1.0


@dataclass
class Backend:
    """Makes stores of one fleet for distinct holders, and waits on the backend's clock."""

    make: Callable[[str], StateStore]
    wait: Callable[[float], None]


@pytest.fixture(params=["rados", "memory"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    fleet = f"f-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        clock = FakeClock()
        board = MemoryLeaseBoard(clock)
        yield Backend(lambda h: MemoryStateStore(board, fleet, h, LEASE), clock.forward)
        return
    client: Any = request.getfixturevalue("rados_admin")
    cluster = request.getfixturevalue("ceph_cluster")
    stores: list[RadosStateStore] = []

    def make(holder: str) -> StateStore:
        store = RadosStateStore(client, cluster.pool, fleet, f"{holder}-{uuid.uuid4().hex}", LEASE)
        stores.append(store)
        return store

    yield Backend(make, time.sleep)
    for s in stores:
        s.close()


def fmap(revision: int, epoch: int = 1) -> FleetMap:
    m = initial_map("x", "a", {"a": ("a:1", "writer"), "b": ("b:1", "reader")})
    return FleetMap(m.fleet, epoch, revision, m.writer, m.members)


def for_fleet(store: StateStore, revision: int, epoch: int = 1) -> FleetMap:
    m = fmap(revision, epoch)
    return FleetMap(store.fleet, m.epoch, m.revision, m.writer, m.members)


def test_empty_fleet_reads_as_none_and_writes_need_the_lease(backend: Backend) -> None:
    a = backend.make("a")
    assert a.load() is None and a.coordinator_url() is None
    with pytest.raises(LeaseLost):
        a.save(for_fleet(a, 1), None)
    assert a.load() is None


def test_one_holder_at_a_time_and_guarded_writes(backend: Backend) -> None:
    a, b = backend.make("a"), backend.make("b")
    assert a.acquire()
    assert not b.acquire()
    a.save(for_fleet(a, 1), None)
    assert b.load() == for_fleet(a, 1)
    with pytest.raises(StaleMap):
        a.save(for_fleet(a, 2), None)  # the fleet exists already
    a.save(for_fleet(a, 2, epoch=2), 1)
    with pytest.raises(StaleMap) as info:
        a.save(for_fleet(a, 3), 1)  # compare on revision fails: nothing written
    assert info.value.found == 2
    assert b.load() == for_fleet(a, 2, epoch=2)
    with pytest.raises(LeaseLost):
        b.save(for_fleet(a, 3), 2)  # not the holder
    assert a.acquire()  # renew
    a.advertise("http://127.0.0.1:1/")
    assert b.coordinator_url() == "http://127.0.0.1:1/"


def test_lease_runs_out_after_its_exact_duration_and_the_old_holder_can_change_nothing(
    backend: Backend,
) -> None:
    a, b = backend.make("a"), backend.make("b")
    assert a.acquire()
    a.save(for_fleet(a, 1), None)
    backend.wait(LEASE * 0.5)
    assert not b.acquire()  # still held
    backend.wait(LEASE * 0.5 + 0.3)
    assert b.acquire()  # expired: at most 0.3 s late (the Pacific binding bug would be ~1 s)
    with pytest.raises(LeaseLost):
        a.save(for_fleet(a, 2), 1)  # the paused-then-resumed ex-holder
    with pytest.raises(LeaseLost):
        a.advertise("http://stale/")
    assert not a.acquire()  # never a silent re-take
    assert b.load() == for_fleet(a, 1)
    b.save(for_fleet(a, 2, epoch=2), 1)
    assert a.load() == for_fleet(a, 2, epoch=2)


def test_a_holder_whose_lease_ran_out_must_step_down_before_taking_it_again(
    backend: Backend,
) -> None:
    a = backend.make("a")
    assert a.acquire()
    backend.wait(LEASE + 0.3)
    with pytest.raises(LeaseLost):
        a.acquire()  # renewal after expiry, even though nobody took it meanwhile
    assert a.acquire()  # a fresh take (the caller reloads the state first)


def test_release_hands_over_at_once(backend: Backend) -> None:
    a, b = backend.make("a"), backend.make("b")
    assert a.acquire()
    a.release()
    assert b.acquire()
    assert not a.acquire()
