"""Grants: the patent's write/read permission identifiers, signed by the coordinator.

A grant says "node N of fleet F may act as ROLE during EPOCH until EXPIRES". The token is
``base64url(canonical JSON) + "." + base64url(HMAC-SHA256(secret, canonical JSON))`` with the
padding stripped. Canonical JSON: sorted keys, no spaces, UTF-8, plus a version field ``v``.

Invariants:
- :func:`verify` returns a grant only when the MAC is correct (constant-time compare), the grant
  has not expired at the ``now`` the caller passes, and fleet, node, role and epoch are the ones
  the caller expects. Each failure raises its own error and nothing else is decided here.
- Time is an input: nothing in this module reads a clock.

What a holder may assume (kazoo's habit): a grant proves who the coordinator meant at signing
time; it does not prove the epoch is still current. Agents compare the grant's epoch with the
epoch they hold, and the journal's epoch records are the final word.

Roles: ``writer`` (writes and pushes records), ``reader`` (serves reads), ``control``
(coordinator-issued: promote, demote and other role changes of the node it names).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Final

from agents.errors import BadSignature, ForeignGrant, GrantExpired, StaleEpoch

__all__ = [
    "CONTROL",
    "GRANT_VERSION",
    "READER",
    "ROLES",
    "WRITER",
    "Grant",
    "sign",
    "verify",
]

GRANT_VERSION: Final = 1
WRITER: Final = "writer"
READER: Final = "reader"
CONTROL: Final = "control"
ROLES: Final = frozenset({WRITER, READER, CONTROL})


@dataclass(frozen=True)
class Grant:
    """Permission for ``node`` of ``fleet`` to act as ``role`` in ``epoch`` until ``expires``.

    ``expires`` is a POSIX timestamp (seconds); ``epoch`` is the fencing token.
    """

    fleet: str
    node: str
    role: str
    epoch: int
    expires: float

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"grant role must be one of {sorted(ROLES)}, not {self.role!r}")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"grant epoch must be a non-negative int, not {self.epoch!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _canonical(grant: Grant) -> bytes:
    body = {"v": GRANT_VERSION, **asdict(grant)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()


def sign(grant: Grant, secret: bytes) -> str:
    """The token for ``grant``, MACed with the fleet ``secret`` (never part of the token)."""
    if not secret:
        raise ValueError("the fleet secret must not be empty")
    payload = _canonical(grant)
    return _b64(payload) + "." + _b64(_mac(secret, payload))


def _decode(token: str, secret: bytes) -> Grant:
    """The grant inside ``token`` once its MAC checks out; BadSignature for anything else."""
    head, sep, tail = token.partition(".")
    if not sep or not head or not tail:
        raise BadSignature("grant token is malformed")
    try:
        payload = _unb64(head)
        mac = _unb64(tail)
    except (binascii.Error, ValueError) as exc:
        raise BadSignature("grant token is not base64url") from exc
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        raise BadSignature("grant signature does not match")
    # Signed by someone holding the secret: a bad body here is a coordinator bug, still refused.
    try:
        body = json.loads(payload)
        if body.pop("v") != GRANT_VERSION:
            raise BadSignature("grant version unsupported", supported=[GRANT_VERSION])
        expires = body["expires"]
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise TypeError("expires")
        if not all(isinstance(body[k], str) for k in ("fleet", "node", "role")):
            raise TypeError("fleet/node/role")
        return Grant(
            fleet=body["fleet"],
            node=body["node"],
            role=body["role"],
            epoch=body["epoch"],
            expires=float(expires),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadSignature("grant body is malformed") from exc


def verify(
    token: str,
    secret: bytes,
    *,
    now: float,
    fleet: str,
    node: str | None,
    roles: Collection[str],
    epoch: int | None,
    newer_epoch_ok: bool = False,
) -> Grant:
    """Check ``token`` and return its grant.

    - ``node=None`` accepts any node (e.g. a reader checking the writer's grant on a push);
    - ``epoch=None`` skips the epoch check (e.g. a control grant that announces a new epoch);
      otherwise the grant's epoch must equal ``epoch``, or be at least ``epoch`` when
      ``newer_epoch_ok``.

    Raises BadSignature (401), GrantExpired (401), ForeignGrant (403), StaleEpoch (409).
    """
    grant = _decode(token, secret)
    if now >= grant.expires:
        raise GrantExpired("grant has expired", expires=grant.expires, now=now)
    if grant.fleet != fleet:
        raise ForeignGrant("grant is for another fleet", field="fleet")
    if node is not None and grant.node != node:
        raise ForeignGrant("grant is for another node", field="node", node=grant.node)
    if grant.role not in roles:
        raise ForeignGrant(
            f"grant role {grant.role!r} not allowed here", field="role", role=grant.role,
            allowed=sorted(roles),
        )
    if epoch is not None:
        stale = grant.epoch < epoch if newer_epoch_ok else grant.epoch != epoch
        if stale:
            raise StaleEpoch(
                f"grant epoch {grant.epoch} does not match current epoch {epoch}",
                current=epoch, got=grant.epoch,
            )
    return grant
