"""ImageStore contract: ``RbdImageStore`` on the sandbox Ceph cluster and ``MemoryImageStore``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.adapters.ceph import RbdImageStore
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
                                lambda pool, name: ceph.client("admin", pool, name))
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

    yield ImageStoreSubject(RbdImageStore(admin), cluster.pool, watch)


def test_image_store_contract(subject: ImageStoreSubject) -> None:
    check_image_store(subject)


def test_the_fake_declares_what_the_adapter_does() -> None:
    check_same_characteristics(RbdImageStore, MemoryImageStore)
