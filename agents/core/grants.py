"""Grants: the patent's write/read permission identifiers, bound to one audience and one purpose.

A grant says "in fleet F, AUDIENCE accepts this token for PURPOSE during EPOCH until EXPIRES,
presented by SUBJECT". It is MACed with the key of the party that checks it: an agent's grants
with that agent's own key, so only the coordinator (which derives every agent key from the
fleet's master key) and the agent itself can make one. The token is ``base64url(canonical
JSON) + "." + base64url(HMAC-SHA256(key, canonical JSON))``, padding stripped; canonical JSON:
sorted keys, no spaces, UTF-8, plus a version field ``v``.

Keys (docs/security.md): ``agent_key(master, fleet, node)`` is what a node holds; the master
stays with the coordinator. Client credentials and agents' reports to the coordinator are
grants too (audience :data:`COORDINATOR`), MACed with the client's secret or the reporting
agent's key; their ``subject`` names the client or node, so the coordinator knows which key to
check with (:func:`peek`) and a token made with one node's key can only speak for that node;
a report grant also carries the digest of its body, so a captured one cannot carry another
report.

Purposes (one per grant; a node refuses any other with 403 ``foreign_grant``):

=========  =====================================  ==========================================
purpose    audience                               presented by
=========  =====================================  ==========================================
write      the writer                             a write/admin client: put, delete, mkdir,
                                                  rename (also reads: write scope includes it)
read       any node                               a client: get, list, stat
push       a reader                               the writer named in ``subject``
promote    the node to promote                    the coordinator
demote     the node to demote                     the coordinator
readers    the writer                             the coordinator (a new reader set)
report     :data:`COORDINATOR`                    the agent named in ``subject``
client     :data:`COORDINATOR`                    the client named in ``subject``
=========  =====================================  ==========================================

Invariants:
- :func:`verify` returns a grant only when the MAC is correct under one of the keys it is given
  (constant-time compare; current and previous key during a rotation), the grant has not
  expired at the ``now`` the caller passes, and fleet, audience, purpose, subject and epoch are
  the ones the caller expects. Each failure raises its own error and nothing else is decided.
- Time is an input: nothing in this module reads a clock.

What a holder may assume (kazoo's habit): a grant proves who the coordinator meant at signing
time; it does not prove the epoch is still current. Agents compare the grant's epoch with the
epoch they hold, and the journal's epoch records are the final word.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Final

from agents.core import boundedjson
from agents.errors import BadSignature, ForeignGrant, GrantExpired, StaleEpoch

__all__ = [
    "CLIENT",
    "COORDINATOR",
    "DEMOTE",
    "GRANT_VERSION",
    "KEY_DERIVATION",
    "PROMOTE",
    "PURPOSES",
    "PUSH",
    "READ",
    "READERS",
    "REPORT",
    "WRITE",
    "Grant",
    "agent_key",
    "body_digest",
    "peek",
    "sign",
    "verify",
]

GRANT_VERSION: Final = 2
WRITE: Final = "write"
READ: Final = "read"
PUSH: Final = "push"
PROMOTE: Final = "promote"
DEMOTE: Final = "demote"
READERS: Final = "readers"
REPORT: Final = "report"
CLIENT: Final = "client"
PURPOSES: Final = frozenset({WRITE, READ, PUSH, PROMOTE, DEMOTE, READERS, REPORT, CLIENT})
# The audience of reports and client credentials. A node of that name gains nothing: agents
# accept neither purpose, and the coordinator checks reports with the reporting node's key.
COORDINATOR: Final = "coordinator"
KEY_DERIVATION: Final = "rbdfleet agent key v1"


def body_digest(body: bytes) -> str:
    """What a report grant's ``digest`` holds: SHA-256 (hex) of the request body, so a
    captured report grant authenticates that one report and nothing else."""
    return hashlib.sha256(body).hexdigest()


def agent_key(master: bytes, fleet: str, node: str) -> bytes:
    """The key ``node`` of ``fleet`` holds: HMAC-SHA256(master, "rbdfleet agent key v1|F|N").

    Node and fleet names are checked by the orchestrator's config (no ``|`` in them), so the
    derivation input names exactly one (fleet, node) pair."""
    if not master:
        raise ValueError("the master key must not be empty")
    label = f"{KEY_DERIVATION}|{fleet}|{node}".encode()
    return hmac.new(master, label, hashlib.sha256).digest()


@dataclass(frozen=True)
class Grant:
    """``audience`` of ``fleet`` accepts this for ``purpose`` in ``epoch`` until ``expires``,
    from ``subject`` ("" when any holder may present it, e.g. a client's read grant).

    ``expires`` is a POSIX timestamp (seconds); ``epoch`` is the fencing token.
    """

    fleet: str
    audience: str
    purpose: str
    epoch: int
    expires: float
    subject: str = ""
    digest: str = ""  # a report's: body_digest of the one body it authenticates

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ValueError(f"grant purpose must be one of {sorted(PURPOSES)}, "
                             f"not {self.purpose!r}")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"grant epoch must be a non-negative int, not {self.epoch!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _canonical(grant: Grant) -> bytes:
    body = {"v": GRANT_VERSION, **asdict(grant)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def sign(grant: Grant, key: bytes) -> str:
    """The token for ``grant``, MACed with ``key`` (the audience's; never part of the token)."""
    if not key:
        raise ValueError("the signing key must not be empty")
    payload = _canonical(grant)
    return _b64(payload) + "." + _b64(_mac(key, payload))


def _split(token: str) -> tuple[bytes, bytes]:
    head, sep, tail = token.partition(".")
    if not sep or not head or not tail:
        raise BadSignature("grant token is malformed")
    try:
        return _unb64(head), _unb64(tail)
    except (binascii.Error, ValueError) as exc:
        raise BadSignature("grant token is not base64url") from exc


def _parse(payload: bytes) -> Grant:
    try:
        body = boundedjson.loads(payload)  # a forged token is network input: bounded depth
        if body.pop("v") != GRANT_VERSION:
            raise BadSignature("grant version unsupported", supported=[GRANT_VERSION])
        expires = body["expires"]
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise TypeError("expires")
        if not all(isinstance(body[k], str)
                   for k in ("fleet", "audience", "purpose", "subject", "digest")):
            raise TypeError("fleet/audience/purpose/subject/digest")
        for key in ("fleet", "audience", "purpose", "subject", "digest"):
            body[key].encode("utf-8")  # a lone surrogate fails here, not in a key derivation
        return Grant(fleet=body["fleet"], audience=body["audience"], purpose=body["purpose"],
                     epoch=body["epoch"], expires=float(expires), subject=body["subject"],
                     digest=body["digest"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadSignature("grant body is malformed") from exc


def peek(token: str) -> Grant:
    """The grant inside ``token`` WITHOUT checking its MAC: only to choose the key to verify
    with (the subject's) or to know when a grant held for someone else runs out. Never a
    decision on its own."""
    payload, _ = _split(token)
    return _parse(payload)


def _check_mac(token: str, keys: Sequence[bytes]) -> None:
    payload, mac = _split(token)
    # every key is tried, whichever matches: the time taken does not tell which one did
    matched = [hmac.compare_digest(mac, _mac(key, payload)) for key in keys if key]
    if not any(matched):
        raise BadSignature("grant signature does not match")


def verify(
    token: str,
    keys: Sequence[bytes],
    *,
    now: float,
    fleet: str,
    audience: str,
    purposes: Collection[str],
    epoch: int | None,
    newer_epoch_ok: bool = False,
    subject: str | None = None,
    body: bytes | None = None,
) -> Grant:
    """Check ``token`` against ``keys`` (current first, then a previous one while rotating).

    - ``subject=None`` accepts any subject; otherwise the grant must name that one;
    - ``body``: the grant's ``digest`` must be :func:`body_digest` of it (reports);
    - ``epoch=None`` skips the epoch check (e.g. a control grant that announces a new epoch);
      otherwise the grant's epoch must equal ``epoch``, or be at least ``epoch`` when
      ``newer_epoch_ok``.

    A token for another fleet, audience, purpose or subject is refused (403) before its MAC is
    checked: refusing on what it claims decides nothing (the MAC is what an acceptance needs).

    Raises BadSignature (401), GrantExpired (401), ForeignGrant (403), StaleEpoch (409).
    """
    grant = peek(token)
    if grant.fleet != fleet:
        raise ForeignGrant("grant is for another fleet", field="fleet")
    if grant.audience != audience:
        raise ForeignGrant("grant is for another audience", field="audience",
                           audience=grant.audience)
    if grant.purpose not in purposes:
        raise ForeignGrant(
            f"grant purpose {grant.purpose!r} not allowed here", field="purpose",
            purpose=grant.purpose, allowed=sorted(purposes),
        )
    if subject is not None and grant.subject != subject:
        raise ForeignGrant("grant was issued to someone else", field="subject",
                           subject=grant.subject)
    _check_mac(token, keys)
    if now >= grant.expires:
        raise GrantExpired("grant has expired", expires=grant.expires, now=now)
    if body is not None and not hmac.compare_digest(grant.digest, body_digest(body)):
        raise ForeignGrant("grant was made for another request body", field="digest")
    if epoch is not None:
        stale = grant.epoch < epoch if newer_epoch_ok else grant.epoch != epoch
        if stale:
            raise StaleEpoch(
                f"grant epoch {grant.epoch} does not match current epoch {epoch}",
                current=epoch, got=grant.epoch,
            )
    return grant
