"""An attacker on the network against real agent processes (raw sockets, file image).

What it proves: every malformed request gets one 4xx (501 for a Transfer-Encoding) with one
JSON error, never a 500, and changes nothing (journal seq, files); the grant is checked before
a body is read; a chunked body is never read as the next request; slow or idle connections
cannot stall the agent (the header deadline cuts a client that trickles a byte a second, a
health probe answers while 50 of them are open, and connections beyond the cap are refused
503 at once); a PUT that trickles in does not hold the space it announced. The deadlines that
take a minute at the default limits (a PUT body kept under its minimum rate, an idle
keep-alive connection) are shown on an agent served in the test's own process with 1 s
limits.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

import pytest

from agents.agent import Agent, AgentSettings
from agents.backends.file import FileDevice
from agents.core.grants import WRITE, Grant, agent_key, sign
from agents.core.protocol import PUSH_CONTENT_TYPE, PushFrame, RecordPush
from agents.core.record import Record
from agents.core.superblock import SLOTS, choose
from agents.server import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONTROL_JSON,
    MIN_BODY_RATE,
    AgentServer,
    serve,
)
from agents.volume import Volume
from tests.fixtures.agents import TEST_SECRET, AgentFleet, FleetFactory

pytestmark = pytest.mark.integration

MiB = 1 << 20


@dataclass
class Raw:
    """One answer read off a raw socket, and whether the agent closed the connection after."""

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool

    def json(self) -> Any:
        return json.loads(self.body)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _read_answer(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before an answer: {bytes(buf)[:200]!r}")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    buf[:] = body[length:]
    return status, headers, bytes(body[:length])


def _closed(sock: socket.socket, buf: bytearray, wait: float = 5.0) -> bool:
    """True when the agent closed the connection (EOF) and sent nothing more."""
    sock.settimeout(wait)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return False
    except ConnectionResetError:  # closed with bytes of ours unread (a refused long line)
        return True
    buf += data
    return not data


def exchange(address: str, request: bytes, *, timeout: float = 10.0) -> Raw:
    """Send ``request`` (raw bytes) on a fresh connection; the first answer."""
    with socket.create_connection(_split(address), timeout=timeout) as sock:
        sock.sendall(request)
        buf = bytearray()
        status, headers, body = _read_answer(sock, buf)
        closed = headers.get("connection", "").lower() == "close" and _closed(sock, buf)
        assert not buf, f"more bytes after the answer: {bytes(buf)[:200]!r}"
        return Raw(status, headers, body, closed)


def http(method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes = b"", *, length: bool = True) -> bytes:
    """A request's bytes; ``Content-Length`` added for a body unless ``length`` is False."""
    lines = [f"{method} {path} HTTP/1.1", "Host: agent"]
    all_headers = dict(headers or {})
    if body and length and not any(k.lower() == "content-length" for k in all_headers):
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def _bearer(grant: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + grant}


def _state(fleet: AgentFleet) -> tuple[int, list[str]]:
    """The writer's seq and every path under / (what a hostile request must not change)."""
    wg = fleet.grant("w", "writer", 1)
    paths: list[str] = []
    todo = ["/"]
    while todo:
        here = todo.pop()
        listing = fleet.client.call(fleet["w"].address, "GET",
                                    "/v1/list" + ("" if here == "/" else here), wg).json()
        for entry in listing["entries"]:
            paths.append(entry["path"])
            if entry["kind"] == "dir":
                todo.append(entry["path"])
    return fleet.health("w")["applied_seq"], sorted(paths)


@pytest.fixture
def fleet(fleet_factory: FleetFactory, tmp_path: Path) -> AgentFleet:
    """A writer ``w`` and a reader ``r1`` on a 64 MiB file image, in plaintext on purpose:
    these tests write raw bytes at the HTTP parser (TLS is covered in test_tls.py)."""
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    return fleet_factory(f"file:{image}", readers=("r1",), insecure_plaintext=True)


def test_malformed_requests_get_one_4xx_and_change_nothing(fleet: AgentFleet) -> None:
    w = fleet["w"].address
    wg, cg = fleet.grant("w", "writer", 1), fleet.grant("w", "promote", 2)
    pg = fleet.grant("w", "push", 1, subject="w")  # routes past the grant to the decoders
    c = fleet.client
    assert c.put(w, "/ok", b"fine", wg).status == 201
    # a directory whose deepest path is near the 4096-byte limit, for the rename case
    deep = "/top" + "".join("/" + chr(ord("a") + i) * 250 for i in range(16))  # 4020 bytes
    assert c.call(w, "POST", "/v1/mkdir", wg, {"path": deep, "parents": True}).status == 201
    before = _state(fleet)
    put = {**_bearer(wg), "X-Rbdfleet-Version": "1"}
    deep_json = b'{"v":1,"path":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge_int = (b'{"v":1,"fleet":"test","node":"w","epoch":' + b"9" * 5000 + b"}")
    assert 60_000 <= MAX_CONTROL_JSON < len(deep_json)  # one case in the cap, one past it
    push = RecordPush(fleet="test", epoch=1, writer="w", commit_seq=9,
                      frames=(PushFrame(0, b"not a journal record"),))
    forged = Record(9, 1, "put", {"path": ["no"], "size": 1, "mtime": 1.0, "crc": 0,
                                  "data": b"x"})
    with open(fleet.backend.removeprefix("file:"), "rb") as image:
        head = image.read(2 * 4096)
    # sealed with the volume's key, as only a writer could: its payload is what is refused
    key = choose([head[s : s + 4096] for s in SLOTS]).record_key
    push_forged = RecordPush(fleet="test", epoch=1, writer="w", commit_seq=9,
                             frames=(PushFrame(0, forged.encode(key)),))
    pushing = {**_bearer(pg), "Content-Type": PUSH_CONTENT_TYPE}
    cases: list[tuple[str, bytes, int, str]] = [
        ("Content-Length: ²", http("PUT", "/v1/files/f", {**put, "Content-Length": "²"},
                                   b"xx", length=False), 400, "decode_error"),
        ("5000-digit length", http("PUT", "/v1/files/f", {**put, "Content-Length": "9" * 5000},
                                   b"xx", length=False), 400, "decode_error"),
        ("two lengths", http("PUT", "/v1/files/f",
                             {**put, "Content-Length": "2", "content-length": "3"}, b"xx",
                             length=False), 400, "decode_error"),
        ("version ²", http("PUT", "/v1/files/f", {**put, "X-Rbdfleet-Version": "²"}, b"xx"),
         400, "decode_error"),
        ("mtime nan", http("PUT", "/v1/files/f", {**put, "X-Rbdfleet-Mtime": "nan"}, b"xx"),
         400, "decode_error"),
        ("mtime inf", http("PUT", "/v1/files/f", {**put, "X-Rbdfleet-Mtime": "inf"}, b"xx"),
         400, "decode_error"),
        ("chunked PUT", http("PUT", "/v1/files/f", {**put, "Transfer-Encoding": "chunked"},
                             b"2\r\nxx\r\n0\r\n\r\n", length=False),
         501, "unsupported_transfer_encoding"),
        ("gzip TE on a 404", http("POST", "/v1/nothing", {"Transfer-Encoding": "gzip"}),
         501, "unsupported_transfer_encoding"),
        ("100k-deep JSON", http("POST", "/v1/mkdir", _bearer(wg), deep_json), 413,
         "too_large"),
        ("deep JSON in the cap", http("POST", "/v1/mkdir", _bearer(wg),
                                      b"[" * 30_000 + b"]" * 30_000), 400, "decode_error"),
        ("5000-digit integer", http("POST", "/v1/promote", _bearer(cg), huge_int), 400,
         "decode_error"),
        ("NaN in JSON", http("POST", "/v1/mkdir", _bearer(wg),
                             b'{"v":1,"path":"/n","parents":NaN}'), 400, "decode_error"),
        ("lone surrogate", http("POST", "/v1/mkdir", _bearer(wg),
                                b'{"v":1,"path":"/\\ud800"}'), 400, "decode_error"),
        ("control char in mkdir", http("POST", "/v1/mkdir", _bearer(wg),
                                       b'{"v":1,"path":"/bell\\u0007"}'), 400, "bad_path"),
        ("newline in a PUT path", http("PUT", "/v1/files/new%0Aline", put, b"xx"), 400,
         "bad_path"),
        ("C1 char in a PUT path", http("PUT", "/v1/files/c1%C2%85", put, b"xx"), 400,
         "bad_path"),
        ("rename past 4096 bytes", http("POST", "/v1/rename", _bearer(wg), json.dumps(
            {"v": 1, "src": "/top", "dst": "/" + "y" * 255}).encode()),
         400, "bad_path"),
        ("rename dst too long", http("POST", "/v1/rename", _bearer(wg), json.dumps(
            {"v": 1, "src": "/ok", "dst": "/x" * 2100}).encode()), 400, "bad_path"),
        ("JSON over the cap", http("POST", "/v1/mkdir", {**_bearer(wg),
                                                         "Content-Length": str(MiB)}),
         413, "too_large"),
        ("push of garbage", http("POST", "/v1/records", pushing, push.encode()), 400,
         "decode_error"),
        ("push as JSON", http("POST", "/v1/records", _bearer(pg),
                              b'{"v":1,"records":[{},{}]}'), 400, "decode_error"),
        ("push past its cap", http("POST", "/v1/records", {**pushing,
                                                           "Content-Length": str(8 * MiB)}),
         413, "too_large"),
        ("push of a forged record", http("POST", "/v1/records", pushing,
                                         push_forged.encode()), 400, "decode_error"),
        ("range of 5000 digits", http("GET", "/v1/files/ok", {
            **_bearer(wg), "Range": "bytes=0-" + "9" * 5000}), 416, "range_not_satisfiable"),
        ("GET with a body", http("GET", "/v1/health", {}, b"GET /v1/health HTTP/1.1\r\n\r\n"),
         400, "decode_error"),
        ("absolute-form target", http("GET", "http://agent/v1/health"), 400, "bad_path"),
        ("garbage request line", b"\x16\x03\x01 hello\r\n\r\n", 400, "bad_http"),
        ("HTTP/0.9 request", b"GET /v1/health\r\n\r\n", 400, "bad_http"),
        ("request line of 70 KB", http("GET", "/v1/stat/" + "a" * 70_000), 414, "bad_http"),
        ("101 headers", http("GET", "/v1/health", {f"X-{i}": "y" for i in range(101)}), 431,
         "bad_http"),
        ("header line of 70 KB", http("GET", "/v1/health", {"X-Big": "y" * 70_000}), 431,
         "bad_http"),
        ("unknown method", http("BREW", "/v1/health"), 501, "bad_http"),
        ("non-ASCII grant", http("GET", "/v1/stat/ok", {"Authorization": "Bearer ²²"}), 401,
         "bad_signature"),
    ]
    for name, request, status, error in cases:
        try:
            answer = exchange(w, request)
        except OSError as exc:
            raise AssertionError(f"{name}: no answer ({exc!r})") from exc
        assert (answer.status, answer.json()["error"]) == (status, error), (name, answer)
        assert answer.headers["content-type"] == "application/json", name
        assert "Traceback" not in answer.body.decode("utf-8", "replace"), name
    assert _state(fleet) == before
    assert fleet["w"].alive and fleet["r1"].alive
    assert "event=internal_error" not in fleet["w"].log.read_text()


def test_grant_is_checked_before_any_body_byte(fleet: AgentFleet) -> None:
    """Headers announcing a 16 MiB body, and no body: a refusal comes back at once (the
    agent did not wait for, nor read, the body) and the connection is closed."""
    w, r1 = fleet["w"].address, fleet["r1"].address
    announced = {"Content-Length": str(16 * MiB)}
    rogue = fleet.grant("w", "writer", 1, secret=b"not the fleet secret")
    cases = [
        (w, "/v1/mkdir", {}, 401),
        (w, "/v1/rename", _bearer(rogue), 401),
        (w, "/v1/promote", _bearer(fleet.grant("w", "writer", 2)), 403),  # not promote
        (w, "/v1/demote", _bearer(fleet.grant("r1", "demote", 2)), 403),  # other node
        (w, "/v1/readers", _bearer(fleet.grant("w", "readers", 1, ttl=-5)), 401),
        (r1, "/v1/records", _bearer(fleet.grant("w", "reader", 1)), 403),  # other node
        (r1, "/v1/records", _bearer(fleet.grant("r1", "reader", 1)), 403),  # not push
        (r1, "/v1/records", {}, 401),
        (w, "/v1/mkdir", _bearer(fleet.grant("w", "writer", 1)), 413),  # then the size cap
    ]
    for address, path, headers, status in cases:
        started = time.monotonic()
        answer = exchange(address, http("POST", path, {**headers, **announced}))
        assert answer.status == status, (path, answer)
        assert answer.closed, path  # the unread body is never parsed as a request
        assert time.monotonic() - started < 5.0, path


def test_100_continue_only_once_the_request_is_allowed(fleet: AgentFleet) -> None:
    """``Expect: 100-continue`` gets its 100 only after the grant and size checks: a
    refused client is never invited to send its body."""
    w = fleet["w"].address
    body = json.dumps({"v": 1, "path": "/invited"}).encode()
    expect = {"Expect": "100-continue", "Content-Length": str(len(body))}
    refused = exchange(w, http("POST", "/v1/mkdir", expect))
    assert refused.status == 401 and refused.closed
    with socket.create_connection(_split(w), timeout=10.0) as sock:
        sock.sendall(http("POST", "/v1/mkdir",
                          {**expect, **_bearer(fleet.grant("w", "writer", 1))}))
        buf = bytearray()
        assert _read_answer(sock, buf)[0] == 100
        sock.sendall(body)
        status, _, answer = _read_answer(sock, buf)
        assert status == 201, answer
    assert "/invited" in _state(fleet)[1]


def test_chunked_body_is_never_read_as_the_next_request(fleet: AgentFleet) -> None:
    """The bytes after a refused Transfer-Encoding request (here: a request smuggled in the
    chunk data) get no answer: the connection is closed."""
    smuggled = http("POST", "/v1/mkdir", _bearer(fleet.grant("w", "writer", 1)),
                    b'{"v":1,"path":"/smuggled"}')
    chunk = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    before = _state(fleet)
    for te in ("chunked", "Chunked", "gzip, chunked"):
        request = http("POST", "/v1/health", {"Transfer-Encoding": te}, chunk, length=False)
        answer = exchange(fleet["w"].address, request)
        assert answer.status == 501 and answer.closed, te
    assert _state(fleet) == before


def test_header_names_are_case_insensitive_and_names_nfc(fleet: AgentFleet) -> None:
    w = fleet["w"].address
    grant = fleet.grant("w", "writer", 1)
    request = http("PUT", "/v1/files/cafe%CC%81", {"authorization": "Bearer " + grant,
                                                   "content-length": "4",
                                                   "x-rbdfleet-mtime": "12.5"}, b"data",
                   length=False)
    answer = exchange(w, request)
    assert answer.status == 201, answer
    assert answer.json()["path"] == "/caf\u00e9"  # decomposed é stored composed
    stat = exchange(w, http("GET", "/v1/stat/caf%C3%A9", {"AUTHORIZATION": "Bearer " + grant}))
    assert stat.status == 200 and stat.json()["mtime"] == 12.5


@contextmanager
def _slow_clients(address: str, count: int, stop: threading.Event) -> Iterator[list[float]]:
    """``count`` connections trickling a request's headers one byte a second (a per-read
    timeout never fires on them); yields, per connection, when the agent closed it."""
    closed_at: list[float] = []
    lock = threading.Lock()

    def trickle() -> None:
        try:
            sock = socket.create_connection(_split(address), timeout=2.0)
        except OSError:
            return
        payload = b"GET /v1/health HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        try:
            for byte in payload:
                if stop.is_set():
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                readable, _, _ = select.select([sock], [], [], 0)
                try:
                    if readable and sock.recv(1) == b"":
                        break
                except OSError:
                    break
                stop.wait(1.0)
            with lock:
                closed_at.append(time.monotonic())
        finally:
            sock.close()

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    try:
        yield closed_at
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)


def test_slow_clients_cannot_stall_the_agent(fleet: AgentFleet) -> None:
    """50 connections trickling headers a byte a second: health answers within its timeout
    throughout, and the agent cuts every one of them at the header deadline."""
    w = fleet["w"].address
    stop = threading.Event()
    started = time.monotonic()
    with _slow_clients(w, 50, stop) as closed_at:
        time.sleep(2.0)
        for _ in range(3):
            probe = time.monotonic()
            answer = exchange(w, http("GET", "/v1/health"), timeout=2.0)
            assert answer.status == 200 and time.monotonic() - probe < 2.0
            time.sleep(1.0)
        deadline = started + HEADER_TIMEOUT + 15.0
        while len(closed_at) < 50 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(closed_at) == 50, f"only {len(closed_at)} slow clients were cut"
        assert max(closed_at) - started < HEADER_TIMEOUT + 10.0
    assert exchange(w, http("GET", "/v1/health"), timeout=2.0).status == 200


def test_connections_beyond_the_cap_are_refused_at_once(fleet: AgentFleet) -> None:
    """MAX_CONNECTIONS idle connections hold every slot: the next one is answered 503
    too_busy without waiting, and once they go the agent serves again."""
    w = fleet["w"].address
    held = [socket.create_connection(_split(w), timeout=5.0) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(1.0)  # every one accepted and given its thread
        started = time.monotonic()
        answer = exchange(w, b"", timeout=5.0)
        assert answer.status == 503 and answer.json()["error"] == "too_busy"
        assert answer.json()["limit"] == MAX_CONNECTIONS and answer.closed
        assert time.monotonic() - started < 2.0
    finally:
        for sock in held:
            sock.close()
    fleet.wait_for(lambda: exchange(w, http("GET", "/v1/health")).status == 200, 15,
                   "slots freed")


def test_a_trickled_put_holds_only_what_it_sent(fleet: AgentFleet) -> None:
    """A PUT announcing 40 MiB that sends 5 MiB and stalls holds the space of what it sent,
    not the 40 MiB: a 20 MiB PUT next to it succeeds (the data area is under 60 MiB; it was
    507 when the announced size was reserved up front), and when the stalled one is cut its
    space comes back."""
    w = fleet["w"].address
    grant = fleet.grant("w", "writer", 1)
    headers = {**_bearer(grant), "Content-Length": str(40 * MiB)}
    with socket.create_connection(_split(w), timeout=30.0) as stalled:
        stalled.sendall(http("PUT", "/v1/files/stalled", headers))
        stalled.sendall(b"s" * (5 * MiB))
        time.sleep(1.0)
        answer = fleet.client.put(w, "/other", b"o" * (20 * MiB), grant)
        assert answer.status == 201, answer.body

    def third_fits() -> bool:  # needs the stalled PUT's 4 MiB back (39 MiB free then)
        try:
            return fleet.client.put(w, "/third", b"t" * (36 * MiB), grant).status == 201
        except (OSError, HTTPException):  # refused 507 before its body was sent
            return False

    fleet.wait_for(third_fits, 30, "the stalled PUT's space given back")
    paths = _state(fleet)[1]
    assert "/stalled" not in paths and {"/other", "/third"} <= set(paths)


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[tuple[AgentServer, Agent]]:
    """An agent served in this process with tight limits (1 s body and idle timeouts), so
    the deadlines that take a minute at the defaults are seen in seconds."""
    image = tmp_path / "tight.raw"
    with image.open("wb") as f:
        f.truncate(16 * MiB)
    device = FileDevice(image)
    Volume.format(device, fleet="tight")
    device.close()
    server = AgentServer(("127.0.0.1", 0), max_body=8 * MiB, body_timeout=1.0,
                         idle_timeout=1.0, header_timeout=2.0)
    address = f"127.0.0.1:{server.server_address[1]}"
    agent = Agent(AgentSettings(node="w", fleet="tight",
                                keys=(agent_key(TEST_SECRET, "tight", "w"),), advertise=address),
                  lambda read_only: FileDevice(image, read_only=read_only))
    server.agent = agent
    agent.start(become_writer_at=1)
    thread = threading.Thread(target=serve, args=(server,), daemon=True)
    thread.start()
    try:
        yield server, agent
    finally:
        server.shutdown()
        agent.stop()
        server.server_close()
        thread.join(timeout=10)


def test_a_trickled_put_body_is_cut_at_its_deadline(
        tight: tuple[AgentServer, Agent]) -> None:
    """A byte every 0.2 s never trips the 1 s per-read timeout; the body's own deadline
    (body_timeout + size at MIN_BODY_RATE) cuts it, and nothing is stored."""
    server, agent = tight
    address = f"127.0.0.1:{server.server_address[1]}"
    grant = sign(Grant("tight", "w", WRITE, 1, time.time() + 60),
                 agent_key(TEST_SECRET, "tight", "w"))
    size = 64 << 10
    allowed = server.body_timeout + size / MIN_BODY_RATE
    with socket.create_connection(_split(address), timeout=5.0) as sock:
        sock.sendall(http("PUT", "/v1/files/trickle", {**_bearer(grant),
                                                       "Content-Length": str(size)}))
        started = time.monotonic()
        cut = False
        while time.monotonic() - started < allowed + 5.0:
            try:
                sock.sendall(b"t")
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable and sock.recv(65536) == b"":
                    cut = True
                    break
            except OSError:  # reset: cut as well
                cut = True
                break
    assert cut and allowed - 0.5 < time.monotonic() - started < allowed + 5.0
    volume = agent.volume
    assert volume is not None and [e.path for e in volume.list("/")] == []


def test_an_idle_keep_alive_connection_is_closed(tight: tuple[AgentServer, Agent]) -> None:
    server, _ = tight
    address = f"127.0.0.1:{server.server_address[1]}"
    with socket.create_connection(_split(address), timeout=5.0) as sock:
        sock.sendall(http("GET", "/v1/health"))
        buf = bytearray()
        assert _read_answer(sock, buf)[0] == 200
        started = time.monotonic()
        assert _closed(sock, buf, wait=5.0)
        assert server.idle_timeout - 0.5 < time.monotonic() - started < server.idle_timeout + 2
