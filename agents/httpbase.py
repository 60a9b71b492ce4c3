"""What the two HTTP servers built on ``http.server`` share (the agent's, ``agents.server``,
and the coordinator's, ``orchestrator.coordinator.api``), so neither imports the other's:
per-connection deadlines, a threading server with a bounded number of connections whose
TLS handshakes run in the connection's own thread, off the accept loop, and the request
handler's phases (idle wait, deadline-bound request, deferred ``100 Continue``).
"""

from __future__ import annotations

import contextlib
import http
import http.server
import io
import json
import logging
import socket
import threading
import time
from typing import Any, cast

from agents.errors import TooBusy
from agents.tlsreload import ContextSource, current

__all__ = ["BoundedHTTPServer", "BoundedRequestHandler", "Deadlines"]

LOG = logging.getLogger(__name__)


class Deadlines:
    """Connections that must finish a phase by a monotonic time. The serving loop
    (``service_actions`` of either server) shuts late ones down: the blocked read then sees
    EOF, whatever per-read timeout a trickling client keeps resetting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}
        self._cut: set[socket.socket] = set()

    def arm(self, sock: socket.socket, due: float) -> None:
        with self._lock:
            self._due[sock] = due

    def disarm(self, sock: socket.socket) -> bool:
        """Lift ``sock``'s deadline; False when it had passed (the connection was cut)."""
        with self._lock:
            self._due.pop(sock, None)
            if sock in self._cut:
                self._cut.discard(sock)
                return False
            return True

    def cut_late(self, now: float) -> int:
        """Shut down every connection past its deadline; how many."""
        with self._lock:
            late = [s for s, due in self._due.items() if due <= now]
            for sock in late:
                del self._due[sock]
                self._cut.add(sock)
        for sock in late:
            # the plain socket's shutdown, also for TLS: SSLSocket.shutdown would drop the
            # TLS state under the thread that is reading
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        return len(late)


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """At most ``max_connections`` connections at once (one more is answered 503 too_busy
    without reading it, and closed), deadlines cut by the serving loop, TLS handshakes bounded
    by ``header_timeout`` in the connection's thread. ``what`` names the server in answers."""

    daemon_threads = True
    # listen backlog: the default 5 resets connections when many clients (or a fleet's
    # nodes and a burst of clients) connect at once
    request_queue_size = 128
    what = "server"
    log = LOG  # subclasses log under their own module's name

    def __init__(self, address: tuple[str, int],
                 handler: type[http.server.BaseHTTPRequestHandler], *,
                 tls: ContextSource | None, max_connections: int,
                 header_timeout: float) -> None:
        self.tls = tls
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.deadlines = Deadlines()
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.tls is not None:  # the handshake runs later, in the connection's own thread
            # each connection takes the context of now: rotated files serve new connections
            sock = current(self.tls).wrap_socket(sock, server_side=True,
                                                 do_handshake_on_connect=False)
        return sock, addr

    def service_actions(self) -> None:
        """Each turn of the serving loop (every poll interval): cut late requests."""
        self.deadlines.cut_late(time.monotonic())

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            request.settimeout(self.header_timeout)
            self.deadlines.arm(request, time.monotonic() + self.header_timeout)
            try:
                request.do_handshake()
            except OSError as exc:  # ssl.SSLError is an OSError; so is a cut or a timeout
                self.log.info("event=tls_handshake_failed client=%s error=%s", client_address[0],
                         type(exc).__name__)
                return
            finally:
                self.deadlines.disarm(request)
        super().finish_request(request, client_address)

    def refused(self, client_address: Any) -> None:
        """Called for each connection refused for want of a slot (the agent counts them)."""

    def _refuse(self, request: Any, client_address: Any) -> None:
        """Over ``max_connections``: answer 503 too_busy without reading (plain HTTP; a TLS
        connection is just closed: no handshake is spent on it) and close."""
        limit = self.max_connections
        self.log.info("event=connection_refused client=%s limit=%d", client_address[0], limit)
        self.refused(client_address)
        if self.tls is None:
            body = json.dumps(TooBusy(f"the {self.what} serves {limit} connections at once; "
                                      "retry", limit=limit).to_wire()).encode()
            head = (f"HTTP/1.1 {TooBusy.status} {http.HTTPStatus(TooBusy.status).phrase}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            with contextlib.suppress(OSError):
                request.setblocking(False)  # never stall the accept loop on this client
                request.send(head + body)
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A bug escaped a connection's thread: log it (not a bare traceback on stderr)."""
        self.log.exception("event=connection_error client=%s", client_address[0])


class BoundedRequestHandler(http.server.BaseHTTPRequestHandler):
    """A connection's requests in turn, each within deadlines: up to the idle timeout for the
    next request to start, then one header deadline for its request line, headers and
    whatever the subclass reads before it disarms the deadline (a byte-a-second client
    included). ``Expect: 100-continue`` is answered only by :meth:`_ready_for_body`,
    after the subclass has checked the credential and the size. Subclasses give
    :meth:`_timeouts` and may reset per-request state in :meth:`_new_request`."""

    server: BoundedHTTPServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and payload go out in two writes: no 40 ms stall
    timeout = None  # set per phase by handle_one_request (idle, then request)

    _continue = False  # "Expect: 100-continue" seen and not answered yet

    def _timeouts(self) -> tuple[float, float, float]:
        """(idle, per-read once a request started, whole request line + headers)."""
        raise NotImplementedError

    def _new_request(self) -> None:
        """Per-request state back to its defaults, before the request line is read."""
        self._continue = False

    def log_message(self, format: str, *args: Any) -> None:
        """Access lines go to the debug log, one structured line each (never headers)."""
        LOG.debug("event=http client=%s line=%r", self.client_address[0], format % args)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError as exc:  # reset or cut while reading a request line or headers
            LOG.debug("event=client_gone client=%s error=%s", self.client_address[0],
                      type(exc).__name__)

    def handle_one_request(self) -> None:
        idle, per_read, header = self._timeouts()
        self.connection.settimeout(idle)
        try:
            waiting = cast(io.BufferedReader, self.rfile).peek(1)  # rbufsize -1: buffered
        except OSError:  # idle too long, or gone
            waiting = b""
        if not waiting:
            self.close_connection = True
            return
        self.connection.settimeout(per_read)
        self._new_request()
        deadlines = self.server.deadlines
        deadlines.arm(self.connection, time.monotonic() + header)
        try:
            super().handle_one_request()
        finally:
            deadlines.disarm(self.connection)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # no headers: no credential, no framing
            self.send_error(400, "HTTP/0.9 requests are not served")
            return False
        return True

    def handle_expect_100(self) -> bool:
        """Defer the ``100 Continue`` until the body is about to be read (a refusal comes
        instead of it)."""
        self._continue = True
        return True

    def _ready_for_body(self) -> None:
        if self._continue:
            self._continue = False
            self.send_response_only(100)
            self.end_headers()
