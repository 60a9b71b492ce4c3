"""Writer faults the fencing must contain, under a recorded client workload (jepsen-style).

Each node's agent opens the shared image through its own loop device (tests/shared_disk.py):
readers' devices are read-only, the coordinator's role switch makes the promoted node's device
read-write, and its fence makes the old writer's device read-only — so a fenced writer keeps
running and its next write fails with EPERM, as a blocklisted RBD writer's fails with EIO.

Scenarios (each runs :class:`tests.jepsen.Workload` throughout and checks its history: one
writer per epoch, every read the latest acknowledged version or a concurrent one, every
acknowledged write readable afterwards, no failed read; the seed is in every failure):

* **writer cut off from the coordinator, not from the disk**: the writer runs in a network
  namespace host whose firewall drops everything to and from the coordinator's address (the
  bridge gateway, where the clients also are); it still reaches the other hosts and its own
  disk. The fleet fails over; a stale client that still reaches the old writer (from another
  host, with an epoch-1 write grant) cannot change a byte of the image; once the cut heals the
  old writer steps down, follows epoch 2 and rejoins as a reader.
* **writer paused (SIGSTOP) then resumed (SIGCONT)**: the fleet fails over while it sleeps; the
  request waiting in its socket runs after SIGCONT and changes nothing; it steps down.

"Nothing changed" is checked three ways: the raw image's SHA-256 is the same before and after
the stale write, every file reads back with the same checksum, and ``rbdfleet-agent fsck``
finds the volume clean.

And without the fence: the old writer's record reaches the image but its put is not
acknowledged (its readers and the coordinator refuse its epoch), not even once told it has
no readers: the readers that leave its set must be reported to the coordinator first.
Runtime ~45 s.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents.core.protocol import PutRequest
from orchestrator.client import FleetClient
from orchestrator.coordinator.service import FleetService
from orchestrator.core.election import ElectionConfig
from orchestrator.core.liveness import LivenessConfig
from orchestrator.ports import Fencer
from orchestrator.sandbox.hosts import HostSet
from orchestrator.testing.history import History
from tests.coordinator_harness import (
    Coordinator,
    bootstrap_map,
    file_image,
    rados_store,
    start_api,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import REPO, TEST_CA, AgentFleet, FleetFactory, coordinator_tls
from tests.jepsen import (
    KEYS,
    SEED,
    Workload,
    assert_history_clean,
    read_value,
    recording_client,
)
from tests.shared_disk import LoopAttachments

pytestmark = pytest.mark.fault

CUT_TABLE = "rbdfleet_cut"


@dataclass
class LoopFleet:
    """Agents on per-node loop devices of one image, driven by one coordinator."""

    fleet: AgentFleet
    disks: LoopAttachments
    coordinator: Coordinator
    service: FleetService
    image: Path

    def client(self) -> FleetClient:
        """A client whose writes give up on a silent writer after 2 s (outcome unknown)."""
        return recording_client(
            [self.coordinator.url], self.fleet.name, io_timeout=2.0
        )

    def image_digest(self) -> str:
        """SHA-256 of every byte of the shared image, once the map's writer has settled (its
        idle checkpoints change the image at rest; no one else may)."""
        wait_until(lambda: self.fleet.health(self.service.require_active().writer)["settled"],
                   60, "the writer to settle")
        digest = hashlib.sha256()
        with self.image.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def role(self, node: str) -> tuple[str, int]:
        """(role, epoch) the node's agent reports; ("unreachable", -1) when it does not."""
        try:
            health = self.fleet.health(node)
        except (OSError, http.client.HTTPException, AssertionError):  # no answer, or not 200
            return "unreachable", -1
        return str(health["role"]), int(health["epoch"])

    def fsck(self) -> None:
        """``rbdfleet-agent fsck`` (the installed entry point) on the image: exit 0."""
        done = subprocess.run(
            [str(Path(sys.executable).with_name("rbdfleet-agent")), "fsck", str(self.image)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stdout + done.stderr


LoopFleetFactory = Callable[..., LoopFleet]


@pytest.fixture
def loop_fleet_factory(
    fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any, ceph_cluster: Any
) -> Iterator[LoopFleetFactory]:
    """``make(hosts=None, fencer=None)``: writer ``w`` and readers ``r1``, ``r2`` on loop
    devices of one image, coordinated (state in RADOS), both readers in sync. With ``hosts``,
    the agents run in its namespace hosts (w on h1, r1 on h2, r2 on h3) and the coordinator on
    the gateway; ``fencer`` replaces the loop devices' fence."""
    cleanup: list[Callable[[], object]] = []  # undone in reverse order; a truthy result is an error

    def make(hosts: HostSet | None = None, fencer: Fencer | None = None,
             election: ElectionConfig | None = None,
             liveness: LivenessConfig | None = None) -> LoopFleet:
        coordinator = start_api(hosts.gateway if hosts else "127.0.0.1")
        cleanup.append(coordinator.api.shutdown)
        image = file_image(tmp_path / "image.raw")
        fleet = fleet_factory(
            f"file:{image}",
            name=f"cf-{uuid.uuid4().hex[:8]}",
            start=False,
            coordinator=coordinator.url,
        )
        disks = LoopAttachments(image)
        cleanup.append(disks.close)
        cleanup.append(fleet.close)  # agents stop before their devices go
        for node, host_name in (("r1", "h2"), ("r2", "h3"), ("w", "h1")):
            where: dict[str, Any] = {}
            if hosts is not None:
                host = hosts.host(host_name)
                where = {
                    "listen": f"{host.address}:0",
                    "launcher": ("ip", "netns", "exec", host.netns),
                }
            writer = node == "w"
            disks.attach(node, writable=writer)
            readers = {n: fleet[n].address for n in ("r1", "r2")} if writer else None
            fleet.add(
                node,
                role="writer" if writer else "reader",
                readers=readers,
                backend=disks.backend(node),
                **where,
            )
        store = rados_store(rados_admin, ceph_cluster.pool, fleet.name)
        cleanup.append(store.close)
        service = start_service(
            coordinator, store, fencer or disks, bootstrap_map(fleet), role_switch=disks,
            election=election, liveness=liveness,
        )
        cleanup.append(coordinator.stop)  # first: no fence or promotion while we stop the rest
        wait_in_sync(service, 20)
        return LoopFleet(fleet, disks, coordinator, service, image)

    yield make
    errors: list[object] = []
    for undo in reversed(cleanup):
        try:
            result = undo()
        except Exception as exc:  # keep undoing the rest: loop devices must not leak
            result = repr(exc)
        if result:
            errors.append(result)
    assert not errors, errors


STALE_VALUE = "STALE" * 100  # what _stale_put writes to /k0 (no workload value looks like it)


def _stale_put(address: str, grant: str, launcher: tuple[str, ...] = ()) -> int:
    """Status of a put to ``address`` with ``grant``, sent from a separate process (run
    through ``launcher``, e.g. inside another host); 599 when no answer came."""
    headers = PutRequest(grant=grant, size=len(STALE_VALUE), readers=()).to_headers()
    script = (
        "import http.client, json, ssl, sys\n"
        "address, headers, ca = json.load(sys.stdin)\n"
        "host, _, port = address.rpartition(':')\n"
        "context = ssl.create_default_context(cafile=ca)\n"
        "conn = http.client.HTTPSConnection(host, int(port), timeout=20, context=context)\n"
        "try:\n"
        f"    conn.request('PUT', '/v1/files/k0', body={STALE_VALUE.encode()!r}, headers=headers)\n"
        "    print(conn.getresponse().status)\n"
        "except OSError:\n"
        "    print(599)\n"
    )
    done = subprocess.run(
        [*launcher, sys.executable, "-c", script],
        input=json.dumps([address, headers, TEST_CA]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def _post_from(launcher: tuple[str, ...], address: str, path: str, grant: str,
               payload: dict[str, Any]) -> int:
    """Status of a JSON POST to ``address`` sent from a process run through ``launcher``,
    presenting the coordinator's certificate (node-only routes need a fleet certificate)."""
    script = (
        "import http.client, json, ssl, sys\n"
        "address, path, grant, body, (cert, key, ca) = json.load(sys.stdin)\n"
        "host, _, port = address.rpartition(':')\n"
        "context = ssl.create_default_context(cafile=ca)\n"
        "context.load_cert_chain(cert, key)\n"
        "conn = http.client.HTTPSConnection(host, int(port), timeout=20, context=context)\n"
        "headers = {'Authorization': 'Bearer ' + grant, 'Content-Type': 'application/json'}\n"
        "conn.request('POST', path, body=json.dumps(dict(body, v=1)), headers=headers)\n"
        "print(conn.getresponse().status)\n"
    )
    done = subprocess.run([*launcher, sys.executable, "-c", script],
                          input=json.dumps([address, path, grant, payload,
                                            coordinator_tls()]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def _checksums(client: FleetClient) -> dict[str, str | None]:
    return {k: read_value(client, k) for k in KEYS}


def _cut(hosts: HostSet, name: str, heal: bool = False) -> None:
    """Drop (or stop dropping) everything between host ``name`` and the gateway, inside the
    host's own namespace: the coordinator and the clients are there, the other hosts not."""
    gateway = hosts.gateway
    rules = (
        f"delete table inet {CUT_TABLE}\n"
        if heal
        else (
            f"table inet {CUT_TABLE} {{\n"
            "  chain input { type filter hook input priority -10; policy accept;"
            f" ip saddr {gateway} drop; }}\n"
            "  chain output { type filter hook output priority -10; policy accept;"
            f" ip daddr {gateway} drop; }}\n"
            "}\n"
        )
    )
    done = subprocess.run(
        ["ip", "netns", "exec", hosts.host(name).netns, "nft", "-f", "-"],
        input=rules,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def _fail_over_under_load(loop: LoopFleet, fault: Any, seed: int) -> tuple[Workload, float]:
    """Run the workload, inject ``fault``, wait for acknowledged writes at epoch 2, stop the
    workload; returns it and the seconds from the fault to the first epoch-2 ack."""
    work = Workload(loop.client(), History(), seed)
    work.start()
    try:
        time.sleep(1.5)
        at = time.monotonic()
        fault()
        wait_until(lambda: work.acked_at(2), 20, f"a write acknowledged at epoch 2 (seed {seed})")
        took = min(t for t, _, e in work.acks if e == 2) - at
        time.sleep(1.0)
    finally:
        work.finish()
    m = loop.service.require_active()
    assert m.epoch == 2 and m.writer in ("r1", "r2") and m.member("w").role == "out", m
    assert not loop.disks.read_only(m.writer)
    return work, took


def _assert_fenced(loop: LoopFleet) -> None:
    """The old writer was fenced first (a reader too slow under load may follow): its device
    is read-only."""
    assert loop.disks.fenced[0][0] == "w" and loop.disks.read_only("w"), loop.disks.fenced


def _rejoined(loop: LoopFleet) -> bool:
    """The old writer is a reader of epoch 2 and the coordinator hands it out again."""
    m = loop.service.require_active()
    return loop.role("w") == ("reader", 2) and "w" in [r.name for r in m.in_sync_readers()]


@pytest.mark.parametrize("stale_client", [True, False], ids=["stale-client", "quiet"])
def test_writer_cut_off_from_the_coordinator_cannot_change_a_byte_and_steps_down(
    loop_fleet_factory: LoopFleetFactory, hosts3: HostSet, stale_client: bool
) -> None:
    seed = SEED + (1 if stale_client else 2)
    loop = loop_fleet_factory(hosts3)
    client = loop.client()
    stale_grant = loop.fleet.grant("w", "writer", 1)
    work, took = _fail_over_under_load(loop, lambda: _cut(hosts3, "h1"), seed)
    _assert_fenced(loop)
    assert loop.fleet["w"].alive  # fenced, not killed: it still runs on its side of the cut
    before, sums = loop.image_digest(), _checksums(client)
    outcomes = []
    if stale_client:
        # A client on the old writer's side of the cut (host h3) still holds an epoch-1
        # grant: the old writer takes the put, and its write hits the fenced device.
        h3 = ("ip", "netns", "exec", hosts3.host("h3").netns)
        outcomes.append(_stale_put(loop.fleet["w"].address, stale_grant, h3))
        assert outcomes[0] >= 400, f"seed {seed}: stale put to the cut-off writer -> {outcomes}"
        assert loop.image_digest() == before, f"seed {seed}: the fenced writer changed the image"
    _cut(hosts3, "h1", heal=True)
    wait_until(lambda: _rejoined(loop), 30, "the old writer back as an in-sync reader")
    if not stale_client:  # still a writer of epoch 1 until the coordinator could tell it
        assert ("DemoteNode", "w") in [(what, n) for _, what, n in loop.service.timeline]
    outcomes.append(_stale_put(loop.fleet["w"].address, stale_grant))
    assert outcomes[-1] == 409, f"seed {seed}: stale put after the heal -> {outcomes}"
    assert loop.image_digest() == before, f"seed {seed}: the old writer changed the image"
    assert _checksums(client) == sums
    loop.fsck()
    assert_history_clean(work.history, client, seed)
    print(
        f"\nseed {seed}: writer cut off -> first ack at epoch 2 after {took:.2f} s; "
        f"stale puts -> {outcomes}; old writer rejoined as reader of epoch 2"
    )


def test_paused_writer_is_fenced_its_waiting_request_changes_nothing_and_it_steps_down(
    loop_fleet_factory: LoopFleetFactory,
) -> None:
    seed = SEED + 3
    loop = loop_fleet_factory()
    client = loop.client()
    old = loop.fleet["w"]
    work, took = _fail_over_under_load(loop, old.pause, seed)
    _assert_fenced(loop)
    before, sums = loop.image_digest(), _checksums(client)
    # A request sent to the sleeping writer waits in its socket and runs after SIGCONT.
    waiting: list[int] = []
    grant = loop.fleet.grant("w", "writer", 1)
    sender = threading.Thread(target=lambda: waiting.append(_stale_put(old.address, grant)))
    sender.start()
    time.sleep(0.3)
    old.resume()
    sender.join(60)
    assert waiting and waiting[0] >= 400, f"seed {seed}: the waiting stale put -> {waiting}"
    wait_until(lambda: _rejoined(loop), 30, "the old writer back as an in-sync reader")
    assert loop.image_digest() == before, f"seed {seed}: the resumed writer changed the image"
    assert _checksums(client) == sums
    loop.fsck()
    assert_history_clean(work.history, client, seed)
    print(
        f"\nseed {seed}: writer paused -> first ack at epoch 2 after {took:.2f} s; "
        f"its waiting stale put -> {waiting[0]}; it rejoined as reader of epoch 2"
    )


class FenceThatDoesNothing:
    """A broken Fencer: reports success and cuts nothing (to show what the fence is for)."""

    def fence(self, vm: str) -> list[str]:
        return []


def test_without_a_fence_the_agents_still_refuse_even_when_the_old_writer_is_told_it_has_no_readers(
    loop_fleet_factory: LoopFleetFactory, hosts3: HostSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the agents hold on their own. The same cut with a fence that does nothing: the
    old writer takes a stale client's put, its record lands on the image (only the fence
    keeps the bytes), but it cannot acknowledge it — its readers refuse an epoch-1 push and
    the coordinator refuses its lagging report (503 lag_not_reported, outcome unknown). Told
    it has no readers at all (a control request from its side of the cut), it still cannot:
    readers that leave its set must be reported first, and that report cannot get through.
    (Before that rule, emptying its reader set let it acknowledge at epoch 1 after epoch 2
    began: split brain, which the history checkers caught.)"""
    seed = SEED + 4
    loop = loop_fleet_factory(hosts3, fencer=FenceThatDoesNothing())
    # nor a read-only re-attach of the old writer's disk after the failover: the agents alone
    monkeypatch.setattr(loop.disks, "make_reader", lambda node: None)
    _fail_over_under_load(loop, lambda: _cut(hosts3, "h1"), seed)
    assert not loop.disks.fenced and not loop.disks.read_only("w")
    before = loop.image_digest()
    h3 = ("ip", "netns", "exec", hosts3.host("h3").netns)
    grant = loop.fleet.grant("w", "writer", 1)
    refused = _stale_put(loop.fleet["w"].address, grant, h3)
    assert refused == 503, f"seed {seed}: the unfenced old writer answered {refused}"
    assert loop.image_digest() != before  # its record landed: the fence is what keeps bytes
    alone = _post_from(h3, loop.fleet["w"].address, "/v1/readers",
                       loop.fleet.grant("w", "readers", 1),
                       {"fleet": loop.fleet.name, "epoch": 1, "readers": []})
    assert alone == 200, f"seed {seed}: emptying the old writer's reader set -> {alone}"
    statuses = [_stale_put(loop.fleet["w"].address, grant, h3) for _ in range(2)]
    assert statuses == [503, 503], f"seed {seed}: the old writer told it has no readers: {statuses}"
    print(f"\nseed {seed}: without a fence, the old writer's stale puts -> {refused}, then "
          f"with no readers -> {statuses}")
