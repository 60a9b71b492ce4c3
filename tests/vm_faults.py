"""A writer VM fault under the recorded workload, on the session's TCG guests: the shared steps.

Used by the VM fault tests (tests/fault/test_paused_writer_vm.py: writer VM paused;
tests/fault/test_cut_off_writer_vm.py: writer VM cut off from the coordinator, and its disk
pulled away; tests/fault/test_agent_restart_vm.py: writer agent killed, writer VM powered off).
Each test brings a fleet up (:func:`start_under_stream`: ``rbdfleet provision``, ``deploy``,
``coordinator run`` with its Ceph-blocklist fencer), runs tests/jepsen.py's recorded workload
on the fleet's RBD image across the VMs (:class:`Recorded`), injects its fault, waits for the
failover (:func:`fail_over_under_stream`), judges the history with
:func:`tests.jepsen.assert_history_clean` (final state read on every node handed out), then
lets the old writer come back and checks that it changed no byte of the image and steps down
(:func:`old_writer_steps_down`). tests/fault/test_reboot_vm.py reboots a reader's and the
writer's guest from inside (:class:`GuestReboot`) and waits for them to come back by
themselves (:func:`in_sync_reader`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.core.protocol import PutRequest
from agents.service import UNIT_NAME
from orchestrator.coordinator.keys import FleetKeys, read_master_keys
from orchestrator.errors import SandboxError
from orchestrator.rollout import GUEST_TLS
from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.vms import VmSet
from orchestrator.testing.history import History, Op
from tests.integration.test_mission_vm import _health, _modes
from tests.jepsen import SEED, Workload, assert_history_clean, recording_client

Say = Callable[[str], None]

WRITER = "vm1"  # the fleet's first writer (the mission fixture's config)


def say_as(tag: str) -> Say:
    """Narration to stderr, prefixed with ``[tag]`` (shown with ``pytest -s``)."""

    def say(message: str) -> None:
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)

    return say


class Recorded:
    """tests/jepsen.py's workload (2 writer and 2 reader threads: puts of 100 B to 3 MiB,
    deletes, renames, mkdirs, gets and stats) through the fleet's own coordinator, with the
    config's client credential and fleet CA; ``seed`` replays it (``RBDFLEET_TEST_SEED``);
    ``root``: a directory of its own, for a second workload on the same fleet."""

    def __init__(self, fleet: Mission, seed: int = SEED, root: str = "") -> None:
        cfg = fleet.config
        assert cfg.fleet.client_secret_file is not None  # the sandbox config names one
        (line, *_) = read_master_keys(cfg.fleet.client_secret_file, "fleet.client_secret_file")
        # a request in flight to a frozen writer is abandoned once the map moves on; this
        # bounds the one sent before the map changed
        self.client = recording_client(fleet.client().coordinator.urls, cfg.fleet.name,
                                       bytes.fromhex(line.decode()), client=cfg.fleet.client,
                                       io_timeout=5.0, retry_timeout=120.0,
                                       ca_file=str(cfg.pki_dir / "ca.pem"))
        self.seed = seed
        self.history = History()
        self.workload = Workload(self.client, self.history, seed, root)

    def start(self) -> None:
        """Start the client threads."""
        self.workload.start(writers=2, readers=2)

    @property
    def acks(self) -> list[tuple[float, str, int]]:
        """(monotonic time, node, epoch) of every acknowledged write so far."""
        return list(self.workload.acks)

    def finish(self, min_acked: int = 10) -> list[Op]:
        """Stop the threads (a thread that died fails the test) and judge the history."""
        self.workload.finish(min_puts=min_acked)
        return self.check(min_acked)

    def check(self, min_acked: int = 10) -> list[Op]:
        """Every checker over the history and the final state read now on every node handed
        out for reading (again after a rejoin: the rejoined node is read too)."""
        return assert_history_clean(self.history, self.client, self.seed, min_acked=min_acked)

    def tally(self) -> str:
        """How the ops ended, for the narration."""
        ops = self.history.ops()
        counts = {k: sum(1 for o in ops if o.outcome == k) for k in ("ok", "fail", "unknown")}
        puts = sum(1 for o in ops if o.kind == "put" and o.outcome == "ok")
        return f"seed {self.seed}: {len(ops)} ops {counts}, {puts} acknowledged puts"


def image_digest(fleet: Mission) -> str:
    """SHA-256 of every byte of the fleet's RBD image (``rbd export``), once the writer has
    settled (its idle checkpoints change the image at rest, and no one else may)."""
    fleet.settle()
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


def agent_health(fleet: Mission, vm: str) -> dict[str, Any]:
    """``GET /v1/health`` of ``vm``'s agent."""
    return _health(f"{fleet.config.vm(vm).address}:{fleet.config.fleet.agent_port}")


def in_sync_reader(fleet: Mission, vm: str, epoch: int) -> bool:
    """Whether the published map is at ``epoch`` and hands ``vm`` out as an in-sync reader
    (asked in-process: a ``rbdfleet status`` subprocess per poll takes seconds on a loaded
    machine)."""
    m = fleet.fleet_map()
    now: dict[str, Any] = next((x for x in m.get("members", []) if x["name"] == vm), {})
    return m.get("epoch") == epoch and now.get("role") == "reader" and bool(now.get("in_sync"))


def agent_service(vms: VmSet, vm: str) -> dict[str, str]:
    """``systemctl show`` of the agent's unit: ActiveState, MainPID, NRestarts, UnitFileState."""
    shown = vms.exec(vm, ["systemctl", "show", "-p", "ActiveState", "-p", "MainPID",
                          "-p", "NRestarts", "-p", "UnitFileState", UNIT_NAME])
    assert shown.returncode == 0, shown.stderr
    return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)


def domain_running(vms: VmSet, vm: str) -> bool:
    """Whether libvirt runs ``vm``'s domain."""
    target = vms.vm(vm)
    state = subprocess.run(["virsh", "-c", target.uri, "domstate", target.domain],
                           capture_output=True, text=True, timeout=60, check=True)
    return state.stdout.strip() == "running"


@dataclass(frozen=True)
class Rebooted:
    """A guest's reboot, in s from its ``systemctl reboot``."""

    booting: float  # its new boot began (the old one's shutdown took this long)
    serving: float  # its agent served again (``event=serving`` in the new boot's journal)
    ssh: float  # it answered SSH again
    starts: int  # systemd's starts of the agent in the new boot until it served
    failed: str  # the last start's failure before that (``event=start_failed``), or ""


class GuestReboot:
    """``vm``'s guest rebooted from inside (:meth:`VmSet.reboot`, ``systemctl reboot``):
    calling it is the fault; :meth:`wait_up` waits for the new boot and times it."""

    def __init__(self, vms: VmSet, vm: str) -> None:
        self.vms = vms
        self.vm = vm
        self.at = 0.0  # monotonic, once the reboot was asked for
        self._since = 0
        self._boot_id = ""

    def _boot_id_now(self) -> str:
        done = self.vms.exec(self.vm, ["cat", "/proc/sys/kernel/random/boot_id"])
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def __call__(self) -> None:
        self._boot_id = self._boot_id_now()
        self._since = self.vms.reboot(self.vm)
        self.at = time.monotonic()

    def wait_up(self, timeout: float = 180.0) -> Rebooted:
        """Once the guest answers SSH after a new boot and its agent serves: the timeline."""
        self.vms.wait_booted(self.vm, self._since, timeout)
        ssh = time.monotonic() - self.at
        assert self._boot_id_now() != self._boot_id  # booted again, not a network hiccup
        deadline = time.monotonic() + timeout
        while True:  # this boot's journal of the agent and the uptime, read together
            done = self.vms.exec(self.vm, ["sh", "-c", "cat /proc/uptime; journalctl -b -o json "
                                           f"--output-fields=MESSAGE -u {UNIT_NAME}"])
            read_at = time.monotonic()
            uptime, *lines = done.stdout.splitlines()
            entries = [(int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, str(e.get("MESSAGE", "")))
                       for e in map(json.loads, lines)]
            serving = next((i for i, (_, m) in enumerate(entries) if "event=serving" in m), None)
            if serving is not None:
                break
            assert time.monotonic() < deadline, f"{self.vm}'s agent not serving: {entries[-5:]}"
            time.sleep(1)
        before = [m for _, m in entries[:serving]]
        booted = read_at - float(uptime.split()[0])  # host's monotonic when the kernel started
        return Rebooted(round(booted - self.at, 1),
                        round(booted + entries[serving][0] - self.at, 1), round(ssh, 1),
                        sum(1 for m in before if m.startswith("Started ")),
                        next((m for m in reversed(before) if "event=start_failed" in m), ""))

    def restore(self) -> None:
        """Power-cycle the guest if it does not answer SSH (a reboot that never came back):
        the session's guest must run for the tests after this one."""
        if self.vms.exec(self.vm, ["true"], timeout=30).returncode != 0:
            self.vms.crash(self.vm)
            self.vms.start(self.vm)


def rejoined(fleet: Mission, vm: str, epoch: int, timeout: float = 180.0) -> None:
    """Wait until ``vm`` is an in-sync reader of ``epoch`` with no command from anyone; when
    it is not within ``timeout``, fail with the map and the disks' modes (the guests' agent
    journals are in the failed test's report: tests/fixtures/vms.py)."""
    try:
        fleet.wait(lambda: in_sync_reader(fleet, vm, epoch), timeout,
                   f"{vm} an in-sync reader of epoch {epoch}, by itself")
    except SandboxError as exc:
        m = fleet.fleet_map()
        members = [(x["name"], x["role"], x["in_sync"]) for x in m.get("members", [])]
        raise AssertionError(f"{exc}; the map: epoch {m.get('epoch')}, writer {m.get('writer')}, "
                             f"phase {m.get('phase')}, members {members}; disks: "
                             f"{_modes(fleet)}") from exc


@dataclass
class Running:
    """A fleet up with its coordinator, a stale writer in the writer's VM and the recorded
    workload."""

    log: Path  # the coordinator's
    before: dict[str, str]  # acknowledged before the workload: path -> sha256
    recorded: Recorded


def start_under_stream(fleet: Mission, writer: str | None, prefix: str) -> Running:
    """Provision, deploy, start the coordinator, put a few files, start a stale writer process
    in ``writer``'s VM (writing to its read-write disk as an old writer would; None: none) and
    the recorded workload from this host; returns once the workload has acknowledged
    writes."""
    fleet.provision()
    fleet.deploy()
    log = fleet.config_path.parent / "coordinator.log"
    fleet.start_coordinator(log)
    before = fleet.put_many(5, prefix=f"{prefix}/before")
    if writer is not None:
        fleet.start_stale_writer(writer)
    recorded = Recorded(fleet)
    recorded.start()
    fleet.wait(lambda: len(recorded.acks) >= 3, 60, "the recorded workload")
    return Running(log, before, recorded)


def settled(fleet: Mission) -> dict[str, Any]:
    """The map, once stable with a writer and every other VM an in-sync reader."""
    others = len(fleet.config.vms) - 1

    def ready() -> bool:
        m = fleet.fleet_map()
        return (m.get("phase") == "stable" and m.get("writer") is not None
                and sum(1 for x in m.get("members", [])
                        if x["role"] == "reader" and x["in_sync"]) == others)

    fleet.wait(ready, 240, "a writer and in-sync readers")
    return fleet.fleet_map()


def continue_under_stream(fleet: Mission, root: str) -> Running:
    """On a fleet already running (an earlier fault of the module undone): once it is settled,
    a new recorded workload under ``root``; returns once it has acknowledged writes."""
    settled(fleet)
    recorded = Recorded(fleet, root=root)
    recorded.start()
    fleet.wait(lambda: len(recorded.acks) >= 3, 60, "the recorded workload")
    return Running(fleet.config_path.parent / "coordinator.log", {}, recorded)


def confirmed_dead(log: Path, node: str) -> str:
    """The coordinator's last ``node_confirmed_dead`` line for ``node`` (its evidence)."""
    lines = [line for line in log.read_text().splitlines()
             if "event=node_confirmed_dead" in line and f" node={node} " in line]
    assert lines, f"{node} never confirmed dead"
    return lines[-1]


@dataclass(frozen=True)
class Failover:
    """What the failover measured and the map it left."""

    announced: float  # s from the fault until the map named another writer, stable
    first_ack: float  # s from the fault until the new writer acknowledged a streamed put
    status: dict[str, Any]  # ``rbdfleet status --json`` after it
    new_writer: str
    other: str  # the reader that stayed a reader


def fail_over_under_stream(fleet: Mission, running: Running, old: str, fault: Callable[[], None],
                           say: Say, epoch: int = 2, *, back_by_itself: bool = False) -> Failover:
    """Inject ``fault`` on the writer ``old``, wait until another writer is announced and
    acknowledges the workload's writes, stop the workload and judge its history; checks
    exactly one failover (``epoch``, no candidate fenced), ``old`` acknowledging nothing at
    ``epoch`` and out (or, ``back_by_itself``, out or a reader again: a node whose fault ends
    with the failover, demoted by the coordinator), the other reader in sync, no
    acknowledged put lost."""
    recorded = running.recorded
    fault()
    at = time.monotonic()
    fleet.wait(lambda: fleet.fleet_map().get("writer") not in (None, old)
               and fleet.fleet_map().get("phase") == "stable", 90, "a new writer announced")
    announced = round(time.monotonic() - at, 2)
    fleet.wait(lambda: any(t > at and node != old for t, node, _ in recorded.acks),
               90, "a write acknowledged by a new writer")
    acked_at = min(t for t, node, _ in recorded.acks if t > at and node != old)
    fleet.wait(lambda: len([1 for t, _, _ in recorded.acks if t > acked_at]) >= 5, 60,
               "more writes on the new writer")
    status = status_of(fleet)
    new_writer = status["map"]["writer"]
    recorded.finish()
    assert not [a for a in recorded.acks if a[1] == old and a[2] >= epoch], recorded.acks
    readers = sorted(m["name"] for m in status["map"]["members"] if m["name"] != old)
    assert new_writer in readers and status["map"]["epoch"] == epoch, status  # none fenced
    assert status["map"]["phase"] == "stable"
    assert member(status, old)["role"] in (("out", "reader") if back_by_itself else ("out",))
    other = next(r for r in readers if r != new_writer)
    assert member(status, other)["role"] == "reader" and member(status, other)["in_sync"]
    lost = fleet.verify(running.before)
    assert lost == [], f"acknowledged puts lost: {lost}"
    say(f"history clean on every node, {recorded.tally()}")
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
    # Over two self-test periods: never in sync, then out again (flapping). The samples miss
    # a flap between two of them; the coordinator's log does not: no confirmed death of
    # ``old`` after the first sample that saw it in sync.
    seen, deaths = [], []
    dead_line = f"event=node_confirmed_dead fleet={fleet.config.fleet.name} node={old} "
    for _ in range(24):
        now = member(status_of(fleet), old)
        seen.append((now["role"], now["in_sync"]))
        deaths.append(running.log.read_text().count(dead_line))
    say(f"{old} as the coordinator saw it after the demotion: {sorted(set(seen))}")
    assert not any(a == ("reader", True) and b[0] == "out"
                   for a, b in itertools.pairwise(seen)), seen
    if ("reader", True) in seen:
        first_in_sync = deaths[seen.index(("reader", True))]
        assert deaths[-1] == first_in_sync, (
            f"{old} confirmed dead again after it was seen in sync", seen, deaths)
    assert image_digest(fleet) == image_before  # the old writer changed no byte
    check = fsck(fleet)
    assert check.returncode == 0, check.stdout + check.stderr
    say(f"image unchanged; fsck: {check.stdout.strip().splitlines()[-1]}")

    fleet.kill_agent(old)  # the explicit rejoin: a fresh agent on the read-only disk
    fleet.rejoin(old)
    assert fleet.verify(running.before) == []
    running.recorded.check()  # the history again, the rejoined node read too
    assert status_of(fleet)["map"]["epoch"] == 2


STALE_PATH = "/stale/put.bin"
_STALE_PUT = r"""
import json, ssl, sys, urllib.error, urllib.request
url, headers, ca = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
request = urllib.request.Request(url, data=b"STALE" * 100, headers=headers, method="PUT")
context = ssl.create_default_context(cafile=ca)
try:
    print(urllib.request.urlopen(request, timeout=20, context=context).status, "ok")
except urllib.error.HTTPError as exc:
    print(exc.code, json.loads(exc.read() or b"{}").get("error"))
except OSError as exc:
    print(599, type(exc).__name__)
"""


def stale_put(fleet: Mission, vms: VmSet, via: str, address: str) -> tuple[int, str]:
    """(status, error code) of a put of :data:`STALE_PATH` sent from ``via``'s guest to the
    agent at ``address`` with a write grant of epoch 1 for :data:`WRITER` (a client whose map
    is stale); 599 when no answer came."""
    keys = FleetKeys(fleet.config.fleet.name, read_master_keys(fleet.config.fleet.secret_file),
                     time.time)
    grant = keys.grant(WRITER, "write", 1, 60.0)
    headers = PutRequest(grant=grant, size=500, readers=()).to_headers()
    done = vms.exec(via, ["python3", "-c", _STALE_PUT,
                          f"https://{address}/v1/files{STALE_PATH}", json.dumps(headers),
                          GUEST_TLS["ca"]], timeout=60)
    assert done.returncode == 0, done.stderr
    status, code = done.stdout.split()
    return int(status), code
