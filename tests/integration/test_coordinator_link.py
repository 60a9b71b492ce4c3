"""agents.peers.CoordinatorLink against real HTTP servers on loopback standing in for an
active coordinator and its standbys: reports reach whichever is active, a standby's answer
names it, an unreachable one is passed over, and nothing outside the configured list is ever
contacted."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from agents.core.protocol import Heartbeat
from agents.daemon import load_config
from agents.errors import ConfigError, NotActiveCoordinator, PeerUnreachable
from agents.peers import CoordinatorLink, Peer

pytestmark = pytest.mark.integration


class _Coordinator(http.server.ThreadingHTTPServer):
    """Answers every POST: 200 ``{"took": name}`` while active, else 503 ``not_active``
    naming ``active_url``. Counts the requests it got."""

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.active = False
        self.active_url = ""
        self.hits = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Coordinator

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.hits += 1
        if self.server.active:
            status, body = 200, {"took": self.server.name}
        else:
            status, body = 503, {"error": "not_active", "message": "standby",
                                 "coordinator": self.server.active_url}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def coordinators() -> Iterator[list[_Coordinator]]:
    servers = [_Coordinator(name) for name in ("a", "b", "c")]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _activate(servers: list[_Coordinator], active: _Coordinator) -> None:
    for server in servers:
        server.active = server is active
        server.active_url = active.url


def _link(*urls: str) -> CoordinatorLink:
    return CoordinatorLink(urls, lambda url: Peer(url), timeout=5.0)


def _report(link: CoordinatorLink) -> str:
    beat = Heartbeat(node="r1", fleet="f", role="reader", epoch=1, applied_seq=0, safe_seq=0,
                     selftest="ok", address="127.0.0.1:1", sent_at=0.0)
    took: str = link.post("/v1/heartbeat", beat, grant=None)["took"]
    return took


def test_a_standby_sends_the_report_on_to_the_active_one_which_then_gets_them_first(
        coordinators: list[_Coordinator]) -> None:
    a, b, c = coordinators
    _activate(coordinators, c)
    link = _link(a.url, b.url, c.url)
    assert _report(link) == "c"
    assert (a.hits, b.hits, c.hits) == (1, 0, 1), "a named c: b was not asked"
    assert _report(link) == "c" and (a.hits, c.hits) == (1, 2)
    _activate(coordinators, b)  # c lost the lease to b
    assert _report(link) == "b" and link.current == b.url


def test_an_unreachable_coordinator_is_passed_over(coordinators: list[_Coordinator]) -> None:
    a = coordinators[0]
    _activate(coordinators, a)
    link = _link(_closed_port(), a.url)
    assert _report(link) == "a"
    assert _report(link) == "a" and a.hits == 2


def test_a_coordinator_named_outside_the_list_is_never_contacted(
        coordinators: list[_Coordinator]) -> None:
    a, b, c = coordinators
    _activate(coordinators, c)  # a and b name c, which this agent was not given
    link = _link(a.url, b.url)
    with pytest.raises(NotActiveCoordinator):
        _report(link)
    assert (a.hits, b.hits, c.hits) == (1, 1, 0)


def test_when_no_coordinator_answers_the_last_error_is_raised() -> None:
    with pytest.raises(PeerUnreachable):
        _report(_link(_closed_port(), _closed_port()))


BASE = {"node": "r1", "fleet": "f", "backend": "file:/x", "secret_file": "/k"}


@pytest.mark.parametrize(("value", "expected"), [
    ("https://10.0.0.1:7470", ("https://10.0.0.1:7470",)),
    (["10.0.0.1:7470", "https://10.0.0.2:7470"], ("10.0.0.1:7470", "https://10.0.0.2:7470")),
    ([], ()),
    ("", ()),
])
def test_the_coordinator_setting_takes_one_url_or_a_list(value: object,
                                                          expected: tuple[str, ...]) -> None:
    assert load_config(None, {**BASE, "coordinator": value}).coordinator == expected


@pytest.mark.parametrize(("value", "reason"), [
    (7470, "must be a URL"),
    (["https://a:1", 2], "must be a URL"),
    (["https://a:1", "http://b:1"], "'http://b:1' is plaintext http:// but TLS is on"),
])
def test_a_bad_coordinator_setting_is_refused(value: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_config(None, {**BASE, "coordinator": value})
