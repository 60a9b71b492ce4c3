"""CredentialStore contract: ``CephxCredentialStore`` on the sandbox cluster and
``MemoryCredentialStore``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.ceph import CephxCredentialStore, mon_command
from orchestrator.ports import SecretKey
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.testing.contracts import CredentialStoreSubject, check_credential_store
from orchestrator.testing.fakes import MemoryCeph, MemoryCredentialStore

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
    client = rados.Rados(conffile=str(cluster.conf), rados_id=user,
                         conf={"keyring": str(keyring)})
    client.connect(timeout=30)
    try:
        yield client
    finally:
        client.shutdown()


def caps_of(admin: Any, user: str) -> dict[str, str]:
    """The user's caps as the monitors keep them."""
    out = mon_command(admin, {"prefix": "auth get", "entity": f"client.{user}",
                              "format": "json"}, f"read client.{user}")
    return {str(k): str(v) for k, v in json.loads(out)[0]["caps"].items()}


@pytest.fixture(params=["cephx", "memory"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> CredentialStoreSubject:
    pools = ("rbd", "rbdfleet-contract-other")
    if request.param == "memory":
        ceph = MemoryCeph()
        store = MemoryCredentialStore(ceph)
        return CredentialStoreSubject(store, pools, PREFIX, store.caps, ceph.session)
    cluster = request.getfixturevalue("ceph_cluster")
    admin = request.getfixturevalue("rados_admin")
    return CredentialStoreSubject(
        CephxCredentialStore(admin), (cluster.pool, pools[1]), PREFIX,
        lambda user: caps_of(admin, user),
        lambda user, key: connected_as(cluster, user, key, tmp_path / f"{user}.keyring"))


def test_credential_store_contract(subject: CredentialStoreSubject) -> None:
    check_credential_store(subject)
