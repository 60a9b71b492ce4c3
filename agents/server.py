"""The agent's HTTP/1.1 API under /v1/ (stdlib ThreadingHTTPServer), documented in
docs/agent-api.md.

Bodies are streamed both ways: a PUT goes from the socket to the volume chunk by chunk, a GET
from the volume's verified chunks to the socket. Every error answer is JSON ``{error,
message, ...}`` (``AgentError.to_wire()``) with the class's HTTP status: the status table is
the error tree in agents/errors.py, and nothing here picks a status by hand. Every answer
carries ``X-Rbdfleet-Epoch``, the epoch the agent knows.
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agents.agent import Agent
from agents.core.index import normalize_path
from agents.core.protocol import (
    DemoteRequest,
    EntryInfo,
    ErrorBody,
    ListResponse,
    Message,
    MkdirRequest,
    PromoteRequest,
    PutRequest,
    ReaderAddress,
    ReaderSet,
    RecordPush,
    RenameRequest,
    WriteAck,
    bearer_token,
)
from agents.errors import (
    AgentError,
    BadPath,
    ChecksumMismatch,
    DecodeError,
    DeviceError,
    FormatError,
    MethodNotAllowed,
    NotFound,
    RangeNotSatisfiable,
    TooLarge,
    WrongKind,
)
from agents.volume import WRITE_UNIT, Entry

__all__ = ["AgentServer", "serve"]

LOG = logging.getLogger(__name__)

CHUNK = WRITE_UNIT  # bytes read from the socket per chunk of a PUT body: whole write units
# go to the device without being staged and copied again (Volume.put's fast path)
MAX_JSON = 16 << 20  # JSON request bodies (a push of 256 records is ~1.4 MiB)
EPOCH_HEADER = "X-Rbdfleet-Epoch"
SEQ_HEADER = "X-Rbdfleet-Seq"
CRC_HEADER = "X-Rbdfleet-Crc"


class InternalError(AgentError):
    """A bug: logged with its traceback, answered 500 without details."""

    code = "internal_error"
    status = 500


def _entry_info(entry: Entry) -> EntryInfo:
    return EntryInfo(path=entry.path, kind=entry.kind, size=entry.size, version=entry.version,
                     epoch=entry.epoch, mtime=entry.mtime, crc=entry.crc)


def _close(stream: Iterator[bytes]) -> None:
    """Unpin a volume read stream (``Volume.read`` returns one with ``close()``)."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single ``bytes=`` range, or None for the whole
    file (no header, or several ranges, which RFC 9110 lets a server ignore)."""
    if header is None or "," in header:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        raise RangeNotSatisfiable(f"malformed Range {header!r}", size=size)
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"range {header!r} outside a file of {size} bytes", size=size)
    return start, end


@dataclass(frozen=True)
class Answer:
    """A JSON answer: status and message (or raw text for /metrics)."""

    status: int
    body: Message | str


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection; requests are dispatched by :data:`ROUTES`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stall
    server: AgentServer
    timeout = 120  # seconds of socket silence before a connection is dropped

    # -- plumbing ------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """Access lines go to the debug log, one structured line each (never headers)."""
        LOG.debug("event=http client=%s line=%r", self.client_address[0], format % args)

    @property
    def agent(self) -> Agent:
        return self.server.agent

    def _headers_map(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items()}

    def _send_head(self, status: int, length: int, content_type: str,
                   extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header(EPOCH_HEADER, str(self.agent.state.epoch))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send_answer(self, answer: Answer) -> None:
        if isinstance(answer.body, str):
            data = answer.body.encode()
            content_type = "text/plain; version=0.0.4; charset=utf-8"
        else:
            data = answer.body.encode()
            content_type = "application/json"
        self._send_head(answer.status, len(data), content_type)
        self.wfile.write(data)

    def _send_error(self, err: AgentError) -> None:
        self._send_answer(Answer(err.status, ErrorBody.from_error(err)))

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise DecodeError("request needs a Content-Length", field="Content-Length")
        if int(length) > MAX_JSON:
            self.close_connection = True
            raise TooLarge(f"JSON body over {MAX_JSON} bytes", limit=MAX_JSON)
        data = self.rfile.read(int(length))
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError("request body is not valid JSON") from exc

    def _token(self) -> str:
        return bearer_token(self._headers_map())

    def _path_after(self, prefix: str) -> str:
        raw = urllib.parse.urlsplit(self.path).path
        try:
            rest = urllib.parse.unquote(raw[len(prefix):], errors="strict")
        except UnicodeDecodeError as exc:
            raise BadPath("path is not valid UTF-8") from exc
        return normalize_path("/" + rest)

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        started = time.monotonic()
        route_name, status = "unknown", 500
        try:
            path = urllib.parse.urlsplit(self.path).path
            route = _match(method, path)
            route_name = route.name
            answer = route.handler(self)
            if answer is not None:
                self._send_answer(answer)
                status = answer.status
            else:
                status = 200
        except AgentError as err:
            status = err.status
            self._fail(err)
        except OSError as exc:  # client gone: reset, timeout, TLS error (SSLError)
            self.close_connection = True
            LOG.info("event=client_gone route=%s error=%s", route_name, type(exc).__name__)
        except Exception:
            LOG.exception("event=internal_error route=%s", route_name)
            status = 500
            self._fail(InternalError("internal error; see the agent's log"))
        finally:
            self.agent.m_requests.inc(method, route_name, str(status))
            self.agent.m_latency.observe(time.monotonic() - started, route_name)

    def _fail(self, err: AgentError) -> None:
        if isinstance(err, DeviceError):
            self.agent.fenced(err)
        if (self.headers.get("Content-Length") or "0").strip() != "0":
            self.close_connection = True  # the body may be unread: never parse it as a request
        if getattr(self, "_streaming", False):
            self.close_connection = True  # headers already sent: cut the body short
            return
        try:
            self._send_error(err)
        except OSError:
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- files ---------------------------------------------------------------------------

    def put_file(self) -> Answer:
        path = self._path_after("/v1/files/")
        self.close_connection = True  # until the body is fully read
        request = PutRequest.from_headers(self._headers_map())
        if request.size > self.server.max_body:
            raise TooLarge(f"body of {request.size} bytes over the limit",
                           limit=self.server.max_body)
        writer = self.agent.writer_for(request.grant)
        ack = writer.put(path, self._body(request.size), request.size,
                         mtime=request.mtime if request.mtime is not None else time.time(),
                         readers=request.readers)
        self.close_connection = False
        self.agent.m_bytes_in.inc(amount=request.size)
        return Answer(201, ack)

    def _body(self, size: int) -> Iterator[bytes]:
        remaining = size
        while remaining:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                raise DecodeError(f"body ended after {size - remaining} of {size} bytes")
            remaining -= len(data)
            yield data

    def get_file(self) -> None:
        path = self._path_after("/v1/files/")
        volume = self.agent.volume_for_read(self._token())
        for _ in range(8):  # retried only if an overwrite lands between stat and read
            entry = volume.stat(path)
            if entry.kind != "file":
                raise WrongKind(f"is a directory: {path}", path=path)
            span = parse_range(self.headers.get("Range"), entry.size)
            start, end = span if span is not None else (0, entry.size)
            stream = volume.read(path, start, end - start)
            if volume.stat(path).version == entry.version:
                break
            _close(stream)
        else:
            raise NotFound(f"{path} keeps changing; retry", path=path)
        try:
            self._stream(path, entry, stream, start, end, span is not None)
        finally:
            _close(stream)

    def _stream(self, path: str, entry: Entry, stream: Iterator[bytes], start: int, end: int,
                partial: bool) -> None:
        try:
            first = next(stream, b"")
        except FormatError as err:
            self.agent.report_corruption(path, err)
            raise
        extra = {SEQ_HEADER: str(entry.version), "ETag": f'"{entry.version}"',
                 "Accept-Ranges": "bytes"}
        if partial:
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        elif entry.crc is not None:
            extra[CRC_HEADER] = str(entry.crc)
        self._send_head(206 if partial else 200, end - start, "application/octet-stream", extra)
        self._streaming = True
        sent = 0
        try:
            for chunk in self._chain(first, stream):
                self.wfile.write(chunk)
                sent += len(chunk)
        except ChecksumMismatch as err:
            self.agent.report_corruption(path, err)
            raise
        finally:
            self.agent.m_bytes_out.inc(amount=sent)
        self._streaming = False

    @staticmethod
    def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
        if first:
            yield first
        yield from rest

    def delete_file(self) -> Answer:
        path = self._path_after("/v1/files/")
        request = PutRequest.from_headers({**self._headers_map(), "Content-Length": "0"})
        ack = self.agent.writer_for(request.grant).delete(path, readers=request.readers)
        return Answer(200, ack)

    def mkdir(self) -> Answer:
        body = MkdirRequest.from_json(self._read_json())
        writer = self.agent.writer_for(self._token())
        return Answer(201, writer.mkdir(normalize_path(body.path), parents=body.parents,
                                        readers=self._readers()))

    def rename(self) -> Answer:
        body = RenameRequest.from_json(self._read_json())
        writer = self.agent.writer_for(self._token())
        ack: WriteAck = writer.rename(normalize_path(body.src), normalize_path(body.dst),
                                      readers=self._readers())
        return Answer(200, ack)

    def _readers(self) -> tuple[ReaderAddress, ...]:
        request = PutRequest.from_headers({**self._headers_map(), "Content-Length": "0"})
        return request.readers

    def list_dir(self) -> Answer:
        raw = urllib.parse.urlsplit(self.path).path
        path = "/" if raw.rstrip("/") == "/v1/list" else self._path_after("/v1/list/")
        volume = self.agent.volume_for_read(self._token())
        applied = volume.applied_seq
        entries = tuple(_entry_info(e) for e in volume.list(path))
        return Answer(200, ListResponse(path=path, entries=entries, applied_seq=applied))

    def stat(self) -> Answer:
        path = self._path_after("/v1/stat/")
        volume = self.agent.volume_for_read(self._token())
        return Answer(200, _entry_info(volume.stat(path)))

    # -- replication, control, operations ------------------------------------------------

    def records(self) -> Answer:
        token = self._token()
        push = RecordPush.from_json(self._read_json())
        return Answer(200, self.agent.receive_push(token, push))

    def promote(self) -> Answer:
        token = self._token()
        return Answer(200, self.agent.promote(token, PromoteRequest.from_json(self._read_json())))

    def demote(self) -> Answer:
        token = self._token()
        return Answer(200, self.agent.demote(token, DemoteRequest.from_json(self._read_json())))

    def readers(self) -> Answer:
        token = self._token()
        return Answer(200, self.agent.set_readers(token, ReaderSet.from_json(self._read_json())))

    def health(self) -> Answer:
        return Answer(200, self.agent.health())

    def metrics(self) -> Answer:
        return Answer(200, self.agent.metrics.render())


@dataclass(frozen=True)
class Route:
    """``method`` on ``path`` (exact) or under ``path`` (when it ends with ``/``)."""

    method: str
    path: str
    name: str
    handler: Callable[[Handler], Answer | None]


ROUTES = (
    Route("PUT", "/v1/files/", "put", Handler.put_file),
    Route("GET", "/v1/files/", "get", Handler.get_file),
    Route("DELETE", "/v1/files/", "delete", Handler.delete_file),
    Route("POST", "/v1/mkdir", "mkdir", Handler.mkdir),
    Route("POST", "/v1/rename", "rename", Handler.rename),
    Route("GET", "/v1/list", "list", Handler.list_dir),
    Route("GET", "/v1/list/", "list", Handler.list_dir),
    Route("GET", "/v1/stat/", "stat", Handler.stat),
    Route("POST", "/v1/records", "records", Handler.records),
    Route("POST", "/v1/promote", "promote", Handler.promote),
    Route("POST", "/v1/demote", "demote", Handler.demote),
    Route("POST", "/v1/readers", "readers", Handler.readers),
    Route("GET", "/v1/health", "health", Handler.health),
    Route("GET", "/metrics", "metrics", Handler.metrics),
)


def _match(method: str, path: str) -> Route:
    matching = [r for r in ROUTES
                if (path.startswith(r.path) if r.path.endswith("/") else path == r.path)]
    for route in matching:
        if route.method == method:
            return route
    if matching:
        raise MethodNotAllowed(f"{method} not allowed on {path}",
                               allowed=sorted({r.method for r in matching}))
    raise NotFound(f"no route {path}", route=path[:200])


class AgentServer(http.server.ThreadingHTTPServer):
    """The agent's HTTP server; TLS when given a cert and key."""

    daemon_threads = True
    allow_reuse_address = True
    # listen backlog: the default 5 resets connections when many clients (or a fleet's
    # readers and a burst of clients) connect at once
    request_queue_size = 128

    agent: Agent  # set by the daemon before serving: the advertised address needs the port

    def __init__(self, address: tuple[str, int], *, max_body: int,
                 tls: tuple[str, str] | None = None) -> None:
        self.max_body = max_body
        self._tls: Any = None  # ssl.SSLContext when TLS is on
        if tls is not None:
            import ssl

            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*tls)
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self._tls is not None:  # handshake later, in the connection's own thread
            sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._tls is not None:
            request.settimeout(Handler.timeout)
            try:
                request.do_handshake()
            except OSError as exc:  # ssl.SSLError is an OSError
                LOG.info("event=tls_handshake_failed client=%s error=%s", client_address[0],
                         type(exc).__name__)
                return
        super().finish_request(request, client_address)


def serve(server: AgentServer) -> None:
    """Serve until ``server.shutdown()`` is called (from another thread)."""
    server.serve_forever(poll_interval=0.2)
