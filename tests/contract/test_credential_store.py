"""CredentialStore contract: ``CephxCredentialStore`` on the sandbox cluster and
``MemoryCredentialStore``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.ceph import CephxCredentialStore, RbdImageStore
from orchestrator.ports import SecretKey
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.testing.contracts import CredentialStoreSubject, check_credential_store
from orchestrator.testing.fakes import MemoryCeph, MemoryCredentialStore, MemoryImageStore

pytestmark = pytest.mark.contract

PREFIX = "rbdfleet-contract"


@contextlib.contextmanager
def connected_as(cluster: CephCluster, user: str, key: SecretKey, keyring: Path
                 ) -> Iterator[Any]:
    """A librados client as ``client.<user>`` (its own keyring file), shut down afterwards."""
    import base64

    import rados

    keyring.write_text(f"[client.{user}]\n    key = {base64.b64encode(key.reveal()).decode()}\n")
    keyring.chmod(0o600)
    # rbd_cache off, as QEMU with cache=none runs librbd: a write reaches the OSD at once
    client = rados.Rados(conffile=str(cluster.conf), rados_id=user,
                         conf={"keyring": str(keyring), "rbd_cache": "false"})
    client.connect(timeout=30)
    try:
        yield client
    finally:
        client.shutdown()


@pytest.fixture(params=["cephx", "memory"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> CredentialStoreSubject:
    if request.param == "memory":
        ceph = MemoryCeph()
        store = MemoryCredentialStore(ceph)
        return CredentialStoreSubject(store, MemoryImageStore(ceph), "rbd", PREFIX, store.caps,
                                      ceph.session)
    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    real = CephxCredentialStore(admin)
    return CredentialStoreSubject(
        real, RbdImageStore(admin), cluster.pool, PREFIX, real.caps,
        lambda user, key: connected_as(cluster, user, key, tmp_path / f"{user}.keyring"))


def test_credential_store_contract(subject: CredentialStoreSubject) -> None:
    check_credential_store(subject)
