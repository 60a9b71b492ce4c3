"""A hostile network against the coordinator's API: every attack gets a 4xx or a closed
connection, changes nothing, and a legitimate client is served throughout.

A real fleet (agents ``w``, ``r1``, ``r2`` on a file image, over TLS) reports to an
in-process coordinator on loopback (its lease in memory, held for the whole test) through a
TLS server of it; the attacks reach its plain HTTP server, so raw bytes reach its HTTP layer
(one test adds another TLS server of the same fleet).
Before and after each battery the stored and published maps (revision, epoch, writer, in-sync
readers), the service's pending steps, last error and held-out nodes, and no node dead, are
compared: nothing an attacker sends may change them. Limits are shortened (:data:`LIMITS`) so
deadlines are seen within seconds. ~40 s in all.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import select
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agents.core.grants import COORDINATOR, REPORT, Grant, body_digest, sign
from agents.core.protocol import Heartbeat, LaggingReaderReport
from orchestrator.coordinator.api import (
    MAX_BODY,
    MAX_REPORT_BODY,
    CoordinatorAPI,
    ServerLimits,
)
from orchestrator.core.clients import client_token
from orchestrator.core.reports import REPORT_TTL, TAKEOVER_SKEW
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore
from tests.coordinator_harness import (
    Coordinator,
    PidFencer,
    bootstrap_map,
    file_image,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import TEST_CLIENT, TEST_CLIENT_SECRET, AgentFleet, FleetFactory

pytestmark = pytest.mark.integration

LIMITS = ServerLimits(max_connections=64, header_timeout=2.0, idle_timeout=3.0,
                      send_timeout=5.0)
LEGIT_BOUND = 2.0  # seconds a legitimate request may take while the attacks run


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    closed: bool  # the server closed the connection after answering

    @property
    def error(self) -> str | None:
        return self.body.get("error")


def _read_answer(sock: socket.socket) -> Answer:
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer (got {received[:80]!r})")
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    length = int(fields["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "answer cut short"
        body += chunk
    assert fields["content-type"] == "application/json", body[:200]
    return Answer(int(lines[0].split()[1]), json.loads(body[:length]), _closed(sock, 1.0))


def _closed(sock: socket.socket, wait: float) -> bool:
    """Whether the peer closes within ``wait`` (EOF or reset)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@dataclass
class Hostile:
    fleet: AgentFleet
    coordinator: Coordinator
    store: MemoryStateStore
    host: str
    port: int
    tls_dir: Path
    extra: list[CoordinatorAPI] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.fleet.name

    def client_grant(self) -> str:
        return client_token(self.name, TEST_CLIENT, TEST_CLIENT_SECRET, time.time(), 30.0)

    def exchange(self, data: bytes, address: tuple[str, int] | None = None) -> Answer:
        with socket.create_connection(address or (self.host, self.port), timeout=10) as sock:
            sock.sendall(data)
            return _read_answer(sock)

    def post(self, path: str, body: bytes, grant: str | None,
             headers: dict[str, str] | None = None) -> Answer:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        if grant is not None:
            head += f"Authorization: Bearer {grant}\r\n"
        for key, value in (headers or {}).items():
            head += f"{key}: {value}\r\n"
        return self.exchange(head.encode() + b"\r\n" + body)

    def state(self) -> dict[str, Any]:
        """What no attack may change."""
        service = self.coordinator.service
        assert service is not None
        stored = self.store.load()
        published = service.require_active()
        status = service.status()
        assert stored is not None
        return {
            "stored": stored.to_json(),
            "published": published.to_json(),
            "epoch": published.epoch,
            "writer": published.writer,
            "in_sync": sorted(r.name for r in published.in_sync_readers()),
            "pending": status["pending"],
            "last_error": status["last_error"],
            "held_out": status["held_out"],
            "dead": sorted(n for n, v in status["liveness"].items() if v == "dead"),
        }

    def extra_api(self, limits: ServerLimits,
                  tls: ssl.SSLContext | None = None) -> tuple[str, int]:
        """The address of a second API server of the same fleet (its own limits, or TLS)."""
        api = CoordinatorAPI(self.coordinator.api.services, self.coordinator.api.clients,
                             time.time, limits)
        self.extra.append(api)
        return api.serve("127.0.0.1", 0, tls)

    def heartbeat(self, node: str, selftest: str = "ok", **fields: Any) -> bytes:
        """A heartbeat of ``node`` saying what its agent says (so it changes nothing, unless
        ``selftest`` says otherwise)."""
        health = self.fleet.health(node)
        message = Heartbeat(node=node, fleet=self.name, role=health["role"], epoch=1,
                            applied_seq=health["applied_seq"], safe_seq=health["safe_seq"],
                            selftest=selftest, address=self.fleet[node].address,
                            sent_at=time.time(), **fields)
        return message.encode()


@pytest.fixture
def hostile(fleet_factory: FleetFactory, tmp_path: Path) -> Iterator[Hostile]:
    api = CoordinatorAPI({}, {}, time.time, LIMITS)
    host, port = api.serve("127.0.0.1", 0)
    coordinator = Coordinator(api, f"http://{host}:{port}")
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"hx-{uuid.uuid4().hex[:8]}",
                          coordinator=coordinator.tls_sibling())
    store = MemoryStateStore(MemoryLeaseBoard(FakeClock()), fleet.name, "c1", 60.0)
    setup = Hostile(fleet, coordinator, store, host, port, tmp_path)
    try:
        wait_in_sync(start_service(coordinator, store, PidFencer(fleet), bootstrap_map(fleet)),
                     20)
        yield setup
    finally:
        for extra in setup.extra:
            extra.shutdown()
        coordinator.stop()


@contextlib.contextmanager
def legit_client(h: Hostile, address: tuple[str, int] | None = None,
                 tls: ssl.SSLContext | None = None) -> Iterator[list[tuple[str, int, float]]]:
    """A client asking for the map and for write and read targets in a loop, each on a
    keep-alive connection; yields its log (what, status, seconds), filled until the block
    ends."""
    log: list[tuple[str, int, float]] = []
    stop = threading.Event()
    host, port = address or (h.host, h.port)

    def connect() -> http.client.HTTPConnection:
        if tls is not None:
            return http.client.HTTPSConnection(host, port, timeout=10, context=tls)
        return http.client.HTTPConnection(host, port, timeout=10)

    def run() -> None:
        kept: http.client.HTTPConnection | None = None  # keep-alive between requests
        while not stop.is_set():
            for what, method, path in (
                    ("map", "GET", f"/v1/fleets/{h.name}/map"),
                    ("write", "POST", f"/v1/fleets/{h.name}/write"),
                    ("read", "POST", f"/v1/fleets/{h.name}/read")):
                conn = kept or connect()
                kept = conn
                body = b'{"path": "/a"}' if method == "POST" else None
                started = time.monotonic()
                try:
                    conn.request(method, path, body=body, headers={
                        "Authorization": f"Bearer {h.client_grant()}"})
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException):
                    status = 0
                if status != 200 or resp.will_close:
                    conn.close()
                    kept = None
                log.append((what, status, time.monotonic() - started))
            stop.wait(0.05)
        if kept is not None:
            kept.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield log
    finally:
        stop.set()
        thread.join(timeout=15)
    slow = [entry for entry in log if entry[1] != 200 or entry[2] > LEGIT_BOUND]
    assert len(log) >= 9 and not slow, f"{len(slow)} of {len(log)} legit requests: {slow[:5]}"


@contextlib.contextmanager
def slow_clients(address: tuple[str, int], count: int) -> Iterator[list[float]]:
    """``count`` connections trickling a request's headers a byte every 0.3 s (a per-read
    timeout never fires on them); yields how long each lasted before the server cut it."""
    lasted: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def trickle() -> None:
        started = time.monotonic()
        try:
            sock = socket.create_connection(address, timeout=2.0)
        except OSError:
            return
        with sock:
            for byte in b"POST /v1/heartbeat HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(0.3):
                    return
                try:
                    sock.sendall(bytes([byte]))
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable and sock.recv(1) == b"":
                        break
                except OSError:
                    break
            with lock:
                lasted.append(time.monotonic() - started)

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield lasted
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def _check(results: list[tuple[str, Answer, int, str, bool]]) -> None:
    """Each (what, answer, status, error, closed) answered as wanted, with a message."""
    wrong = [f"{what}: got {a.status} {a.error!r} closed={a.closed} ({a.body.get('message')!r}),"
             f" want {status} {error!r} closed={closed}"
             for what, a, status, error, closed in results
             if (a.status, a.error, a.closed) != (status, error, closed)
             or not a.body.get("message") or "Traceback" in a.body.get("message", "")]
    assert not wrong, "\n".join(wrong)


def test_malformed_requests_get_one_4xx_and_change_nothing_while_a_client_is_served(
    hostile: Hostile,
) -> None:
    h = hostile
    before = h.state()
    write = f"/v1/fleets/{h.name}/write"
    fleet = f"/v1/fleets/{h.name}"
    client = f"Authorization: Bearer {h.client_grant()}\r\n"
    hb = h.heartbeat("r1")
    odd_hb = hb.replace(b'"node":"r1"', b'"node":"\\ud800"')
    foreign = sign(Grant("not-this-fleet", COORDINATOR, REPORT, 1, time.time() + 60,
                         subject="r1", digest=body_digest(b"{}")), b"some key")
    big_int = b'{"v":1,"node":"r1","applied_seq":' + b"9" * 5000 + b"}"
    big_path = b'{"path":' + b"1" * 5000 + b"}"
    deep_token = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode() + ".bWFj"

    def unsigned(purpose: str, subject: str) -> str:
        """A token claiming ``subject`` (JSON-escaped: any code point), with a junk MAC."""
        claim = json.dumps({"v": 2, "fleet": h.name, "audience": "coordinator",
                            "purpose": purpose, "epoch": 1, "expires": time.time() + 60,
                            "subject": subject, "digest": ""}).encode()
        return base64.urlsafe_b64encode(claim).rstrip(b"=").decode() + ".bWFj"


    def req(head: str, body: bytes = b"") -> bytes:
        return f"{head}\r\nHost: x\r\n".encode() + body

    # (what, raw request, status, error, connection closed)
    cases: list[tuple[str, bytes, int, str, bool]] = [
        ("Content-Length superscript two", req(f"POST {write} HTTP/1.1",
         f"{client}Content-Length: \u00b2\r\n\r\n{{}}".encode()), 400, "decode_error", True),
        ("Content-Length of 5,000 digits", req(f"POST {write} HTTP/1.1",
         f"{client}Content-Length: {'9' * 5000}\r\n\r\n".encode()), 400, "decode_error", True),
        ("negative Content-Length", req(f"POST {write} HTTP/1.1",
         f"{client}Content-Length: -2\r\n\r\n{{}}".encode()), 400, "decode_error", True),
        ("two Content-Lengths", req(f"POST {write} HTTP/1.1",
         f"{client}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}".encode()),
         400, "decode_error", True),
        ("chunked", req(f"POST {write} HTTP/1.1", f"{client}Transfer-Encoding: chunked\r\n\r\n"
         "2\r\n{}\r\n0\r\n\r\nGET /v1/health HTTP/1.1\r\n\r\n".encode()),
         411, "length_required", True),
        ("chunked and a length", req(f"POST {write} HTTP/1.1", f"{client}Content-Length: 2\r\n"
         "Transfer-Encoding: chunked\r\n\r\n{}".encode()), 411, "length_required", True),
        ("client body over the cap, unread", req(f"POST {write} HTTP/1.1",
         f"{client}Content-Length: {MAX_BODY + 1}\r\n\r\n{{".encode()), 413, "too_large", True),
        ("100k-deep JSON, unread", req(f"POST {write} HTTP/1.1",
         f"{client}Content-Length: 200000\r\n\r\n[[[[".encode()), 413, "too_large", True),
        ("report over the cap, unread", req("POST /v1/heartbeat HTTP/1.1",
         f"Authorization: Bearer {h.fleet.report_grant('r1', b'[[[[')}\r\n"
         f"Content-Length: {MAX_REPORT_BODY + 1}\r\n\r\n[[[[".encode()),
         413, "too_large", True),
        ("a body on a GET", req(f"GET {fleet}/map HTTP/1.1", b"Content-Length: 2\r\n\r\n{}"),
         400, "decode_error", True),
        ("no credential, a GiB announced", req(f"POST {write} HTTP/1.1",
         f"Content-Length: {1 << 30}\r\n\r\n{{".encode()), 401, "bad_signature", True),
        ("no report grant, a GiB announced", req("POST /v1/heartbeat HTTP/1.1",
         f"Content-Length: {1 << 30}\r\n\r\n{{".encode()), 401, "bad_signature", True),
        ("report grant of another fleet", req("POST /v1/selftest HTTP/1.1",
         f"Authorization: Bearer {foreign}\r\nContent-Length: 2\r\n\r\n{{}}".encode()),
         403, "foreign_grant", True),
        ("a client credential as a report grant", req("POST /v1/selftest HTTP/1.1",
         f"Authorization: Bearer {h.client_grant()}\r\nContent-Length: 2\r\n\r\n{{}}"
         .encode()), 403, "foreign_grant", True),
        ("a token nested 3,000 deep", req(f"POST {write} HTTP/1.1",
         f"Authorization: Bearer {deep_token}\r\nContent-Length: 2\r\n\r\n{{}}".encode()),
         401, "bad_signature", True),
        ("a report token nested 3,000 deep", req("POST /v1/heartbeat HTTP/1.1",
         f"Authorization: Bearer {deep_token}\r\nContent-Length: 2\r\n\r\n{{}}".encode()),
         401, "bad_signature", True),
        ("a report token naming a lone surrogate", req("POST /v1/selftest HTTP/1.1",
         f"Authorization: Bearer {unsigned('report', chr(0xD800))}\r\nContent-Length: 2\r\n"
         "\r\n{}".encode()), 401, "bad_signature", True),
        ("a client token naming a lone surrogate", req(f"POST {write} HTTP/1.1",
         f"Authorization: Bearer {unsigned('client', chr(0xD800))}\r\nContent-Length: 2\r\n"
         "\r\n{}".encode()), 401, "bad_signature", True),
        ("a heartbeat about a lone surrogate", req("POST /v1/heartbeat HTTP/1.1",
         f"Authorization: Bearer {h.fleet.report_grant('r1', odd_hb)}\r\n"
         f"Content-Length: {len(odd_hb)}\r\n\r\n".encode() + odd_hb),
         400, "decode_error", False),
        ("10k-deep JSON", req(f"POST {write} HTTP/1.1", f"{client}Content-Length: 20000\r\n\r\n"
         .encode() + b"[" * 10_000 + b"]" * 10_000), 400, "decode_error", False),
        ("5,000-digit integer", req(f"POST {write} HTTP/1.1", f"{client}Content-Length: "
         f"{len(big_path)}\r\n\r\n".encode() + big_path), 400, "decode_error", False),
        ("infinite number", req(f"POST {fleet}/failover HTTP/1.1",
         f"{client}Content-Length: 12\r\n\r\n".encode() + b'{"to":1e999}'),
         400, "decode_error", False),
        ("NaN", req(f"POST {fleet}/fence HTTP/1.1",
         f"{client}Content-Length: 12\r\n\r\n".encode() + b'{"node":NaN}'),
         400, "decode_error", False),
        ("not UTF-8", req(f"POST {fleet}/read HTTP/1.1",
         f"{client}Content-Length: 2\r\n\r\n".encode() + b"\xff\xfe"), 400, "decode_error", False),
        ("report with a 5,000-digit seq", req("POST /v1/heartbeat HTTP/1.1",
         f"Authorization: Bearer {h.fleet.report_grant('r1', big_int)}\r\n"
         f"Content-Length: {len(big_int)}\r\n\r\n".encode() + big_int),
         400, "decode_error", False),
        ("100-continue without a grant", req(f"POST {write} HTTP/1.1",
         b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n"), 401, "bad_signature", True),
        ("too many query fields", req(f"GET {fleet}/map?" + "&".join(
         f"a{i}=1" for i in range(50)) + " HTTP/1.1", b"\r\n"), 400, "decode_error", False),
        ("5,000-digit after", req(f"GET {fleet}/map?after={'7' * 5000} HTTP/1.1", b"\r\n"),
         400, "decode_error", False),
        ("HTTP/2.0 request line", req(f"GET {fleet}/map HTTP/2.0", b"\r\n"),
         400, "bad_request", True),
        ("header block too large", req(f"GET {fleet}/map HTTP/1.1", b"".join(
         b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n"), 431, "bad_request", True),
    ]
    with legit_client(h), slow_clients((h.host, h.port), 16) as lasted:
        results = []
        for what, data, status, error, closed in cases:
            with socket.create_connection((h.host, h.port), timeout=10) as sock:
                sock.sendall(data)
                # a 413/401 comes before the announced body; half-close nothing: the server
                # must answer without waiting for bytes that never come
                results.append((what, _read_answer(sock), status, error, closed))
        _check(results)
        # a body that ends early (the client half-closes) is refused; one that stalls is cut
        # at the request's deadline, unanswered
        with socket.create_connection((h.host, h.port), timeout=10) as sock:
            sock.sendall(req(f"POST {write} HTTP/1.1", f"{client}Content-Length: 20\r\n\r\n{{}}"
                             .encode()))
            sock.shutdown(socket.SHUT_WR)
            _check([("body cut short", _read_answer(sock), 400, "decode_error", True)])
        with socket.create_connection((h.host, h.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(req(f"POST {write} HTTP/1.1", f"{client}Content-Length: 20\r\n\r\n{{}}"
                             .encode()))
            assert sock.recv(1) == b""
            assert time.monotonic() - started < LIMITS.header_timeout + 2.0
        # header names in any case, the credential as well
        answer = h.exchange(req(f"POST {write} HTTP/1.1",
                                f"aUTHORIZATION: Bearer {h.client_grant()}\r\ncontent-length: "
                                f"14\r\n\r\n".encode() + b'{"path": "/a"}'))
        assert answer.status == 200 and answer.body["epoch"] == before["epoch"], answer
        answer = h.post("/v1/heartbeat", hb, h.fleet.report_grant("r1", hb),
                        headers={"X-Ignored": "1"})
        assert answer.status == 200, answer
        wait_until(lambda: len(lasted) == 16, LIMITS.header_timeout + 10, "slow clients cut")
    # every trickle was cut at its header deadline, none lasted until its 10 KB were sent
    assert max(lasted) < LIMITS.header_timeout + 2.0, lasted
    time.sleep(1.0)  # anything a wrongly accepted request queued has run by now
    assert h.state() == before


def test_a_replayed_report_is_refused_and_changes_nothing(hostile: Hostile) -> None:
    """A report captured on the wire (its body and grant) works once: sent again it is 409
    ``replayed_report``. A lagging report's replay would take a reader that caught up out of
    the in-sync set again; a writer's heartbeat's replay would get fresh push grants."""
    h = hostile
    service = h.coordinator.service
    assert service is not None
    sync_revision = int(h.fleet.health("w")["sync_revision"])
    lagging = LaggingReaderReport(fleet=h.name, writer="w", epoch=1, reader="r2",
                                  address=h.fleet["r2"].address, applied_seq=0, target_seq=1,
                                  reason="captured", sync_revision=sync_revision).encode()
    grant = h.fleet.report_grant("w", lagging)
    revision = service.require_active().revision
    first = h.post("/v1/lagging", lagging, grant)
    assert first.status == 200, first
    assert first.body["revision"] > revision  # it took r2 out: the original counted
    # the writer's next heartbeat (r2 still in its in-sync set) puts r2 back in the map
    wait_in_sync(service, 10)
    w_heartbeat = h.heartbeat("w", in_sync=("r1", "r2"), sync_revision=sync_revision)
    w_grant = h.fleet.report_grant("w", w_heartbeat)
    answer = h.post("/v1/heartbeat", w_heartbeat, w_grant)
    assert answer.status == 200 and answer.body["push_grants"], answer
    with legit_client(h):
        before = h.state()
        for _ in range(3):
            replay = h.post("/v1/lagging", lagging, grant)
            assert (replay.status, replay.error) == (409, "replayed_report"), replay
            assert replay.body["node"] == "w" and "push_grants" not in replay.body
            replay = h.post("/v1/heartbeat", w_heartbeat, w_grant)
            assert (replay.status, replay.error) == (409, "replayed_report"), replay
            assert "push_grants" not in replay.body
            time.sleep(0.3)
        time.sleep(1.0)
        assert h.state() == before
    # a new report (signed again, as an agent does) is news as usual
    fresh = h.post("/v1/lagging", lagging, h.fleet.report_grant("w", lagging))
    assert fresh.status == 200 and fresh.body["revision"] > before["published"]["revision"]


def test_a_report_delivered_late_is_refused_and_changes_nothing(hostile: Hostile) -> None:
    """A heartbeat a network cut held back arrives after newer ones of its agent: it is 409
    ``stale_report`` and rolls nothing back. (Seen on the sandbox VMs: a demoted writer back in
    sync was confirmed dead again by its heartbeat from the cut, which still said its self-test
    had failed on its fenced disk.) The same heartbeat signed now is news as usual."""
    h = hostile
    service = h.coordinator.service
    assert service is not None and service.active_since is not None
    # signed after this term began watching (or it would be refused as unknown, not as late)
    signed = service.active_since + TAKEOVER_SKEW + 0.5
    time.sleep(max(0.0, signed - time.time()) + 1.5)  # r1's agent reports after `signed`
    wait_in_sync(service, 10)
    late = h.heartbeat("r1", selftest="failed")
    with legit_client(h):
        before = h.state()
        for _ in range(3):
            ttl = REPORT_TTL - (time.time() - signed)
            answer = h.post("/v1/heartbeat", late, h.fleet.report_grant("r1", late, ttl=ttl))
            assert (answer.status, answer.error) == (409, "stale_report"), answer
            assert answer.body["node"] == "r1"
            time.sleep(0.3)
        time.sleep(1.0)
        assert h.state() == before
    fresh = h.post("/v1/heartbeat", late, h.fleet.report_grant("r1", late))
    assert fresh.status == 200, fresh
    # the node goes out of the map (its agent, healthy, is let back in after)
    wait_until(lambda: h.state()["published"]["revision"] > before["published"]["revision"],
               10, "r1 taken out for its fresh failed self-test")


def test_connections_beyond_the_cap_are_refused_unread_and_idle_ones_closed(
    hostile: Hostile,
) -> None:
    """With every slot of a (second, small) API server held by idle connections, the next
    one is answered 503 too_busy at once; idle ones are closed after ``idle_timeout`` and the
    server serves again. The main server's client is served throughout."""
    h = hostile
    before = h.state()
    small = ServerLimits(max_connections=8, header_timeout=2.0, idle_timeout=3.0)
    address = h.extra_api(small)
    with legit_client(h):
        held = [socket.create_connection(address, timeout=10)
                for _ in range(small.max_connections)]
        try:
            time.sleep(0.5)  # every one accepted and given its thread
            started = time.monotonic()
            refused = h.exchange(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", address)
            assert time.monotonic() - started < 1.0
            assert (refused.status, refused.error, refused.closed) == (503, "too_busy", True)
            assert refused.body["limit"] == small.max_connections
            started = time.monotonic()
            assert all(_closed(sock, small.idle_timeout + 3.0) for sock in held)
            assert time.monotonic() - started < small.idle_timeout + 3.0
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: h.exchange(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
                                      address).status == 200, 5, "slots freed")
    assert h.state() == before


def _tls_context(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts over a throwaway self-signed certificate for 127.0.0.1."""
    cert, key = directory / "coordinator.pem", directory / "coordinator.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_tls_clients_that_never_handshake_block_nobody(hostile: Hostile) -> None:
    """Connections that open TCP and never start TLS each wait in their own thread, cut at
    ``header_timeout``; meanwhile a TLS client is served as usual."""
    h = hostile
    before = h.state()
    server, client = _tls_context(h.tls_dir)
    address = h.extra_api(LIMITS, tls=server)
    silent = [socket.create_connection(address, timeout=10) for _ in range(10)]
    try:
        started = time.monotonic()
        with legit_client(h, address, tls=client):
            time.sleep(2.0)
        assert all(_closed(sock, LIMITS.header_timeout + 3.0) for sock in silent)
        assert time.monotonic() - started < LIMITS.header_timeout + 8.0
    finally:
        for sock in silent:
            sock.close()
    assert h.state() == before
