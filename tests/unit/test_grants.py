"""Grants: sign/verify round trip, and every way a token can be wrong is refused by its error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core.grants import CONTROL, READER, ROLES, WRITER, Grant, sign, verify
from agents.errors import BadSignature, ForeignGrant, GrantExpired, StaleEpoch

pytestmark = pytest.mark.unit

SECRET = b"test-fleet-secret"
NOW = 1_000_000.0

grants = st.builds(
    Grant,
    fleet=st.text(min_size=1, max_size=20),
    node=st.text(min_size=1, max_size=20),
    role=st.sampled_from(sorted(ROLES)),
    epoch=st.integers(min_value=0, max_value=2**53),
    expires=st.floats(min_value=NOW + 1, max_value=NOW + 1e6),
)


def _verify(token: str, g: Grant, **over: object) -> Grant:
    kwargs: dict[str, object] = dict(now=NOW, fleet=g.fleet, node=g.node, roles=ROLES,
                                     epoch=g.epoch)
    kwargs.update(over)
    return verify(token, SECRET, **kwargs)  # type: ignore[arg-type]


@given(grants)
def test_round_trip(g: Grant) -> None:
    assert _verify(sign(g, SECRET), g) == g


@given(grants, st.data())
def test_any_changed_byte_is_refused(g: Grant, data: st.DataObject) -> None:
    token = sign(g, SECRET)
    i = data.draw(st.integers(0, len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    c = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[i]))
    forged = token[:i] + c + token[i + 1 :]
    try:
        got = _verify(forged, g)
    except BadSignature:
        return
    # A flip in the padding bits of the last base64 char can decode to the same bytes.
    assert got == g


def test_wrong_secret_is_bad_signature() -> None:
    g = Grant("f", "n1", WRITER, 3, NOW + 60)
    with pytest.raises(BadSignature):
        verify(sign(g, b"other"), SECRET, now=NOW, fleet="f", node="n1", roles={WRITER}, epoch=3)


@pytest.mark.parametrize("token", ["", ".", "abc", "abc.", ".abc", "!!.!!", "a.b.c"])
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(BadSignature):
        verify(token, SECRET, now=NOW, fleet="f", node=None, roles=ROLES, epoch=None)


def test_expired_at_the_given_now() -> None:
    g = Grant("f", "n1", READER, 1, NOW)
    with pytest.raises(GrantExpired) as info:
        _verify(sign(g, SECRET), g)
    assert info.value.fields == {"expires": NOW, "now": NOW}
    assert _verify(sign(g, SECRET), g, now=NOW - 0.001) == g


@pytest.mark.parametrize(
    ("over", "error"),
    [
        ({"fleet": "other"}, ForeignGrant),
        ({"node": "n2"}, ForeignGrant),
        ({"roles": {READER}}, ForeignGrant),
        ({"epoch": 4}, StaleEpoch),
        ({"epoch": 2}, StaleEpoch),
    ],
)
def test_mismatches(over: dict[str, object], error: type[Exception]) -> None:
    g = Grant("f", "n1", WRITER, 3, NOW + 60)
    with pytest.raises(error):
        _verify(sign(g, SECRET), g, **over)


def test_stale_epoch_fields_and_newer_ok() -> None:
    g = Grant("f", "n1", CONTROL, 5, NOW + 60)
    token = sign(g, SECRET)
    with pytest.raises(StaleEpoch) as info:
        _verify(token, g, epoch=6, newer_epoch_ok=True)
    assert info.value.fields == {"current": 6, "got": 5}
    assert _verify(token, g, epoch=4, newer_epoch_ok=True) == g
    assert _verify(token, g, node=None, epoch=None) == g


def test_status_codes() -> None:
    assert (BadSignature.status, GrantExpired.status, ForeignGrant.status, StaleEpoch.status) == (
        401, 401, 403, 409)


def test_invalid_grants_cannot_be_built() -> None:
    with pytest.raises(ValueError):
        Grant("f", "n", "admin", 1, NOW)
    with pytest.raises(ValueError):
        Grant("f", "n", READER, -1, NOW)
    with pytest.raises(ValueError):
        sign(Grant("f", "n", READER, 1, NOW), b"")
