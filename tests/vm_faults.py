"""A writer VM fault under a stream of puts, on the session's TCG guests: the shared steps.

Used by the VM fault tests (tests/fault/test_paused_writer_vm.py: writer VM paused;
tests/fault/test_cut_off_writer_vm.py: writer VM cut off from the coordinator). Each test
brings a fleet up (:func:`start_under_stream`), injects its fault, waits for the failover
(:func:`fail_over_under_stream`), then lets the old writer come back and checks that it
changed no byte of the image and steps down (:func:`old_writer_steps_down`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.errors import RbdfleetError
from orchestrator.sandbox.demo import Mission, sha256
from tests.integration.test_mission_vm import _health, _modes

Say = Callable[[str], None]

WRITER = "vm1"  # the fleet's first writer (the mission fixture's config)


def say_as(tag: str) -> Say:
    """Narration to stderr, prefixed with ``[tag]`` (shown with ``pytest -s``)."""

    def say(message: str) -> None:
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)

    return say


class PutStream:
    """Small puts one after another from a thread; what was acknowledged, by whom, when."""

    def __init__(self, fleet: Mission, io_timeout: float, prefix: str) -> None:
        self.client = fleet.client(timeout=120.0)
        # a put in flight to the lost writer waits this long before it follows the new map
        self.client.io_timeout = io_timeout
        self.prefix = prefix
        self.acked: dict[str, str] = {}
        self.by_node: list[tuple[float, str, int]] = []  # (monotonic ack time, node, epoch)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start putting in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the put in flight (bounded: its client times out)."""
        self._stop.set()
        self._thread.join(150)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            path = f"{self.prefix}/stream-{i:04d}.bin"
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


def image_digest(fleet: Mission) -> str:
    """SHA-256 of every byte of the fleet's RBD image (``rbd export``)."""
    ceph = fleet.config.ceph
    image = f"{ceph.pool}/{fleet.config.fleet.image}"
    export = subprocess.run(["rbd", "-c", str(ceph.conf), "--keyring", str(ceph.keyring),
                             "export", image, "-"], capture_output=True, timeout=120, check=True)
    return hashlib.sha256(export.stdout).hexdigest()


def fsck(fleet: Mission) -> subprocess.CompletedProcess[str]:
    """``rbdfleet-agent fsck`` of the fleet's RBD image (exit 0: clean)."""
    ceph = fleet.config.ceph
    return subprocess.run(
        [sys.executable, "-m", "agents", "fsck", f"rbd:{ceph.pool}/{fleet.config.fleet.image}",
         "--conf", str(ceph.conf), "--keyring", str(ceph.keyring)],
        capture_output=True, text=True, timeout=120, check=False)


def member(status: dict[str, Any], name: str) -> dict[str, Any]:
    """The member ``name`` of a ``rbdfleet status --json`` answer."""
    return next(m for m in status["map"]["members"] if m["name"] == name)


def status_of(fleet: Mission) -> dict[str, Any]:
    """``rbdfleet status --json``."""
    result: dict[str, Any] = json.loads(fleet.cli("status", "--json").stdout)
    return result


@dataclass
class Running:
    """A fleet up with its coordinator, a stale writer in the writer's VM and a put stream."""

    log: Path  # the coordinator's
    before: dict[str, str]  # acknowledged before the stream: path -> sha256
    stream: PutStream

    @property
    def acked(self) -> dict[str, str]:
        """Every put acknowledged so far: path -> sha256."""
        return {**self.before, **self.stream.acked}


def start_under_stream(fleet: Mission, writer: str, prefix: str) -> Running:
    """Provision, deploy, start the coordinator, put a few files, start a stale writer process
    in ``writer``'s VM (writing to its read-write disk as an old writer would) and a stream of
    puts from this host (5 s client I/O timeout); returns once the stream is acknowledged."""
    fleet.provision()
    fleet.deploy()
    log = fleet.config_path.parent / "coordinator.log"
    fleet.start_coordinator(log)
    before = fleet.put_many(5, prefix=f"{prefix}/before")
    fleet.start_stale_writer(writer)
    stream = PutStream(fleet, io_timeout=5.0, prefix=prefix)
    stream.start()
    fleet.wait(lambda: len(stream.acked) >= 3, 60, "the put stream")
    return Running(log, before, stream)


@dataclass(frozen=True)
class Failover:
    """What the failover measured and the map it left."""

    announced: float  # s from the fault until the map named another writer, stable
    first_ack: float  # s from the fault until the new writer acknowledged a streamed put
    status: dict[str, Any]  # ``rbdfleet status --json`` after it
    new_writer: str
    other: str  # the reader that stayed a reader


def fail_over_under_stream(fleet: Mission, running: Running, old: str, fault: Callable[[], None],
                           say: Say) -> Failover:
    """Inject ``fault`` on the writer ``old``, wait until another writer is announced and
    acknowledges streamed puts, stop the stream; checks exactly one failover (epoch 2, no
    candidate fenced), ``old`` out, the other reader in sync, no acknowledged put lost."""
    stream = running.stream
    fault()
    at = time.monotonic()
    fleet.wait(lambda: fleet.fleet_map().get("writer") not in (None, old)
               and fleet.fleet_map().get("phase") == "stable", 90, "a new writer announced")
    announced = round(time.monotonic() - at, 2)
    fleet.wait(lambda: any(t > at and node != old for t, node, _ in stream.by_node),
               90, "a put acknowledged by a new writer")
    acked_at = min(t for t, node, _ in stream.by_node if t > at and node != old)
    fleet.wait(lambda: len([1 for t, _, _ in stream.by_node if t > acked_at]) >= 5, 60,
               "more puts on the new writer")
    stream.stop()
    status = status_of(fleet)
    new_writer = status["map"]["writer"]
    readers = sorted(m["name"] for m in status["map"]["members"] if m["name"] != old)
    assert new_writer in readers and status["map"]["epoch"] == 2, status  # no candidate fenced
    assert status["map"]["phase"] == "stable"
    assert member(status, old)["role"] == "out"
    other = next(r for r in readers if r != new_writer)
    assert member(status, other)["role"] == "reader" and member(status, other)["in_sync"]
    lost = fleet.verify(running.acked)
    assert lost == [], f"acknowledged puts lost: {lost}"
    say(f"{len(stream.acked)} streamed puts acknowledged, none lost; not acknowledged: "
        f"{stream.errors or 'none'}")
    return Failover(announced, round(acked_at - at, 2), status, new_writer, other)


def old_writer_steps_down(fleet: Mission, running: Running, old: str, image_before: str,
                          ended: float, say: Say) -> None:
    """After the fault ended (at monotonic ``ended``): ``old``'s disk is read-only (the
    coordinator re-attached it), its agent a reader of epoch 2 that does not flap (never seen
    in sync, then out again); the image is byte for byte ``image_before`` and fsck-clean;
    after an explicit rejoin (fresh agent) it is an in-sync reader and every acknowledged put
    reads back."""
    fleet.wait(lambda: _modes(fleet).get(old) == "ro", 90,
               f"{old}'s disk re-attached read-only by the coordinator")
    say(f"{old} read-only again {time.monotonic() - ended:.1f} s after the fault ended")
    address = f"{fleet.config.vm(old).address}:{fleet.config.fleet.agent_port}"
    fleet.wait(lambda: _health(address)["epoch"] == 2, 30, f"{old} demoted to epoch 2")
    assert _health(address)["role"] == "reader"
    seen = []
    for _ in range(24):  # over two self-test periods: never in sync, then out again (flapping)
        now = member(status_of(fleet), old)
        seen.append((now["role"], now["in_sync"]))
    say(f"{old} as the coordinator saw it after the demotion: {sorted(set(seen))}")
    assert not any(a == ("reader", True) and b[0] == "out"
                   for a, b in itertools.pairwise(seen)), seen
    assert image_digest(fleet) == image_before  # the old writer changed no byte
    check = fsck(fleet)
    assert check.returncode == 0, check.stdout + check.stderr
    say(f"image unchanged; fsck: {check.stdout.strip().splitlines()[-1]}")

    fleet.kill_agent(old)  # the explicit rejoin: a fresh agent on the read-only disk
    fleet.rejoin(old)
    assert fleet.verify(running.acked) == []
    assert status_of(fleet)["map"]["epoch"] == 2
