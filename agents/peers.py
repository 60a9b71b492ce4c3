"""Outgoing HTTP/1.1 + JSON from an agent: writer → reader pushes, agent → coordinator reports.

One function, :func:`post_message`, with a timeout, optional TLS (CA file), and the error
mapping done once here: transport failures raise :class:`PeerUnreachable`; an error answer
becomes the AgentError subclass its body names (``agents.errors.error_from_wire``).
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

from agents.core.protocol import AUTH_HEADER, BEARER, ErrorBody, Message
from agents.errors import AgentError, DecodeError

__all__ = ["Peer", "PeerUnreachable", "post_message"]


class PeerUnreachable(AgentError):
    """A peer (reader, coordinator) did not answer: refused, reset, timed out, bad TLS."""

    code = "peer_unreachable"
    status = 502


@dataclass(frozen=True)
class Peer:
    """Where to reach a peer: ``address`` is ``host:port`` or a full ``http(s)://`` URL."""

    address: str
    tls: bool = False
    ca_file: str | None = None

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
        context = ssl.create_default_context(cafile=peer.ca_file)
        return http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=timeout,
                                           context=context)
    if url.scheme != "http":
        raise PeerUnreachable(f"peer scheme {url.scheme!r} not supported", address=peer.address)
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)


def post_message(peer: Peer, path: str, message: Message, *, grant: str | None,
                 timeout: float) -> dict[str, Any]:
    """POST ``message`` to ``path`` on ``peer``; the JSON answer as a dict (``{}`` if empty).

    Raises PeerUnreachable for transport errors and the sent AgentError for an error answer.
    """
    url = peer.url(path)
    body = message.encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    if grant is not None:
        headers[AUTH_HEADER] = BEARER + grant
    conn = _connection(peer, url, timeout)
    try:
        conn.request("POST", url.path or "/", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        raise PeerUnreachable(f"{peer.address}: {type(exc).__name__}: {exc}",
                              address=peer.address) from exc
    finally:
        conn.close()
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
