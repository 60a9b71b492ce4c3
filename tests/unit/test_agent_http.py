"""Pure parts of the agent's shell: Range parsing, route table, body limits, the header
deadline, metrics text, daemon config."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core.protocol import MAX_PUSH_RECORDS, PushFrame, RecordPush
from agents.core.record import Record, RecordKey
from agents.daemon import load_config, read_keys
from agents.errors import ConfigError, MethodNotAllowed, NotFound, RangeNotSatisfiable
from agents.httpbase import Deadlines
from agents.metrics import Registry
from agents.server import (
    MAX_CONTROL_JSON,
    MAX_PUSH_BODY,
    ROUTES,
    _match,
    parse_range,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=2-5", 10, (2, 6)),
        ("bytes=2-", 10, (2, 10)),
        ("bytes=5-100", 10, (5, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=-30", 10, (0, 10)),
        ("bytes=0-1,4-5", 10, None),
    ],
)
def test_ranges(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=5-2", "bytes=-", "items=0-1",
                                    "bytes=x-1", "bytes=-0", "bytes=0-" + "9" * 5000,
                                    "bytes=-" + "9" * 20, "bytes=\u0663-"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 10)


@given(st.integers(1, 10**9), st.integers(0, 10**9), st.integers(0, 10**9))
def test_ranges_stay_inside_the_file(size: int, a: int, b: int) -> None:
    try:
        span = parse_range(f"bytes={a}-{b}", size)
    except RangeNotSatisfiable:
        assert a >= size or b < a
        return
    assert span is not None
    start, end = span
    assert 0 <= start < end <= size


def test_routes() -> None:
    assert _match("PUT", "/v1/files/a/b").name == "put"
    assert _match("GET", "/v1/list").name == "list"
    assert _match("GET", "/v1/list/x").name == "list"
    with pytest.raises(MethodNotAllowed) as info:
        _match("PATCH", "/v1/files/a")
    assert info.value.fields["allowed"] == ["DELETE", "GET", "PUT"]
    with pytest.raises(NotFound):
        _match("GET", "/v1/filesx")
    assert len({(r.method, r.path) for r in ROUTES}) == len(ROUTES)


def test_every_route_says_what_body_it_takes() -> None:
    """POSTs read capped JSON, the PUT streams, GET and DELETE take no body."""
    for route in ROUTES:
        if route.method == "POST":
            assert 0 < route.json_limit <= MAX_PUSH_BODY and not route.streamed, route.name
        else:
            assert route.json_limit == 0 and route.streamed == (route.method == "PUT")
    assert {r.name: r.json_limit for r in ROUTES if r.json_limit not in (0, MAX_CONTROL_JSON)
            } == {"records": MAX_PUSH_BODY}


def test_a_full_push_fits_its_cap() -> None:
    """MAX_PUSH_RECORDS records of 4 pages each (a put of ~1000 chunks) fit a push."""
    sums = list(range(1000, 1000 + 1024))
    record = Record(2**40, 2**40, "put", {"path": "/" + "p" * 4000, "size": 1 << 30,
                                          "mtime": 1.5, "crc": 2**31, "chunk": 1 << 20,
                                          "extents": [[1 << 40, 1 << 30]], "sums": sums})
    assert record.encoded_length() <= 4 * 4096
    frame = PushFrame(1 << 30, record.encode(RecordKey.for_volume(bytes(16))))
    push = RecordPush(fleet="f" * 255, epoch=2**40, writer="w" * 255, commit_seq=2**40,
                      frames=(frame,) * MAX_PUSH_RECORDS)
    assert len(push.encode()) <= MAX_PUSH_BODY


def test_deadlines_cut_only_late_connections() -> None:
    deadlines = Deadlines()
    late, late_peer = socket.socketpair()
    on_time, on_time_peer = socket.socketpair()
    try:
        deadlines.arm(late, 10.0)
        deadlines.arm(on_time, 20.0)
        assert deadlines.cut_late(9.0) == 0
        assert deadlines.cut_late(15.0) == 1
        late_peer.settimeout(1.0)
        assert late_peer.recv(1) == b""  # the late one sees EOF at once
        assert deadlines.disarm(late) is False  # what it read is not a whole request
        assert deadlines.disarm(late) is True  # forgotten after that
        assert deadlines.disarm(on_time) is True
        assert deadlines.cut_late(100.0) == 0  # disarmed: never cut
        on_time.sendall(b"x")
        assert on_time_peer.recv(1) == b"x"
    finally:
        for sock in (late, late_peer, on_time, on_time_peer):
            sock.close()


def test_metrics_text() -> None:
    reg = Registry()
    c = reg.counter("x_total", "help x", ("route",))
    c.inc('a"b')
    c.inc('a"b', amount=2)
    reg.gauge("g", "help g", lambda: 1.5)
    h = reg.histogram("h_seconds", "help h")
    h.observe(0.003)
    h.observe(100)
    text = reg.render()
    assert '# TYPE x_total counter\nx_total{route="a\\"b"} 3\n' in text
    assert "g 1.5\n" in text
    assert 'h_seconds_bucket{le="0.005"} 1\n' in text
    assert 'h_seconds_bucket{le="+Inf"} 2\n' in text
    assert "h_seconds_count 2\n" in text
    with pytest.raises(ValueError):
        reg.counter("x_total", "again")
    with pytest.raises(ValueError):
        c.inc()


def _write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def test_config_toml_json_and_overrides(tmp_path: Path) -> None:
    toml = _write(tmp_path, "a.toml", """
node = "vm1"
fleet = "demo"
backend = "rbd:rbd/img"
secret_file = "/s"
max_body = "2GiB"
[readers]
vm2 = "10.0.0.2:7480"
[ceph]
conf = "/c"
user = "u"
[tls]
cert = "/crt"
key = "/key"
[timing]
ack_timeout = 3
""")
    config = load_config(toml, {"listen": "127.0.0.1:0", "role": None})
    assert (config.ceph_conf, config.ceph_user, config.tls_cert) == ("/c", "u", "/crt")
    assert config.max_body == 2 << 30 and config.ack_timeout == 3.0
    assert config.readers == {"vm2": "10.0.0.2:7480"} and config.listen == "127.0.0.1:0"
    as_json = _write(tmp_path, "a.json", json.dumps(
        {"node": "n", "fleet": "f", "backend": "file:/x", "secret_file": "/s"}))
    assert load_config(as_json, {"role": "writer"}).role == "writer"
    assert load_config(as_json, {"role": "spare"}).role == "spare"


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({}, "node"),
        ({"node": "n", "fleet": "f", "backend": "b", "secret_file": "s", "nope": 1}, "nope"),
        ({"node": "n", "fleet": "f", "backend": "b", "secret_file": "s", "role": "boss"},
         "role"),
        ({"node": "n", "fleet": "f", "backend": "b", "secret_file": "s", "epoch": 0}, "epoch"),
        ({"node": "n", "fleet": "f", "backend": "b", "secret_file": "s",
          "ack_timeout": -1}, "ack_timeout"),
        ({"node": "n", "fleet": "f", "backend": "b", "secret_file": "s", "listen": "x"},
         "listen"),
        ({"node": "n", "fleet": "f", "backend": "b", "secret_file": "s", "tls_cert": "c"},
         "tls"),
        ({"node": "n", "fleet": "f", "backend": "b", "secret_file": "s", "max_body": "lots"},
         "max_body"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, settings)
    assert info.value.key == key


def test_key_file_must_be_private_and_hold_hex_keys(tmp_path: Path) -> None:
    """The node's own key, current first; a second line (the previous key) during a
    rotation; the content never appears in an error."""
    path = tmp_path / "agent.key"
    path.write_text("5ec2e7aa\n0ld0\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        read_keys(str(path))
    assert "5ec2e7aa" not in str(info.value)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        read_keys(str(path))  # "0ld0" is not hex
    assert "5ec2e7aa" not in str(info.value) and "0ld0" not in str(info.value)
    path.write_text("5ec2e7aa\n01d0\n")
    assert read_keys(str(path)) == (bytes.fromhex("5ec2e7aa"), bytes.fromhex("01d0"))
    path.write_text("\n")
    with pytest.raises(ConfigError):
        read_keys(str(path))
