"""The coordinator's HTTP/1.1 + JSON API under ``/v1`` (stdlib server, one thread per
connection).

==========================================  ======  ==========================================
route                                       auth    answer
==========================================  ======  ==========================================
GET  /v1/health                             -       ``{"ok": true, "fleets": {name: active}}``
GET  /v1/status                             -       per fleet: map, liveness, pending steps
GET  /v1/fleets/F/map?after=REV&wait=S      -       the map once ``revision > REV`` (long poll)
POST /v1/fleets/F/write  ``{"path"}``       write   ordered + labelled targets with grants
POST /v1/fleets/F/read   ``{"path"}``       read    in-sync readers then the writer, grants
POST /v1/fleets/F/report ``{"node",...}``   read    202: failure seen by a client (SUSPECT)
POST /v1/fleets/F/failover ``{"to"}``       admin   the new map (after fence + promote)
POST /v1/fleets/F/fence  ``{"node"}``       admin   the new map
POST /v1/heartbeat | /v1/selftest |         agent   agents' reports (agents.core.protocol);
     /v1/lagging                                    a writer's heartbeat is answered with
                                                    its push grants (``push_grants``)
                                                    (over TLS: the sender's certificate)
GET  /metrics                               -       Prometheus text
==========================================  ======  ==========================================

read/write/admin: a client token (orchestrator.core.clients: purpose ``client``, audience
``coordinator``, subject the client's name, MACed with that client's own secret from the
ClientStore) of a client whose scope includes the route's (403 ``foreign_grant`` otherwise; 401
for an unknown or revoked client). "agent": a report grant MACed with the key of the node the
message names (purpose ``report``, bound to the body), each admitted once and a node's own in
the order it signed them (orchestrator.core.reports: a replayed report is 409
``replayed_report``, one overtaken by a newer report 409 ``stale_report``), sent over TLS with
the certificate of that node (:class:`PeerCert`: 403 ``peer_cert_required`` without one of the
fleet CA, 403 ``peer_cert_mismatch`` with another node's; a coordinator serving plaintext, only
ever started insecure, has no certificate to check). A standby answers
fleet routes with 503 ``not_active`` naming the active coordinator, so clients follow it.

Errors are ``{"error", "message", ...}`` with the status of the error class (agents.errors),
and bad input changes no state: 400 malformed body, query, field or framing; 401 no grant, a
forged or expired one; 403 a valid grant of another fleet, node or role, a report without
its node's certificate; 404 unknown fleet,
node or route; 405 a known route with another method (``allowed`` names the right one); 409 a
refused transition, a lagging report from a writer that is not the current one (stale epoch or
not the writer; the current writer in the answer), a replayed report; 411 a
``Transfer-Encoding``; 413 a body over the route's cap (:data:`MAX_BODY` for client routes,
:data:`MAX_REPORT_BODY` for reports); 501 an HTTP method the server does not know. The server's
own refusals (a bad request line, a header block too large) answer JSON too.

The network is hostile (anyone may connect); docs/coordinator.md ("Limits") has the table:
- The credential (client token, or report grant up to the body digest) is checked before any
  body byte is read; a body is read only up to its route's cap and parsed with bounds
  (agents.core.boundedjson: depth, integer digits, finite numbers).
- Framing is strict: ``Transfer-Encoding`` refused and the connection closed, at most one
  ``Content-Length`` of at most 19 ASCII digits, none (or 0) on routes without a body; a body
  left unread closes the connection, so it is never parsed as the next request.
- Per connection: ``header_timeout`` for the request line, headers and body (enforced by the
  serving loop against a client that trickles a byte at a time), ``idle_timeout`` between
  requests, ``send_timeout`` per write of an answer; at most ``max_connections`` served at once
  (503 ``too_busy`` beyond, answered without reading); with TLS the handshake runs in the
  connection's own thread under ``header_timeout``, never in the accept loop. The handler
  reads the client's certificate (verified against the CA of the caller's context, which
  asks for one) from ``self.connection.getpeercert()``: :meth:`PeerCert.of`.
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

from agents.core import boundedjson
from agents.core.grants import CLIENT, COORDINATOR, REPORT, Grant, peek, verify
from agents.core.protocol import (
    HeaderMap,
    Heartbeat,
    LaggingReaderReport,
    SelfTestReport,
    bearer_token,
    header_int,
)
from agents.errors import (
    AgentError,
    BadSignature,
    DecodeError,
    ForeignGrant,
    InternalError,
    MethodNotAllowed,
    NotFound,
    NotWriter,
    PeerCertificateRequired,
    RbdfleetError,
    StaleEpoch,
    TooLarge,
)
from agents.httpbase import BoundedHTTPServer, BoundedRequestHandler
from agents.tlsreload import ContextSource
from orchestrator.coordinator.service import FleetService
from orchestrator.core import election as el
from orchestrator.core.clients import ClientCredential, allows
from orchestrator.core.fleetmap import FleetMap
from orchestrator.core.liveness import (
    FailureReported,
    HeartbeatReceived,
    Observation,
    SelfTestFailed,
)
from orchestrator.errors import (
    CoordinationError,
    CoordinationFailed,
    IllegalFleetTransition,
    LengthRequired,
    NotActive,
    NotActiveError,
    PeerCertificateMismatch,
    RefusedTransition,
    ReplayedReport,
    ReportOutOfOrder,
    ReportReplayed,
    StaleReport,
)
from orchestrator.ports import ClientStore

LOG = logging.getLogger(__name__)

# a revoked or rotated client is refused at most this long after the change
CLIENT_CACHE_SECONDS = 2.0
# a client route's JSON body: a 4 KiB path even fully \u-escaped, a report's 500-char reason
MAX_BODY = 32 << 10
# an agent's report: a heartbeat naming a large fleet's in-sync readers, a self-test's details
MAX_REPORT_BODY = 64 << 10
MAX_QUERY_FIELDS = 8  # the map route takes two
MAX_WAIT = 30.0
AGENT_REPORTS = frozenset({"heartbeat", "selftest", "lagging"})
FLEET_ROUTES = {
    "map": "GET",
    "write": "POST",
    "read": "POST",
    "report": "POST",
    "failover": "POST",
    "fence": "POST",
}


@dataclass(frozen=True)
class ServerLimits:
    """What one connection may take (module docstring); the defaults are the ones served."""

    max_connections: int = 256  # agents keep a connection per reporting thread, clients one each
    header_timeout: float = 10.0  # from a request's first byte to its body's last (and TLS)
    idle_timeout: float = 60.0  # a keep-alive connection waiting for its next request
    send_timeout: float = 30.0  # per write of an answer to a client that does not read


@dataclass(frozen=True)
class Route:
    """What a request line asks for: ``parts`` of the path, who may ask (``auth``) and the
    largest body it takes (0: none)."""

    parts: tuple[str, ...]
    auth: Literal["none", "client", "agent"]
    body_limit: int


@dataclass(frozen=True)
class PeerCert:
    """What a request's connection proves about its sender: ``tls`` (False only on a
    coordinator serving plaintext), whether it ``presented`` a certificate (verified against
    the fleet CA at the handshake) and that certificate's common name, ``name``."""

    tls: bool
    presented: bool = False
    name: str = ""

    @classmethod
    def of(cls, connection: socket.socket) -> PeerCert:
        """The peer of ``connection``. Only the common name counts: a fleet certificate's is
        the name it was issued to, its node (orchestrator.pki.issue), while its SANs are
        addresses, which may be any DNS name."""
        if not isinstance(connection, ssl.SSLSocket):
            return PLAINTEXT
        cert = connection.getpeercert()  # {} when none was presented
        if not cert:
            return NO_CERT
        subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
        names = [value for rdn in subject for key, value in rdn if key == "commonName"]
        return cls(True, True, names[0] if len(names) == 1 else "")

    def require_certificate(self) -> None:
        """Refuse (403) a node-only request without a fleet certificate; plaintext has none
        to check."""
        if self.tls and not self.presented:
            raise PeerCertificateRequired(
                "reports are for fleet nodes: connect with the node's certificate of the "
                "fleet CA")

    def check_sender(self, node: str) -> None:
        """Refuse (403) a report of ``node`` whose connection does not prove to be ``node``:
        no certificate, or another node's (one node's certificate cannot carry another
        node's report)."""
        self.require_certificate()
        if self.tls and self.name != node:
            raise PeerCertificateMismatch(
                f"the report grant names node {node[:100]!r}, the connection's certificate "
                f"{self.name[:100]!r}", node=node[:100], certificate=self.name[:100])


PLAINTEXT = PeerCert(tls=False)  # a coordinator started insecure: no certificates at all
NO_CERT = PeerCert(tls=True)  # TLS, no certificate presented (clients have none)


def to_wire(exc: RbdfleetError) -> AgentError:
    """Map an orchestrator error to its wire form (one table: here)."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, NotActive):
        return NotActiveError(str(exc), fleet=exc.fleet, coordinator=exc.coordinator)
    if isinstance(exc, IllegalFleetTransition):
        return RefusedTransition(str(exc), subject=exc.subject, from_=exc.from_, to=exc.to)
    if isinstance(exc, CoordinationError):
        return CoordinationFailed(str(exc))
    if isinstance(exc, ReportOutOfOrder):
        return StaleReport(str(exc), node=exc.node[:100])
    if isinstance(exc, ReportReplayed):
        return ReplayedReport(str(exc), node=exc.node[:100])
    return AgentError(str(exc))


class CoordinatorAPI:
    """Routes requests to the fleets' services; ``serve()`` runs the HTTP server."""

    def __init__(
        self,
        services: dict[str, FleetService],
        clients: dict[str, ClientStore],
        wall: Callable[[], float],
        limits: ServerLimits | None = None,
    ) -> None:
        self.services = services
        self.clients = clients
        self.wall = wall
        self.limits = limits or ServerLimits()
        self._client_cache: dict[tuple[str, str], tuple[ClientCredential | None, float]] = {}
        self._cache_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def serve(self, host: str, port: int,
              tls: ContextSource | None = None) -> tuple[str, int]:
        """Start serving in a thread; returns the bound (host, port) (port 0 picks one).

        ``tls`` is a server context the caller built (certificates, peer verification), or
        one that follows its files (agents.tlsreload: rotated certificates, a new CRL)."""
        api = self

        class Handler(_Handler):
            owner = api

        server = _Server((host, port), Handler, tls, self.limits)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": _POLL_INTERVAL}, name="api", daemon=True)
        self._thread.start()
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def shutdown(self) -> None:
        """Stop the server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- routing -------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes | Callable[[int], bytes],
        peer: PeerCert = NO_CERT,
    ) -> tuple[int, Any]:
        """One request -> (status, JSON-able answer or text for /metrics).

        ``body``: the request's body, or (from the HTTP server) the function that reads it
        given the route's cap, called only once the request's credential checked out.
        ``peer``: what the connection proves (:meth:`PeerCert.of`); reports need their node's
        certificate, so the default (TLS, none presented) refuses them."""
        route = _route(method, path)
        parts = route.parts
        service: FleetService | None = None
        report: Grant | None = None
        if route.auth == "client":
            service = self._service(parts[2])
            self._authorize_client(service.fleet, headers, parts[3])
        elif route.auth == "agent":
            peer.require_certificate()  # before the grant: no key derivation for a stranger
            report = self._report_sender(headers)
            peer.check_sender(report.subject)
        data = body(route.body_limit) if callable(body) else body
        if len(data) > route.body_limit:
            raise TooLarge(f"body of {len(data)} bytes over this route's {route.body_limit}",
                           limit=route.body_limit)
        if parts == ("v1", "health"):
            return 200, {"ok": True, "fleets": {n: s.active for n, s in self.services.items()}}
        if parts == ("v1", "status"):
            return 200, {"fleets": [s.status() for s in self.services.values()]}
        if parts == ("metrics",):
            return 200, self.metrics()
        if report is not None:
            return self._agent_report(parts[1], report, headers, data)
        return self._fleet_route(method, service or self._service(parts[2]), parts[3], query,
                                 data)

    def _service(self, fleet: str) -> FleetService:
        service = self.services.get(fleet)
        if service is None:
            raise NotFound(f"unknown fleet {fleet!r}", fleet=fleet)
        return service

    def _fleet_route(
        self,
        method: str,
        service: FleetService,
        action: str,
        query: dict[str, str],
        body: bytes,
    ) -> tuple[int, Any]:
        if method == "GET" and action == "map":
            after = _int(query.get("after", "-1"), "after")
            wait = min(_float(query.get("wait", "0") or "0", "wait"), MAX_WAIT)
            m = service.wait_map(after, wait) if wait > 0 else service.require_active()
            return 200, {"map": m.to_json(), "coordinator": service.settings.url}
        data = _json(body)
        if action in ("write", "read"):
            m, targets = service.targets(action)
            if action == "write" and not targets:
                raise CoordinationFailed(
                    f"fleet {service.fleet} has no writer right now (epoch {m.epoch})",
                    epoch=m.epoch,
                    revision=m.revision,
                )
            answer: dict[str, Any] = {
                "fleet": service.fleet,
                "path": _field(data, "path", str, ""),
                "epoch": m.epoch,
                "revision": m.revision,
                "ordered": [t.to_json() for t in targets],
            }
            if action == "write":
                answer["labelled"] = {
                    "writer": targets[0].to_json(),
                    "readers": [t.to_json() for t in targets[1:]],
                }
            return 200, answer
        if action == "report":
            node = _field(data, "node", str, "")
            if not service.require_active().has(node):
                raise NotFound(f"no node {node[:100]!r} in fleet {service.fleet}", node=node[:100])
            service.submit(
                FailureReported(node, service.clock.monotonic(), str(data.get("reporter", "")))
            )
            LOG.info(
                "event=client_report fleet=%s node=%s reason=%r",
                service.fleet,
                node,
                str(data.get("reason", ""))[:200],
            )
            return 202, {"accepted": True}
        if action == "failover":
            to = _field(data, "to", str, None)
            m = service.request(el.FailoverRequested(to, service.clock.monotonic()))
            return 200, {"map": m.to_json()}
        if action == "fence":
            node = _field(data, "node", str, "")
            m = service.request(el.FenceRequested(node, service.clock.monotonic()))
            return 200, {"map": m.to_json()}
        raise NotFound(f"no route POST {action}")  # pragma: no cover - _route routes first

    def _credential(self, fleet: str, name: str) -> ClientCredential | None:
        """The client's stored credential, read again after :data:`CLIENT_CACHE_SECONDS`."""
        now = self.wall()
        with self._cache_lock:
            cached = self._client_cache.get((fleet, name))
        if cached is not None and now - cached[1] < CLIENT_CACHE_SECONDS:
            return cached[0]
        store = self.clients.get(fleet)
        credential = None if store is None else store.get(name)
        with self._cache_lock:
            if len(self._client_cache) > 10_000:  # names come from the network: bounded
                self._client_cache.clear()
            self._client_cache[(fleet, name)] = (credential, now)
        return credential

    def _authorize_client(self, fleet: str, headers: Mapping[str, str],
                          route: str) -> ClientCredential:
        token = bearer_token(headers)
        claimed = _peek(token)  # which secret to check with; nothing trusted yet
        if claimed.audience != COORDINATOR or claimed.purpose != CLIENT:
            raise ForeignGrant("not a client credential", field="purpose",
                               purpose=claimed.purpose)
        name = claimed.subject
        credential = self._credential(fleet, name)
        if credential is None:
            raise BadSignature(f"no client {name[:100]!r} in fleet {fleet}", client=name[:100])
        verify(token, (credential.secret,), now=self.wall(), fleet=fleet,
               audience=COORDINATOR, purposes={CLIENT}, epoch=None, subject=credential.name)
        if not allows(credential.scope, route):
            raise ForeignGrant(f"client {name!r} has scope {credential.scope!r}, which does "
                               f"not allow {route}", field="scope", scope=credential.scope)
        return credential

    def _report_sender(self, headers: Mapping[str, str]) -> Grant:
        """The report grant, checked before its body is read: MACed with the key of the node
        it names, of a fleet served here, not expired. The body binding (digest) and the
        message's own node and fleet are checked once the body is in
        (:meth:`_agent_report`)."""
        token = bearer_token(headers)
        claimed = _peek(token)  # which fleet and node's key to check with; nothing trusted yet
        service = self.services.get(claimed.fleet)
        if service is None:
            raise ForeignGrant("grant is for a fleet this coordinator does not serve",
                               field="fleet")
        return verify(token, service.keys.node_keys(claimed.subject), now=self.wall(),
                      fleet=service.fleet, audience=COORDINATOR, purposes={REPORT},
                      epoch=None, subject=claimed.subject)

    def _agent_report(self, kind: str, grant: Grant, headers: Mapping[str, str],
                      body: bytes) -> tuple[int, Any]:
        """``grant``: the request's report grant, checked before the body was read."""
        message: Heartbeat | SelfTestReport | LaggingReaderReport
        if kind == "heartbeat":
            message = Heartbeat.decode(body)
            sender = message.node
        elif kind == "selftest":
            message = SelfTestReport.decode(body)
            sender = message.node
        else:  # lagging: _route knows no other kind
            message = LaggingReaderReport.decode(body)
            sender = message.writer
        service = self._service(message.fleet)
        if sender != grant.subject:  # a report about another node (checked before its key)
            raise ForeignGrant("grant was issued to someone else", field="subject",
                               subject=grant.subject)
        token = bearer_token(headers)
        verified = service.keys.verify_report(token, sender, body)
        m = service.require_active()
        if isinstance(message, LaggingReaderReport):
            service.admit_report(verified, token, (), ordered=False)
            _check_current_writer(m, message)
            m = _take_out_of_the_map(service, message, service.clock.monotonic())
        else:
            service.admit_report(verified, token, _report_events(service, message),
                                 ordered=True)
        writer = m.member(m.writer) if m.writer else None
        answer: dict[str, Any] = {
            "epoch": m.epoch,
            "revision": m.revision,
            "writer": None if writer is None else writer.name,
            "writer_address": None if writer is None else writer.address,
        }
        if (isinstance(message, Heartbeat) and message.node == m.writer
                and message.epoch == m.epoch and m.phase == "stable"):
            # the writer's push grants are renewed here, well before they run out
            answer["push_grants"] = service.keys.push_grants(m)
        return 200, answer

    def metrics(self) -> str:
        """Prometheus text of every fleet's series (see orchestrator.coordinator.metrics)."""
        from orchestrator.coordinator.metrics import coordinator_metrics

        return coordinator_metrics(self).render()


def _report_events(service: FleetService,
                   message: Heartbeat | SelfTestReport) -> list[Observation | el.Event]:
    """What an agent's report about itself tells the failure detector and the election."""
    now = service.clock.monotonic()
    if isinstance(message, SelfTestReport):
        if message.ok:
            return [HeartbeatReceived(message.node, now, True)]
        failed = ",".join(c.name for c in message.checks if not c.ok)
        return [SelfTestFailed(message.node, now, failed, message.epoch)]
    events: list[Observation | el.Event] = [
        HeartbeatReceived(message.node, now, message.selftest != "failed", message.epoch),
        el.HeartbeatObserved(message.node, message.role, message.epoch, message.applied_seq,
                             now, message.selftest)]
    if message.role == "writer":
        events.append(el.WriterSyncObserved(message.node, message.epoch,
                                            message.sync_revision, frozenset(message.in_sync),
                                            now))
    return events


def _route(method: str, path: str) -> Route:
    """The route ``method`` on ``path`` asks for; NotFound, or MethodNotAllowed naming the
    route's one method."""
    parts = tuple(p for p in path.split("/") if p)
    allowed: str | None = None
    auth: Literal["none", "client", "agent"] = "none"
    limit = 0
    if parts in (("v1", "health"), ("v1", "status"), ("metrics",)):
        allowed = "GET"
    elif len(parts) == 2 and parts[0] == "v1" and parts[1] in AGENT_REPORTS:
        allowed, auth, limit = "POST", "agent", MAX_REPORT_BODY
    elif len(parts) == 4 and parts[:2] == ("v1", "fleets"):
        allowed = FLEET_ROUTES.get(parts[3])
        if allowed == "POST":
            auth, limit = "client", MAX_BODY
    if allowed is None:
        raise NotFound(f"no route {path[:200]}", route=path[:200])
    if method != allowed:
        raise MethodNotAllowed(f"{method} not allowed on {path[:200]}", allowed=[allowed])
    return Route(parts, auth, limit)


def _peek(token: str) -> Grant:
    """What ``token`` claims (:func:`peek`); BadSignature for a payload nested too deep for
    the JSON parser (its RecursionError is no ValueError) or naming a fleet or subject that is
    no UTF-8 text (a lone surrogate, which no key derivation or store lookup can encode)."""
    try:
        claimed = peek(token)
        (claimed.fleet + claimed.subject).encode()
    except (RecursionError, UnicodeEncodeError) as exc:
        raise BadSignature("grant token is malformed") from exc
    return claimed


def _check_current_writer(m: FleetMap, report: LaggingReaderReport) -> None:
    """A deposed writer cannot take readers out of the set: refuse an older epoch, and
    another node's report at the current epoch. A newer epoch is a writer promoted but not
    yet announced (its epoch record may be what a reader failed to ack): accepted."""
    writer = m.member(m.writer) if m.writer else None
    current = {
        "writer": None if writer is None else writer.name,
        "writer_address": None if writer is None else writer.address,
    }
    if report.epoch < m.epoch:
        raise StaleEpoch(
            f"lagging report of epoch {report.epoch}; the fleet is at epoch {m.epoch}",
            current=m.epoch,
            got=report.epoch,
            **current,
        )
    if report.epoch == m.epoch and (writer is None or report.writer != writer.name):
        raise NotWriter(f"{report.writer[:100]!r} is not the writer of epoch {m.epoch}", **current)


def _take_out_of_the_map(service: FleetService, report: LaggingReaderReport,
                         now: float) -> FleetMap:
    """Answer a lagging report only once the published map no longer hands the reader out:
    the writer acknowledges writes without that reader as soon as we answer."""
    published = service.request(el.ReaderLagging(report.reader, now, report.epoch,
                                                 report.sync_revision))
    if published.has(report.reader) and published.member(report.reader).in_sync:
        raise CoordinationError(f"reader {report.reader} is still in the published map of "
                                f"fleet {service.fleet}; report again")
    return published


def _field(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """``data[name]`` checked to be a ``kind`` (or null when the default is None)."""
    value = data.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, kind):
        raise DecodeError(f"field {name!r} must be a {kind.__name__}", field=name)
    return value


def _float(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise DecodeError(f"{name} must be a number", field=name) from exc
    if value != value:  # NaN compares unequal to itself
        raise DecodeError(f"{name} must be a number", field=name)
    return value


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise DecodeError(f"{name} must be an integer", field=name) from exc


def _json(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        data = boundedjson.loads(body)
    except boundedjson.JsonLimit as exc:
        raise DecodeError(f"body is not JSON within bounds: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError("body is not a JSON object")
    return data


def _query(text: str) -> dict[str, str]:
    try:
        return dict(urllib.parse.parse_qsl(text, max_num_fields=MAX_QUERY_FIELDS))
    except ValueError as exc:
        raise DecodeError(f"malformed query: {exc}", field="query") from exc


_POLL_INTERVAL = 0.2  # the serving loop cuts late requests at this granularity


class _RequestCut(Exception):
    """The request's body did not come within its deadline (or its connection broke): nobody
    is left to answer."""


class _Handler(BoundedRequestHandler):
    """One connection: requests in turn, each checked (framing, route, credential) before its
    body is read, answered with JSON."""

    owner: ClassVar[CoordinatorAPI]
    server: _Server

    _unread = 0  # body bytes announced and not read: the connection closes if any remain

    def _timeouts(self) -> tuple[float, float, float]:
        limits = self.server.limits
        return limits.idle_timeout, limits.header_timeout, limits.header_timeout

    def _new_request(self) -> None:
        super()._new_request()
        self._unread = 0

    def _framing(self) -> None:
        """How the body is delimited: at most one Content-Length of ASCII digits (absent: no
        body), never a Transfer-Encoding."""
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True
            raise LengthRequired("Transfer-Encoding is not accepted: send a Content-Length",
                                 field="Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            self.close_connection = True
            raise DecodeError("more than one Content-Length", field="Content-Length")
        try:
            self._unread = header_int("Content-Length", lengths[0]) if lengths else 0
        except DecodeError:
            self.close_connection = True
            raise

    def _read_body(self, limit: int) -> bytes:
        """The body, once the route's credential checked out: at most ``limit`` bytes (0:
        the route takes none), then the request's deadline is lifted."""
        length = self._unread
        if length > limit:
            self.close_connection = True  # refused unread
            if not limit:
                raise DecodeError("this route takes no body", field="Content-Length")
            raise TooLarge(f"body of {length} bytes over this route's {limit}", limit=limit)
        if length:
            self._ready_for_body()
        try:
            data = self.rfile.read(length) if length else b""
        except OSError as exc:  # silent past the per-read timeout, or reset: nobody to answer
            self.close_connection = True
            raise _RequestCut from exc
        self._unread -= len(data)
        if not self.server.deadlines.disarm(self.connection):
            raise _RequestCut
        if len(data) != length:
            raise DecodeError(f"body ended after {len(data)} of {length} bytes")
        return data

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        try:
            self._framing()
            status, answer = self.owner.handle(method, url.path, _query(url.query),
                                               HeaderMap(self.headers.items()), self._read_body,
                                               PeerCert.of(self.connection))
        except _RequestCut:
            self.close_connection = True
            LOG.info("event=request_cut client=%s path=%r", self.client_address[0],
                     url.path[:200])
            return
        except RbdfleetError as exc:
            wire = to_wire(exc)
            status, answer = wire.status, wire.to_wire()
        except Exception:  # a bug: keep the traceback in the log, answer without details
            LOG.exception("event=internal_error method=%s path=%r", method, url.path[:200])
            wire = InternalError("internal error; see the coordinator's log")
            status, answer = wire.status, wire.to_wire()
        if self._unread:  # refused before its body was read: never parse it as a request
            self.close_connection = True
        try:
            self._answer(status, answer)
        except OSError as exc:  # the client gave up first (its timeout, a reset): no one to tell
            self.close_connection = True
            LOG.info("event=client_gone path=%r error=%s", url.path[:200], type(exc).__name__)

    def _answer(self, status: int, answer: Any) -> None:
        if isinstance(answer, str):
            payload, ctype = answer.encode(), "text/plain; version=0.0.4"
        else:
            payload, ctype = json.dumps(answer).encode(), "application/json"
        self.connection.settimeout(self.server.limits.send_timeout)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The server's own refusals (bad request line, header block too large, unknown
        method) as JSON too, and the connection closed. An HTTP version other than 1.x is the
        client's fault: 400, not the stdlib's 505 (only an unknown method stays 501)."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a 0.9 answer would have no status line
            self.request_version = "HTTP/1.0"
        reason = message or http.HTTPStatus(code).phrase
        if code == http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = http.HTTPStatus.BAD_REQUEST
        error = "not_implemented" if code == 501 else "bad_request"
        with contextlib.suppress(OSError):
            self._answer(code, {"error": error, "message": reason})


class _Server(BoundedHTTPServer):
    """The API's HTTP server: bounded connections, deadlines, TLS handshakes off the accept
    loop (module docstring; :class:`agents.httpbase.BoundedHTTPServer`)."""

    what = "coordinator"
    log = LOG

    def __init__(self, address: tuple[str, int], handler: type[_Handler],
                 tls: ContextSource | None, limits: ServerLimits) -> None:
        self.limits = limits
        super().__init__(address, handler, tls=tls, max_connections=limits.max_connections,
                         header_timeout=limits.header_timeout)


__all__ = [
    "CLIENT_CACHE_SECONDS",
    "MAX_BODY",
    "MAX_REPORT_BODY",
    "NO_CERT",
    "PLAINTEXT",
    "CoordinatorAPI",
    "PeerCert",
    "ServerLimits",
    "to_wire",
]
