"""Outgoing HTTP/1.1 from an agent: writer → reader pushes (binary), agent → coordinator
reports (JSON), sent by :class:`CoordinatorLink` to whichever coordinator is active.

:class:`PeerSession` keeps one keep-alive connection per sending thread, with a timeout,
TLS (the peer verified against a CA file; this node's certificate presented when the
:class:`Peer` names it), and the error mapping done once here: transport failures raise
:class:`PeerUnreachable`; an error answer becomes the AgentError subclass its body names
(``agents.errors.error_from_wire``).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agents.core.protocol import AUTH_HEADER, BEARER, ErrorBody, Message
from agents.errors import AgentError, DecodeError, NotActiveCoordinator, PeerUnreachable
from agents.tlsreload import ReloadingContext, TlsFiles, client_context

__all__ = ["CoordinatorLink", "Peer", "PeerSession", "post_message", "reload_client_contexts"]

# files loaded once per (CA, certificate, key, CRL), not per connection, and again when they
# change (a rotated certificate, a new CRL); a process has one or two of these
_CONTEXTS: dict[TlsFiles, ReloadingContext] = {}
_CONTEXTS_LOCK = threading.Lock()
_MAX_CONTEXTS = 16


def _client_context(files: TlsFiles) -> ssl.SSLContext:
    with _CONTEXTS_LOCK:
        source = _CONTEXTS.get(files)
        if source is None:
            if len(_CONTEXTS) >= _MAX_CONTEXTS:  # only tests make many: start over
                _CONTEXTS.clear()
            source = _CONTEXTS[files] = ReloadingContext(files, client_context)
    return source.get()


def reload_client_contexts() -> None:
    """Look at every client context's files now (the agent's SIGHUP)."""
    with _CONTEXTS_LOCK:
        sources = list(_CONTEXTS.values())
    for source in sources:
        source.reload()


@dataclass(frozen=True)
class Peer:
    """Where to reach a peer: ``address`` is ``host:port`` or a full ``http(s)://`` URL.

    Over TLS the peer is verified against ``ca_file``, and ``cert_file``/``key_file`` (this
    node's certificate and key, PEM), when set, are presented: the receiver's node-only
    routes (pushes, reports) require a certificate of the fleet CA."""

    address: str
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # the fleet CA's revocation list: revoked peers are refused once the file exists
    crl_file: str | None = None

    def url(self, path: str) -> urllib.parse.SplitResult:
        """The parsed URL of ``path`` on this peer."""
        base = self.address if "://" in self.address else (
            ("https://" if self.tls else "http://") + self.address)
        return urllib.parse.urlsplit(base.rstrip("/") + path)


def _connection(peer: Peer, url: urllib.parse.SplitResult,
                timeout: float) -> http.client.HTTPConnection:
    if url.hostname is None:
        raise PeerUnreachable(f"peer address {peer.address!r} has no host", address=peer.address)
    if url.scheme == "https":
        try:
            context = _client_context(TlsFiles(peer.ca_file, peer.cert_file, peer.key_file,
                                               peer.crl_file, crl_required=False))
        except (OSError, ValueError) as exc:  # ssl.SSLError too: a file that does not load
            raise PeerUnreachable(f"TLS to {peer.address}: {exc}", address=peer.address) from exc
        return http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=timeout,
                                           context=context)
    if url.scheme != "http":
        raise PeerUnreachable(f"peer scheme {url.scheme!r} not supported", address=peer.address)
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)


class PeerSession:
    """One keep-alive HTTP/1.1 connection to a peer, reopened when it breaks.

    Not thread-safe: one per sending thread (e.g. per reader link). A request that fails on a
    reused connection (the peer closed it while idle) is sent once more on a fresh one, so use
    it only for idempotent messages (pushes, reports).
    """

    def __init__(self, peer: Peer, timeout: float) -> None:
        self.peer = peer
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def post(self, path: str, message: Message, *, grant: str | None) -> dict[str, Any]:
        """POST ``message`` to ``path``; the JSON answer as a dict (``{}`` if empty).

        Raises PeerUnreachable for transport errors and the sent AgentError for an error
        answer."""
        return self.post_body(path, [message.encode()], "application/json", grant=grant)

    def post_body(self, path: str, parts: Sequence[bytes | memoryview], content_type: str, *,
                  grant: str | None) -> dict[str, Any]:
        """POST the body made of ``parts``, sent one after the other as they are (each a
        ``sendall`` of the buffer: a push's frames shared by all readers are never copied);
        answered and raising like :meth:`post`."""
        url = self.peer.url(path)
        body = list(parts)
        headers = {"Content-Type": content_type,
                   "Content-Length": str(sum(memoryview(p).nbytes for p in body))}
        if grant is not None:
            headers[AUTH_HEADER] = BEARER + grant
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = _connection(self.peer, url, self.timeout)
            try:
                self._conn.request("POST", url.path or "/", body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
                status = response.status
                if response.will_close:
                    self.close()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2 or not reused:
                    raise PeerUnreachable(f"{self.peer.address}: {type(exc).__name__}: {exc}",
                                          address=self.peer.address) from exc
        return _answer(self.peer, status, data)

    def close(self) -> None:
        """Drop the connection (the next post opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class CoordinatorLink:
    """Reports to the active one of the fleet's coordinators (an active one and standbys).

    A report goes first to the coordinator that took the last one. A standby answers 503
    ``not_active`` naming the active one, which is tried next if it is one of ``urls``: a
    coordinator's answer never sends reports anywhere else. An unreachable one passes the
    report to the next in ``urls``. Each is tried at most once per report; when none takes
    it, the last error is raised. Thread-safe: one keep-alive connection per coordinator
    and sending thread.
    """

    def __init__(self, urls: Sequence[str], peer: Callable[[str], Peer],
                 timeout: float) -> None:
        if not urls:
            raise ValueError("a coordinator link needs at least one URL")
        self.urls = tuple(urls)
        self._peer = peer
        self._timeout = timeout
        self._current = 0  # index into urls of the last coordinator that took a report
        self._local = threading.local()

    @property
    def current(self) -> str:
        """The URL reports go to first."""
        return self.urls[self._current]

    def post(self, path: str, message: Message, *, grant: str | None) -> dict[str, Any]:
        """POST ``message`` to the active coordinator; its JSON answer (see the class)."""
        tried: list[int] = []
        at: int | None = self._current
        error: AgentError | None = None
        while at is not None:
            tried.append(at)
            try:
                answer = self._session(at).post(path, message, grant=grant)
            except NotActiveCoordinator as exc:
                error = exc
                named = self._index(exc.fields.get("coordinator"))
                at = named if named is not None and named not in tried else self._next(tried)
                continue
            except PeerUnreachable as exc:
                error = exc
                at = self._next(tried)
                continue
            self._current = at
            return answer
        assert error is not None
        raise error

    def _session(self, at: int) -> PeerSession:
        sessions: dict[int, PeerSession] | None = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        session = sessions.get(at)
        if session is None:
            session = sessions[at] = PeerSession(self._peer(self.urls[at]), self._timeout)
        return session

    def _next(self, tried: list[int]) -> int | None:
        """The next coordinator after the last one tried, in ``urls`` order, not yet tried."""
        count = len(self.urls)
        return next((i % count for i in range(tried[-1] + 1, tried[-1] + count)
                     if i % count not in tried), None)

    def _index(self, url: object) -> int | None:
        """Which of ``urls`` the coordinator ``url`` is (scheme, host, port compared)."""
        if not isinstance(url, str):
            return None
        wanted = _origin(url)
        return next((i for i, mine in enumerate(self.urls) if _origin(mine) == wanted), None)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url if "://" in url else "https://" + url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _answer(peer: Peer, status: int, data: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(data) if data else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"{peer.address} answered {status} with non-JSON",
                          address=peer.address) from exc
    if status >= 400:
        try:
            err = ErrorBody.from_json({**answer, "v": 1}).to_exception(status)
        except (DecodeError, TypeError):
            err = AgentError(f"{peer.address} answered {status}", status=status)
        raise err
    if not isinstance(answer, dict):
        raise DecodeError(f"{peer.address} answered with a non-object", address=peer.address)
    return answer


def post_message(peer: Peer, path: str, message: Message, *, grant: str | None,
                 timeout: float) -> dict[str, Any]:
    """POST ``message`` to ``path`` on ``peer`` over a fresh connection (one-off requests;
    :class:`PeerSession` for repeated ones); the JSON answer as a dict (``{}`` if empty).

    Raises PeerUnreachable for transport errors and the sent AgentError for an error answer.
    """
    session = PeerSession(peer, timeout)
    try:
        return session.post(path, message, grant=grant)
    finally:
        session.close()
