"""Grants: sign/verify round trip, every way a token can be wrong is refused by its error, and
what per-node keys mean: a node's key makes grants for that node only, nothing else."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core.grants import (
    COORDINATOR,
    DEMOTE,
    GRANT_VERSION,
    PROMOTE,
    PURPOSES,
    PUSH,
    READ,
    READERS,
    REPORT,
    WRITE,
    Grant,
    agent_key,
    body_digest,
    peek,
    sign,
    verify,
)
from agents.errors import BadSignature, ForeignGrant, GrantExpired, StaleEpoch

pytestmark = pytest.mark.unit

MASTER = b"test-fleet-master-key"
NOW = 1_000_000.0


def key(node: str, fleet: str = "f", master: bytes = MASTER) -> bytes:
    return agent_key(master, fleet, node)


grants = st.builds(
    Grant,
    fleet=st.text(min_size=1, max_size=20),
    audience=st.text(min_size=1, max_size=20),
    purpose=st.sampled_from(sorted(PURPOSES)),
    epoch=st.integers(min_value=0, max_value=2**53),
    expires=st.floats(min_value=NOW + 1, max_value=NOW + 1e6),
    subject=st.text(max_size=20),
    digest=st.sampled_from(["", body_digest(b"{}")]),
)


def _verify(token: str, g: Grant, **over: object) -> Grant:
    kwargs: dict[str, object] = dict(now=NOW, fleet=g.fleet, audience=g.audience,
                                     purposes=PURPOSES, epoch=g.epoch, subject=g.subject)
    kwargs.update(over)
    keys = kwargs.pop("keys", (MASTER,))
    return verify(token, keys, **kwargs)  # type: ignore[arg-type]


@given(grants)
def test_round_trip(g: Grant) -> None:
    token = sign(g, MASTER)
    assert _verify(token, g) == g
    assert peek(token) == g


@given(grants, st.data())
def test_any_changed_byte_is_refused(g: Grant, data: st.DataObject) -> None:
    token = sign(g, MASTER)
    i = data.draw(st.integers(0, len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    c = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[i]))
    forged = token[:i] + c + token[i + 1 :]
    try:
        got = _verify(forged, g)
    except (BadSignature, ForeignGrant):  # a changed claim is refused on what it claims
        return
    # A flip in the padding bits of the last base64 char can decode to the same bytes.
    assert got == g


def test_wrong_key_is_bad_signature() -> None:
    g = Grant("f", "n1", WRITE, 3, NOW + 60)
    with pytest.raises(BadSignature):
        _verify(sign(g, key("n1", master=b"another master")), g, keys=(key("n1"),))


@pytest.mark.parametrize("token", ["", ".", "abc", "abc.", ".abc", "!!.!!", "a.b.c"])
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(BadSignature):
        verify(token, (MASTER,), now=NOW, fleet="f", audience="n", purposes=PURPOSES,
               epoch=None)


def test_expired_at_the_given_now() -> None:
    g = Grant("f", "n1", READ, 1, NOW)
    with pytest.raises(GrantExpired) as info:
        _verify(sign(g, MASTER), g)
    assert info.value.fields == {"expires": NOW, "now": NOW}
    assert _verify(sign(g, MASTER), g, now=NOW - 0.001) == g


@pytest.mark.parametrize(
    ("over", "error", "field"),
    [
        ({"fleet": "other"}, ForeignGrant, "fleet"),
        ({"audience": "n2"}, ForeignGrant, "audience"),
        ({"purposes": {READ}}, ForeignGrant, "purpose"),
        ({"subject": "w2"}, ForeignGrant, "subject"),
        ({"body": b"another report"}, ForeignGrant, "digest"),
        ({"epoch": 4}, StaleEpoch, None),
        ({"epoch": 2}, StaleEpoch, None),
    ],
)
def test_mismatches(over: dict[str, object], error: type[Exception], field: str | None) -> None:
    g = Grant("f", "n1", WRITE, 3, NOW + 60, subject="w", digest=body_digest(b"report"))
    with pytest.raises(error) as info:
        _verify(sign(g, MASTER), g, **over)
    if field is not None:
        assert info.value.fields["field"] == field  # type: ignore[attr-defined]
    assert _verify(sign(g, MASTER), g, body=b"report") == g


def test_stale_epoch_fields_and_newer_ok() -> None:
    g = Grant("f", "n1", PROMOTE, 5, NOW + 60)
    token = sign(g, MASTER)
    with pytest.raises(StaleEpoch) as info:
        _verify(token, g, epoch=6, newer_epoch_ok=True)
    assert info.value.fields == {"current": 6, "got": 5}
    assert _verify(token, g, epoch=4, newer_epoch_ok=True) == g
    assert _verify(token, g, subject=None, epoch=None) == g


def test_status_codes() -> None:
    assert (BadSignature.status, GrantExpired.status, ForeignGrant.status, StaleEpoch.status) == (
        401, 401, 403, 409)


def test_invalid_grants_cannot_be_built() -> None:
    with pytest.raises(ValueError):
        Grant("f", "n", "control", 1, NOW)  # one purpose per grant: no catch-all role
    with pytest.raises(ValueError):
        Grant("f", "n", READ, -1, NOW)
    with pytest.raises(ValueError):
        sign(Grant("f", "n", READ, 1, NOW), b"")
    with pytest.raises(ValueError):
        agent_key(b"", "f", "n")


# -- derived keys -----------------------------------------------------------------------------


def test_agent_key_is_the_documented_hmac_and_differs_per_node_fleet_and_master() -> None:
    expected = hmac.new(MASTER, b"rbdfleet agent key v1|f|r1", hashlib.sha256).digest()
    assert key("r1") == expected and len(expected) == 32
    assert len({key("r1"), key("r2"), key("r1", fleet="g"), key("r1", master=b"m2")}) == 4


@pytest.mark.parametrize("purpose", [WRITE, PUSH, PROMOTE, DEMOTE, READERS])
def test_a_readers_key_mints_nothing_another_node_accepts(purpose: str) -> None:
    """What a compromised reader r1 holds (its own key) makes no grant that the writer ``w``
    or the other reader ``r2`` accepts, for any purpose: each checks with its own key."""
    for victim in ("w", "r2"):
        forged = sign(Grant("f", victim, purpose, 2, NOW + 60, subject="r1"), key("r1"))
        with pytest.raises(BadSignature):
            verify(forged, (key(victim),), now=NOW, fleet="f", audience=victim,
                   purposes={purpose}, epoch=None)


def test_a_grant_is_bound_to_its_audience_and_purpose() -> None:
    """A write grant for w: refused as a read of r1 (other audience), as a promote, push or
    demote of w (other purpose), by r1 even with the right claims (other key)."""
    token = sign(Grant("f", "w", WRITE, 1, NOW + 60), key("w"))
    for audience, purpose, keys, error in (
        ("r1", WRITE, (key("r1"),), ForeignGrant),
        ("w", PROMOTE, (key("w"),), ForeignGrant),
        ("w", PUSH, (key("w"),), ForeignGrant),
        ("w", DEMOTE, (key("w"),), ForeignGrant),
    ):
        with pytest.raises(error):
            verify(token, keys, now=NOW, fleet="f", audience=audience, purposes={purpose},
                   epoch=None)
    relabelled = sign(Grant("f", "r1", WRITE, 1, NOW + 60), key("w"))
    with pytest.raises(BadSignature):
        verify(relabelled, (key("r1"),), now=NOW, fleet="f", audience="r1", purposes={WRITE},
               epoch=None)


def test_a_report_grant_speaks_for_its_node_and_its_body_only() -> None:
    body = b'{"v":1,"node":"w","ok":true}'
    g = Grant("f", COORDINATOR, REPORT, 1, NOW + 60, subject="w", digest=body_digest(body))
    token = sign(g, key("w"))
    assert verify(token, (key("w"),), now=NOW, fleet="f", audience=COORDINATOR,
                  purposes={REPORT}, epoch=None, subject="w", body=body) == g
    with pytest.raises(ForeignGrant):  # replayed with another body (ok: false)
        verify(token, (key("w"),), now=NOW, fleet="f", audience=COORDINATOR,
               purposes={REPORT}, epoch=None, subject="w", body=body.replace(b"true", b"false"))
    with pytest.raises(ForeignGrant):  # as a PUT on w
        verify(token, (key("w"),), now=NOW, fleet="f", audience="w", purposes={WRITE},
               epoch=None)


def test_two_keys_accepted_during_a_rotation() -> None:
    """A checker holding (new, old) accepts grants made under either; one made under a key it
    no longer holds is refused."""
    old, new = key("w", master=b"old master"), key("w", master=b"new master")
    for signer in (old, new):
        g = Grant("f", "w", READ, 1, NOW + 60)
        assert verify(sign(g, signer), (new, old), now=NOW, fleet="f", audience="w",
                      purposes={READ}, epoch=None) == g
    with pytest.raises(BadSignature):
        verify(sign(Grant("f", "w", READ, 1, NOW + 60), old), (new,), now=NOW, fleet="f",
               audience="w", purposes={READ}, epoch=None)


def _token(payload: bytes) -> str:
    """A token around ``payload`` as an attacker would forge it (its MAC is never reached)."""
    return f"{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}.bWFj"


@pytest.mark.parametrize("payload", [
    b"[" * 3000 + b"]" * 3000,  # json.loads would recurse once per level
    b'{"v":1,"expires":1e999}',
    b'{"v":1,"epoch":' + b"9" * 5000 + b"}",
    b'{"v":1,"expires":NaN}',
])
def test_hostile_token_bodies_are_malformed_grants(payload: bytes) -> None:
    with pytest.raises(BadSignature, match="malformed"):
        peek(_token(payload))


def test_subject_with_a_lone_surrogate_is_malformed() -> None:
    body = {"v": GRANT_VERSION, "fleet": "f", "audience": "w", "purpose": "put",
            "epoch": 1, "expires": 1.0, "subject": "\ud800", "digest": ""}
    payload = json.dumps(body).encode()  # ASCII escapes: the surrogate survives decoding
    with pytest.raises(BadSignature, match="malformed"):
        peek(_token(payload))
