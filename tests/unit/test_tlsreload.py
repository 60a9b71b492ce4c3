"""agents/tlsreload.py: contexts rebuilt when their files change (a bad file keeps the old one),
and what the contexts check: a CA bundle of two CAs, a CRL per CA (a revoked peer refused at
the handshake)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from agents.tlsreload import (
    ReloadingContext,
    TlsFiles,
    client_context,
    default_crl,
    server_context,
    stamp,
)
from orchestrator.pki import Issued, inspect, issue, make_ca, make_crl

pytestmark = pytest.mark.unit

NOW = datetime.datetime.now(datetime.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _write(directory: Path, name: str, issued: Issued) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(issued.cert)
    key.write_bytes(issued.key)
    return str(cert), str(key)


def _replace(path: str, data: bytes) -> None:
    """As the deployers write: a new file renamed over the old one."""
    tmp = f"{path}.tmp"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def _server_name(context: ssl.SSLContext) -> str:
    """The common name of the certificate ``context`` serves (one handshake)."""
    a, b = socket.socketpair()
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    thread = threading.Thread(target=_accept, args=(context, a, []))
    thread.start()
    with client.wrap_socket(b) as s:
        der = s.getpeercert(binary_form=True)
    thread.join(10)
    assert der is not None
    return inspect(ssl.DER_cert_to_PEM_cert(der).encode()).name


def _accept(context: ssl.SSLContext, sock: socket.socket, outcome: list[str]) -> None:
    try:
        with context.wrap_socket(sock, server_side=True) as s:
            der = s.getpeercert(binary_form=True)
            outcome.append("no certificate" if der is None else
                           inspect(ssl.DER_cert_to_PEM_cert(der).encode()).name)
    except (ssl.SSLError, OSError) as exc:
        outcome.append(f"refused: {getattr(exc, 'reason', None) or exc}")


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """What the server saw: the client certificate's common name, or why it refused."""
    a, b = socket.socketpair()
    outcome: list[str] = []
    thread = threading.Thread(target=_accept, args=(server, a, outcome))
    thread.start()
    with contextlib.suppress(OSError), client.wrap_socket(b, server_hostname="127.0.0.1") as s:
        s.recv(1)  # TLS 1.3: the server's verdict on the client certificate comes after
    thread.join(10)
    return outcome[0]


def test_the_context_is_rebuilt_when_a_file_changes_and_only_then(tmp_path: Path) -> None:
    ca = make_ca("demo", NOW)
    (tmp_path / "ca.pem").write_bytes(ca.cert)
    cert, key = _write(tmp_path, "vm1", issue(ca, "vm1", ["127.0.0.1"], NOW))
    clock = Clock()
    source = ReloadingContext(TlsFiles(str(tmp_path / "ca.pem"), cert, key), server_context,
                              interval=2.0, clock=clock)
    first = source.get()
    assert _server_name(first) == "vm1"
    clock.now += 5
    assert source.get() is first and source.reloads == 0  # nothing changed: nothing rebuilt

    renewed = issue(ca, "vm1-renewed", ["127.0.0.1"], NOW)
    _replace(key, renewed.key)
    _replace(cert, renewed.cert)
    clock.now += 1
    assert source.get() is first  # looked at no more often than every 2 s
    clock.now += 1
    second = source.get()
    assert second is not first and source.reloads == 1
    assert _server_name(second) == "vm1-renewed"
    assert _server_name(first) == "vm1"  # what a connection already holds is left alone


def test_a_half_written_file_keeps_the_old_context_until_it_is_whole(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = make_ca("demo", NOW)
    (tmp_path / "ca.pem").write_bytes(ca.cert)
    cert, key = _write(tmp_path, "vm1", issue(ca, "vm1", ["127.0.0.1"], NOW))
    source = ReloadingContext(TlsFiles(str(tmp_path / "ca.pem"), cert, key), server_context,
                              clock=Clock())
    first = source.get()
    renewed = issue(ca, "vm1-renewed", ["127.0.0.1"], NOW)
    with caplog.at_level(logging.WARNING, logger="agents.tlsreload"):
        Path(cert).write_bytes(renewed.cert[:100])  # cut short
        assert source.reload() is False
        # the whole certificate but not its key yet: the pair does not load either
        Path(cert).write_bytes(renewed.cert)
        assert source.reload() is False
    assert source.get() is first and _server_name(source.get()) == "vm1"
    assert [r.message.split()[0] for r in caplog.records] == ["event=tls_reload_failed"] * 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agents.tlsreload"):
        assert source.reload() is False  # the same files again: not retried, not logged
    assert not caplog.records
    Path(key).write_bytes(renewed.key)
    assert source.reload() is True and _server_name(source.get()) == "vm1-renewed"


def test_a_missing_file_at_start_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ReloadingContext(TlsFiles(str(tmp_path / "ca.pem"), str(tmp_path / "x.pem"),
                                  str(tmp_path / "x.key")), server_context)


def test_the_stamp_sees_a_rename_a_rewrite_and_a_removal(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    first = stamp((str(path),))
    _replace(str(path), b"one")  # same size and content, new inode
    renamed = stamp((str(path),))
    assert renamed != first
    path.write_bytes(b"longer")
    assert stamp((str(path),)) != renamed
    path.unlink()
    assert stamp((str(path),)) == (None,)


def test_a_revoked_peer_is_refused_and_a_bundle_of_two_cas_with_their_crls_serves_both(
        tmp_path: Path) -> None:
    old, new = make_ca("demo", NOW), make_ca("demo", NOW)
    server_cert, server_key = _write(tmp_path, "w", issue(new, "w", ["127.0.0.1"], NOW))
    reader = issue(new, "r1", ["127.0.0.1"], NOW)
    r1 = _write(tmp_path, "r1", reader)
    r2 = _write(tmp_path, "r2", issue(new, "r2", ["127.0.0.1"], NOW))
    legacy = _write(tmp_path, "r3", issue(old, "r3", ["127.0.0.1"], NOW))  # not moved yet
    (tmp_path / "new.pem").write_bytes(new.cert)
    (tmp_path / "bundle.pem").write_bytes(new.cert + old.cert)
    revoked = make_crl(new, {inspect(reader.cert).serial: NOW}, NOW)
    (tmp_path / "crl-new.pem").write_bytes(revoked)
    (tmp_path / "crls.pem").write_bytes(revoked + make_crl(old, {}, NOW))

    def client(identity: tuple[str, str], ca: str) -> ssl.SSLContext:
        return client_context(TlsFiles(str(tmp_path / ca), *identity))

    plain = server_context(TlsFiles(str(tmp_path / "new.pem"), server_cert, server_key))
    assert _handshake(plain, client(r1, "new.pem")) == "r1"  # no CRL: no revocation check
    checked = server_context(TlsFiles(str(tmp_path / "new.pem"), server_cert, server_key,
                                      str(tmp_path / "crl-new.pem")))
    assert _handshake(checked, client(r1, "new.pem")).startswith("refused: ")
    assert _handshake(checked, client(r2, "new.pem")) == "r2"
    # a client without a certificate is not checked (clients of the data routes have none)
    nobody = client_context(TlsFiles(str(tmp_path / "new.pem")))
    assert _handshake(checked, nobody) == "no certificate"
    # the old CA's node is refused by the new CA alone, served by the bundle with both CRLs
    assert _handshake(checked, client(legacy, "bundle.pem")).startswith("refused: ")
    both = server_context(TlsFiles(str(tmp_path / "bundle.pem"), server_cert, server_key,
                                   str(tmp_path / "crls.pem")))
    assert _handshake(both, client(legacy, "bundle.pem")) == "r3"
    assert _handshake(both, client(r2, "bundle.pem")) == "r2"
    assert _handshake(both, client(r1, "bundle.pem")).startswith("refused: ")
    # a bundle whose CRL file lacks one CA's CRL refuses that CA's nodes: name every CA
    half = server_context(TlsFiles(str(tmp_path / "bundle.pem"), server_cert, server_key,
                                   str(tmp_path / "crl-new.pem")))
    assert _handshake(half, client(legacy, "bundle.pem")).startswith("refused: ")
    # the client side checks the server against the CRL too
    revoked_server = server_context(TlsFiles(str(tmp_path / "new.pem"), *r1))
    crl_client = client_context(TlsFiles(str(tmp_path / "new.pem"), *r2,
                                         crl=str(tmp_path / "crl-new.pem")))
    with pytest.raises(ssl.SSLCertVerificationError):
        _client_handshake(revoked_server, crl_client)


def _client_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    a, b = socket.socketpair()
    thread = threading.Thread(target=_accept, args=(server, a, []))
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname="127.0.0.1"):
            pass
    finally:
        b.close()
        thread.join(10)


def test_a_crl_beside_the_ca_counts_from_the_moment_it_appears(tmp_path: Path) -> None:
    ca = make_ca("demo", NOW)
    (tmp_path / "ca.pem").write_bytes(ca.cert)
    server_cert, server_key = _write(tmp_path, "w", issue(ca, "w", ["127.0.0.1"], NOW))
    reader = issue(ca, "r1", ["127.0.0.1"], NOW)
    r1 = _write(tmp_path, "r1", reader)
    crl = default_crl(str(tmp_path / "ca.pem"))
    assert crl == str(tmp_path / "crl.pem")
    source = ReloadingContext(TlsFiles(str(tmp_path / "ca.pem"), server_cert, server_key, crl,
                                       crl_required=False), server_context, clock=Clock())
    client = client_context(TlsFiles(str(tmp_path / "ca.pem"), *r1))
    assert _handshake(source.get(), client) == "r1"  # none yet (deployed before revocation)
    _replace(crl, make_crl(ca, {inspect(reader.cert).serial: NOW}, NOW))
    assert source.reload() is True
    assert _handshake(source.get(), client).startswith("refused: ")
    # a required CRL that is missing does not load
    with pytest.raises(OSError):
        server_context(TlsFiles(str(tmp_path / "ca.pem"), server_cert, server_key,
                                str(tmp_path / "none.pem")))
