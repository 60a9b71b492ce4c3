"""Fencer (and FenceProof) contract: ``BlocklistFencer`` on the sandbox cluster, with one
cephx user and one librbd client per VM as QEMU would have, and ``MemoryFencer``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.ceph import BlocklistFencer, CephxCredentialStore
from orchestrator.testing.contracts import (
    FencerSubject,
    ImageClient,
    check_fencer,
    check_same_characteristics,
)
from orchestrator.testing.fakes import (
    MemoryCeph,
    MemoryCredentialStore,
    MemoryFencer,
    MemoryImageStore,
)
from tests.contract.test_credential_store import connected_as

pytestmark = pytest.mark.contract

VMS = ("vm-a", "vm-b")


class RbdClient:
    """A VM's librbd handle on the image (read-write), as its QEMU holds it."""

    def __init__(self, image: Any) -> None:
        self.image = image

    def write(self) -> bool:
        import rbd

        try:
            self.image.write(b"x" * 4096, 0)
            self.image.flush()
        except (rbd.Error, OSError):
            return False
        return True


@pytest.fixture(params=["blocklist", "memory"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FencerSubject]:
    users = {vm: f"rbdfleet-contract-{vm}-{tmp_path.name[-12:]}" for vm in VMS}
    if request.param == "memory":
        ceph = MemoryCeph()
        MemoryImageStore(ceph).create_image("rbd", "img", 16 << 20, 1)
        for user in users.values():
            MemoryCredentialStore(ceph).ensure_user(user, "rbd", "img")
        fake = MemoryFencer(ceph, "rbd", "img", users)
        yield FencerSubject(fake, VMS, lambda vm: ceph.client(users[vm], "rbd", "img"), fake)
        return
    import rbd

    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    # layering only: with exclusive-lock the two VMs' writes would pass the lock back and forth
    image = request.getfixturevalue("rbd_image_factory")(16 << 20, features=1)
    credentials = CephxCredentialStore(admin)
    keys = {vm: credentials.ensure_user(user, cluster.pool, image) for vm, user in users.items()}
    fencer = BlocklistFencer(admin, cluster.pool, image, users)

    @contextlib.contextmanager
    def attach(vm: str) -> Iterator[ImageClient]:
        with connected_as(cluster, users[vm], keys[vm], tmp_path / f"{vm}.keyring") as client, \
                client.open_ioctx(cluster.pool) as ioctx:
            handle = rbd.Image(ioctx, image)
            try:
                yield RbdClient(handle)
            finally:
                with contextlib.suppress(rbd.Error, OSError):  # a fenced handle cannot close
                    handle.close()

    earlier = set(fencer.blocklist())
    try:
        yield FencerSubject(fencer, VMS, attach, fencer)
    finally:
        fencer.unfence(sorted(set(fencer.blocklist()) - earlier))
        for user in users.values():
            credentials.remove_user(user)


def test_fencer_contract(subject: FencerSubject) -> None:
    check_fencer(subject)


def test_the_fake_declares_what_the_adapter_does() -> None:
    check_same_characteristics(BlocklistFencer, MemoryFencer)
