"""orchestrator/pki.py: the CA's CRL (made with the CA, valid until the CA ends), revoking a
node's certificate (its serial in the CRL, its files set aside so a new one is issued) and
reissuing one (a rotation)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from orchestrator.errors import PkiError
from orchestrator.pki import FleetPki, inspect, make_ca, make_crl, revoked_serials

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)


def test_the_ca_comes_with_an_empty_crl_valid_until_the_ca_ends(tmp_path: Path) -> None:
    pki = FleetPki(tmp_path / "tls", "demo")
    assert pki.ensure_ca(NOW) is True
    assert pki.revoked() == {}
    crl = x509.load_pem_x509_crl(pki.crl_file.read_bytes())
    assert crl.next_update_utc == inspect(pki.ca_file.read_bytes()).not_after
    # a fleet provisioned before CRLs gets one at its next provision, the CA kept
    ca = pki.ca_file.read_bytes()
    pki.crl_file.unlink()
    assert pki.ensure_ca(NOW) is False
    assert pki.revoked() == {} and pki.ca_file.read_bytes() == ca


def test_revoking_names_the_serial_in_the_crl_and_sets_the_certificate_aside(
        tmp_path: Path) -> None:
    pki = FleetPki(tmp_path / "tls", "demo")
    pki.ensure_ca(NOW)
    pki.ensure("vm1", ["10.0.0.1"], NOW)
    pki.ensure("vm2", ["10.0.0.2"], NOW)
    first = inspect(pki.cert_file("vm1").read_bytes())
    later = NOW + datetime.timedelta(hours=1)
    info = pki.revoke("vm1", later)
    assert info.serial == first.serial and info.name == "vm1"
    assert pki.revoked() == {first.serial: later}
    assert not pki.cert_file("vm1").exists() and not pki.key_file("vm1").exists()
    assert (pki.dir / f"vm1.revoked-{first.serial:x}.pem").exists()
    with pytest.raises(PkiError, match="cannot read"):  # nothing left to revoke
        pki.revoke("vm1", later)
    # provision issues vm1 a new certificate; a second revocation keeps the first
    assert pki.ensure("vm1", ["10.0.0.1"], later) is True
    second = pki.revoke("vm2", later)
    assert set(pki.revoked()) == {first.serial, second.serial}
    assert inspect(pki.cert_file("vm1").read_bytes()).serial not in pki.revoked()


def test_reissuing_makes_a_new_key_and_serial_whatever_the_old_one(tmp_path: Path) -> None:
    pki = FleetPki(tmp_path / "tls", "demo")
    pki.ensure_ca(NOW)
    pki.ensure("vm1", ["10.0.0.1"], NOW)
    old_cert, old_key = pki.cert_file("vm1").read_bytes(), pki.key_file("vm1").read_bytes()
    info = pki.reissue("vm1", ["10.0.0.1"], NOW)
    assert pki.key_file("vm1").read_bytes() != old_key
    assert info.serial != inspect(old_cert).serial and "10.0.0.1" in info.sans
    assert pki.key_file("vm1").stat().st_mode & 0o777 == 0o600


def test_a_crl_is_only_taken_from_its_own_ca() -> None:
    ca, other = make_ca("demo", NOW), make_ca("demo", NOW)
    crl = make_crl(ca, {7: NOW, 9: NOW}, NOW)
    assert revoked_serials(ca.cert, crl) == {7: NOW, 9: NOW}
    with pytest.raises(PkiError, match="not the fleet CA's"):
        revoked_serials(other.cert, crl)
    with pytest.raises(PkiError, match="not PEM"):
        revoked_serials(ca.cert, crl[:50])
    # two CAs of one fleet have distinct names (nodes find each one's CRL by it)
    assert inspect(ca.cert).name != inspect(other.cert).name


def test_a_ca_rotation_bundles_the_new_and_the_old_ca_and_crl_then_drops_the_old(
        tmp_path: Path) -> None:
    pki = FleetPki(tmp_path / "tls", "demo")
    pki.ensure_ca(NOW)
    pki.ensure("vm1", ["10.0.0.1"], NOW)
    old_ca = pki.ca_file.read_bytes()
    old_cert = pki.cert_file("vm1").read_bytes()
    assert not pki.rotating_ca()
    new = pki.begin_ca_rotation(NOW)
    assert pki.rotating_ca() and new.is_ca
    bundle = x509.load_pem_x509_certificates(pki.ca_file.read_bytes())
    assert new.name in bundle[0].subject.rfc4514_string()
    assert bundle[1].public_bytes(serialization.Encoding.PEM) == old_ca
    crls = pki.crl_file.read_bytes().count(b"-----BEGIN X509 CRL-----")
    assert crls == 2 and pki.revoked() == {}  # the new CA's CRL first
    with pytest.raises(PkiError, match="under way"):
        pki.begin_ca_rotation(NOW)
    # the new CA signs; a revocation keeps the old CA's CRL in the bundle
    pki.ensure("vm2", ["10.0.0.2"], NOW)
    assert inspect(pki.cert_file("vm2").read_bytes()).serial
    pki.revoke("vm2", NOW)
    assert pki.crl_file.read_bytes().count(b"-----BEGIN X509 CRL-----") == 2
    # vm1's certificate is the old CA's: provision (ensure) reissues it from the new one
    assert pki.ensure("vm1", ["10.0.0.1"], NOW) is True
    assert pki.cert_file("vm1").read_bytes() != old_cert
    pki.finish_ca_rotation()
    assert not pki.rotating_ca()
    assert inspect(pki.ca_file.read_bytes()).name == new.name
    assert pki.crl_file.read_bytes().count(b"-----BEGIN X509 CRL-----") == 1
    assert len(pki.revoked()) == 1
    with pytest.raises(PkiError, match="no CA rotation"):
        pki.finish_ca_rotation()
