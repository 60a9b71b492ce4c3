"""The fleet's TLS certificates: one CA per fleet, a certificate per node (docs/security.md).

The CA's key never leaves the admin/coordinator host (like the master key): ``rbdfleet
provision`` makes it in the PKI directory (``[tls] dir``, mode 0700, keys 0600) and issues
there, per name (each VM, ``coordinator``), a certificate for both TLS server and client use,
whose subject alternative names are the node's addresses and its name. Deployers copy a VM
only its own certificate and key plus the public CA certificate (``ca.pem``).

Revocation: the CA's certificate revocation list (``crl.pem``, made with the CA, empty at
first) names the serial of every certificate ``rbdfleet cert revoke`` revoked; agents and the
coordinator refuse a peer certificate it names (agents.tlsreload). It is valid until the CA
ends: nodes read it from their disk, nobody fetches it, so it must never go stale.

CA rotation (``rbdfleet cert rotate-ca``): for an overlap the directory's ``ca.pem`` is a
bundle, the new CA first (it signs from then on, its key in ``ca.key``) and the old one after,
and ``crl.pem`` holds the new CA's CRL then the old one's; every node trusts both while each
gets a certificate of the new CA (``cert rotate --all``), then ``rotate-ca --finish`` drops
the old CA and its CRL.

Pure parts (:func:`make_ca`, :func:`issue`, :func:`make_crl`, :func:`inspect`,
:func:`verify_issued`) take the time as an argument; :class:`FleetPki` is the directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agents.tlsreload import ReloadingContext, TlsFiles, default_crl
from agents.tlsreload import server_context as tls_server_context
from orchestrator.config import FleetConfig
from orchestrator.errors import PkiError

__all__ = ["CA_DAYS", "CERT_DAYS", "CertInfo", "FleetPki", "Issued", "inspect",
           "issue", "make_ca", "make_crl", "node_names", "reloading_server_context",
           "revoked_serials", "server_context", "verify_issued"]

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
    """What a certificate says: common name, SANs, validity, serial number."""

    name: str
    sans: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool
    serial: int = 0


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
    # each CA its own name: during a CA rotation nodes hold the old and the new CA and a CRL
    # of each, and OpenSSL finds a certificate's CRL by its issuer's name
    subject = _name(f"rbdfleet {fleet} CA {secrets.token_hex(4)}", f"rbdfleet {fleet}")
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


def make_crl(ca: Issued, revoked: dict[int, datetime.datetime],
             now: datetime.datetime) -> bytes:
    """The CA's CRL (PEM) naming ``revoked`` (serial -> when), issued ``now`` and valid
    until the CA ends (module docstring)."""
    ca_cert, ca_key = _load_ca(ca)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - _BACKDATE).next_update(ca_cert.not_valid_after_utc))
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            .build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoked_serials(ca_pem: bytes, crl_pem: bytes) -> dict[int, datetime.datetime]:
    """Serial -> revocation time of the CRL ``crl_pem`` if ``ca_pem`` (its first
    certificate) signed it; PkiError otherwise."""
    ca = _cert(ca_pem, "the CA certificate")
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise PkiError(f"the CRL is not PEM: {exc}") from exc
    public = ca.public_key()
    if crl.issuer != ca.subject or not (
            isinstance(public, ec.EllipticCurvePublicKey) and crl.is_signature_valid(public)):
        raise PkiError("the CRL is not the fleet CA's")
    return {r.serial_number: r.revocation_date_utc for r in crl}


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
                    cert.not_valid_after_utc, is_ca, cert.serial_number)


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


def _pem_blocks(data: bytes) -> list[bytes]:
    """The PEM blocks of ``data`` (a bundle), each with its lines, in order."""
    blocks, current = [], b""
    for line in data.splitlines(keepends=True):
        if line.startswith(b"-----BEGIN "):
            current = b""
        current += line
        if line.startswith(b"-----END "):
            blocks.append(current)
    return blocks


def node_names(config: FleetConfig, coordinator_hosts: Sequence[str]) -> dict[str, list[str]]:
    """Every name the fleet's PKI issues a certificate to, with its SANs: each VM and
    sandbox host (its address) and the coordinators (``coordinator_hosts``)."""
    names = {vm.name: [vm.address] for vm in config.vms}
    names.update({host.name: [host.address] for host in config.hosts})
    names[COORDINATOR] = list(coordinator_hosts)
    return names


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
    (0600), ``crl.pem`` (public), and ``<name>.pem`` / ``<name>.key`` (0600) per issued name;
    a revoked certificate is kept as ``<name>.revoked-<serial>.pem``."""

    def __init__(self, directory: Path, fleet: str) -> None:
        self.dir = directory
        self.fleet = fleet

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def crl_file(self) -> Path:
        return self.dir / "crl.pem"

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
        """Make the CA unless it exists, and its CRL unless it has one; whether the CA was
        made."""
        made = not self.ca_file.exists()
        if made:
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                ca = make_ca(self.fleet, now)
                _write_private(self.key_file("ca"), ca.key, 0o600)
                _write_private(self.ca_file, ca.cert, 0o644)
            except OSError as exc:
                raise PkiError(f"cannot write the fleet CA in {self.dir}: {exc}") from exc
        try:
            self.revoked()
        except PkiError:  # none yet (a fleet provisioned before CRLs), or another CA's
            self._write_crl({}, now)
        return made

    def revoked(self) -> dict[int, datetime.datetime]:
        """Serial -> revocation time of every certificate the (current) CA's CRL names;
        PkiError when there is no CRL of this CA."""
        return revoked_serials(self._read(self.ca_file), self._read(self.crl_file))

    def _write_crl(self, revoked: dict[int, datetime.datetime],
                   now: datetime.datetime) -> None:
        """The current CA's CRL, then the previous CA's during a CA rotation."""
        try:
            previous = _pem_blocks(self.crl_file.read_bytes())[1:]
        except OSError:
            previous = []
        try:
            _write_private(self.crl_file, b"".join([make_crl(self.ca(), revoked, now),
                                                    *previous]), 0o644)
        except OSError as exc:
            raise PkiError(f"cannot write the CRL in {self.dir}: {exc}") from exc

    def rotating_ca(self) -> bool:
        """Whether a CA rotation is under way (``ca.pem`` holds the old CA after the new)."""
        return len(_pem_blocks(self._read(self.ca_file))) > 1

    def begin_ca_rotation(self, now: datetime.datetime) -> CertInfo:
        """A new CA signs from now on; ``ca.pem`` and ``crl.pem`` become bundles of the new
        and the old (module docstring). The new CA's info; PkiError if a rotation is under
        way already."""
        if self.rotating_ca():
            raise PkiError("a CA rotation is under way: finish it first "
                           "(`rbdfleet cert rotate-ca --finish`)")
        self.ensure_ca(now)  # the old CA's CRL, for a fleet provisioned before CRLs
        old_ca, old_crl = self._read(self.ca_file), self._read(self.crl_file)
        new = make_ca(self.fleet, now)
        try:
            _write_private(self.key_file("ca.previous"), self._read(self.key_file("ca")), 0o600)
            # the new key before the bundle naming its certificate first: whoever signs in
            # between fails to load a mismatched pair rather than sign with the old key
            _write_private(self.key_file("ca"), new.key, 0o600)
            _write_private(self.ca_file, new.cert + old_ca, 0o644)
            _write_private(self.crl_file, make_crl(new, {}, now) + old_crl, 0o644)
        except OSError as exc:
            raise PkiError(f"cannot write the new CA in {self.dir}: {exc}") from exc
        return inspect(new.cert)

    def finish_ca_rotation(self) -> None:
        """Trust the new CA alone: the old one and its CRL leave the bundles. PkiError if no
        rotation is under way."""
        if not self.rotating_ca():
            raise PkiError("no CA rotation is under way (`rbdfleet cert rotate-ca` starts one)")
        try:
            _write_private(self.ca_file, _pem_blocks(self._read(self.ca_file))[0], 0o644)
            _write_private(self.crl_file, _pem_blocks(self._read(self.crl_file))[0], 0o644)
            self.key_file("ca.previous").unlink(missing_ok=True)
        except OSError as exc:
            raise PkiError(f"cannot write the CA in {self.dir}: {exc}") from exc

    def revoke(self, name: str, now: datetime.datetime) -> CertInfo:
        """Revoke ``name``'s current certificate: its serial joins the CRL, the certificate
        is kept aside as ``<name>.revoked-<serial>.pem`` and its key deleted (so that
        ``provision`` or ``cert rotate`` issues a new one). PkiError when it has none of
        this CA."""
        cert = self.cert_file(name)
        info = verify_issued(self._read(self.ca_file), self._read(cert), now)
        revoked = {**self.revoked(), info.serial: now}
        self._write_crl(revoked, now)
        try:
            os.replace(cert, cert.with_name(f"{name}.revoked-{info.serial:x}.pem"))
            self.key_file(name).unlink(missing_ok=True)
        except OSError as exc:
            raise PkiError(f"{name}'s certificate is revoked, but cannot be moved aside in "
                           f"{self.dir}: {exc}") from exc
        return info

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
        self.reissue(name, sans, now)
        return True

    def reissue(self, name: str, sans: Sequence[str], now: datetime.datetime) -> CertInfo:
        """A new key and certificate for ``name`` whatever it has (a rotation); the old
        certificate stays valid until it expires or is revoked."""
        issued = issue(self.ca(), name, sans, now)
        try:
            # the key first: a reader between the two writes sees the old certificate with
            # the new key, which does not load, and keeps what it had (agents.tlsreload)
            _write_private(self.key_file(name), issued.key, 0o600)
            _write_private(self.cert_file(name), issued.cert, 0o644)
        except OSError as exc:
            raise PkiError(f"cannot write {name}'s certificate in {self.dir}: {exc}") from exc
        return inspect(issued.cert)

    def identity(self, name: str) -> tuple[Path, Path]:
        """``(cert, key)`` paths of ``name``; PkiError if either is missing."""
        cert, key = self.cert_file(name), self.key_file(name)
        for path in (self.ca_file, cert, key):
            if not path.exists():
                raise PkiError(f"{path} missing: `rbdfleet provision` makes the fleet's "
                               "certificates")
        return cert, key


def reloading_server_context(cert: str | Path, key: str | Path, ca: str | Path,
                             crl: str | Path | None = None) -> ReloadingContext:
    """A coordinator's TLS server context: its certificate, and the fleet CA (bundle) for
    client certificates, which are optional at the handshake (clients have none; one that is
    presented must chain to the CA and not be revoked by ``crl``, by default ``crl.pem``
    beside the CA once it exists) and required by node-only routes (agents' reports), whose
    handler checks ``getpeercert()``. Rebuilt when the files change (agents.tlsreload).
    PkiError if a file does not load."""
    files = TlsFiles(str(ca), str(cert), str(key),
                     default_crl(str(ca)) if crl is None else str(crl),
                     crl_required=crl is not None)
    try:
        return ReloadingContext(files, tls_server_context)
    except (OSError, ValueError) as exc:  # ssl.SSLError too
        raise PkiError(f"the coordinator's certificate, key, CA or CRL does not load: "
                       f"{exc}") from exc


def server_context(cert: str | Path, key: str | Path, ca: str | Path,
                   crl: str | Path | None = None) -> ssl.SSLContext:
    """:func:`reloading_server_context` as it is now, never rebuilt."""
    return reloading_server_context(cert, key, ca, crl).get()
