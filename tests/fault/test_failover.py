"""Jepsen-style faults against real agent processes driven by a real coordinator.

Generator and checks: tests/jepsen.py (client threads put unique values and get them back;
history: invoke, then ok / fail / unknown with the epoch and node; checkers: one writer per
epoch, every read the latest acknowledged version or a concurrent one, every acknowledged write
readable at the end, no failed read; the seed in every failure). Nemesis: kill -9 of the
writer, kill -9 of a reader, loss of the active coordinator (all under the workload), SIGSTOP /
SIGCONT of an RBD writer. The cut-off and paused writers of a file fleet are in
test_coordinator_faults.py. Runtime ~60 s in total.
"""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import FleetClient
from orchestrator.errors import LeaseLost
from orchestrator.testing.history import History
from tests.coordinator_harness import (
    Coordinator,
    LockOwnerFencer,
    PidFencer,
    bootstrap_map,
    coordinated_file_fleet,
    file_image,
    fleet_client,
    rados_store,
    start_api,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import AgentFleet, FleetFactory
from tests.jepsen import SEED, Workload, assert_history_clean, recording_client

pytestmark = pytest.mark.fault


@pytest.fixture
def coordinated_file(
    fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any, ceph_cluster: Any
) -> Iterator[tuple[AgentFleet, Coordinator]]:
    with coordinated_file_fleet(
        fleet_factory, tmp_path, rados_admin, ceph_cluster.pool, "ff"
    ) as (fleet, coordinator, _fencer):
        yield fleet, coordinator


def test_writer_killed_under_load_loses_no_acknowledged_write(coordinated_file: Any) -> None:
    fleet, coordinator = coordinated_file
    client = recording_client([coordinator.url], fleet.name)
    history = History()
    work = Workload(client, history, SEED)
    work.start()
    time.sleep(1.5)
    killed_at = time.monotonic()
    fleet["w"].kill()
    wait_until(lambda: work.acked_at(2), 15, f"a write acknowledged at epoch 2 (seed {SEED})")
    first_new = min(t for t, _, e in work.acks if e == 2)
    time.sleep(1.0)
    work.finish()
    assert_history_clean(history, client, SEED)
    service = coordinator.service
    assert service is not None
    m = service.require_active()
    assert m.epoch == 2 and m.writer in ("r1", "r2") and m.member("w").role == "out"
    print(f"\nseed {SEED}: writer kill -> first ack at epoch 2 after {first_new - killed_at:.2f} s")


def test_killed_reader_is_routed_around_without_failed_reads(coordinated_file: Any) -> None:
    fleet, coordinator = coordinated_file
    client = recording_client([coordinator.url], fleet.name)
    history = History()
    work = Workload(client, history, SEED + 1)
    work.start(writers=1, readers=3)
    time.sleep(1.0)
    killed_at = time.monotonic()
    fleet["r1"].kill()
    wait_until(
        lambda: "r1" not in [t.node for t in client.coordinator.targets("read", "/").ordered],
        10,
        "r1 routed around",
    )
    rerouted = time.monotonic() - killed_at
    time.sleep(1.0)
    work.finish()
    assert_history_clean(history, client, SEED + 1)
    print(f"\nseed {SEED + 1}: reader kill -> routed around after {rerouted:.2f} s")


def test_active_coordinator_lost_standby_takes_over_and_fails_over(
    fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any, ceph_cluster: Any
) -> None:
    first, second = start_api(), start_api()
    image = file_image(tmp_path / "image.raw")
    fleet = fleet_factory(
        f"file:{image}", name=f"fc-{uuid.uuid4().hex[:8]}", coordinator=second.url
    )
    store_a = rados_store(rados_admin, ceph_cluster.pool, fleet.name, lease=2.0)
    store_b = rados_store(rados_admin, ceph_cluster.pool, fleet.name, lease=2.0)
    try:
        a = start_service(first, store_a, PidFencer(fleet), bootstrap_map(fleet))
        wait_until(lambda: a.active, 10, "first coordinator active")
        b = start_service(second, store_b, PidFencer(fleet), bootstrap_map(fleet))
        time.sleep(0.5)
        assert not b.active
        client = recording_client([second.url, first.url], fleet.name)
        client.put_bytes(b"before", "/x")
        work = Workload(client, History(), SEED + 2)
        work.start()
        try:
            time.sleep(1.0)
            lost_at = time.monotonic()
            first.stop(release=False)  # dies holding the lease: the standby must wait it out
            wait_until(lambda: b.active, 10, "standby active")
            took_over = time.monotonic() - lost_at
            assert took_over <= 2.0 + 1.0  # within the lease (+ one renewal period + margin)
            with pytest.raises(LeaseLost):
                store_a.save(b.require_active(), b.require_active().revision)  # the ex-active
            assert client.get_bytes("/x") == b"before"
            fleet["w"].kill()
            wait_until(lambda: work.acked_at(2), 15, f"failover by the standby (seed {SEED + 2})")
            time.sleep(0.5)
        finally:
            work.finish()
        assert b.require_active().writer in ("r1", "r2")
        client.put_bytes(b"after", "/x")
        assert client.get_bytes("/x") == b"after"
        assert_history_clean(work.history, client, SEED + 2)
        print(f"\nseed {SEED + 2}: coordinator lost -> standby active after {took_over:.2f} s")
    finally:
        second.stop()
        store_a.close()
        store_b.close()


def _checksums(client: FleetClient, paths: list[str]) -> dict[str, str]:
    return {p: hashlib.sha256(client.get_bytes(p)).hexdigest() for p in paths}


def test_paused_writer_on_rbd_is_fenced_and_cannot_change_a_byte(
    fleet_factory: FleetFactory, rbd_image: Any, rados_admin: Any
) -> None:
    cluster, image = rbd_image
    coordinator = start_api()
    ceph = {"conf": str(cluster.conf), "user": "admin", "keyring": str(cluster.keyring)}
    fleet = fleet_factory(
        f"rbd:{cluster.pool}/{image}",
        name=f"fr-{uuid.uuid4().hex[:8]}",
        ceph=ceph,
        coordinator=coordinator.url,
    )
    store = rados_store(rados_admin, cluster.pool, fleet.name)
    fencer = LockOwnerFencer(rados_admin, cluster.pool, image)
    try:
        service = start_service(coordinator, store, fencer, bootstrap_map(fleet))
        wait_in_sync(service, 20)
        client = fleet_client([coordinator.url], fleet.name)
        for i in range(5):
            client.put_bytes(f"old-{i}".encode() * 100, f"/f{i}")
        old_writer = fleet["w"]
        stale_grant = fleet.grant("w", "writer", 1)
        old_writer.pause()
        # A request that reaches the paused writer: it runs only after SIGCONT.
        stale: list[Any] = []
        sender = threading.Thread(target=lambda: stale.append(_try_put(fleet, stale_grant)))
        sender.start()
        wait_until(lambda: service.require_active().writer in ("r1", "r2"), 20, "failover")
        assert fencer.fenced and fencer.fenced[0][0] == "w" and fencer.fenced[0][1]
        for i in range(5, 8):
            client.put_bytes(f"new-{i}".encode() * 100, f"/f{i}")
        paths = [f"/f{i}" for i in range(8)]
        before = _checksums(client, paths)
        old_writer.resume()
        sender.join(30)
        after_resume = _try_put(fleet, stale_grant)
        time.sleep(1.0)
        # Real refusals from the live ex-writer, not "no answer" (a crashed one would pass that)
        refusals = {(409, "not_writer"), (409, "stale_epoch")}
        assert stale and stale[0] in refusals, f"stale put answered {stale}"
        assert after_resume in refusals, f"put to the resumed ex-writer answered {after_resume}"
        assert _checksums(client, paths) == before
        wait_until(lambda: _role(fleet, "w") == ("reader", 2), 15,
                   "ex-writer stepped down to a reader of epoch 2")
        assert old_writer.alive
        fsck = subprocess.run(
            [
                sys.executable,
                "-m",
                "agents",
                "fsck",
                f"rbd:{cluster.pool}/{image}",
                "--conf",
                str(cluster.conf),
                "--keyring",
                str(cluster.keyring),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        print(
            f"\npaused writer: fenced {fencer.fenced[0][1]}, in-flight put -> {stale[0]}, "
            f"put after SIGCONT -> {after_resume}, role now {_role(fleet, 'w')}"
        )
    finally:
        coordinator.stop()
        store.close()


def _try_put(fleet: AgentFleet, grant: str) -> tuple[int, str]:
    """(status, error code) of a put straight to the old writer with an epoch-1 grant;
    (599, "no answer") when the connection gave none."""
    try:
        resp = fleet.client.put(fleet["w"].address, "/f0", b"STALE" * 100, grant)
    except (OSError, http.client.HTTPException):
        return 599, "no answer"
    body = resp.json() if resp.status >= 400 else {}
    return int(resp.status), str(body.get("error", ""))


def _role(fleet: AgentFleet, node: str) -> tuple[str, int]:
    """(role, epoch) the node's agent reports; ("unreachable", -1) when it does not answer."""
    try:
        health = fleet.health(node)
    except (OSError, http.client.HTTPException):
        return "unreachable", -1
    return str(health["role"]), int(health["epoch"])


class ProcessSpares:
    """SpareProvisioner for agent processes: 'attach' = make the image appear at the path
    the spare's agent (already running, waiting for its disk) opens."""

    def __init__(self, image: Path, disks: dict[str, Path]) -> None:
        self.image = image
        self.disks = disks
        self.attached: list[tuple[str, float]] = []

    def attach_spare(self, node: str) -> None:
        self.disks[node].symlink_to(self.image)
        self.attached.append((node, time.monotonic()))


def test_killed_reader_is_replaced_by_a_spare_that_catches_up(
    fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any, ceph_cluster: Any
) -> None:
    coordinator = start_api()
    image = file_image(tmp_path / "image.raw")
    fleet = fleet_factory(
        f"file:{image}", name=f"fs-{uuid.uuid4().hex[:8]}", coordinator=coordinator.url
    )
    # the spare's agent runs from the start, as deployed, with no disk: it heartbeats and
    # waits for one
    disk = tmp_path / "s1-disk.raw"
    fleet.add("s1", role="spare", backend=f"file:{disk}")
    assert fleet.health("s1")["role"] == "starting"
    store = rados_store(rados_admin, ceph_cluster.pool, fleet.name)
    spares = ProcessSpares(image, {"s1": disk})
    try:
        service = start_service(coordinator, store, PidFencer(fleet),
                                bootstrap_map(fleet, spares=("s1",)), spares=spares)
        wait_in_sync(service, 20)
        grant = fleet.grant("s1", "reader", fleet.epoch("w"))
        assert fleet.client.get(fleet["s1"].address, "/s0", grant).status == 503
        client = fleet_client([coordinator.url], fleet.name)
        for i in range(20):
            client.put_bytes(f"v{i}".encode(), f"/s{i}")
        killed_at = time.monotonic()
        fleet["r1"].kill()
        wait_until(
            lambda: "s1" in [r.name for r in service.require_active().in_sync_readers()],
            30,
            "spare s1 in sync",
        )
        in_sync_after = time.monotonic() - killed_at
        m = service.require_active()
        assert m.member("r1").role == "out" and m.member("s1").role == "reader"
        assert [n for n, _ in spares.attached] == ["s1"]
        served = fleet.client.get(fleet["s1"].address, "/s5",
                                  fleet.grant("s1", "reader", m.epoch))
        assert (served.status, served.body) == (200, b"v5")  # from the disk it waited for
        client.put_bytes(b"after", "/s0")
        assert client.get_with_version("/s0")[0] == b"after"
        print(f"\nreader kill -> spare attached and in sync after {in_sync_after:.2f} s")
    finally:
        coordinator.stop()
        store.close()
