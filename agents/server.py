"""The agent's HTTP/1.1 API under /v1/ (stdlib ThreadingHTTPServer), documented in
docs/agent-api.md; its limits in docs/agent.md ("Limits").

Bodies are streamed both ways: a PUT goes from the socket to the volume chunk by chunk, a GET
from the volume's verified chunks to the socket. Every error answer is JSON ``{error,
message, ...}`` (``AgentError.to_wire()``) with the class's HTTP status: the status table is
the error tree in agents/errors.py, and nothing here picks a status by hand (the HTTP layer's
own refusals of a request line or header block keep its status, as ``bad_http``). Every answer
carries ``X-Rbdfleet-Epoch``, the epoch the agent knows.

The network is hostile (anyone may connect):
- The grant is checked before any body byte is read, on every route; JSON bodies are capped
  per route (:attr:`Route.json_limit`) and parsed with bounds (``Message.decode``).
- Framing is strict: ``Transfer-Encoding`` is refused (501) and the connection closed, one
  ``Content-Length`` of ASCII digits, none (or 0) on routes without a body; a body left unread
  closes the connection, so it is never parsed as the next request.
- Each connection has a deadline for its request line, headers and JSON body
  (``header_timeout``, enforced by the serving loop even against a client that trickles a
  byte at a time), an idle timeout between requests, a deadline for a PUT body (it must keep
  :data:`MIN_BODY_RATE` after ``body_timeout`` of grace) and ``body_timeout`` per read of it
  and per 4 MiB piece of a GET answer, and at most ``max_connections`` are served at once
  (503 ``too_busy`` beyond).
"""

from __future__ import annotations

import contextlib
import http
import http.server
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from agents.agent import Agent
from agents.committer import WRITE_UNIT
from agents.core import boundedjson
from agents.core.grants import DEMOTE, PROMOTE, PUSH, READERS, verify
from agents.core.index import Entry, check_payload, normalize_path
from agents.core.protocol import (
    CRC_HEADER,
    EPOCH_HEADER,
    INSECURE_HEADER,
    LIST_LIMIT,
    MAX_LIST_LIMIT,
    MAX_PUSH_RECORDS,
    PUSH_CONTENT_TYPE,
    SEQ_HEADER,
    DemoteRequest,
    EntryInfo,
    ErrorBody,
    HeaderMap,
    ListResponse,
    Message,
    MkdirRequest,
    PromoteRequest,
    PutRequest,
    ReaderSet,
    RecordPush,
    RenameRequest,
    WriteAck,
    bearer_token,
    header_int,
)
from agents.device import ALIGN
from agents.errors import (
    AgentError,
    BadHttp,
    BadPath,
    BadRequest,
    CatchingUp,
    ChecksumMismatch,
    DecodeError,
    DeviceError,
    FormatError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PeerCertificateRequired,
    RangeNotSatisfiable,
    TooBusy,
    TooLarge,
    UnsupportedTransferEncoding,
    WrongKind,
)
from agents.httpbase import BoundedHTTPServer, BoundedRequestHandler
from agents.tlsreload import ReloadingContext, TlsFiles, server_context

__all__ = ["AgentServer", "serve"]

LOG = logging.getLogger(__name__)

CHUNK = WRITE_UNIT  # bytes read from the socket per chunk of a PUT body: whole write units
# go to the device without being staged and copied again (Volume.put's fast path)
MAX_CONTROL_JSON = 64 << 10  # mkdir/rename (two 4 KiB paths even fully \u-escaped), control
# a push of MAX_PUSH_RECORDS records, each up to 4 pages (a put record of a file of about a
# thousand chunks), with its framing; the writer sends a bigger backlog as its commit seq
# alone, and a push refused here only makes the reader catch up from the journal
MAX_PUSH_BODY = MAX_PUSH_RECORDS * 4 * ALIGN + MAX_CONTROL_JSON
MAX_CONNECTIONS = 128  # served at once (one thread each); more are answered 503 too_busy
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to its headers (and JSON body)
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may wait for its next request
BODY_TIMEOUT = 30.0  # seconds of silence inside a PUT body, or to send a GET's 4 MiB piece
MIN_BODY_RATE = 256 << 10  # bytes/s a PUT body keeps on average (after BODY_TIMEOUT of grace)


M = TypeVar("M", bound=Message)


def _entry_info(entry: Entry) -> EntryInfo:
    return EntryInfo(path=entry.path, kind=entry.kind, size=entry.size, version=entry.version,
                     epoch=entry.epoch, mtime=entry.mtime, crc=entry.crc)


def _list_query(target: str) -> tuple[int, str | None]:
    """``limit`` (LIST_LIMIT when absent, at most MAX_LIST_LIMIT) and ``after`` of a list
    request's query; BadRequest for anything else, a repeated or malformed parameter."""
    query = target.split("#", 1)[0].partition("?")[2]
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict",
                                       max_num_fields=4)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed query: {exc}") from exc
    params = dict(pairs)
    unknown = set(params) - {"limit", "after"}
    if len(params) != len(pairs) or unknown:
        raise BadRequest("list takes each of limit and after at most once, nothing else",
                         unknown=sorted(unknown)[:4])
    limit = params.get("limit", str(LIST_LIMIT))
    if not re.fullmatch(r"[0-9]{1,9}", limit, re.ASCII) or int(limit) < 1:
        raise BadRequest("limit must be a positive integer", limit=limit[:20])
    return min(int(limit), MAX_LIST_LIMIT), params.get("after")


def _close(stream: Iterator[memoryview]) -> None:
    """Unpin a volume read stream (``Volume.read_views`` returns one with ``close()``)."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$", re.ASCII)


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


class Handler(BoundedRequestHandler):
    """One connection; requests are dispatched by :data:`ROUTES`."""

    server: AgentServer

    _unread = 0  # body bytes announced and not read yet: the connection closes if any remain
    _has_length = False
    _streaming = False

    # -- plumbing ------------------------------------------------------------------------

    @property
    def agent(self) -> Agent:
        return self.server.agent

    def _timeouts(self) -> tuple[float, float, float]:
        server = self.server
        return server.idle_timeout, server.body_timeout, server.header_timeout

    def _request_read(self) -> None:
        """The request (headers and any JSON body) is in: lift its deadline. OSError when
        the deadline had already cut the connection (what was read is not the request)."""
        if not self.server.deadlines.disarm(self.connection):
            raise ConnectionAbortedError("request not received within header_timeout")

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The HTTP layer's own refusals (bad request line, header block too large, unknown
        method): one JSON error like every other answer, and the connection closed."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a 0.9 answer would have no status line
            self.request_version = "HTTP/1.0"
        text = message or http.HTTPStatus(code).phrase
        self.log_error("code %d, message %s", code, text)
        with contextlib.suppress(OSError):
            self._send_answer(Answer(code, ErrorBody.from_error(BadHttp(text, status=code))))

    def _headers_map(self) -> HeaderMap:
        return HeaderMap(self.headers.items())

    def _bodyless_request(self) -> PutRequest:
        """The PUT-style headers (grant, readers) of a request that writes no file data."""
        return PutRequest.from_headers(HeaderMap([("Content-Length", "0"),
                                                  *self.headers.items()]))

    def _send_head(self, status: int, length: int, content_type: str,
                   extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header(EPOCH_HEADER, str(self.agent.state.epoch))
        if self.server.plaintext:  # every answer says so, /v1/health included
            self.send_header(INSECURE_HEADER, "plaintext")
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

    def _framing(self) -> None:
        """How the body is delimited: one Content-Length of ASCII digits, never a
        Transfer-Encoding (whose bytes would otherwise be read as the next request)."""
        self._unread, self._has_length, self._streaming = 0, False, False
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True
            raise UnsupportedTransferEncoding(
                "Transfer-Encoding is not accepted: send a Content-Length",
                field="Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            self.close_connection = True
            raise DecodeError("more than one Content-Length", field="Content-Length")
        if lengths:
            try:
                self._unread = header_int("Content-Length", lengths[0])
            except DecodeError:
                self.close_connection = True
                raise
            self._has_length = True

    def _message(self, message: type[M], limit: int, *,
                 max_depth: int = boundedjson.MAX_DEPTH) -> M:
        """Read and decode the JSON body (at most ``limit`` bytes, nested at most
        ``max_depth``), then lift the request's deadline."""
        return message.decode(self._whole_body(limit), max_depth=max_depth)

    def _whole_body(self, limit: int) -> bytes:
        """Read the whole body (at most ``limit`` bytes), then lift the request's deadline."""
        length = self._unread
        if not self._has_length:
            raise DecodeError("request needs a Content-Length", field="Content-Length")
        if length > limit:
            raise TooLarge(f"body of {length} bytes over this route's {limit}", limit=limit)
        self._ready_for_body()
        data = self.rfile.read(length)
        self._unread -= len(data)
        self._request_read()
        if len(data) != length:
            raise DecodeError(f"body ended after {len(data)} of {length} bytes")
        return data

    def _token(self) -> str:
        return bearer_token(self._headers_map())

    def _authenticate(self, purposes: Collection[str]) -> str:
        """The request's grant token, once signature (this node's key), expiry, fleet,
        audience (this node) and purpose check out: before the body is read. The agent checks
        the rest (epoch, subject, the body's own fields) after decoding."""
        self.server.check_node_peer(self.connection)
        token = self._token()
        settings = self.agent.settings
        verify(token, settings.keys, now=time.time(), fleet=settings.fleet,
               audience=settings.node, purposes=purposes, epoch=None)
        return token

    def _raw_path(self) -> str:
        """The request target's path (no query); only origin-form targets (``/...``)."""
        raw = self.path.split("?", 1)[0].split("#", 1)[0]
        if not raw.startswith("/"):
            raise BadPath("request target must be a path starting with '/'")
        return raw

    def _path_after(self, prefix: str) -> str:
        raw = self._raw_path()
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
            self._framing()
            route = _match(method, self._raw_path())
            route_name = route.name
            if self._unread and not (route.json_limit or route.streamed):
                raise DecodeError(f"{method} {route.path} takes no body",
                                  field="Content-Length")
            if not route.json_limit:
                self._request_read()  # a PUT body has its own per-read timeout
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
        if self._unread:
            self.close_connection = True  # the body is unread: never parse it as a request
        if self._streaming:
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
        request = PutRequest.from_headers(self._headers_map())
        writer = self.agent.writer_for(request.grant)
        if request.size > self.server.max_body:
            raise TooLarge(f"body of {request.size} bytes over the limit",
                           limit=self.server.max_body)
        ack = writer.put(path, self._body(request.size), request.size,
                         mtime=request.mtime if request.mtime is not None else time.time())
        self.agent.m_bytes_in.inc(amount=request.size)
        return Answer(201, ack)

    def _body(self, size: int) -> Iterator[bytes]:
        self._ready_for_body()
        # the whole body within body_timeout plus size at MIN_BODY_RATE: a per-read timeout
        # alone restarts with every byte, so a trickle would hold this thread for ever
        server = self.server
        server.deadlines.arm(self.connection,
                             time.monotonic() + server.body_timeout + size / MIN_BODY_RATE)
        try:
            remaining = size
            while remaining:
                data = self.rfile.read(min(CHUNK, remaining))
                if not data:
                    raise DecodeError(f"body ended after {size - remaining} of {size} bytes")
                remaining -= len(data)
                self._unread = remaining
                yield data
        finally:
            server.deadlines.disarm(self.connection)

    def get_file(self) -> None:
        path = self._path_after("/v1/files/")
        volume = self.agent.volume_for_read(self._token())
        for _ in range(8):  # retried only if an overwrite lands between stat and read
            entry = volume.stat(path)
            if entry.kind != "file":
                raise WrongKind(f"is a directory: {path}", path=path)
            span = parse_range(self.headers.get("Range"), entry.size)
            start, end = span if span is not None else (0, entry.size)
            stream = volume.read_views(path, start, end - start)
            if volume.stat(path).version == entry.version:
                break
            _close(stream)
        else:
            raise NotFound(f"{path} keeps changing; retry", path=path)
        try:
            self._stream(path, entry, stream, start, end, span is not None)
        finally:
            _close(stream)

    def _stream(self, path: str, entry: Entry, stream: Iterator[memoryview], start: int,
                end: int, partial: bool) -> None:
        # each view is valid until the next next() on ``stream`` (its buffer is then reused):
        # wfile.write (unbuffered: socket.sendall) has sent all of it before the loop asks
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
    def _chain(first: bytes | memoryview,
               rest: Iterator[memoryview]) -> Iterator[bytes | memoryview]:
        if first:
            yield first
        yield from rest

    def delete_file(self) -> Answer:
        path = self._path_after("/v1/files/")
        request = self._bodyless_request()
        ack = self.agent.writer_for(request.grant).delete(path)
        return Answer(200, ack)

    def mkdir(self) -> Answer:
        writer = self.agent.writer_for(self._token())
        body = self._message(MkdirRequest, MAX_CONTROL_JSON)
        return Answer(201, writer.mkdir(normalize_path(body.path), parents=body.parents))

    def rename(self) -> Answer:
        writer = self.agent.writer_for(self._token())
        body = self._message(RenameRequest, MAX_CONTROL_JSON)
        ack: WriteAck = writer.rename(normalize_path(body.src),
                                      normalize_path(body.dst))
        return Answer(200, ack)

    def list_dir(self) -> Answer:
        raw = self._raw_path()
        path = "/" if raw.rstrip("/") == "/v1/list" else self._path_after("/v1/list/")
        limit, after = _list_query(self.path)
        volume = self.agent.volume_for_read(self._token())
        applied = volume.applied_seq
        page, cursor = volume.list_page(path, after=after, limit=limit)
        entries = tuple(_entry_info(e) for e in page)
        return Answer(200, ListResponse(path=path, entries=entries, applied_seq=applied,
                                        next=cursor))

    def stat(self) -> Answer:
        path = self._path_after("/v1/stat/")
        volume = self.agent.volume_for_read(self._token())
        return Answer(200, _entry_info(volume.stat(path)))

    # -- replication, control, operations ------------------------------------------------

    def records(self) -> Answer:
        token = self._authenticate({PUSH})  # the agent checks it names the push's writer
        kind = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if kind != PUSH_CONTENT_TYPE:
            raise DecodeError(f"a record push is sent as {PUSH_CONTENT_TYPE}",
                              field="Content-Type")
        volume = self.agent.volume  # the push's records are sealed with its volume's key
        if volume is None:
            raise CatchingUp("agent is starting", applied=-1, target=-1)
        push = RecordPush.decode(self._whole_body(MAX_PUSH_BODY), volume.superblock.record_key)
        _check_push(push)
        return Answer(200, self.agent.receive_push(token, push))

    def promote(self) -> Answer:
        token = self._authenticate({PROMOTE})
        request = self._message(PromoteRequest, MAX_CONTROL_JSON)
        return Answer(200, self.agent.promote(token, request))

    def demote(self) -> Answer:
        token = self._authenticate({DEMOTE})
        request = self._message(DemoteRequest, MAX_CONTROL_JSON)
        return Answer(200, self.agent.demote(token, request))

    def readers(self) -> Answer:
        token = self._authenticate({READERS})
        request = self._message(ReaderSet, MAX_CONTROL_JSON)
        return Answer(200, self.agent.set_readers(token, request))

    def health(self) -> Answer:
        return Answer(200, self.agent.health())

    def metrics(self) -> Answer:
        return Answer(200, self.agent.metrics.render())


def _check_push(push: RecordPush) -> None:
    """Refuse (400) a push whose records do not decode to well-formed records in seq order
    (413 past MAX_PUSH_RECORDS): a reader applies only what a writer could have written
    (the grant was checked already)."""
    try:
        for pushed in push.records:
            check_payload(pushed.record)
    except FormatError as exc:
        raise DecodeError(f"record push: {exc.message}", field="records") from exc


@dataclass(frozen=True)
class Route:
    """``method`` on ``path`` (exact) or under ``path`` (when it ends with ``/``).

    ``json_limit``: the route reads a JSON body of at most this many bytes (0: no body);
    ``streamed``: the body is a PUT's data, bounded by the server's ``max_body``."""

    method: str
    path: str
    name: str
    handler: Callable[[Handler], Answer | None]
    json_limit: int = 0
    streamed: bool = False


ROUTES = (
    Route("PUT", "/v1/files/", "put", Handler.put_file, streamed=True),
    Route("GET", "/v1/files/", "get", Handler.get_file),
    Route("DELETE", "/v1/files/", "delete", Handler.delete_file),
    Route("POST", "/v1/mkdir", "mkdir", Handler.mkdir, MAX_CONTROL_JSON),
    Route("POST", "/v1/rename", "rename", Handler.rename, MAX_CONTROL_JSON),
    Route("GET", "/v1/list", "list", Handler.list_dir),
    Route("GET", "/v1/list/", "list", Handler.list_dir),
    Route("GET", "/v1/stat/", "stat", Handler.stat),
    Route("POST", "/v1/records", "records", Handler.records, MAX_PUSH_BODY),
    Route("POST", "/v1/promote", "promote", Handler.promote, MAX_CONTROL_JSON),
    Route("POST", "/v1/demote", "demote", Handler.demote, MAX_CONTROL_JSON),
    Route("POST", "/v1/readers", "readers", Handler.readers, MAX_CONTROL_JSON),
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


class AgentServer(BoundedHTTPServer):
    """The agent's HTTP server; TLS when given a cert and key. Limits: see the module."""

    allow_reuse_address = True
    what = "agent"
    log = LOG

    agent: Agent  # set by the daemon before serving: the advertised address needs the port

    def __init__(self, address: tuple[str, int], *, max_body: int,
                 tls: TlsFiles | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        """``tls``: this node's certificate and key, the fleet CA whose certificates the
        node-only routes require of their callers (mutual TLS) and its CRL, reloaded when they
        change (agents.tlsreload; OSError or ValueError here if they do not load). Without
        ``tls`` the server speaks plaintext and checks no peer (``insecure_plaintext``)."""
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        # client certificates are optional at the handshake: clients have none and data
        # routes stay grant-authenticated; a presented one must chain to the fleet CA and not
        # be revoked (else the handshake fails), and node-only routes require one
        self.tls_source = None if tls is None else ReloadingContext(tls, server_context)
        self.plaintext = tls is None
        super().__init__(address, Handler, tls=self.tls_source, max_connections=max_connections,
                         header_timeout=header_timeout)

    def check_node_peer(self, connection: Any) -> None:
        """Refuse (403) a node-only request whose connection presented no certificate of the
        fleet CA; plaintext (``insecure_plaintext``) has none to check."""
        if not self.plaintext and not connection.getpeercert():
            raise PeerCertificateRequired(
                "this route is for fleet nodes: connect with a certificate of the fleet CA")

    def refused(self, client_address: Any) -> None:
        self.agent.m_requests.inc("-", "refused", str(TooBusy.status))


def serve(server: AgentServer) -> None:
    """Serve until ``server.shutdown()`` is called (from another thread)."""
    server.serve_forever(poll_interval=0.2)
