"""The coordinator over real agent processes on a file image, state in real RADOS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.core.protocol import Heartbeat, SelfTestCheck, SelfTestReport
from agents.errors import BadSignature, ForeignGrant, NotFound
from agents.peers import post_message
from orchestrator.cli.clients import write_secret_file
from orchestrator.core.fleetmap import FleetMap
from tests.coordinator_harness import (
    Coordinator,
    PidFencer,
    coordinated_file_fleet,
    fleet_client,
    wait_until,
)
from tests.fixtures.agents import (
    TEST_CLIENT,
    TEST_CLIENT_SECRET,
    AgentFleet,
    FleetFactory,
    node_peer,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def coordinated(
    fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any, ceph_cluster: Any
) -> Iterator[tuple[AgentFleet, Coordinator, PidFencer]]:
    with coordinated_file_fleet(
        fleet_factory, tmp_path, rados_admin, ceph_cluster.pool, "it"
    ) as coordinated:
        yield coordinated


def test_put_get_and_namespace_ops_follow_the_patent_flow(coordinated: Any) -> None:
    fleet, coordinator, _ = coordinated
    client = fleet_client([coordinator.url], fleet.name)
    targets = client.coordinator.targets("write", "/a.txt")
    assert [t.node for t in targets.ordered] == ["w", "r1", "r2"]  # ordered: writer first
    assert [t.role for t in targets.ordered] == ["writer", "reader", "reader"]  # labelled
    ack = client.put_bytes(b"hello fleet", "/a.txt")
    assert ack.node == "w" and ack.epoch == 1
    reads = client.coordinator.targets("read", "/a.txt")
    assert [t.node for t in reads.ordered] == ["r1", "r2", "w"]
    assert client.get_bytes("/a.txt") == b"hello fleet"
    client.mkdir("/d")
    client.rename("/a.txt", "/d/b.txt")
    assert client.stat("/d/b.txt")["size"] == len(b"hello fleet")
    assert [e["path"].rsplit("/", 1)[-1] for e in client.ls("/d")["entries"]] == ["b.txt"]
    client.delete("/d/b.txt")
    with pytest.raises(NotFound):
        client.get_bytes("/d/b.txt")


def test_manual_failover_fences_promotes_and_clients_follow(coordinated: Any) -> None:
    fleet, coordinator, fencer = coordinated
    client = fleet_client([coordinator.url], fleet.name)
    client.put_bytes(b"v1", "/k")
    watched: list[FleetMap] = []
    before = int(client.coordinator.map()["revision"])

    def watch() -> None:
        watched.append(FleetMap.from_json(client.coordinator.map(after=before, wait=20)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    new_map = client.coordinator.failover("r1")
    watcher.join(30)
    assert new_map["writer"] == "r1" and new_map["epoch"] == 2
    assert [n for n, _ in fencer.fenced] == ["w"] and not fleet["w"].alive
    assert watched and watched[0].revision > before  # the long poll woke up
    ack = client.put_bytes(b"v2", "/k")
    assert (ack.node, ack.epoch) == ("r1", 2)
    assert client.get_bytes("/k") == b"v2"
    status = client.coordinator.status()["fleets"][0]
    assert status["active"] and status["map"]["writer"] == "r1"


def test_illegal_failover_is_refused_naming_the_pair(coordinated: Any) -> None:
    fleet, coordinator, _ = coordinated
    client = fleet_client([coordinator.url], fleet.name)
    with pytest.raises(Exception, match="writer -> writer"):
        client.coordinator.failover("w")


def test_cli_put_get_ls_status_as_subprocesses(coordinated: Any, tmp_path: Path) -> None:
    fleet, coordinator, _ = coordinated
    conf = tmp_path / "rbdfleet.toml"
    client_secret = tmp_path / "client.secret"
    write_secret_file(client_secret, TEST_CLIENT_SECRET)
    conf.write_text(
        '[ceph]\nconf = "/nonexistent/ceph.conf"\nkeyring = "/nonexistent/keyring"\n'
        f'[fleet]\nname = "{fleet.name}"\nimage = "img"\nsize = "64MiB"\nwriter = ""\n'
        f'secret_file = "{fleet.master_file()}"\n'
        f'client = "{TEST_CLIENT}"\nclient_secret_file = "{client_secret}"\n'
        f'[coordinator]\nurls = ["http://127.0.0.1:9", "{coordinator.url}"]\n'
    )
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(9 << 20))  # above the progress-bar threshold
    env = {**os.environ, "RBDFLEET_CONFIG": str(conf)}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli.app", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("put", str(local), "/big.bin")
    cli("get", "/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    listing = json.loads(cli("ls", "/", "--json"))
    assert [e["path"] for e in listing["entries"]] == ["/big.bin"]
    status = json.loads(cli("status", "--json"))
    assert status["map"]["writer"] == "w" and status["active"] is True
    table = cli("status")
    assert "in-sync" in table and "w " in table
    missing = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.app", "get", "/nope", str(tmp_path / "x")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 10 and "rbdfleet: error" in missing.stderr


def test_a_failed_self_test_report_of_the_writer_triggers_failover(coordinated: Any) -> None:
    fleet, coordinator, fencer = coordinated
    report = SelfTestReport(
        node="w",
        fleet=fleet.name,
        role="writer",
        epoch=1,
        ok=False,
        checks=(SelfTestCheck("device-read", False, "EIO"),),
        at=time.time(),
    )
    post_message(
        node_peer(coordinator.url, "w"),
        "/v1/selftest",
        report,
        grant=fleet.report_grant("w", report),
        timeout=10,
    )
    service = coordinator.service
    assert service is not None
    wait_until(lambda: service.require_active().writer in ("r1", "r2"), 15, "failover")
    assert [n for n, _ in fencer.fenced] == ["w"]


def test_agent_reports_need_the_agents_own_grant(coordinated: Any) -> None:
    """A report about w needs w's key: r1's own report grant, a sniffed heartbeat grant of w
    (bound to that heartbeat's body) and a client's read grant for w are all refused."""
    fleet, coordinator, _ = coordinated
    report = SelfTestReport(
        node="w", fleet=fleet.name, role="writer", epoch=1, ok=False, checks=(), at=time.time()
    )
    heartbeat = Heartbeat(node="w", fleet=fleet.name, role="writer", epoch=1, applied_seq=0,
                          safe_seq=0, selftest="ok", address=fleet["w"].address,
                          sent_at=time.time())
    for sender, grant, refusal in (  # each over the certificate of the node its grant names
        ("r1", fleet.report_grant("r1", report), ForeignGrant),  # r1 speaking about w
        ("r1", fleet.report_grant("w", report, key_of="r1"), BadSignature),  # r1 posing as w
        ("w", fleet.report_grant("w", heartbeat), ForeignGrant),  # w's, for another body
        ("w", fleet.grant("w", "reader", 1), ForeignGrant),  # for w, not the coordinator
    ):
        with pytest.raises(refusal):
            post_message(node_peer(coordinator.url, sender), "/v1/selftest", report,
                         grant=grant, timeout=10)
    time.sleep(0.5)
    service = coordinator.service
    assert service is not None and service.require_active().writer == "w"
