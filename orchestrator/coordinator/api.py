"""The coordinator's HTTP/1.1 + JSON API under ``/v1`` (stdlib server, one thread per request).

==========================================  ======  ==========================================
route                                       auth    answer
==========================================  ======  ==========================================
GET  /v1/health                             -       ``{"ok": true, "fleets": {name: active}}``
GET  /v1/status                             -       per fleet: map, liveness, pending steps
GET  /v1/fleets/F/map?after=REV&wait=S      -       the map once ``revision > REV`` (long poll)
POST /v1/fleets/F/write  ``{"path"}``       client  ordered + labelled targets with grants
POST /v1/fleets/F/read   ``{"path"}``       client  in-sync readers then the writer, grants
POST /v1/fleets/F/report ``{"node",...}``   client  202: failure seen by a client
POST /v1/fleets/F/failover ``{"to"}``       client  the new map (after fence + promote)
POST /v1/fleets/F/fence  ``{"node"}``       client  the new map
POST /v1/heartbeat | /v1/selftest |         agent   agents' reports (agents.core.protocol)
     /v1/lagging
GET  /metrics                               -       Prometheus text
==========================================  ======  ==========================================

"client" auth is a ``control`` grant for node ``client`` signed with the fleet secret;
"agent" auth is the agent's own grant for the node the message names. A standby answers
fleet routes with 503 ``not_active`` naming the active coordinator, so clients follow it.
Errors are ``{"error", "message", ...}`` with the status of one table (:data:`STATUS`).
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

from agents.core.grants import CONTROL, READER, WRITER, verify
from agents.core.protocol import (
    AUTH_HEADER,
    BEARER,
    Heartbeat,
    LaggingReaderReport,
    SelfTestReport,
)
from agents.errors import AgentError, BadRequest, DecodeError, NotFound, RbdfleetError
from orchestrator.coordinator.service import FleetService, NotActive
from orchestrator.core import election as el
from orchestrator.core.fleetmap import IllegalTransition
from orchestrator.core.liveness import FailureReported, HeartbeatReceived, SelfTestFailed
from orchestrator.errors import CoordinationError

LOG = logging.getLogger(__name__)

CLIENT_NODE = "client"
MAX_BODY = 1 << 20
MAX_WAIT = 30.0


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
        secrets: dict[str, bytes],
        wall: Callable[[], float],
    ) -> None:
        self.services = services
        self.secrets = secrets
        self.wall = wall
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def serve(
        self, host: str, port: int, certfile: str | None = None, keyfile: str | None = None
    ) -> tuple[str, int]:
        """Start serving in a thread; returns the bound (host, port) (port 0 picks one)."""
        api = self

        class Handler(_Handler):
            owner = api

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        if certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            server.socket = context.wrap_socket(server.socket, server_side=True)
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
            wait = min(float(query.get("wait", "0") or 0), MAX_WAIT)
            m = service.wait_map(after, wait) if wait > 0 else service.require_active()
            return 200, {"map": m.to_json(), "coordinator": service.settings.url}
        if method != "POST":
            raise NotFound(f"no route {method} {action}")
        self._authorize_client(service.fleet, headers)
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
                "path": str(data.get("path", "")),
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
            node = str(data.get("node", ""))
            service.require_active()
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
            to = data.get("to")
            m = service.request(
                el.FailoverRequested(None if to is None else str(to), service.clock.monotonic())
            )
            return 200, {"map": m.to_json()}
        if action == "fence":
            node = str(data.get("node", ""))
            m = service.request(el.FenceRequested(node, service.clock.monotonic()))
            return 200, {"map": m.to_json()}
        raise NotFound(f"no route POST {action}")

    def _authorize_client(self, fleet: str, headers: Any) -> None:
        token = _bearer(headers)
        verify(
            token,
            self.secrets[fleet],
            now=self.wall(),
            fleet=fleet,
            node=CLIENT_NODE,
            roles={CONTROL},
            epoch=None,
        )

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
        verify(
            _bearer(headers),
            self.secrets[message.fleet],
            now=self.wall(),
            fleet=message.fleet,
            node=sender,
            roles={READER, WRITER},
            epoch=None,
        )
        m = service.require_active()
        now = service.clock.monotonic()
        if isinstance(message, Heartbeat):
            service.submit(HeartbeatReceived(message.node, now, message.selftest != "failed"))
            service.submit(
                el.HeartbeatObserved(
                    message.node, message.role, message.epoch, message.applied_seq, now
                )
            )
        elif isinstance(message, SelfTestReport):
            if message.ok:
                service.submit(HeartbeatReceived(message.node, now, True))
            else:
                failed = ",".join(c.name for c in message.checks if not c.ok)
                service.submit(SelfTestFailed(message.node, now, failed))
        else:
            service.submit(el.ReaderLagging(message.reader, now))
        writer = m.member(m.writer) if m.writer else None
        return 200, {
            "epoch": m.epoch,
            "revision": m.revision,
            "writer": None if writer is None else writer.name,
            "writer_address": None if writer is None else writer.address,
        }

    def metrics(self) -> str:
        """Prometheus text: active flag, epoch, revision, failovers per fleet."""
        lines = [
            "# TYPE rbdfleet_coordinator_active gauge",
            "# TYPE rbdfleet_coordinator_epoch gauge",
            "# TYPE rbdfleet_coordinator_failovers_total counter",
        ]
        for name, s in sorted(self.services.items()):
            st = s.status()
            label = f'{{fleet="{name}"}}'
            lines.append(f"rbdfleet_coordinator_active{label} {int(st['active'])}")
            if st["map"] is not None:
                lines.append(f"rbdfleet_coordinator_epoch{label} {st['map']['epoch']}")
            lines.append(f"rbdfleet_coordinator_failovers_total{label} {st['stats']['failovers']}")
        return "\n".join(lines) + "\n"


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


def _bearer(headers: Any) -> str:
    value = headers.get(AUTH_HEADER) or ""
    if not value.startswith(BEARER):
        raise BadRequest("request carries no grant (Authorization: Bearer <token>)")
    return str(value[len(BEARER) :].strip())


class _Handler(BaseHTTPRequestHandler):
    owner: ClassVar[CoordinatorAPI]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("event=http " + format, *args)

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise BadRequest(f"body larger than {MAX_BODY} bytes")
            body = self.rfile.read(length) if length else b""
            status, answer = self.owner.handle(method, url.path, query, self.headers, body)
        except RbdfleetError as exc:
            wire = to_wire(exc)
            status, answer = wire.status, wire.to_wire()
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


__all__ = [
    "CLIENT_NODE",
    "CoordinationFailed",
    "CoordinatorAPI",
    "NotActiveError",
    "RefusedTransition",
    "to_wire",
]
