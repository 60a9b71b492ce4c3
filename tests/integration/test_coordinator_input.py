"""Bad input to a real coordinator: clear JSON errors, honest status codes, no state change.

A real coordinator (state in the sandbox RADOS cluster) runs a real fleet (writer ``w``,
readers ``r1`` and ``r2`` on a file image). Each test sends a battery of bad requests — at
the HTTP level (raw sockets where a client library would refuse to send them) and at the
JSON and grant level — and checks every answer's status and error code. After the battery
the map stored in RADOS is the same map, at the same revision, and the fleet still has its
writer and both readers in sync: nothing a bad request says changes anything. ~10 s.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents.core.protocol import Heartbeat, LaggingReaderReport, SelfTestCheck, SelfTestReport
from orchestrator.adapters.rados_state import RadosStateStore
from orchestrator.coordinator.api import MAX_BODY
from orchestrator.core.clients import client_token
from orchestrator.core.fleetmap import FleetMap
from tests.coordinator_harness import Coordinator, coordinated_file_fleet, rados_store
from tests.fixtures.agents import TEST_CLIENT, TEST_CLIENT_SECRET, AgentFleet, FleetFactory

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    """The running fleet, its coordinator and a second handle on the RADOS state."""

    fleet: AgentFleet
    coordinator: Coordinator
    store: RadosStateStore

    @property
    def address(self) -> tuple[str, int]:
        url = urllib.parse.urlsplit(self.coordinator.url)
        assert url.hostname is not None and url.port is not None
        return url.hostname, url.port

    def stored(self) -> FleetMap:
        m = self.store.load()
        assert m is not None
        return m

    def client_grant(self, *, ttl: float = 30.0, fleet: str | None = None,
                     secret: bytes = TEST_CLIENT_SECRET, name: str = TEST_CLIENT) -> str:
        return client_token(fleet or self.fleet.name, name, secret, time.time(), ttl)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        grant: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """One request on a fresh connection; the answer must be a JSON object."""
        conn = http.client.HTTPConnection(*self.address, timeout=10)
        try:
            sent = dict(headers or {})
            if grant is not None:  # "" sends an empty bearer
                sent["Authorization"] = "Bearer " + grant
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            raw = resp.read()
            assert resp.getheader("Content-Type") == "application/json", raw[:200]
            answer = json.loads(raw)
            assert isinstance(answer, dict)
            return resp.status, answer
        finally:
            conn.close()

    def raw(self, data: bytes) -> tuple[int, dict[str, Any], bool]:
        """Send ``data`` as is; (status, JSON body, whether the server then closed)."""
        with socket.create_connection(self.address, timeout=10) as sock:
            sock.sendall(data)
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(4096)
                assert chunk, f"connection closed without an answer to {data[:60]!r}"
                received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = dict(line.split(": ", 1) for line in lines[1:])
            length = int(fields["Content-Length"])
            while len(body) < length:
                chunk = sock.recv(4096)
                assert chunk, "answer cut short"
                body += chunk
            assert fields["Content-Type"] == "application/json", body[:200]
            sock.settimeout(5)
            closed = sock.recv(1) == b""
            return status, json.loads(body[:length]), closed


@pytest.fixture
def setup(
    fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any, ceph_cluster: Any
) -> Iterator[Setup]:
    with coordinated_file_fleet(fleet_factory, tmp_path, rados_admin, ceph_cluster.pool, "in",
                                plaintext_coordinator=True) as (
        fleet,
        coordinator,
        _,
    ):
        store = rados_store(rados_admin, ceph_cluster.pool, fleet.name)
        try:
            yield Setup(fleet, coordinator, store)
        finally:
            store.close()


def _assert_untouched(s: Setup, before: FleetMap) -> None:
    after = s.stored()
    assert (after.revision, after.epoch) == (before.revision, before.epoch)
    assert after == before
    service = s.coordinator.service
    assert service is not None
    published = service.require_active()
    assert published.revision == before.revision and published.writer == "w"
    assert sorted(r.name for r in published.in_sync_readers()) == ["r1", "r2"]
    assert [s.fleet.health(n)["role"] for n in ("w", "r1", "r2")] == ["writer", "reader", "reader"]


def _check(results: list[tuple[str, int, dict[str, Any], int, str]]) -> None:
    wrong = [
        f"{what}: got {status} {answer.get('error')!r} ({answer.get('message')!r}), "
        f"want {want} {code!r}"
        for what, status, answer, want, code in results
        if status != want or answer.get("error") != code or not answer.get("message")
    ]
    assert not wrong, "\n".join(wrong)


def _forge(token: str, **changes: Any) -> str:
    """The token's payload changed (node, role...) with the original MAC kept."""
    head, _, mac = token.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    payload.update(changes)
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode() + "." + mac


def test_bad_client_requests_get_honest_errors_and_change_nothing(setup: Setup) -> None:
    s = setup
    before = s.stored()
    fleet = f"/v1/fleets/{s.fleet.name}"
    good = s.client_grant()
    grant = s.fleet.grant

    def js(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    # (what, status, error code, method, path, body, grant; None: no Authorization header)
    cases: list[tuple[str, int, str, str, str, bytes | None, str | None]] = [
        # malformed bodies, fields and queries: 400
        ("not JSON", 400, "decode_error", "POST", f"{fleet}/write", b"{nope", good),
        ("not UTF-8", 400, "decode_error", "POST", f"{fleet}/read", b"\xff\xfe", good),
        ("JSON array", 400, "decode_error", "POST", f"{fleet}/write", b"[1, 2]", good),
        ("path a number", 400, "decode_error", "POST", f"{fleet}/write", js(path=5), good),
        ("failover to 5", 400, "decode_error", "POST", f"{fleet}/failover", js(to=5), good),
        ("fence a list", 400, "decode_error", "POST", f"{fleet}/fence", js(node=["w"]), good),
        ("wait word", 400, "decode_error", "GET", f"{fleet}/map?after=1&wait=soon", None, None),
        ("wait NaN", 400, "decode_error", "GET", f"{fleet}/map?wait=nan", None, None),
        ("after word", 400, "decode_error", "GET", f"{fleet}/map?after=x", None, None),
        # grants: missing, forged, expired -> 401; valid but not a client's -> 403
        ("no grant", 401, "bad_signature", "POST", f"{fleet}/write", b"{}", None),
        ("empty bearer", 401, "bad_signature", "POST", f"{fleet}/write", b"{}", ""),
        ("garbage token", 401, "bad_signature", "POST", f"{fleet}/failover", b"{}", "garbage"),
        (
            "forged payload",
            401,
            "bad_signature",
            "POST",
            f"{fleet}/failover",
            b"{}",
            _forge(grant("r1", "reader", 1), audience="coordinator", purpose="client",
                   subject=TEST_CLIENT),
        ),
        (
            "wrong secret",
            401,
            "bad_signature",
            "POST",
            f"{fleet}/fence",
            js(node="w"),
            s.client_grant(secret=b"not-the-client-secret-0123"),
        ),
        (
            "expired",
            401,
            "grant_expired",
            "POST",
            f"{fleet}/failover",
            b"{}",
            s.client_grant(ttl=-1.0),
        ),
        (
            "another fleet's grant",
            403,
            "foreign_grant",
            "POST",
            f"{fleet}/failover",
            b"{}",
            s.client_grant(fleet="other-fleet"),
        ),
        (
            "an agent's grant",
            403,
            "foreign_grant",
            "POST",
            f"{fleet}/fence",
            js(node="w"),
            grant("w", "writer", 1),
        ),
        (
            "unknown client",
            401,
            "bad_signature",
            "POST",
            f"{fleet}/read",
            b"{}",
            s.client_grant(name="stranger"),
        ),
        (
            "client as reader",
            403,
            "foreign_grant",
            "POST",
            f"{fleet}/write",
            b"{}",
            grant("client", "reader", 1),
        ),
        # unknown fleet, node, route: 404; a known route with another method: 405
        ("unknown fleet", 404, "not_found", "POST", "/v1/fleets/nope/write", b"{}", good),
        ("unknown fleet map", 404, "not_found", "GET", "/v1/fleets/nope/map", None, None),
        ("report a stranger", 404, "not_found", "POST", f"{fleet}/report", js(node="x"), good),
        ("unknown action", 404, "not_found", "POST", f"{fleet}/explode", b"{}", good),
        ("unknown route", 404, "not_found", "GET", "/v2/health", None, None),
        ("GET a POST route", 405, "method_not_allowed", "GET", f"{fleet}/write", None, None),
        ("POST a GET route", 405, "method_not_allowed", "POST", "/v1/health", b"{}", None),
        ("DELETE the map", 405, "method_not_allowed", "DELETE", f"{fleet}/map", None, None),
        ("PUT a heartbeat", 405, "method_not_allowed", "PUT", "/v1/heartbeat", b"{}", None),
        # transitions the election refuses: 409, naming the pair
        ("failover to x", 409, "refused_transition", "POST", f"{fleet}/failover", js(to="x"), good),
        ("failover to w", 409, "refused_transition", "POST", f"{fleet}/failover", js(to="w"), good),
        ("fence x", 409, "refused_transition", "POST", f"{fleet}/fence", js(node="x"), good),
    ]
    results = []
    for what, want, code, method, path, body, token in cases:
        status, answer = s.request(method, path, body=body, grant=token)
        results.append((what, status, answer, want, code))
    _check(results)
    assert s.request("GET", f"{fleet}/write")[1]["allowed"] == ["POST"]
    _assert_untouched(s, before)


def test_bad_agent_reports_and_stale_epochs_change_nothing(setup: Setup) -> None:
    s = setup
    before = s.stored()
    name = s.fleet.name
    now = time.time()

    def heartbeat(node: str, fleet: str = name, role: str = "reader", epoch: int = 1) -> bytes:
        message = Heartbeat(
            node=node,
            fleet=fleet,
            role=role,
            epoch=epoch,
            applied_seq=0,
            safe_seq=0,
            selftest="ok",
            address="127.0.0.1:1",
            sent_at=now,
        )
        return message.encode()

    def lagging(writer: str, epoch: int) -> bytes:
        message = LaggingReaderReport(
            fleet=name,
            writer=writer,
            epoch=epoch,
            reader="r2",
            address=s.fleet["r2"].address,
            applied_seq=0,
            target_seq=9,
            reason="test",
        )
        return message.encode()

    check = SelfTestCheck("device-read", False, "EIO")
    failed = SelfTestReport(
        node="w", fleet=name, role="writer", epoch=1, ok=False, checks=(check,), at=now
    ).encode()
    report = s.fleet.report_grant  # a report grant is bound to its body
    forged = _forge(report("r1", failed), subject="w")
    partial = json.dumps({"v": 1, "node": "r1"}).encode()
    w_heartbeat = heartbeat("w", role="writer")
    # (what, status, error code, route, body, grant)
    cases: list[tuple[str, int, str, str, bytes, str]] = [
        ("heartbeat not JSON", 400, "decode_error", "/v1/heartbeat", b"{", report("r1", b"{")),
        ("heartbeat cut short", 400, "decode_error", "/v1/heartbeat", partial,
         report("r1", partial)),
        ("unknown fleet", 404, "not_found", "/v1/heartbeat", heartbeat("r1", "nope"),
         report("r1", heartbeat("r1", "nope"))),
        ("for another node", 403, "foreign_grant", "/v1/heartbeat", heartbeat("r2"),
         report("r1", heartbeat("r2"))),
        ("r1 fails w's self-test", 403, "foreign_grant", "/v1/selftest", failed,
         report("r1", failed)),
        ("r1 posing as w", 401, "bad_signature", "/v1/selftest", failed,
         report("w", failed, key_of="r1")),
        ("forged self-test", 401, "bad_signature", "/v1/selftest", failed, forged),
        ("sniffed heartbeat grant", 403, "foreign_grant", "/v1/selftest", failed,
         report("w", w_heartbeat)),
        ("w's write grant", 403, "foreign_grant", "/v1/selftest", failed,
         s.fleet.grant("w", "writer", 1)),
        ("lagging from a reader", 409, "not_writer", "/v1/lagging", lagging("r1", 1),
         report("r1", lagging("r1", 1))),
        ("lagging of epoch 0", 409, "stale_epoch", "/v1/lagging", lagging("w", 0),
         report("w", lagging("w", 0))),
        ("unknown report kind", 404, "not_found", "/v1/gossip", b"{}", report("w", b"{}")),
    ]
    results = []
    for what, want, code, route, body, token in cases:
        status, answer = s.request("POST", route, body=body, grant=token)
        results.append((what, status, answer, want, code))
        if code in ("stale_epoch", "not_writer"):  # a 409 names the current writer
            assert answer.get("writer") == "w", answer
            assert answer.get("writer_address") == s.fleet["w"].address, answer
    _check(results)
    # A heartbeat of an older epoch is news about the node, not a request: answered with the
    # current epoch and writer (so a deposed writer learns it), and the map stays as it is.
    stale = heartbeat("w", role="writer", epoch=0)
    status, answer = s.request("POST", "/v1/heartbeat", body=stale,
                               grant=report("w", stale))
    assert (status, answer["epoch"], answer["writer"]) == (200, 1, "w"), answer
    time.sleep(1.0)  # anything queued by a wrongly accepted report has run by now
    _assert_untouched(s, before)


def test_broken_http_is_answered_in_json_and_the_connection_closed(setup: Setup) -> None:
    s = setup
    before = s.stored()
    path = f"/v1/fleets/{s.fleet.name}/write"
    auth = f"Authorization: Bearer {s.client_grant()}\r\n"
    # An oversized body is refused before a byte of it is read, then the connection closes
    # (its unread body must never be parsed as the next request).
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}"
    status, answer, closed = s.raw(f"{head}Content-Length: {MAX_BODY + 1}\r\n\r\n{{".encode())
    assert (status, answer["error"], answer["limit"], closed) == (413, "too_large", MAX_BODY, True)
    for length in ("abc", "-5"):
        status, answer, closed = s.raw(f"{head}Content-Length: {length}\r\n\r\n".encode())
        assert (status, answer["error"], closed) == (400, "decode_error", True), length
    status, answer, closed = s.raw(b"BREW /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, answer["error"], closed) == (501, "not_implemented", True)
    status, answer, closed = s.raw(b"GET /v1/health and more HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, answer["error"], closed) == (400, "bad_request", True)
    # A well-formed request on the same server still works afterwards.
    status, answer = s.request("GET", "/v1/health")
    assert status == 200 and answer["fleets"] == {s.fleet.name: True}
    _assert_untouched(s, before)
