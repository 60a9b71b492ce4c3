"""The coordinator's HTTP/1.1 + JSON API under ``/v1`` (stdlib server, one thread per request).

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
GET  /metrics                               -       Prometheus text
==========================================  ======  ==========================================

read/write/admin: a client token (orchestrator.core.clients: purpose ``client``, audience
``coordinator``, subject the client's name, MACed with that client's own secret from the
ClientStore) of a client whose scope includes the route's (403 ``foreign_grant`` otherwise; 401
for an unknown or revoked client). "agent": a report grant MACed with the key of the node the
message names (purpose ``report``, bound to the body). A standby answers fleet routes with 503
``not_active`` naming the active coordinator, so clients follow it.

Errors are ``{"error", "message", ...}`` with the status of the error class (agents.errors),
and bad input changes no state: 400 malformed body, query or field; 401 no grant, a forged
or expired one; 403 a valid grant of another fleet, node or role; 404 unknown fleet, node or
route; 405 a known route with another method (``allowed`` names the right one); 409 a
refused transition, or a lagging report from a writer that is not the current one (stale
epoch or not the writer; the current writer in the answer); 413 a body over
:data:`MAX_BODY` (the connection is closed, the body never read); 501 an HTTP method the
server does not know. The server's own refusals (a bad request line) answer JSON too.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from agents.core.grants import CLIENT, COORDINATOR, peek, verify
from agents.core.protocol import (
    Heartbeat,
    LaggingReaderReport,
    SelfTestReport,
    bearer_token,
)
from agents.errors import (
    AgentError,
    BadSignature,
    DecodeError,
    ForeignGrant,
    MethodNotAllowed,
    NotFound,
    NotWriter,
    RbdfleetError,
    StaleEpoch,
    TooLarge,
)
from agents.server import InternalError
from orchestrator.coordinator.service import FleetService, NotActive
from orchestrator.core import election as el
from orchestrator.core.clients import ClientCredential, allows
from orchestrator.core.fleetmap import FleetMap, IllegalTransition
from orchestrator.core.liveness import FailureReported, HeartbeatReceived, SelfTestFailed
from orchestrator.errors import CoordinationError
from orchestrator.ports import ClientStore

LOG = logging.getLogger(__name__)

# a revoked or rotated client is refused at most this long after the change
CLIENT_CACHE_SECONDS = 2.0
MAX_BODY = 1 << 20
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


class NotActiveError(AgentError):
    """Wire form of :class:`NotActive`: 503 with the active coordinator's URL."""

    code = "not_active"
    status = 503


class RefusedTransition(AgentError):
    """Wire form of an IllegalTransition the election refused (409)."""

    code = "refused_transition"
    status = 409


class CoordinationFailed(AgentError):
    """Wire form of a CoordinationError (a fence or promotion that failed): 503."""

    code = "coordination_failed"
    status = 503


def to_wire(exc: RbdfleetError) -> AgentError:
    """Map an orchestrator error to its wire form (one table: here)."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, NotActive):
        return NotActiveError(str(exc), fleet=exc.fleet, coordinator=exc.coordinator)
    if isinstance(exc, IllegalTransition):
        return RefusedTransition(str(exc), subject=exc.subject, from_=exc.from_, to=exc.to)
    if isinstance(exc, CoordinationError):
        return CoordinationFailed(str(exc))
    return AgentError(str(exc))


class CoordinatorAPI:
    """Routes requests to the fleets' services; ``serve()`` runs the HTTP server."""

    def __init__(
        self,
        services: dict[str, FleetService],
        clients: dict[str, ClientStore],
        wall: Callable[[], float],
    ) -> None:
        self.services = services
        self.clients = clients
        self.wall = wall
        self._client_cache: dict[tuple[str, str], tuple[ClientCredential | None, float]] = {}
        self._cache_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Start serving in a thread; returns the bound (host, port) (port 0 picks one).

        ``tls`` is a server context the caller built (certificates, peer verification)."""
        api = self

        class Handler(_Handler):
            owner = api

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="api", daemon=True)
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
        self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes
    ) -> tuple[int, Any]:
        """One request -> (status, JSON-able answer or text for /metrics)."""
        parts = [p for p in path.split("/") if p]
        allowed = _method_of(parts)
        if allowed is None:
            raise NotFound(f"no route {path[:200]}", route=path[:200])
        if method != allowed:
            raise MethodNotAllowed(f"{method} not allowed on {path[:200]}", allowed=[allowed])
        if method == "GET" and parts == ["v1", "health"]:
            return 200, {"ok": True, "fleets": {n: s.active for n, s in self.services.items()}}
        if method == "GET" and parts == ["v1", "status"]:
            return 200, {"fleets": [s.status() for s in self.services.values()]}
        if method == "GET" and parts == ["metrics"]:
            return 200, self.metrics()
        if method == "POST" and len(parts) == 2 and parts[0] == "v1":
            return self._agent_report(parts[1], headers, body)
        if len(parts) == 4 and parts[:2] == ["v1", "fleets"]:
            service = self._service(parts[2])
            return self._fleet_route(method, service, parts[3], query, headers, body)
        raise NotFound(f"no route {method} {path}")

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
        headers: Any,
        body: bytes,
    ) -> tuple[int, Any]:
        if method == "GET" and action == "map":
            after = _int(query.get("after", "-1"), "after")
            wait = min(_float(query.get("wait", "0") or "0", "wait"), MAX_WAIT)
            m = service.wait_map(after, wait) if wait > 0 else service.require_active()
            return 200, {"map": m.to_json(), "coordinator": service.settings.url}
        self._authorize_client(service.fleet, headers, action)
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
        raise NotFound(f"no route POST {action}")  # pragma: no cover - _method_of routes first

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

    def _authorize_client(self, fleet: str, headers: Any, route: str) -> ClientCredential:
        token = bearer_token(headers)
        claimed = peek(token)  # which secret to check with; nothing trusted yet
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

    def _agent_report(self, kind: str, headers: Any, body: bytes) -> tuple[int, Any]:
        message: Heartbeat | SelfTestReport | LaggingReaderReport
        if kind == "heartbeat":
            message = Heartbeat.decode(body)
            sender = message.node
        elif kind == "selftest":
            message = SelfTestReport.decode(body)
            sender = message.node
        elif kind == "lagging":
            message = LaggingReaderReport.decode(body)
            sender = message.writer
        else:
            raise NotFound(f"no route POST /v1/{kind}")
        service = self._service(message.fleet)
        service.keys.verify_report(bearer_token(headers), sender, body)
        m = service.require_active()
        if isinstance(message, LaggingReaderReport):
            _check_current_writer(m, message)
        now = service.clock.monotonic()
        if isinstance(message, Heartbeat):
            service.submit(HeartbeatReceived(message.node, now, message.selftest != "failed",
                                             message.epoch))
            service.submit(
                el.HeartbeatObserved(
                    message.node, message.role, message.epoch, message.applied_seq, now,
                    message.selftest,
                )
            )
            if message.role == "writer":
                service.submit(el.WriterSyncObserved(message.node, message.epoch,
                                                     message.sync_revision,
                                                     frozenset(message.in_sync), now))
        elif isinstance(message, SelfTestReport):
            if message.ok:
                service.submit(HeartbeatReceived(message.node, now, True))
            else:
                failed = ",".join(c.name for c in message.checks if not c.ok)
                service.submit(SelfTestFailed(message.node, now, failed, message.epoch))
        else:
            m = _take_out_of_the_map(service, message, now)
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


def _method_of(parts: list[str]) -> str | None:
    """The one method the route ``parts`` answers, None when there is no such route."""
    if parts in (["v1", "health"], ["v1", "status"], ["metrics"]):
        return "GET"
    if len(parts) == 2 and parts[0] == "v1" and parts[1] in AGENT_REPORTS:
        return "POST"
    if len(parts) == 4 and parts[:2] == ["v1", "fleets"]:
        return FLEET_ROUTES.get(parts[3])
    return None


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
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError("body is not JSON") from exc
    if not isinstance(data, dict):
        raise DecodeError("body is not a JSON object")
    return data


class _Handler(BaseHTTPRequestHandler):
    owner: ClassVar[CoordinatorAPI]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("event=http " + format, *args)

    def _read_body(self) -> bytes:
        """The request body; the connection closes when it is refused unread."""
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit():
            self.close_connection = True
            raise DecodeError(
                "Content-Length must be a non-negative integer", field="Content-Length"
            )
        length = int(text)
        if length > MAX_BODY:
            self.close_connection = True
            raise TooLarge(f"body of {length} bytes over the limit of {MAX_BODY}", limit=MAX_BODY)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            body = self._read_body()
            status, answer = self.owner.handle(method, url.path, query, self.headers, body)
        except RbdfleetError as exc:
            wire = to_wire(exc)
            status, answer = wire.status, wire.to_wire()
        except Exception:  # a bug: keep the traceback in the log, answer without details
            LOG.exception("event=internal_error method=%s path=%r", method, url.path[:200])
            wire = InternalError("internal error; see the coordinator's log")
            status, answer = wire.status, wire.to_wire()
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
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
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
        """The server's own refusals (bad request line, unknown method) as JSON too."""
        self.close_connection = True
        reason = message or self.responses.get(code, ("error",))[0]
        error = "not_implemented" if code == 501 else "bad_request"
        self._answer(code, {"error": error, "message": reason})


__all__ = [
    "CLIENT_CACHE_SECONDS",
    "CoordinationFailed",
    "CoordinatorAPI",
    "NotActiveError",
    "RefusedTransition",
    "to_wire",
]
