"""Named fault scenarios against real agent processes on a file image (kill -9, SIGSTOP,
demote mid-write, corrupted bytes on the image, hostile input).

Each test states what it proves. Shared helpers find a file's bytes or a journal record on the
image file, so corruption is injected exactly where the format puts things.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents.core.protocol import PutRequest
from agents.core.record import Record
from agents.core.superblock import SLOTS, choose
from agents.device import ALIGN
from agents.errors import FormatError
from tests.fixtures.agents import (
    REPO,
    AgentFleet,
    FleetFactory,
    ReportSink,
    Response,
    client_context,
)

pytestmark = pytest.mark.fault

MiB = 1 << 20


def _image(fleet: AgentFleet) -> Path:
    return Path(fleet.backend.removeprefix("file:"))


def _make_image(path: Path, size: int) -> str:
    with path.open("wb") as f:
        f.truncate(size)
    return f"file:{path}"


def _fsck(fleet: AgentFleet) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agents", "fsck", str(_image(fleet))],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def _journal_record_offset(path: Path, seq: int) -> int:
    """Image offset of the journal record ``seq``."""
    data = path.read_bytes()
    sb = choose([data[s : s + ALIGN] for s in SLOTS])
    end = sb.journal_offset + sb.journal_bytes
    off = data.find(b"RBFR", sb.journal_offset, end)
    while off != -1:  # records are packed: one may start at any byte, not only at 4 KiB
        length = Record.peek_length(data[off : off + ALIGN])
        if length is not None:
            try:
                if Record.decode(data[off : off + length], sb.record_key).seq == seq:
                    return off
            except FormatError:  # client bytes that look like a header, a stale record
                pass
        off = data.find(b"RBFR", off + 1, end)
    raise AssertionError(f"journal record {seq} not found")


def _slow_body(total: int, chunk: int, started: threading.Event, after: int,
               pause: float) -> Iterator[bytes]:
    sent = 0
    block = os.urandom(chunk)
    while sent < total:
        yield block
        sent += chunk
        if sent == after:
            started.set()
        if sent >= after:
            time.sleep(pause)


@dataclass
class Background:
    """A put running on a thread: its outcome once ``thread`` is joined."""

    thread: threading.Thread
    outcome: list[Response | Exception]

    def failed(self) -> bool:
        """True unless the put was acknowledged."""
        self.thread.join(60)
        assert not self.thread.is_alive()
        return not (isinstance(self.outcome[0], Response) and self.outcome[0].status == 201)


def _put_in_background(fleet: AgentFleet, node: str, path: str, total: int,
                       started: threading.Event, grant: str) -> Background:
    outcome: list[Response | Exception] = []

    def run() -> None:
        try:
            outcome.append(fleet.client.put(
                fleet[node].address, path, _slow_body(total, MiB, started, 8 * MiB, 0.05),
                grant, size=total))
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return Background(thread, outcome)


def _connect(address: str, timeout: float = 60) -> http.client.HTTPConnection:
    host, _, port = address.rpartition(":")
    return http.client.HTTPSConnection(host, int(port), timeout=timeout,
                                       context=client_context())


def _promote(fleet: AgentFleet, node: str, epoch: int, readers: tuple[str, ...]) -> None:
    """Promote as the coordinator does: the map's readers, all in sync, in the request."""
    resp = fleet.client.call(
        fleet[node].address, "POST", "/v1/promote", fleet.grant(node, "promote", epoch),
        {"fleet": fleet.name, "node": node, "epoch": epoch, "in_sync": list(readers),
         "readers": [{"node": n, "address": fleet[n].address} for n in readers],
         "push_grants": fleet.push_grants(node, readers, epoch)})
    assert resp.status == 200, resp.body
    assert resp.json()["in_sync"] == sorted(readers)


def test_writer_killed_mid_put_leaves_nothing_partial(file_fleet: AgentFleet) -> None:
    """kill -9 of the writer during a 32 MiB put: no reader shows the file, fsck is clean, a
    promoted reader takes over and the next put succeeds and reaches the other reader."""
    fleet, c = file_fleet, file_fleet.client
    assert c.put(fleet["w"].address, "/keep", b"k" * 100, fleet.grant("w", "writer", 1)).status \
        == 201
    started = threading.Event()
    outcome = _put_in_background(fleet, "w", "/big", 32 * MiB, started,
                                 fleet.grant("w", "writer", 1))
    assert started.wait(60)
    fleet["w"].kill()
    assert outcome.failed()
    for node in ("r1", "r2"):
        rg = fleet.grant(node, "reader", 1)
        assert c.get(fleet[node].address, "/big", rg).status == 404
        assert c.get(fleet[node].address, "/keep", rg).body == b"k" * 100
    check = _fsck(fleet)
    assert check.returncode == 0, check.stdout + check.stderr
    _promote(fleet, "r1", 2, readers=("r2",))
    put = c.put(fleet["r1"].address, "/big", os.urandom(3 * MiB), fleet.grant("r1", "writer", 2))
    assert put.status == 201, put.body
    assert put.json()["acked"] == ["r2"]
    got = c.get(fleet["r2"].address, "/big", fleet.grant("r2", "reader", 2))
    assert got.status == 200 and len(got.body) == 3 * MiB
    assert _fsck(fleet).returncode == 0


def test_demote_stops_an_inflight_put(file_fleet: AgentFleet) -> None:
    """Demote during a large put: the put fails, nothing partial is visible, later writes on
    the demoted node are refused (409 not_writer)."""
    fleet, c = file_fleet, file_fleet.client
    started = threading.Event()
    outcome = _put_in_background(fleet, "w", "/big", 32 * MiB, started,
                                 fleet.grant("w", "writer", 1))
    assert started.wait(60)
    resp = c.call(fleet["w"].address, "POST", "/v1/demote", fleet.grant("w", "demote", 2),
                  {"fleet": fleet.name, "node": "w", "epoch": 2})
    assert resp.status == 200 and resp.json()["role"] == "reader"
    assert outcome.failed()
    for node in ("w", "r1", "r2"):
        grant = fleet.grant(node, "reader", 1 if node != "w" else 2)
        assert c.get(fleet[node].address, "/big", grant).status in (404, 409)
    refused = c.put(fleet["w"].address, "/x", b"x", fleet.grant("w", "writer", 2))
    assert refused.status == 409 and refused.json()["error"] == "not_writer"
    assert _fsck(fleet).returncode == 0


def test_corrupted_data_block_is_never_served(fleet_factory: FleetFactory, tmp_path: Path,
                                              report_sink: ReportSink) -> None:
    """A flipped byte in a file's data: readers refuse it (error before the body, or a body
    cut short: never wrong bytes), count it and report it to the coordinator."""
    fleet = fleet_factory(_make_image(tmp_path / "img", 64 * MiB), coordinator=report_sink.url)
    c = fleet.client
    data = os.urandom(3 * MiB)
    assert c.put(fleet["w"].address, "/f", data, fleet.grant("w", "writer", 1)).status == 201
    image = _image(fleet)
    start = image.read_bytes().find(data[:4096])
    assert start > 0 and start % ALIGN == 0
    _flip(image, start + 2 * MiB + 17)  # third 1 MiB chunk
    rg = fleet.grant("r1", "reader", 1)
    conn = _connect(fleet["r1"].address, 30)
    conn.request("GET", "/v1/files/f", headers={"Authorization": "Bearer " + rg})
    resp = conn.getresponse()
    assert resp.status == 200
    try:
        body = resp.read()
    except http.client.IncompleteRead as exc:
        body = exc.partial
    conn.close()
    assert len(body) < len(data) and data.startswith(body)
    _flip(image, start + 5)  # first chunk: the error comes before any byte
    first = c.get(fleet["r2"].address, "/f", fleet.grant("r2", "reader", 1))
    assert first.status == 500 and first.json()["error"] == "checksum_mismatch"
    metrics = c.request(fleet["r1"].address, "GET", "/metrics").body.decode()
    assert "rbdfleet_agent_checksum_errors_total 1" in metrics
    fleet.wait_for(lambda: any(not m["ok"] and m["checks"][0]["name"] == "data-checksum"
                               for m in report_sink.messages("/v1/selftest")),
                   what="checksum report at the coordinator")
    assert _fsck(fleet).returncode == 1


def test_corrupted_journal_record_is_detected(file_fleet: AgentFleet) -> None:
    """A flipped byte in a committed journal record: fsck reports it with its location and a
    restarting reader refuses to serve from the broken journal (start fails, logged)."""
    fleet, c = file_fleet, file_fleet.client
    wg = fleet.grant("w", "writer", 1)
    seqs = [c.put(fleet["w"].address, f"/f{i}", b"%d" % i * 10, wg).json()["seq"]
            for i in range(3)]
    offset = _journal_record_offset(_image(fleet), seqs[0])
    _flip(_image(fleet), offset + 60)
    check = _fsck(fleet)
    assert check.returncode == 1
    assert "journal" in check.stdout
    fleet["r2"].kill()
    with pytest.raises(RuntimeError, match="exited 1"):
        fleet["r2"].start(timeout=30)
    assert "event=start_failed" in fleet["r2"].log.read_text()
    assert "code=checksum_mismatch" in fleet["r2"].log.read_text()


def test_killed_reader_catches_up(file_fleet: AgentFleet, report_sink: ReportSink) -> None:
    """kill -9 of a reader: the writer acks without it (reported lagging), the restarted
    reader catches up from the journal and is in sync again."""
    del report_sink  # the coordinator is configured per fleet in the next test
    fleet, c = file_fleet, file_fleet.client
    wg = fleet.grant("w", "writer", 1)
    fleet["r2"].kill()
    files = {f"/k{i}": os.urandom(5000 + i) for i in range(5)}
    for path, data in files.items():
        put = c.put(fleet["w"].address, path, data, wg)
        assert put.status == 201
        assert put.json()["lagging"] == ["r2"] and put.json()["acked"] == ["r1"]
    assert fleet.health("w")["lagging"] == ["r2"]
    fleet["r2"].start()
    rg = fleet.grant("r2", "reader", 1)
    for path, data in files.items():
        assert c.get(fleet["r2"].address, path, rg).body == data
    fleet.wait_for(lambda: fleet.health("w")["in_sync"] == ["r1", "r2"], what="r2 in sync")
    put = c.put(fleet["w"].address, "/after", b"a", wg)
    assert put.json()["acked"] == ["r1", "r2"]


def test_paused_reader_is_reported_and_catches_up(fleet_factory: FleetFactory, tmp_path: Path,
                                                  report_sink: ReportSink) -> None:
    """SIGSTOP of a reader: the put is acked after ack_timeout with the reader reported
    lagging to the coordinator; after SIGCONT it catches up and serves the new version."""
    fleet = fleet_factory(_make_image(tmp_path / "img", 64 * MiB), coordinator=report_sink.url,
                          ack_timeout=1.5)
    c = fleet.client
    wg = fleet.grant("w", "writer", 1)
    fleet["r1"].pause()
    try:
        put = c.put(fleet["w"].address, "/p", b"paused", wg)
        assert put.status == 201 and "r1" in put.json()["lagging"]
        reports = report_sink.messages("/v1/lagging")
        assert "r1" in [r["reader"] for r in reports]
        report = next(r for r in reports if r["reader"] == "r1")
        assert report["target_seq"] >= put.json()["seq"] - 1
    finally:
        fleet["r1"].resume()
    rg = fleet.grant("r1", "reader", 1)
    fleet.wait_for(lambda: c.get(fleet["r1"].address, "/p", rg).status == 200,
                   what="r1 serving /p")
    assert c.get(fleet["r1"].address, "/p", rg).body == b"paused"
    fleet.wait_for(lambda: fleet.health("w")["in_sync"] == ["r1", "r2"], what="r1 in sync")
    assert report_sink.messages("/v1/heartbeat"), "agents send heartbeats"
    beat = report_sink.messages("/v1/heartbeat")[-1]
    assert beat["fleet"] == fleet.name and beat["address"]


def test_overwrite_while_streaming_gives_whole_old(fleet_factory: FleetFactory,
                                                   tmp_path: Path) -> None:
    """A reader streams v1 slowly while the writer overwrites it three times: the stream is
    exactly v1 (its extents stay quarantined while pinned), and a new GET gets the newest."""
    fleet = fleet_factory(_make_image(tmp_path / "img", 160 * MiB))
    c = fleet.client
    wg = fleet.grant("w", "writer", 1)
    versions = [os.urandom(16 * MiB) for _ in range(4)]
    assert c.put(fleet["w"].address, "/v", versions[0], wg).status == 201
    rg = fleet.grant("r1", "reader", 1)
    conn = _connect(fleet["r1"].address, 60)
    conn.request("GET", "/v1/files/v", headers={"Authorization": "Bearer " + rg})
    resp = conn.getresponse()
    head = resp.read(MiB)
    for data in versions[1:]:
        assert c.put(fleet["w"].address, "/v", data, wg).status == 201
    body = head + resp.read()
    conn.close()
    assert hashlib.sha256(body).digest() == hashlib.sha256(versions[0]).digest()
    latest = c.get(fleet["r1"].address, "/v", rg).body
    assert hashlib.sha256(latest).digest() == hashlib.sha256(versions[-1]).digest()


def _raw(fleet: AgentFleet, method: str, path: str, headers: dict[str, str],
         body: bytes = b"") -> tuple[int, dict[str, object]]:
    conn = _connect(fleet["w"].address, 30)
    conn.putrequest(method, path, skip_accept_encoding=True)
    if body and "Content-Length" not in headers:
        headers = {**headers, "Content-Length": str(len(body))}
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    if body:
        conn.send(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


def test_hostile_input_changes_nothing(fleet_factory: FleetFactory, tmp_path: Path) -> None:
    """Bad paths, oversized bodies, malformed JSON, forged/stale/foreign/expired grants,
    hostile numbers and framing: each gets its honest status and the writer's journal does
    not move (tests/integration/test_agent_hostile.py has the raw-socket suite)."""
    fleet = fleet_factory(_make_image(tmp_path / "img", 64 * MiB), max_body="1MiB")
    c = fleet.client
    wg = fleet.grant("w", "writer", 1)
    assert c.put(fleet["w"].address, "/ok", b"fine", wg).status == 201
    before = fleet.health("w")["applied_seq"]

    def put_headers(grant: str, size: int = 4) -> dict[str, str]:
        return PutRequest(grant=grant, size=size).to_headers()

    cases: list[tuple[str, str, dict[str, str], bytes, int, str]] = [
        ("PUT", "/v1/files/a/../b", put_headers(wg), b"data", 400, "bad_path"),
        ("PUT", "/v1/files/a/%2e%2e/b", put_headers(wg), b"data", 400, "bad_path"),
        ("PUT", "/v1/files//abs", put_headers(wg), b"data", 400, "bad_path"),
        ("PUT", "/v1/files/nul%00x", put_headers(wg), b"data", 400, "bad_path"),
        ("PUT", "/v1/files/bad%ffutf8", put_headers(wg), b"data", 400, "bad_path"),
        ("PUT", "/v1/files/" + "n" * 256, put_headers(wg), b"data", 400, "bad_path"),
        ("PUT", "/v1/files/" + "d/" * 2100 + "x", put_headers(wg), b"data", 400, "bad_path"),
        ("PUT", "/v1/files/huge", put_headers(wg, 2 * MiB), b"", 413, "too_large"),
        ("PUT", "/v1/files/f", put_headers(fleet.grant("w", "writer", 1, secret=b"forged")),
         b"data", 401, "bad_signature"),
        ("PUT", "/v1/files/f", put_headers(wg + "x"), b"data", 401, "bad_signature"),
        ("PUT", "/v1/files/f", {"Content-Length": "4"}, b"data", 401, "bad_signature"),
        ("PUT", "/v1/files/f", put_headers(fleet.grant("w", "writer", 1, ttl=-1)), b"data",
         401, "grant_expired"),
        ("PUT", "/v1/files/f", put_headers(fleet.grant("w", "writer", 1, fleet="other")),
         b"data", 403, "foreign_grant"),
        ("PUT", "/v1/files/f", put_headers(fleet.grant("r1", "writer", 1)), b"data", 403,
         "foreign_grant"),
        ("PUT", "/v1/files/f", put_headers(fleet.grant("w", "reader", 1)), b"data", 403,
         "foreign_grant"),
        ("PUT", "/v1/files/f", put_headers(fleet.grant("w", "writer", 0)), b"data", 409,
         "stale_epoch"),
        ("PUT", "/v1/files/f", {**put_headers(wg), "X-Rbdfleet-Version": "2"}, b"data", 400,
         "unsupported_version"),
        ("POST", "/v1/mkdir", {"Authorization": "Bearer " + wg},
         b"{nope", 400, "decode_error"),
        ("POST", "/v1/mkdir", {"Authorization": "Bearer " + wg},
         b'{"v":1}  ', 400, "decode_error"),
        ("POST", "/v1/rename", {"Authorization": "Bearer " + wg},
         b'{"v":1,"src":"/ok","dst":"/../x"}', 400, "bad_path"),
        ("POST", "/v1/promote", {"Authorization": "Bearer " + wg},
         b'{"v":1,"fleet":"test","node":"w","epoch":5}', 403, "foreign_grant"),
        ("GET", "/v1/nothing", {}, b"", 404, "not_found"),
        ("DELETE", "/v1/health", {}, b"", 405, "method_not_allowed"),
        ("GET", "/v1/files/ok", {"Authorization": "Bearer " + wg, "Range": "bytes=10-20"}, b"",
         416, "range_not_satisfiable"),
        # hostile numbers and framing: each a 4xx (501 for a transfer coding), never a 500
        ("PUT", "/v1/files/f", {**put_headers(wg), "Content-Length": "²"}, b"", 400,
         "decode_error"),
        ("PUT", "/v1/files/f", {**put_headers(wg), "X-Rbdfleet-Version": "²"}, b"data", 400,
         "decode_error"),
        ("PUT", "/v1/files/f", {**put_headers(wg), "X-Rbdfleet-Mtime": "nan"}, b"data", 400,
         "decode_error"),
        ("PUT", "/v1/files/f", {**put_headers(wg), "X-Rbdfleet-Mtime": "-inf"}, b"data", 400,
         "decode_error"),
        ("POST", "/v1/mkdir", {"Authorization": "Bearer " + wg, "Transfer-Encoding": "chunked"},
         b"", 501, "unsupported_transfer_encoding"),
        ("POST", "/v1/mkdir", {"Authorization": "Bearer " + wg}, b'{"v":1,"path":"/t\\tab"}',
         400, "bad_path"),
        ("POST", "/v1/promote", {"Authorization": "Bearer " + fleet.grant("w", "promote", 5)},
         b'{"v":1,"fleet":"test","node":"w","epoch":' + b"5" * 5000 + b"}", 400,
         "decode_error"),
        ("POST", "/v1/readers", {"Authorization": "Bearer " + fleet.grant("w", "readers", 1)},
         b"[" * 50_000, 400, "decode_error"),
    ]
    for method, path, headers, body, status, error in cases:
        got_status, answer = _raw(fleet, method, path, headers, body)
        assert (got_status, answer.get("error")) == (status, error), (method, path[:60], answer)
    assert fleet.health("w")["applied_seq"] == before
    listing = c.call(fleet["w"].address, "GET", "/v1/list", wg).json()
    assert [e["path"] for e in listing["entries"]] == ["/ok"]


def test_rbd_writer_killed_then_fenced_and_replaced(rbd_fleet: AgentFleet,
                                                    rados_admin: Any) -> None:
    """On RBD: kill -9 the writer mid-put, fence it as the coordinator does (blocklist the
    address holding the image's exclusive lock, then wait for the new osdmap), promote a
    reader: it takes the lock, the partial put is invisible and the next put succeeds."""
    import rbd

    fleet, c = rbd_fleet, rbd_fleet.client
    assert c.put(fleet["w"].address, "/keep", b"k" * 9000,
                 fleet.grant("w", "writer", 1)).status == 201
    started = threading.Event()
    outcome = _put_in_background(fleet, "w", "/big", 24 * MiB, started,
                                 fleet.grant("w", "writer", 1))
    assert started.wait(60)
    fleet["w"].kill()
    assert outcome.failed()
    pool, _, image = fleet.backend.removeprefix("rbd:").partition("/")
    with rados_admin.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image) as img:
        owners = [o["owner"] for o in img.lock_get_owners()]
    assert len(owners) == 1
    ret, _, status = rados_admin.mon_command(json.dumps(
        {"prefix": "osd blocklist", "blocklistop": "add", "addr": owners[0], "expire": 600.0}),
        b"")
    assert ret == 0, status
    rados_admin.wait_for_latest_osdmap()
    _promote(fleet, "r1", 2, readers=("r2",))
    for node in ("r1", "r2"):
        grant = fleet.grant(node, "reader", 2)
        assert c.get(fleet[node].address, "/big", grant).status == 404
        assert c.get(fleet[node].address, "/keep", grant).body == b"k" * 9000
    put = c.put(fleet["r1"].address, "/next", b"n" * 70000, fleet.grant("r1", "writer", 2))
    assert put.status == 201 and put.json()["acked"] == ["r2"], put.body
    assert c.get(fleet["r2"].address, "/next", fleet.grant("r2", "reader", 2)).body \
        == b"n" * 70000


def test_refused_body_is_not_read_as_the_next_request(file_fleet: AgentFleet) -> None:
    """A request refused before its body is read (no grant) does not leave that body on a
    keep-alive connection to be parsed as the next request."""
    conn = _connect(file_fleet["r1"].address, 30)
    body = json.dumps({"v": 1, "fleet": "test", "epoch": 1, "writer": "w", "records": [],
                       "commit_seq": 0}).encode()
    conn.request("POST", "/v1/records", body=body)
    first = conn.getresponse()
    assert first.status == 401
    first.read()
    conn.request("GET", "/v1/health")
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())["node"] == "r1"
    conn.close()
