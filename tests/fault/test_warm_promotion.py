"""Warm promotion on real agent processes (file image, loopback): the writer is killed with
SIGKILL under a put load, a reader is promoted, and

- every acknowledged write is served, with its bytes, by the new writer and the other reader;
- the promoted reader kept its state (log ``event=promotion_warm``, metric
  ``rbdfleet_agent_promotions_total{mode="warm"} 1``), i.e. it did not reload the volume;
- when the image no longer matches the reader's state (a rewritten superblock), the same
  promotion opens the volume cold, says why, and loses nothing either.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import threading
import time
from pathlib import Path

import pytest

from agents.core.superblock import SLOTS, Superblock, choose
from agents.device import ALIGN
from tests.fixtures.agents import AgentFleet, FleetFactory

pytestmark = pytest.mark.fault

SIZES = (100, 5000, 70_000)  # inline, one extent block, several blocks


def _promote(fleet: AgentFleet, node: str, epoch: int, readers: tuple[str, ...]) -> float:
    """Promote as the coordinator does; seconds from request to answer."""
    started = time.monotonic()
    resp = fleet.client.call(
        fleet[node].address, "POST", "/v1/promote", fleet.grant(node, "promote", epoch),
        {"fleet": fleet.name, "node": node, "epoch": epoch, "in_sync": list(readers),
         "readers": [{"node": n, "address": fleet[n].address} for n in readers],
         "push_grants": fleet.push_grants(node, readers, epoch)})
    assert resp.status == 200, resp.body
    return time.monotonic() - started


def _load_until_killed(fleet: AgentFleet, threads: int, run_for: float) -> dict[str, str]:
    """Put unique files to the writer from ``threads`` clients, SIGKILL the writer after
    ``run_for`` seconds while they go on; path -> sha256 of every acknowledged put."""
    acked: dict[str, str] = {}
    lock = threading.Lock()
    grant = fleet.grant("w", "writer", 1)

    def client(n: int) -> None:
        for i in range(1_000_000):
            data = hashlib.sha256(f"{n}/{i}".encode()).digest() * (SIZES[i % 3] // 32 + 1)
            path = f"/load/{n}/{i}"
            try:
                resp = fleet.client.put(fleet["w"].address, path, data, grant)
            except (OSError, http.client.HTTPException):
                return  # the writer is gone: this put's outcome is unknown
            if resp.status != 201:
                return
            with lock:
                acked[path] = hashlib.sha256(data).hexdigest()

    workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(run_for)
    fleet["w"].kill()
    for worker in workers:
        worker.join(60)
        assert not worker.is_alive()
    return acked


def _assert_served(fleet: AgentFleet, node: str, epoch: int, acked: dict[str, str]) -> None:
    grant = fleet.grant(node, "reader", epoch)
    for path, digest in acked.items():
        got = fleet.client.get(fleet[node].address, path, grant)
        assert got.status == 200, (node, path, got.body[:200])
        assert hashlib.sha256(got.body).hexdigest() == digest, (node, path)


def _promotions(fleet: AgentFleet, node: str) -> dict[str, float]:
    body = fleet.client.request(fleet[node].address, "GET", "/metrics").body.decode()
    return {m: float(v) for m, v in
            re.findall(r'^rbdfleet_agent_promotions_total\{mode="(\w+)"\} (\S+)$', body, re.M)}


def test_writer_killed_under_load_reader_promoted_warm(file_fleet: AgentFleet) -> None:
    fleet = file_fleet
    acked = _load_until_killed(fleet, threads=4, run_for=2.0)
    assert len(acked) >= 20, "the load acknowledged too little to prove anything"
    seconds = _promote(fleet, "r1", 2, readers=("r2",))
    log = fleet["r1"].log.read_text()
    assert "event=promotion_warm node=r1" in log
    assert "event=promotion_cold" not in log
    assert _promotions(fleet, "r1") == {"warm": 1, "cold": 0}
    _assert_served(fleet, "r1", 2, acked)
    _assert_served(fleet, "r2", 2, acked)
    put = fleet.client.put(fleet["r1"].address, "/after", b"a" * 5000,
                           fleet.grant("r1", "writer", 2))
    assert put.status == 201, put.body
    assert put.json()["acked"] == ["r2"]
    got = fleet.client.get(fleet["r2"].address, "/after", fleet.grant("r2", "reader", 2))
    assert got.status == 200 and got.body == b"a" * 5000
    print(f"\n{len(acked)} acknowledged writes kept; warm promotion answered in {seconds:.3f} s")


def test_reader_state_not_matching_the_image_promotes_cold(file_fleet: AgentFleet) -> None:
    """The superblock was rewritten (a new generation, same geometry) after r1 opened the
    volume: r1's state is not trusted, the promotion reopens the volume and says why."""
    fleet = file_fleet
    acked = _load_until_killed(fleet, threads=2, run_for=1.0)
    image = Path(fleet.backend.removeprefix("file:"))
    with image.open("r+b") as f:
        raw = f.read(2 * ALIGN)
        sb = choose([raw[s : s + ALIGN] for s in SLOTS])
        bumped = Superblock(**{**sb.__dict__, "generation": sb.generation + 1})
        f.seek(bumped.slot)
        f.write(bumped.encode())
    _promote(fleet, "r1", 2, readers=("r2",))
    assert "event=promotion_cold node=r1 reason=superblock" in fleet["r1"].log.read_text()
    assert _promotions(fleet, "r1") == {"warm": 0, "cold": 1}
    _assert_served(fleet, "r1", 2, acked)
    _assert_served(fleet, "r2", 2, acked)



def test_lagging_reader_promoted_warm_reads_the_tail_from_the_image(
        fleet_factory: FleetFactory, tmp_path: Path) -> None:
    """r1 does not tail the journal on its own (a one-hour tail interval) and is stopped
    (SIGSTOP) while the writer goes on without it (reported lagging), so it misses the last
    writes' pushes; the writer is killed and r1 resumed: it is behind r2 when it is
    promoted, and the warm path replays what it missed from the journal on the image, so
    every acknowledged write is served."""
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    fleet = fleet_factory(f"file:{image}", start=False)
    fleet.add("r1", tail_interval=3600.0)
    fleet.add("r2")
    fleet.add("w", role="writer", readers={n: fleet[n].address for n in ("r1", "r2")})
    fleet["r1"].pause()
    try:
        acked = _load_until_killed(fleet, threads=2, run_for=8.0)
    finally:
        fleet["r1"].resume()
    assert len(acked) >= 10, "the load acknowledged too little to prove anything"
    behind, ahead = fleet.health("r1")["applied_seq"], fleet.health("r2")["applied_seq"]
    assert behind < ahead, (behind, ahead)
    _promote(fleet, "r1", 2, readers=("r2",))
    log = fleet["r1"].log.read_text()
    assert "event=promotion_warm node=r1" in log and "event=promotion_cold" not in log
    _assert_served(fleet, "r1", 2, acked)
    _assert_served(fleet, "r2", 2, acked)
