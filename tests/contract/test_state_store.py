"""StateStore contract (``orchestrator.testing.contracts``): the real RADOS store and the
in-memory fake.

The RADOS run uses the sandbox cluster and real time (leases of 1 s, so it sleeps ~3 s in
all); the memory run moves a FakeClock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator.adapters.rados_state import RadosStateStore
from orchestrator.ports import StateStore
from orchestrator.testing.contracts import STATE_STORE_CHECKS, StateStoreSubject
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore

pytestmark = pytest.mark.contract

LEASE = 1.0


@pytest.fixture(params=["rados", "memory"])
def backend(request: pytest.FixtureRequest) -> Iterator[StateStoreSubject]:
    fleet = f"f-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        clock = FakeClock()
        board = MemoryLeaseBoard(clock)
        yield StateStoreSubject(lambda h: MemoryStateStore(board, fleet, h, LEASE), clock.forward,
                                LEASE)
        return
    client: Any = request.getfixturevalue("rados_admin")
    cluster = request.getfixturevalue("ceph_cluster")
    stores: list[RadosStateStore] = []

    def make(holder: str) -> StateStore:
        store = RadosStateStore(client, cluster.pool, fleet, f"{holder}-{uuid.uuid4().hex}", LEASE)
        stores.append(store)
        return store

    yield StateStoreSubject(make, time.sleep, LEASE)
    for s in stores:
        s.close()


@pytest.mark.parametrize("check", STATE_STORE_CHECKS, ids=lambda c: c.__name__)
def test_state_store_contract(backend: StateStoreSubject,
                              check: Callable[[StateStoreSubject], None]) -> None:
    check(backend)
