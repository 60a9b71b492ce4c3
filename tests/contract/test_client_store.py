"""ClientStore contract: ``RadosClientStore`` on the sandbox cluster and ``MemoryClientStore``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from orchestrator.adapters.rados_clients import RadosClientStore
from orchestrator.ports import ClientStore
from orchestrator.testing.clients import MemoryClientStore
from orchestrator.testing.contracts import check_client_store

pytestmark = pytest.mark.contract

Maker = Callable[[str], ClientStore]


@pytest.fixture(params=["rados", "memory"])
def make(request: pytest.FixtureRequest) -> Iterator[Maker]:
    if request.param == "memory":
        fleets: dict[str, MemoryClientStore] = {}

        def memory(fleet: str) -> ClientStore:
            # one backend: every store of a fleet sees the same credentials
            return fleets.setdefault(fleet, MemoryClientStore(fleet))

        yield memory
        return
    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    opened: list[RadosClientStore] = []

    def rados(fleet: str) -> ClientStore:
        store = RadosClientStore(admin, cluster.pool, fleet)
        opened.append(store)
        return store

    yield rados
    for store in opened:
        store.close()


def test_client_store_contract(make: Maker) -> None:
    check_client_store(make)
