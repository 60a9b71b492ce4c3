"""The writer VM is paused (``virsh suspend``) under a stream of puts, then comes back.

On the session's three TCG guests and Ceph cluster, one fleet of its own (the ``mission``
fixture of the mission test: own name, image, users, serial; everything undone after):

1. a client streams small puts; a process in the writer's VM keeps writing to its read-write
   disk (as a stale writer would); the writer VM is paused;
2. the coordinator fences it (Ceph blocklist) and switches roles although the paused guest
   cannot release its disk: the new writer accepts writes, exactly one failover (epoch 2,
   no candidate fenced), no acknowledged put lost;
3. the VM is resumed: the stale process's next write fails with EIO, not a byte of the image
   changes (sha256 of the whole image, fsck clean), the coordinator re-attaches its disk
   ``<readonly/>`` and it stays ``out`` (no flapping in and out of sync) until its agent is
   restarted, when it rejoins as an in-sync reader.

Budget: ~2 min with the VMs already booted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agents.errors import RbdfleetError
from orchestrator.sandbox.demo import Mission, sha256
from orchestrator.sandbox.vms import VmSet
from tests.integration.test_mission_vm import _health, _modes, mission  # noqa: F401

pytestmark = [pytest.mark.fault, pytest.mark.vm]

WRITER = "vm1"


def _say(message: str) -> None:
    print(f"[paused-writer] {message}", file=sys.stderr, flush=True)


class PutStream:
    """Small puts one after another from a thread; what was acknowledged, by whom, when."""

    def __init__(self, fleet: Mission, io_timeout: float) -> None:
        self.client = fleet.client(timeout=120.0)
        # a put in flight to the frozen writer waits this long before it follows the new map
        self.client.io_timeout = io_timeout
        self.acked: dict[str, str] = {}
        self.by_node: list[tuple[float, str, int]] = []  # (monotonic ack time, node, epoch)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(150)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            path = f"/paused/stream-{i:04d}.bin"
            data = hashlib.sha256(path.encode()).digest() * 128  # 4 KiB, its own content
            try:
                result = self.client.put_bytes(data, path)
            except RbdfleetError as exc:
                self.errors.append(f"{path}: {exc}")
            else:
                self.acked[path] = sha256(data)
                self.by_node.append((time.monotonic(), result.node, result.epoch))
            i += 1
            time.sleep(0.05)


def _image_digest(fleet: Mission) -> str:
    ceph = fleet.config.ceph
    image = f"{ceph.pool}/{fleet.config.fleet.image}"
    export = subprocess.run(["rbd", "-c", str(ceph.conf), "--keyring", str(ceph.keyring),
                             "export", image, "-"], capture_output=True, timeout=120, check=True)
    return hashlib.sha256(export.stdout).hexdigest()


def _fsck(fleet: Mission) -> subprocess.CompletedProcess[str]:
    ceph = fleet.config.ceph
    return subprocess.run(
        [sys.executable, "-m", "agents", "fsck", f"rbd:{ceph.pool}/{fleet.config.fleet.image}",
         "--conf", str(ceph.conf), "--keyring", str(ceph.keyring)],
        capture_output=True, text=True, timeout=120, check=False)


def _member(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in status["map"]["members"] if m["name"] == name)


def test_paused_writer_is_replaced_and_cannot_change_a_byte_when_it_comes_back(
        mission: Mission, sandbox_vms: VmSet, tmp_path: Path) -> None:  # noqa: F811
    mission.provision()
    mission.deploy()
    log = mission.config_path.parent / "coordinator.log"
    mission.start_coordinator(log)
    before = mission.put_many(5, prefix="/paused/before")
    mission.start_stale_writer(WRITER)
    stream = PutStream(mission, io_timeout=5.0)
    stream.start()
    mission.wait(lambda: len(stream.acked) >= 3, 60, "the put stream")

    sandbox_vms.pause(WRITER)
    paused = time.monotonic()
    _say("writer VM paused")
    mission.wait(lambda: mission.fleet_map().get("writer") not in (None, WRITER)
                 and mission.fleet_map().get("phase") == "stable", 90, "a new writer announced")
    announced = round(time.monotonic() - paused, 2)
    mission.wait(lambda: any(t > paused and node != WRITER for t, node, _ in stream.by_node),
                 90, "a put acknowledged by a new writer")
    first_ack = min(t for t, node, _ in stream.by_node if t > paused and node != WRITER)
    failover = round(first_ack - paused, 2)
    _say(f"new writer announced {announced} s, first streamed put acknowledged by it "
         f"{failover} s after the pause (the put in flight to the frozen writer waited for "
         "the client's 5 s I/O timeout)")
    mission.wait(lambda: len([1 for t, _, _ in stream.by_node if t > first_ack]) >= 5, 60,
                 "more puts on the new writer")
    stream.stop()
    status = json.loads(mission.cli("status", "--json").stdout)
    new_writer = status["map"]["writer"]
    assert new_writer in ("vm2", "vm3") and status["map"]["epoch"] == 2  # no candidate fenced
    assert status["map"]["phase"] == "stable"
    assert _member(status, WRITER)["role"] == "out"
    other = next(r for r in ("vm2", "vm3") if r != new_writer)
    assert _member(status, other)["role"] == "reader" and _member(status, other)["in_sync"]
    # the paused guest still holds its (fenced, useless) read-write disk: the proof was the
    # blocklist, logged as such by the role switch
    assert _modes(mission) == {WRITER: "rw", new_writer: "rw", other: "ro"}
    assert "still holds a fenced read-write disk" in log.read_text()
    lost = mission.verify({**before, **stream.acked})
    assert lost == [], f"acknowledged puts lost: {lost}"
    _say(f"{len(stream.acked)} streamed puts acknowledged, none lost; not acknowledged: "
         f"{stream.errors or 'none'}")
    image_before = _image_digest(mission)

    sandbox_vms.resume(WRITER)
    resumed = time.monotonic()
    mission.wait(lambda: "failed" in mission.stale_writer_log(WRITER), 60,
                 "the resumed stale writer's failed write")
    outcome = mission.stale_write_outcome(WRITER)
    _say(f"stale writer after resume: {outcome}")
    assert "errno=5 EIO" in outcome
    mission.wait(lambda: _modes(mission).get(WRITER) == "ro", 90,
                 f"{WRITER}'s disk re-attached read-only by the coordinator")
    _say(f"{WRITER} read-only again {time.monotonic() - resumed:.1f} s after the resume")
    address = f"{mission.config.vm(WRITER).address}:{mission.config.fleet.agent_port}"
    mission.wait(lambda: _health(address)["epoch"] == 2, 30, f"{WRITER} demoted to epoch 2")
    assert _health(address)["role"] == "reader"
    seen = []
    for _ in range(24):  # over two self-test periods: never in sync, then out again (flapping)
        member = _member(json.loads(mission.cli("status", "--json").stdout), WRITER)
        seen.append((member["role"], member["in_sync"]))
    _say(f"{WRITER} as the coordinator saw it after the demotion: {sorted(set(seen))}")
    assert not any(a == ("reader", True) and b[0] == "out"
                   for a, b in itertools.pairwise(seen)), seen
    assert _image_digest(mission) == image_before  # the stale writer changed no byte
    check = _fsck(mission)
    assert check.returncode == 0, check.stdout + check.stderr
    _say(f"image unchanged after the resume; fsck: {check.stdout.strip().splitlines()[-1]}")

    mission.kill_agent(WRITER)  # the explicit rejoin: a fresh agent on the read-only disk
    mission.rejoin(WRITER)
    assert mission.verify({**before, **stream.acked}) == []
    assert json.loads(mission.cli("status", "--json").stdout)["map"]["epoch"] == 2
    _say(f"failover with a paused writer VM: announced {announced} s, put acknowledged "
         f"{failover} s; rejoin {mission.timings['rejoin']} s")
