"""RadosClientStore: a fleet's client credentials in one RADOS object next to its state.

Layout: object ``rbdfleet.clients.<fleet>`` in the fleet's pool; one omap key per client
name, its value JSON ``{"scope", "secret" (hex), "created"}``. Anyone who may read the pool
may read the secrets: the pool's cephx capability is the coordinator's and the operator's,
never a VM's (VMs get ``rbd`` caps on the image only; docs/security.md). Writes need no lease:
each is one atomic op on one key.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.adapters.ceph import rados_module, translate_ceph_errors
from orchestrator.core.clients import ClientCredential
from orchestrator.errors import StorageError

MAX_CLIENTS = 10_000


def clients_object(fleet: str) -> str:
    """The RADOS object that holds ``fleet``'s client credentials."""
    return f"rbdfleet.clients.{fleet}"


def _decode(name: str, raw: bytes) -> ClientCredential:
    try:
        body = json.loads(raw)
        return ClientCredential(name=name, scope=body["scope"],
                                secret=bytes.fromhex(body["secret"]),
                                created=float(body.get("created", 0.0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"client {name!r}: stored credential is malformed") from exc


class RadosClientStore:
    """ClientStore over an open ``rados.Rados`` handle (the caller owns and shuts it down)."""

    def __init__(self, client: Any, pool: str, fleet: str) -> None:
        self._rados = rados_module()
        self.fleet = fleet
        self._oid = clients_object(fleet)
        with translate_ceph_errors(f"open pool {pool}"):
            self._ioctx = client.open_ioctx(pool)

    def close(self) -> None:
        """Close the pool handle."""
        self._ioctx.close()

    def _read(self, keys: tuple[str, ...] | None) -> dict[str, bytes]:
        rados = self._rados
        with translate_ceph_errors(f"read {self._oid}"):
            try:
                with rados.ReadOpCtx() as op:
                    if keys is None:
                        it, _ = self._ioctx.get_omap_vals(op, "", "", MAX_CLIENTS)
                    else:
                        it, _ = self._ioctx.get_omap_vals_by_keys(op, keys)
                    self._ioctx.operate_read_op(op, self._oid)
                    return {k: bytes(v) for k, v in it}
            except rados.ObjectNotFound:
                return {}

    def get(self, name: str) -> ClientCredential | None:
        """The credential named ``name``, or None."""
        raw = self._read((name,)).get(name)
        return None if raw is None else _decode(name, raw)

    def list(self) -> list[ClientCredential]:
        """Every credential, by name."""
        return [_decode(n, raw) for n, raw in sorted(self._read(None).items())]

    def put(self, credential: ClientCredential) -> None:
        """Create or replace (one atomic omap write; creates the object)."""
        value = json.dumps({"scope": credential.scope, "secret": credential.secret.hex(),
                            "created": credential.created}).encode()
        with translate_ceph_errors(f"write {self._oid}"), self._rados.WriteOpCtx() as op:
            self._ioctx.set_omap(op, (credential.name,), (value,))
            self._ioctx.operate_write_op(op, self._oid)

    def remove(self, name: str) -> bool:
        """Delete ``name``; False when there was none."""
        if self.get(name) is None:
            return False
        with translate_ceph_errors(f"write {self._oid}"), self._rados.WriteOpCtx() as op:
            self._ioctx.remove_omap_keys(op, (name,))
            self._ioctx.operate_write_op(op, self._oid)
        return True


__all__ = ["RadosClientStore", "clients_object"]
