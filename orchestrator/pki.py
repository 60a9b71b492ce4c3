"""The fleet's TLS certificates: one CA per fleet, a certificate per node (docs/security.md).

The CA's key never leaves the admin/coordinator host (like the master key): ``rbdfleet
provision`` makes it in the PKI directory (``[tls] dir``, mode 0700, keys 0600) and issues
there, per name (each VM, ``coordinator``), a certificate for both TLS server and client use,
whose subject alternative names are the node's addresses and its name. Deployers copy a VM
only its own certificate and key plus the public CA certificate (``ca.pem``).

Pure parts (:func:`make_ca`, :func:`issue`, :func:`inspect`, :func:`verify_issued`) take the
time as an argument; :class:`FleetPki` is the directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.errors import PkiError

__all__ = ["CA_DAYS", "CERT_DAYS", "CertInfo", "FleetPki", "Issued", "inspect",
           "issue", "make_ca", "server_context", "verify_issued"]

CA_DAYS = 3650
CERT_DAYS = 825  # the longest lifetime clients commonly accept for a server certificate
RENEW_BEFORE = datetime.timedelta(days=30)  # `provision` reissues a cert this close to expiry
COORDINATOR = "coordinator"  # the name of the coordinators' certificate (shared by all)
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate clocks a little behind the admin host's


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says: common name, SANs, validity."""

    name: str
    sans: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(fleet: str, now: datetime.datetime, days: int = CA_DAYS) -> Issued:
    """A new self-signed CA for ``fleet`` (P-256), valid ``days`` from ``now``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(f"rbdfleet {fleet} CA", f"rbdfleet {fleet}")
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + datetime.timedelta(days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert)
        key = serialization.load_pem_private_key(ca.key, password=None)
    except ValueError as exc:
        raise PkiError(f"the fleet CA does not load: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the fleet CA key is not an EC key")
    return cert, key


def issue(ca: Issued, name: str, sans: Sequence[str], now: datetime.datetime,
          days: int = CERT_DAYS) -> Issued:
    """A certificate for ``name`` signed by ``ca``: TLS server and client, its SANs ``sans``
    (IP addresses or DNS names) and ``name``; valid ``days`` from ``now`` (never past the
    CA's own end)."""
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([*sans, name]))  # ordered, no repeats
    organization = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    not_after = min(now + datetime.timedelta(days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name, str(organization)))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"{what} is not a PEM certificate: {exc}") from exc


def inspect(pem: bytes) -> CertInfo:
    """The name, SANs and validity of a PEM certificate."""
    cert = _cert(pem, "certificate")
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(v) for v in (*san.get_values_for_type(x509.IPAddress),
                                      *san.get_values_for_type(x509.DNSName)))
    except x509.ExtensionNotFound:
        sans = ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(str(common[0].value) if common else "", sans, cert.not_valid_before_utc,
                    cert.not_valid_after_utc, is_ca)


def verify_issued(ca_pem: bytes, cert_pem: bytes, now: datetime.datetime) -> CertInfo:
    """``cert_pem``'s info if ``ca_pem`` signed it and it is valid at ``now``; else PkiError."""
    ca, cert = _cert(ca_pem, "the CA certificate"), _cert(cert_pem, "the certificate")
    info = inspect(cert_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"certificate {info.name!r} is not issued by the fleet CA "
                       f"({ca.subject.rfc4514_string()})") from exc
    if not info.not_before <= now <= info.not_after:
        raise PkiError(f"certificate {info.name!r} is valid from {info.not_before:%Y-%m-%d} "
                       f"to {info.not_after:%Y-%m-%d}, not at {now:%Y-%m-%d %H:%M}")
    return info


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` (never wider)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class FleetPki:
    """The PKI directory of one fleet on the admin host: ``ca.pem`` (public), ``ca.key``
    (0600), and ``<name>.pem`` / ``<name>.key`` (0600) per issued name."""

    def __init__(self, directory: Path, fleet: str) -> None:
        self.dir = directory
        self.fleet = fleet

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def cert_file(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key_file(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read {path}: {exc.strerror} (`rbdfleet provision` makes "
                           "the fleet's certificates)") from exc

    def ca(self) -> Issued:
        """The CA's certificate and key (the admin host's copy)."""
        return Issued(self._read(self.ca_file), self._read(self.key_file("ca")))

    def ensure_ca(self, now: datetime.datetime) -> bool:
        """Make the CA unless it exists; whether it was made."""
        if self.ca_file.exists():
            return False
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            ca = make_ca(self.fleet, now)
            _write_private(self.key_file("ca"), ca.key, 0o600)
            _write_private(self.ca_file, ca.cert, 0o644)
        except OSError as exc:
            raise PkiError(f"cannot write the fleet CA in {self.dir}: {exc}") from exc
        return True

    def ensure(self, name: str, sans: Sequence[str], now: datetime.datetime) -> bool:
        """Issue ``name``'s certificate unless a valid one from this CA with these SANs (and
        more than :data:`RENEW_BEFORE` left) exists; whether one was issued."""
        cert = self.cert_file(name)
        if cert.exists() and self.key_file(name).exists():
            try:
                info = verify_issued(self._read(self.ca_file), cert.read_bytes(), now)
                wanted = {str(_san(s).value) for s in (*sans, name)}
                if wanted <= set(info.sans) and info.not_after - now > RENEW_BEFORE:
                    return False
            except PkiError:
                pass  # another CA's, expired or unreadable: reissue
        issued = issue(self.ca(), name, sans, now)
        try:
            _write_private(self.key_file(name), issued.key, 0o600)
            _write_private(cert, issued.cert, 0o644)
        except OSError as exc:
            raise PkiError(f"cannot write {name}'s certificate in {self.dir}: {exc}") from exc
        return True

    def identity(self, name: str) -> tuple[Path, Path]:
        """``(cert, key)`` paths of ``name``; PkiError if either is missing."""
        cert, key = self.cert_file(name), self.key_file(name)
        for path in (self.ca_file, cert, key):
            if not path.exists():
                raise PkiError(f"{path} missing: `rbdfleet provision` makes the fleet's "
                               "certificates")
        return cert, key


def server_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """A coordinator's TLS server context: its certificate, and the fleet CA for client
    certificates, which are optional at the handshake (clients have none; one that is
    presented must chain to the CA) and required by node-only routes (agents' reports), whose
    handler checks ``getpeercert()``. PkiError if a file does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ca)
    except OSError as exc:  # ssl.SSLError too
        raise PkiError(f"the coordinator's certificate, key or CA does not load: {exc}") from exc
    context.verify_mode = ssl.CERT_OPTIONAL
    return context
