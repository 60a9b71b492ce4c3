"""Agents as real processes: 1 writer + 2 readers on a file image and on an RBD image.

Proves the write flow (patent S301-S305): a put is acknowledged once durable and acked by the
in-sync readers, after which every reader serves the new version; ranged and streamed reads;
the namespace ops; promotion/demotion by control grants; health, metrics, SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.agents import AgentClient, AgentFleet, FleetFactory

pytestmark = pytest.mark.integration

READERS = ("r1", "r2")


def _roundtrip(fleet: AgentFleet) -> None:
    c = fleet.client
    wg = fleet.grant("w", "writer", 1)
    data = os.urandom(3 << 20) + b"tail"
    resp = c.put(fleet["w"].address, "/dir/big.bin", data, wg,
                 readers=fleet.reader_addresses(*READERS))
    assert resp.status == 201, resp.body
    ack = resp.json()
    assert ack["op"] == "put" and ack["size"] == len(data)
    assert sorted(ack["acked"]) == list(READERS) and ack["lagging"] == []
    for node in ("w", *READERS):  # visible at once at every reader: no waiting
        got = c.get(fleet[node].address, "/dir/big.bin", fleet.grant(node, "reader", 1))
        assert got.status == 200, got.body
        assert hashlib.sha256(got.body).digest() == hashlib.sha256(data).digest()
        assert got.headers["x-rbdfleet-seq"] == str(ack["seq"])
        part = c.get(fleet[node].address, "/dir/big.bin", fleet.grant(node, "reader", 1),
                     range_="bytes=1048570-1048590")
        assert part.status == 206 and part.body == data[1048570:1048591]
        assert part.headers["content-range"] == f"bytes 1048570-1048590/{len(data)}"
    # small file (inline), overwrite, stat, list, mkdir, rename, delete
    assert c.put(fleet["w"].address, "/dir/small", b"v1", wg).status == 201
    assert c.put(fleet["w"].address, "/dir/small", b"version-2", wg).status == 201
    rg = fleet.grant("r1", "reader", 1)
    assert c.get(fleet["r1"].address, "/dir/small", rg).body == b"version-2"
    assert c.call(fleet["w"].address, "POST", "/v1/mkdir", wg,
                  {"path": "/a/b/c", "parents": True}).status == 201
    assert c.call(fleet["w"].address, "POST", "/v1/rename", wg,
                  {"src": "/dir/small", "dst": "/a/b/c/moved"}).status == 200
    listing = c.call(fleet["r2"].address, "GET", "/v1/list/a/b/c",
                     fleet.grant("r2", "reader", 1)).json()
    assert [e["path"] for e in listing["entries"]] == ["/a/b/c/moved"]
    stat = c.call(fleet["r1"].address, "GET", "/v1/stat/a/b/c/moved", rg).json()
    assert stat["size"] == 9 and stat["kind"] == "file"
    assert c.request(fleet["w"].address, "DELETE", "/v1/files/a/b/c/moved",
                     headers={"Authorization": "Bearer " + wg}).status == 200
    assert c.get(fleet["r2"].address, "/a/b/c/moved", fleet.grant("r2", "reader", 1)).status \
        == 404
    root = c.call(fleet["r1"].address, "GET", "/v1/list", rg).json()
    assert sorted(e["path"] for e in root["entries"]) == ["/a", "/dir"]


def test_file_fleet_roundtrip(file_fleet: AgentFleet) -> None:
    _roundtrip(file_fleet)


def test_rbd_fleet_roundtrip(rbd_fleet: AgentFleet) -> None:
    _roundtrip(rbd_fleet)


def test_promote_demote_and_health(file_fleet: AgentFleet) -> None:
    fleet, c = file_fleet, file_fleet.client
    assert c.put(fleet["w"].address, "/before", b"x" * 5000,
                 fleet.grant("w", "writer", 1)).status == 201
    # demote the writer: it stops writing at once
    resp = c.call(fleet["w"].address, "POST", "/v1/demote", fleet.grant("w", "demote", 2),
                  {"fleet": "test", "node": "w", "epoch": 2, "writer": "r1"})
    assert resp.status == 200, resp.body
    assert resp.json()["role"] == "reader"
    refused = c.put(fleet["w"].address, "/after", b"y", fleet.grant("w", "writer", 2))
    assert refused.status == 409 and refused.json()["error"] == "not_writer"
    assert refused.json()["writer"] == "r1"
    # promote r1 to epoch 2 with the map's readers: r2 was in sync (waited for from the first
    # write), w was just demoted (it must earn its place)
    readers = [{"node": n, "address": fleet[n].address} for n in ("w", "r2")]
    resp = c.call(fleet["r1"].address, "POST", "/v1/promote", fleet.grant("r1", "promote", 2),
                  {"fleet": "test", "node": "r1", "epoch": 2, "readers": readers,
                   "in_sync": ["r2"], "push_grants": fleet.push_grants("r1", ("w", "r2"), 2)})
    assert resp.status == 200, resp.body
    assert resp.json()["role"] == "writer" and resp.json()["epoch"] == 2
    assert resp.json()["in_sync"] == ["r2"]
    revision = resp.json()["sync_revision"]
    # w joins once it caught up: the writer says so (a newer sync revision), then waits for it
    deadline = time.monotonic() + 10
    while fleet.health("r1")["in_sync"] != ["r2", "w"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fleet.health("r1")["in_sync"] == ["r2", "w"]
    assert fleet.health("r1")["sync_revision"] > revision
    put = c.put(fleet["r1"].address, "/after", b"z" * 10, fleet.grant("r1", "writer", 2))
    assert put.status == 201, put.body
    assert sorted(put.json()["acked"]) == ["r2", "w"]
    for node in ("w", "r2"):
        got = c.get(fleet[node].address, "/after", fleet.grant(node, "reader", 2))
        assert got.status == 200 and got.body == b"z" * 10
        assert fleet.epoch(node) == 2
    # an old-epoch write grant at the new writer is stale
    stale = c.put(fleet["r1"].address, "/x", b"1", fleet.grant("r1", "writer", 1))
    assert stale.status == 409 and stale.json()["error"] == "stale_epoch"
    health = fleet.health("r1")
    assert health["selftest"] == "ok" and health["in_sync"] == ["r2", "w"]
    metrics = c.request(fleet["r1"].address, "GET", "/metrics")
    assert metrics.status == 200
    assert b"rbdfleet_agent_is_writer 1" in metrics.body
    assert b'rbdfleet_agent_requests_total{method="PUT",route="put",status="201"}' \
        in metrics.body


def test_sigterm_is_graceful(file_fleet: AgentFleet) -> None:
    for node in ("w", *READERS):
        assert file_fleet[node].stop() == 0
        assert "event=stopped" in file_fleet[node].log.read_text()
    assert b"fleet-secret" not in b"".join(
        file_fleet[n].log.read_bytes() for n in ("w", *READERS))


def test_tls_fleet(fleet_factory: FleetFactory, tmp_path: Path) -> None:
    """With a cert and key the agents serve HTTPS, and the writer pushes over HTTPS."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    fleet = fleet_factory(f"file:{image}", tls_cert=str(cert), tls_key=str(key),
                          tls_ca=str(cert))
    fleet.client.tls = ssl.create_default_context(cafile=str(cert))
    put = fleet.client.put(fleet["w"].address, "/secure", b"s" * 1000,
                           fleet.grant("w", "writer", 1))
    assert put.status == 201 and put.json()["acked"] == ["r1", "r2"], put.body
    got = fleet.client.get(fleet["r2"].address, "/secure", fleet.grant("r2", "reader", 1))
    assert got.body == b"s" * 1000
    with pytest.raises(OSError):  # plain HTTP gets no answer from a TLS agent
        AgentClient(timeout=2).request(fleet["r1"].address, "GET", "/v1/health")


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_bodies_are_streamed(fleet_factory: FleetFactory, tmp_path: Path) -> None:
    """Bodies are streamed, not buffered: after a 32 MiB put + get has warmed the I/O buffers
    (the volume keeps a few 4 MiB writes and reads in flight), a 96 MiB put + get raises the
    peak RSS of the writer and of the reader by less than half the body (measured: ~24 and
    ~12 MiB; buffering it would add >= 96 MiB)."""
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(192 << 20)
    fleet = fleet_factory(f"file:{image}")
    block = os.urandom(1 << 20)
    w_pid, r_pid = fleet["w"].proc.pid, fleet["r1"].proc.pid  # type: ignore[union-attr]
    peaks = []
    for name, mib in (("/warm", 32), ("/big", 96)):
        put = fleet.client.put(fleet["w"].address, name, (block for _ in range(mib)),
                               fleet.grant("w", "writer", 1), size=mib << 20)
        assert put.status == 201, put.body
        got = fleet.client.get(fleet["r1"].address, name, fleet.grant("r1", "reader", 1))
        assert hashlib.sha256(got.body).digest() == hashlib.sha256(block * mib).digest()
        peaks.append((_hwm_mib(w_pid), _hwm_mib(r_pid)))
    assert peaks[1][0] - peaks[0][0] < 48, peaks
    assert peaks[1][1] - peaks[0][1] < 48, peaks


def test_a_spare_waits_for_its_disk_then_serves_or_exits_if_it_is_no_volume(
    fleet_factory: FleetFactory, tmp_path: Path
) -> None:
    """A spare's agent (config ``role = "spare"``) starts with no disk: it answers its health
    as ``starting`` and serves no file; once the disk appears it starts as a reader and
    catches up. One whose disk turns out to hold no volume exits 1 (its unit restarts it),
    as an agent with that disk would at once."""
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    fleet = fleet_factory(f"file:{image}", readers=("r1",))
    put = fleet.client.put(fleet["w"].address, "/a", b"hello", fleet.grant("w", "writer", 1))
    assert put.status == 201, put.body
    later = tmp_path / "attached-later.raw"
    spare = fleet.add("s1", role="spare", backend=f"file:{later}")
    time.sleep(1.0)  # a few looks for the disk
    assert fleet.health("s1")["role"] == "starting" and spare.alive
    grant = fleet.grant("s1", "reader", 1)
    assert fleet.client.get(spare.address, "/a", grant).status == 503
    later.symlink_to(image)  # the coordinator's attach
    fleet.wait_for(lambda: fleet.health("s1")["role"] == "reader"
                   and fleet.epoch("s1") == 1, what="the spare a reader")
    fleet.wait_for(lambda: fleet.client.get(spare.address, "/a", grant).status == 200,
                   what="the spare serving /a")
    assert fleet.client.get(spare.address, "/a", grant).body == b"hello"

    garbage = tmp_path / "not-a-volume.raw"
    broken = fleet.add("s2", role="spare", backend=f"file:{garbage}")
    garbage.write_bytes(os.urandom(1 << 20))
    assert broken.proc is not None
    assert broken.proc.wait(30) == 1
    assert "event=start_failed" in broken.log.read_text()
