"""Client credentials: scopes nest, a client's token verifies under its own secret only, and the
``rbdfleet client`` use cases (add, rotate, revoke) over the in-memory ClientStore."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agents.core.grants import CLIENT, COORDINATOR, verify
from agents.errors import BadSignature, ForeignGrant
from orchestrator.cli.clients import issue, write_secret_file
from orchestrator.core.clients import (
    ADMIN_SCOPE,
    READ_SCOPE,
    WRITE_SCOPE,
    ClientCredential,
    allows,
    check_client_name,
    client_token,
)
from orchestrator.errors import ConfigError
from orchestrator.services import read_client_secret
from orchestrator.testing.clients import MemoryClientStore

pytestmark = pytest.mark.unit

NOW = 1_000_000.0


@pytest.mark.parametrize(("scope", "allowed"), [
    (READ_SCOPE, {"read", "report"}),
    (WRITE_SCOPE, {"read", "report", "write"}),
    (ADMIN_SCOPE, {"read", "report", "write", "failover", "fence"}),
])
def test_scopes_nest(scope: str, allowed: set[str]) -> None:
    routes = {"read", "report", "write", "failover", "fence", "map", "explode"}
    assert {r for r in routes if allows(scope, r)} == allowed


def test_a_client_token_verifies_under_its_own_secret_only() -> None:
    token = client_token("f", "alice", b"alice-secret-0123456", NOW, ttl=30.0)
    grant = verify(token, (b"alice-secret-0123456",), now=NOW, fleet="f",
                   audience=COORDINATOR, purposes={CLIENT}, epoch=None, subject="alice")
    assert (grant.subject, grant.expires) == ("alice", NOW + 30.0)
    with pytest.raises(BadSignature):
        verify(token, (b"bob-secret-0123456789",), now=NOW, fleet="f", audience=COORDINATOR,
               purposes={CLIENT}, epoch=None, subject="alice")
    with pytest.raises(ForeignGrant):  # alice's token does not speak for bob
        verify(token, (b"alice-secret-0123456",), now=NOW, fleet="f", audience=COORDINATOR,
               purposes={CLIENT}, epoch=None, subject="bob")


def test_credentials_are_validated() -> None:
    with pytest.raises(ValueError):
        ClientCredential("alice", "root", b"x" * 32)
    with pytest.raises(ValueError):
        ClientCredential("alice", READ_SCOPE, b"short")
    for bad in ("", "Alice", "a b", "-x", "a" * 64, "x|y"):
        with pytest.raises(ValueError):
            check_client_name(bad)


def test_add_rotate_revoke(tmp_path: Path) -> None:
    store = MemoryClientStore("f")
    out = tmp_path / "alice.secret"
    first = issue(store, "alice", WRITE_SCOPE, replace=False, out=out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert read_client_secret(out) == first.secret == store.get("alice").secret  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="exists"):
        issue(store, "alice", READ_SCOPE, replace=False, out=out)
    second = issue(store, "alice", WRITE_SCOPE, replace=True, out=out)
    assert second.secret != first.secret and read_client_secret(out) == second.secret
    with pytest.raises(ConfigError, match="no client"):
        issue(store, "bob", READ_SCOPE, replace=True, out=None)
    assert [c.name for c in store.list()] == ["alice"]
    assert store.remove("alice") and not store.remove("alice")


def test_a_client_secret_file_must_be_private_hex(tmp_path: Path) -> None:
    path = tmp_path / "c.secret"
    write_secret_file(path, b"\x01" * 32)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        read_client_secret(path)
    path.chmod(0o600)
    path.write_text("not hex\n")
    with pytest.raises(ConfigError, match="hex"):
        read_client_secret(path)
