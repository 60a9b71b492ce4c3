"""TLS contexts that follow their files, for agents and the coordinator (docs/security.md).

A node's certificate and key, the fleet CA bundle and the CA's revocation list (CRL) are
replaced on disk by ``rbdfleet cert rotate`` / ``cert revoke`` (or the Ansible role) while the
process runs. :class:`ReloadingContext` hands each new connection a context built from the
files as they are now: every :data:`CHECK_INTERVAL` seconds at most (or at once on
:meth:`ReloadingContext.reload`, which the agent calls on SIGHUP) it compares each file's
(inode, size, mtime) with those it was built from and rebuilds when one changed. Connections
already open keep the context they were made with. A rebuild that fails (a file half
written, a certificate without its new key yet) is logged and the old context kept; it is
tried again once the files change again.

The CA file may hold several CA certificates (the old and the new CA during a CA rotation):
a peer's certificate of either is accepted. The CRL file holds one CRL per CA (PEM,
concatenated) and every peer certificate presented is checked against its CA's
(``VERIFY_CRL_CHECK_LEAF``): a revoked node's certificate fails the handshake, and so does
one whose CA has no CRL in the file, so a CRL file names every CA of the bundle. Unless
configured otherwise the CRL is ``crl.pem`` beside the CA file (:func:`default_crl`), checked
from the moment it exists: ``rbdfleet cert revoke`` installs it on nodes deployed before it.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CHECK_INTERVAL", "ContextSource", "ReloadingContext", "TlsFiles", "client_context",
           "current", "default_crl", "server_context", "stamp"]

LOG = logging.getLogger(__name__)

# Files are looked at (a few stat calls) at most this often, by the connection that comes
# first after it: a rotated certificate serves within that many seconds.
CHECK_INTERVAL = 2.0

Stamp = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one TLS identity: ``cert``/``key`` this node's (None: a client that
    presents none), ``ca`` the fleet CA bundle (None: the system's CAs, for a client),
    ``crl`` the CAs' revocation lists (None: no revocation check)."""

    ca: str | None
    cert: str | None = None
    key: str | None = None
    crl: str | None = None
    crl_required: bool = True  # False: no revocation check while the CRL file is missing

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert, self.key, self.ca, self.crl) if p is not None)


def default_crl(ca: str) -> str:
    """Where a node finds its CA's CRL unless told: ``crl.pem`` beside the CA file."""
    return os.path.join(os.path.dirname(ca), "crl.pem")


def _verify(context: ssl.SSLContext, files: TlsFiles) -> None:
    if files.crl is not None and (files.crl_required or os.path.exists(files.crl)):
        context.load_verify_locations(files.crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server's context: its certificate; client certificates optional at the handshake
    (clients have none; a presented one must chain to the CA and, with a CRL, not be revoked)
    and required by node-only routes, whose handlers check ``getpeercert()``."""
    if files.cert is None or files.ca is None:
        raise ValueError("a TLS server needs its certificate, key and the fleet CA")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    context.load_verify_locations(files.ca)
    _verify(context, files)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client's context: the server verified against the CA (and CRL); this node's
    certificate presented when ``files`` names one."""
    context = ssl.create_default_context(cafile=files.ca)
    if files.cert is not None:
        context.load_cert_chain(files.cert, files.key)
    _verify(context, files)
    return context


def stamp(paths: tuple[str, ...], stat: Callable[[str], os.stat_result] = os.stat) -> Stamp:
    """(inode, size, mtime in ns) of each path, None for one that cannot be looked at: a
    replaced (renamed over), rewritten or touched file changes it."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


class ReloadingContext:
    """The context ``build(files)`` makes, rebuilt when the files change (module docstring).

    The first build happens here and its errors (OSError, ssl.SSLError) propagate: a process
    fails at start, not at its first connection. Thread-safe."""

    def __init__(self, files: TlsFiles, build: Callable[[TlsFiles], ssl.SSLContext], *,
                 interval: float = CHECK_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 stat: Callable[[str], os.stat_result] = os.stat) -> None:
        self.files = files
        self._build = build
        self._interval = interval
        self._clock = clock
        self._stat = stat
        self._lock = threading.Lock()
        self._stamp = stamp(files.paths(), stat)
        self._context = build(files)
        self._failed: Stamp | None = None  # files as they were when a rebuild failed
        self._next = clock() + interval
        self.reloads = 0  # successful rebuilds since start

    def get(self) -> ssl.SSLContext:
        """The context for a new connection (the files looked at if it is time)."""
        if self._clock() < self._next:
            return self._context
        with self._lock:
            if self._clock() >= self._next:
                self._check()
            return self._context

    def reload(self) -> bool:
        """Look at the files now (SIGHUP); whether a new context was built."""
        with self._lock:
            return self._check()

    def _check(self) -> bool:
        self._next = self._clock() + self._interval
        now = stamp(self.files.paths(), self._stat)
        if now == self._stamp or now == self._failed:
            return False
        try:
            context = self._build(self.files)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._failed = now
            LOG.warning("event=tls_reload_failed cert=%s error=%r action=kept_previous",
                        self.files.cert or self.files.ca, str(exc))
            return False
        self._context, self._stamp, self._failed = context, now, None
        self.reloads += 1
        LOG.info("event=tls_reloaded cert=%s ca=%s crl=%s", self.files.cert, self.files.ca,
                 self.files.crl)
        return True


ContextSource = ssl.SSLContext | ReloadingContext


def current(source: ContextSource) -> ssl.SSLContext:
    """The context to use for a new connection: a fixed one as is, a reloading one's now."""
    return source if isinstance(source, ssl.SSLContext) else source.get()
