"""orchestrator/pki.py: the fleet CA, per-node certificates (SANs, expiry, chain), the
directory's files and modes, and that Python's ssl accepts what it issues; what `provision`
issues and where `deploy` points the agents (or the insecure flag)."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from orchestrator.config import FleetConfig, from_mapping
from orchestrator.errors import PkiError
from orchestrator.pki import (
    CERT_DAYS,
    COORDINATOR,
    RENEW_BEFORE,
    FleetPki,
    Issued,
    inspect,
    issue,
    make_ca,
    verify_issued,
)
from orchestrator.provision import provision_pki
from orchestrator.rollout import GUEST_TLS, FleetRollout, agent_config
from tests.unit.test_rollout import FakeDeployer, FakeShell

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)


def test_a_node_certificate_names_its_addresses_and_node() -> None:
    ca = make_ca("demo", NOW)
    cert = issue(ca, "vm1", ["10.87.0.11", "vm1.example"], NOW)
    info = verify_issued(ca.cert, cert.cert, NOW)
    assert info.name == "vm1"
    assert set(info.sans) == {"10.87.0.11", "vm1.example", "vm1"}
    assert not info.is_ca and inspect(ca.cert).is_ca


def test_expiry_is_checked_and_capped_by_the_ca() -> None:
    ca = make_ca("demo", NOW, days=100)
    cert = issue(ca, "vm1", ["10.0.0.1"], NOW)  # asks for CERT_DAYS: capped at the CA's end
    info = inspect(cert.cert)
    assert info.not_after == inspect(ca.cert).not_after < NOW + datetime.timedelta(CERT_DAYS)
    verify_issued(ca.cert, cert.cert, NOW + datetime.timedelta(days=99))
    with pytest.raises(PkiError, match="valid from"):
        verify_issued(ca.cert, cert.cert, NOW + datetime.timedelta(days=101))
    with pytest.raises(PkiError, match="valid from"):
        verify_issued(ca.cert, cert.cert, NOW - datetime.timedelta(days=1))


def test_another_fleets_ca_did_not_issue_it() -> None:
    ours, theirs = make_ca("demo", NOW), make_ca("demo", NOW)  # same name, other key
    cert = issue(theirs, "vm1", ["10.0.0.1"], NOW)
    with pytest.raises(PkiError, match="not issued by the fleet CA"):
        verify_issued(ours.cert, cert.cert, NOW)
    with pytest.raises(PkiError, match="not a PEM certificate"):
        verify_issued(ours.cert, b"garbage", NOW)


def test_the_directory_keeps_keys_private_and_reissues_only_when_needed(tmp_path: Path) -> None:
    pki = FleetPki(tmp_path / "tls", "demo")
    with pytest.raises(PkiError, match="rbdfleet provision"):
        pki.ca()
    assert pki.ensure_ca(NOW) and not pki.ensure_ca(NOW)
    assert stat.S_IMODE(pki.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(pki.key_file("ca").stat().st_mode) == 0o600
    assert pki.ensure("vm1", ["10.0.0.1"], NOW)
    assert stat.S_IMODE(pki.key_file("vm1").stat().st_mode) == 0o600
    first = pki.cert_file("vm1").read_bytes()
    assert not pki.ensure("vm1", ["10.0.0.1"], NOW)  # same SANs, far from expiry: kept
    assert pki.cert_file("vm1").read_bytes() == first
    assert pki.ensure("vm1", ["10.0.0.2"], NOW)  # an address changed: reissued
    assert "10.0.0.2" in inspect(pki.cert_file("vm1").read_bytes()).sans
    late = inspect(pki.cert_file("vm1").read_bytes()).not_after - RENEW_BEFORE
    assert pki.ensure("vm1", ["10.0.0.2"], late)  # about to expire: reissued
    assert pki.identity("vm1") == (pki.cert_file("vm1"), pki.key_file("vm1"))
    with pytest.raises(PkiError, match="missing"):
        pki.identity("vm9")


def _handshake(ca: Issued, server: Issued, client: Issued, tmp: Path) -> str:
    """One TLS handshake over a socket pair, the server requiring a client certificate of
    ``ca`` and the client checking the server's SAN 127.0.0.1: the client's common name as
    the server saw it (its subject's repr), or ``refused: REASON``."""
    tmp.mkdir()
    for name, issued in (("ca", ca), ("server", server), ("client", client)):
        (tmp / f"{name}.pem").write_bytes(issued.cert)
        (tmp / f"{name}.key").write_bytes(issued.key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "server.pem", tmp / "server.key")
    server_ctx.load_verify_locations(tmp / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=tmp / "ca.pem")
    client_ctx.load_cert_chain(tmp / "client.pem", tmp / "client.key")
    a, b = socket.socketpair()
    outcome: list[str] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                peer = s.getpeercert()
                assert peer is not None
                outcome.append(repr(peer["subject"]))
        except ssl.SSLError as exc:
            outcome.append(f"refused: {exc.reason}")

    thread = threading.Thread(target=serve)
    thread.start()
    with contextlib.suppress(OSError), client_ctx.wrap_socket(b, server_hostname="127.0.0.1"):
        pass
    thread.join(10)
    return outcome[0]


def test_python_ssl_does_mutual_tls_with_what_it_issues(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca, other = make_ca("demo", now), make_ca("demo", now)
    server = issue(ca, "vm1", ["127.0.0.1"], now)
    assert _handshake(ca, server, issue(ca, "vm2", ["10.0.0.2"], now), tmp_path / "a") == repr(
        ((("organizationName", "rbdfleet demo"),), (("commonName", "vm2"),)))
    refused = _handshake(ca, server, issue(other, "vm2", ["10.0.0.2"], now), tmp_path / "b")
    assert refused.startswith("refused: ")


def _fleet(tmp_path: Path, **tls: object) -> FleetConfig:
    return from_mapping({
        "ceph": {"conf": "/c", "keyring": "/k"},
        "ssh": {"key": "/k", "known_hosts": "/kh"},
        "fleet": {"name": "demo", "image": "img", "size": "64MiB", "writer": "vm1",
                  "secret_file": str(tmp_path / "fleet.secret")},
        "vm": [{"name": f"vm{i}", "domain": f"d{i}", "address": f"10.0.0.{i}"} for i in (1, 2)],
        "tls": tls})


def test_provision_issues_each_vm_and_the_coordinator_and_deploy_points_agents_at_them(
        tmp_path: Path) -> None:
    cfg = _fleet(tmp_path)
    made = provision_pki(cfg, ["10.0.0.254"], NOW)
    assert len(made) == 4 and provision_pki(cfg, ["10.0.0.254"], NOW) == []  # idempotent
    pki = FleetPki(cfg.pki_dir, "demo")
    assert cfg.pki_dir == tmp_path / "tls"
    for name, address in (("vm1", "10.0.0.1"), ("vm2", "10.0.0.2"),
                          (COORDINATOR, "10.0.0.254")):
        info = verify_issued(pki.ca_file.read_bytes(), pki.cert_file(name).read_bytes(), NOW)
        assert set(info.sans) == {address, name}
    shipped = agent_config(cfg, "vm2", coordinators=["https://10.0.0.254:7470"])
    assert shipped["tls"] == GUEST_TLS and "insecure_plaintext" not in shipped


def test_the_insecure_flag_makes_no_pki_and_plaintext_agents(tmp_path: Path) -> None:
    cfg = _fleet(tmp_path, insecure_plaintext=True)
    assert provision_pki(cfg, ["10.0.0.254"], NOW) == [] and not cfg.pki_dir.exists()
    shipped = agent_config(cfg, "vm1", coordinators=())
    assert shipped["insecure_plaintext"] is True and "tls" not in shipped


def test_deploy_installs_a_vms_own_certificate_and_key_and_never_the_ca_key(
        tmp_path: Path) -> None:
    cfg = _fleet(tmp_path)
    provision_pki(cfg, ["10.0.0.254"], NOW)
    shell = FakeShell()
    FleetRollout(cfg, shell, FakeDeployer(shell), b"master", progress=lambda _: None).deploy()
    pki = FleetPki(cfg.pki_dir, "demo")
    puts = {(name, path): (mode, data) for kind, name, args in shell.log
            if kind == "put_files" for data, path, mode in args}  # the deployer's file copy
    assert puts[("vm1", GUEST_TLS["key"])] == (0o600, pki.key_file("vm1").read_bytes())
    assert puts[("vm1", GUEST_TLS["cert"])] == (0o644, pki.cert_file("vm1").read_bytes())
    assert puts[("vm2", GUEST_TLS["ca"])] == (0o644, pki.ca_file.read_bytes())
    shipped = b"".join(data for _, data in puts.values())
    assert pki.key_file("ca").read_bytes() not in shipped
    assert pki.key_file("vm2").read_bytes() not in b"".join(
        data for (vm, _), (_, data) in puts.items() if vm != "vm2")
