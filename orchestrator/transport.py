"""HTTP/1.1 to agents and coordinators: the one connection layer of the orchestrator.

:class:`Transport` sends one request (TLS against the fleet CA, an identity presented where
the agents ask for one) and maps every failure once into the project's error tree; a
:class:`Cancel` lets another thread abandon a request in flight. The client library
(:mod:`orchestrator.client`) and the agents' control adapter
(:mod:`orchestrator.adapters.agent_control`) both ride it, so it imports neither: only the
wire vocabulary (``agents``), the config and the error tree.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agents.errors import AgentError, error_from_wire
from agents.tlsreload import ReloadingContext, TlsFiles, client_context, default_crl
from orchestrator.config import FleetConfig
from orchestrator.errors import (
    AgentUnreachable,
    ConfigError,
    RequestOutcomeUnknown,
    Superseded,
)

__all__ = ["CHUNK", "Cancel", "Readable", "Response", "Transport"]

LOG = logging.getLogger(__name__)

CHUNK = 1 << 20


class Readable(Protocol):
    """A request body streamed by ``http.client`` (a file or a wrapper around one)."""

    def read(self, n: int = -1, /) -> bytes: ...


class Cancel:
    """Lets another thread abandon one request in flight: its socket is shut down, so a writer
    that went silent (paused, cut off) stops holding the caller until the I/O timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.reason: str | None = None

    def attach(self, conn: http.client.HTTPConnection) -> None:
        """The request's connection, once open (shut down at once if already cancelled)."""
        with self._lock:
            self._conn = conn
            cancelled = self.reason is not None
        if cancelled:
            _shutdown(conn)

    def cancel(self, reason: str) -> None:
        """Abandon the request (idempotent)."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            conn = self._conn
        if conn is not None:
            _shutdown(conn)


def _shutdown(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            # the plain socket's shutdown, also for TLS: SSLSocket.shutdown would drop the TLS
            # state under the thread that is reading
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS whose TCP socket is shown to its :class:`Cancel` before the TLS handshake: a
    silent (paused) server holds the handshake for the whole timeout, and a request the map
    has moved past must be cut there too."""

    cancel: Cancel | None = None

    def __init__(self, host: str, port: int, *, timeout: float,
                 context: ssl.SSLContext, resume: ssl.SSLSession | None = None) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.tls_context = context
        self.resume = resume

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP only
        tls = self.tls_context.wrap_socket(self.sock, server_hostname=self.host,
                                           do_handshake_on_connect=False, session=self.resume)
        self.sock = tls  # what the cancel shuts down (the plain socket is detached now)
        if self.cancel is not None:
            self.cancel.attach(self)
        tls.do_handshake()


class _TlsSessions:
    """The last TLS session each server gave this transport, offered again on the next
    connection to it: a resumed handshake skips the certificate checks and signatures on
    both sides, the largest part of a request to an agent in a small VM. Only sessions of the
    context in use are offered (a reloaded context, after a rotation or a new CRL, starts
    afresh, and so does an agent whose context was reloaded: its old tickets no longer
    decrypt, so a revoked certificate never rides a resumed session past a CRL change)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, int], tuple[ssl.SSLContext, ssl.SSLSession]] = {}

    def offer(self, server: tuple[str, int], context: ssl.SSLContext) -> ssl.SSLSession | None:
        with self._lock:
            kept = self._sessions.get(server)
        return kept[1] if kept is not None and kept[0] is context else None

    def keep(self, conn: _HTTPSConnection) -> None:
        """After the answer was read (a TLS 1.3 server sends its tickets after the
        handshake)."""
        sock = conn.sock
        if getattr(sock, "session_reused", False):
            LOG.debug("event=tls_session_resumed server=%s:%d", conn.host, conn.port)
        session = getattr(sock, "session", None)
        if session is not None:
            with self._lock:
                self._sessions[(conn.host, conn.port)] = (conn.tls_context, session)


@dataclass(frozen=True)
class Response:
    """Status, headers and the JSON body of an answered request."""

    status: int
    headers: dict[str, str]
    body: Any


def _url(address: str, path: str, tls: bool) -> urllib.parse.SplitResult:
    base = address if "://" in address else ("https://" if tls else "http://") + address
    return urllib.parse.urlsplit(base.rstrip("/") + path)


class Transport:
    """HTTP/1.1 to agents and coordinators; errors mapped once (here) into the project's tree.

    ``tls``: bare ``host:port`` addresses are reached over HTTPS, verified against
    ``ca_file`` (the fleet CA); ``identity`` (cert, key files) is presented to them: the
    coordinator's, for the agents' node-only routes (clients have none). The TLS context is
    built once and again when its files change (agents.tlsreload: a rotated certificate, a CA
    bundle, the CRL beside the CA, by which a revoked node's certificate is refused)."""

    def __init__(self, tls: bool = False, ca_file: str | None = None,
                 identity: tuple[str, str] | None = None) -> None:
        self.tls = tls
        self.ca_file = ca_file
        self.identity = identity
        self._context: ReloadingContext | None = None
        self._lock = threading.Lock()
        self._sessions = _TlsSessions()

    @classmethod
    def for_fleet(cls, cfg: FleetConfig, identity: tuple[str, str] | None = None) -> Transport:
        """The transport a fleet's config asks for: TLS against the fleet CA in its PKI
        directory (ConfigError when missing), plaintext only with ``[tls]
        insecure_plaintext`` (logged as a warning)."""
        if cfg.tls.insecure_plaintext:
            LOG.warning("event=insecure_plaintext fleet=%s tls=off", cfg.fleet.name)
            return cls()
        ca = cfg.pki_dir / "ca.pem"
        if not ca.exists():
            raise ConfigError("tls.dir", f"{ca} missing: TLS is on by default and needs the "
                              "fleet CA (`rbdfleet provision` makes it), or set [tls] "
                              "insecure_plaintext = true")
        return cls(tls=True, ca_file=str(ca), identity=identity)

    def context(self) -> ssl.SSLContext:
        """The client TLS context (fleet CA, identity); ConfigError if the files do not load."""
        with self._lock:
            if self._context is None:
                cert, key = self.identity or (None, None)
                crl = None if self.ca_file is None else default_crl(self.ca_file)
                try:
                    self._context = ReloadingContext(
                        TlsFiles(self.ca_file, cert, key, crl, crl_required=False),
                        client_context)
                except (OSError, ValueError) as exc:  # ssl.SSLError too
                    raise ConfigError("tls", f"the fleet CA or certificate does not load: "
                                             f"{exc}") from exc
            source = self._context
        return source.get()

    def connect(
        self, address: str, path: str, timeout: float
    ) -> tuple[http.client.HTTPConnection, str]:
        """An unconnected HTTP(S) connection to ``address`` and the request target for ``path``."""
        url = _url(address, path, self.tls)
        if url.hostname is None:
            raise AgentUnreachable("?", address, "address has no host")
        target = url.path + (f"?{url.query}" if url.query else "")
        if url.scheme == "https":
            context, port = self.context(), url.port or 443
            resume = self._sessions.offer((url.hostname, port), context)
            return _HTTPSConnection(url.hostname, port, timeout=timeout, context=context,
                                    resume=resume), target
        return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout), target

    def request(
        self,
        node: str,
        address: str,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | Readable | None = None,
        timeout: float,
        sink: Callable[[http.client.HTTPResponse], None] | None = None,
        cancel: Cancel | None = None,
    ) -> Response:
        """Send one request; a non-2xx answer raises the error its body names.

        ``sink`` consumes a 2xx body itself (streamed gets); else the body is parsed as JSON.
        ``cancel`` lets another thread abandon it (:class:`Superseded`).
        """
        conn, target = self.connect(address, path, timeout)
        if isinstance(conn, _HTTPSConnection):
            conn.cancel = cancel
        sent = False
        try:
            conn.connect()
            if cancel is not None:
                cancel.attach(conn)
            conn.blocksize = CHUNK
            sent = True
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            status = resp.status
            resp_headers = {k.lower(): v for k, v in resp.getheaders()}
            if 200 <= status < 300 and sink is not None:
                sink(resp)
                self._keep_session(conn)
                return Response(status, resp_headers, None)
            raw = resp.read()
            self._keep_session(conn)
        except (OSError, http.client.HTTPException) as exc:
            reason = _reason(exc)
            if cancel is not None and cancel.reason is not None:
                raise Superseded(node, address, cancel.reason) from exc
            if sent and method != "GET":
                raise RequestOutcomeUnknown(node, address, reason) from exc
            raise AgentUnreachable(node, address, reason) from exc
        finally:
            conn.close()
        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                data = raw.decode(errors="replace")
        if not 200 <= status < 300:
            if isinstance(data, dict) and "error" in data:
                raise error_from_wire(data, status)
            raise AgentError(f"{address}: HTTP {status}", status=status)
        return Response(status, resp_headers, data)

    def _keep_session(self, conn: http.client.HTTPConnection) -> None:
        if isinstance(conn, _HTTPSConnection):
            self._sessions.keep(conn)


def _reason(exc: BaseException) -> str:
    """Why a request failed, in words (a TLS verification failure names the likely cause)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the server's certificate is not trusted ({exc.verify_message}): is the "
                "configured CA ([tls] dir's ca.pem) this fleet's?")
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    return str(exc) or type(exc).__name__
