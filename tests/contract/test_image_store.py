"""ImageStore contract: ``RbdImageStore`` on the sandbox Ceph cluster and ``MemoryImageStore``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.adapters.ceph import RbdImageStore, mon_command
from orchestrator.testing.contracts import (
    ImageStoreSubject,
    check_image_store,
    check_same_characteristics,
)
from orchestrator.testing.fakes import MemoryCeph, MemoryImageStore
from tests.fixtures.ceph import connect_admin

pytestmark = pytest.mark.contract


@pytest.fixture(params=["rbd", "memory"])
def subject(request: pytest.FixtureRequest) -> Iterator[ImageStoreSubject]:
    if request.param == "memory":
        ceph = MemoryCeph()
        yield ImageStoreSubject(MemoryImageStore(ceph), "rbd",
                                lambda pool, name: ceph.client("admin", pool, name),
                                ceph.pools.discard)
        return
    import rbd

    cluster = request.getfixturevalue("ceph_cluster")
    admin: Any = request.getfixturevalue("rados_admin")

    @contextlib.contextmanager
    def watch(pool: str, name: str) -> Iterator[object]:
        # Another connection, as a VM's QEMU would be: a read-write open registers a watch.
        client = connect_admin(cluster)
        try:
            with client.open_ioctx(pool) as ioctx, rbd.Image(ioctx, name) as image:
                yield image
        finally:
            client.shutdown()

    def drop_pool(pool: str) -> None:
        mon_command(admin, {"prefix": "osd pool rm", "pool": pool, "pool2": pool,
                            "yes_i_really_really_mean_it": True}, f"remove pool {pool}")
        admin.wait_for_latest_osdmap()  # the handle's pool list comes from its osdmap

    yield ImageStoreSubject(RbdImageStore(admin), cluster.pool, watch, drop_pool)


def test_image_store_contract(subject: ImageStoreSubject) -> None:
    check_image_store(subject)


def test_the_fake_declares_what_the_adapter_does() -> None:
    check_same_characteristics(RbdImageStore, MemoryImageStore)
