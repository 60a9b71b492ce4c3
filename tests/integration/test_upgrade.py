"""Rolling upgrade (orchestrator/upgrade.py) of real agents on namespace hosts, under a recorded
client workload (tests/jepsen.py).

Three namespace hosts run the agent the way ``rbdfleet deploy`` installs it where systemd does
not run (the pidfile fallback: ``AgentDeployer`` over SSH), on one shared file image, with a
harness coordinator on the hosts' gateway; its fence is STONITH (SIGKILL of the agent the
host's pidfile names: a file image has no storage-side fence). The agents start on an "old"
package (the tree's agents with one comment added: another version), then:

1. ``--dry-run``'s plan: the readers, the handover, the old writer;
2. an upgrade to a package whose agent exits at start stops at the first reader, naming it and
   why; the writer and the other reader go on serving;
3. the upgrade to the tree's package run again continues there (the reader left down with
   the bad package first), hands the writer role over and upgrades the old writer: every agent
   reports the new version, a third run has nothing to do.

And the Ansible path: ``ansible/upgrade.yml`` over the same old fleet, readers ``serial: 1``
through the role, the handover by the real ``rbdfleet failover --to`` CLI (a config naming the
harness coordinator and its admin client), then the old writer; a second run changes nothing.

The workload runs through 2 and 3: its history must be clean (no failed read, no acknowledged
write lost, one writer per epoch). Printed: each step's duration, the write unavailability
of the handover as the clients saw it (last ack at the old epoch to the first at the new one)
and the longest gap between two acks during the whole upgrade.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agents.core.protocol import Health
from orchestrator.adapters.ansible import AnsibleRunner, InventoryHost, write_package
from orchestrator.adapters.ssh import ParamikoShell
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.core.fleetmap import FleetMap, initial_map
from orchestrator.core.liveness import LivenessConfig
from orchestrator.core.upgrade import Handover, Upgrade
from orchestrator.deploy import AgentDeployer, AgentLayout, DeployTarget
from orchestrator.errors import FencingFailed, UpgradeStalled
from orchestrator.packaging import DEFAULT_LAUNCH, AgentPackage
from orchestrator.sandbox.hosts import HostSet, TestHost
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore
from orchestrator.testing.history import History
from orchestrator.upgrade import FleetUpgrade
from tests.coordinator_harness import (
    Coordinator,
    MonotonicClock,
    fleet_client,
    start_api,
    start_service,
    transport,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import (
    FAST,
    TEST_CA,
    TEST_CLIENT,
    TEST_CLIENT_SECRET,
    TEST_SECRET,
    node_tls,
    shared_pki,
)
from tests.jepsen import SEED, Workload, assert_history_clean, recording_client

pytestmark = pytest.mark.integration

PORT = 7480
# Not a test of failure detection: on a loaded 2-core machine the default probes (0.3 s, dead
# after 1.2 s of silence) fail the writer over by themselves before or during the upgrade.
PATIENT = LivenessConfig(probe_interval=0.5, probe_timeout=2.0, suspect_after=3.0,
                         dead_after=8.0, confirm_failures=5)
WRITER = "h1"
REPO_AGENTS = Path(__file__).resolve().parents[2] / "agents"


def package_variant(tmp_path: Path, name: str, change: Mapping[str, str]) -> AgentPackage:
    """The tree's agents package with ``change`` (file -> text appended or, for a file named
    with a leading ``=``, its whole new content): another version."""
    root = tmp_path / name / "agents"
    shutil.copytree(REPO_AGENTS, root, ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in change.items():
        if path.startswith("="):
            (root / path[1:]).write_text(text)
        else:
            with (root / path).open("a") as f:
                f.write(text)
    return AgentPackage.build(root)


# SIGKILL of the agent the pidfile names, if its command line holds the config (argv: config
# pidfile), then wait until it is gone; run inside the host (its own pid namespace).
_KILL = """
import os, signal, sys, time
config, pidfile = sys.argv[1:3]
try:
    pid = int(open(pidfile).read().split()[0])
    argv = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\\0")
except (OSError, ValueError, IndexError):
    sys.exit(0)
if config.encode() in argv:
    os.kill(pid, signal.SIGKILL)
    while os.path.exists("/proc/%d" % pid):
        time.sleep(0.02)
    print(pid)
"""


@dataclass
class PidfileFencer:
    """STONITH of the agent a host's pidfile names (that process only: its command line must
    hold the host's agent config, as the deployer checks)."""

    hosts: HostSet
    fenced: list[tuple[str, str]] = field(default_factory=list)  # (node, pid killed or "")

    def fence(self, vm: str) -> list[str]:
        layout = AgentLayout(str(self.hosts.host(vm).root))
        done = self.hosts.exec_on(vm, ["/usr/bin/python3", "-c", _KILL, layout.config_path,
                                       layout.pidfile], timeout=20)
        if done.returncode != 0:
            raise FencingFailed(f"fence {vm}: {done.stderr.strip()[-300:]}")
        self.fenced.append((vm, done.stdout.strip()))
        return []


@dataclass
class UpgradeFleet:
    """Agents deployed on the hosts, their coordinator, and how to build an upgrade."""

    hosts: HostSet
    shell: ParamikoShell
    coordinator: Coordinator
    name: str
    image: Path
    keys: Path
    fencer: PidfileFencer

    def config(self, host: TestHost, fleet_map: FleetMap) -> dict[str, Any]:
        """``host``'s agent config for ``fleet_map`` (its role and epoch), as a deployer
        writes it."""
        writer = host.name == fleet_map.writer
        config: dict[str, Any] = {
            "node": host.name, "fleet": self.name, "backend": f"file:{self.image}",
            "secret_file": str(self.keys / f"{host.name}.key"),
            "listen": f"{host.address}:{PORT}", "advertise": f"{host.address}:{PORT}",
            "role": "writer" if writer else "reader", "epoch": fleet_map.epoch,
            "coordinator": self.coordinator.url, **FAST, **node_tls(host.name, host.address)}
        if writer:
            config["readers"] = {h.name: f"{h.address}:{PORT}" for h in self.hosts.hosts
                                 if h.name != host.name}
        return config

    def targets(self, fleet_map: FleetMap) -> dict[str, DeployTarget]:
        return {h.name: DeployTarget(h, str(h.root), self.config(h, fleet_map))
                for h in self.hosts.hosts}

    def upgrade(self, package: AgentPackage) -> FleetUpgrade:
        """The use case as ``rbdfleet upgrade`` wires it, to ``package``."""
        control = transport(identity=True)

        def health(address: str, timeout: float) -> Health:
            return Health.from_json(control.request(address, address, "GET", "/v1/health",
                                                    timeout=timeout).body)

        client = fleet_client([self.coordinator.url], self.name).coordinator
        return FleetUpgrade(client, AgentDeployer(self.shell, package, launch=DEFAULT_LAUNCH),
                            self.targets, health, MonotonicClock(), node_wait=60.0,
                            poll=0.2, progress=lambda msg: print(f"upgrade: {msg}"))

    def map(self) -> FleetMap:
        service = self.coordinator.service
        assert service is not None
        return service.require_active()


@pytest.fixture
def old_fleet(hosts3: HostSet, shell3: ParamikoShell, tmp_path: Path
              ) -> Iterator[tuple[UpgradeFleet, AgentPackage]]:
    """h1 writer, h2 and h3 readers, on the "old" package, both readers in sync."""
    old = package_variant(tmp_path, "old", {"__init__.py": "# the previous release\n"})
    name = f"up-{uuid.uuid4().hex[:8]}"
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run([sys.executable, "-m", "agents", "format", "--backend", f"file:{image}",
                    "--fleet", name], check=True, capture_output=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    fleet_keys = FleetKeys(name, (TEST_SECRET,), time.time)  # each node its own key
    for h in hosts3.hosts:
        (keys / f"{h.name}.key").write_bytes(fleet_keys.node_key_file(h.name))
        (keys / f"{h.name}.key").chmod(0o600)
    coordinator = start_api(hosts3.gateway)
    fleet = UpgradeFleet(hosts3, shell3, coordinator, name, image, keys, PidfileFencer(hosts3))
    bootstrap = initial_map(name, WRITER, {
        h.name: (f"{h.address}:{PORT}", "writer" if h.name == WRITER else "reader")
        for h in hosts3.hosts})
    deployer = AgentDeployer(shell3, old, launch=DEFAULT_LAUNCH)
    targets = fleet.targets(bootstrap)
    try:
        deployer.deploy([t for n, t in targets.items() if n != WRITER])
        deployer.deploy([targets[WRITER]])
        # after the agents: a coordinator started first would find them dead and fence them
        service = start_service(coordinator, MemoryStateStore(
            MemoryLeaseBoard(FakeClock()), name, "c1", 60.0), fleet.fencer, bootstrap,
            liveness=PATIENT)
        wait_in_sync(service, 60)
        yield fleet, old
    finally:
        coordinator.stop()
        deployer.stop(list(targets.values()))


def _longest_gap(acks: list[tuple[float, str, int]], start: float, end: float) -> float:
    times = sorted(t for t, _, _ in acks if start <= t <= end)
    return max((b - a for a, b in itertools.pairwise(times)), default=end - start)


def test_rolling_upgrade_under_load_stops_at_a_bad_node_and_continues(
        old_fleet: tuple[UpgradeFleet, AgentPackage], tmp_path: Path) -> None:
    fleet, old = old_fleet
    new = AgentPackage.build()
    broken = package_variant(tmp_path, "broken", {
        "=__main__.py": "import sys\nsys.exit('this release is broken on purpose')\n"})
    assert len({old.version, new.version, broken.version}) == 3
    dry = fleet.upgrade(new).plan()
    assert dry[:2] == [Upgrade("h2"), Upgrade("h3")] and dry[3:] == [Upgrade(WRITER)]
    assert isinstance(dry[2], Handover) and dry[2].writer == WRITER, dry

    work = Workload(recording_client([fleet.coordinator.url], fleet.name), History(), SEED)
    work.start()
    try:
        time.sleep(1.5)
        with pytest.raises(UpgradeStalled) as stalled:
            fleet.upgrade(broken).run()
        assert stalled.value.node == "h2"
        assert "exited right after start" in str(stalled.value), stalled.value
        assert "broken on purpose" in str(stalled.value), stalled.value
        m = fleet.map()
        assert (m.writer, m.epoch) == (WRITER, 1)
        assert [r.name for r in m.in_sync_readers()] == ["h3"], m
        acked = len(work.acks)
        wait_until(lambda: len(work.acks) > acked + 5, 30,
                   f"writes acknowledged with h2 down (seed {SEED})")

        started = time.monotonic()
        report = fleet.upgrade(new).run()
        finished = time.monotonic()
        time.sleep(1.0)
    finally:
        work.finish()

    steps = [s.step for s in report.steps]
    assert steps[:2] == ["upgrade h2", "upgrade h3"] and steps[3] == f"upgrade {WRITER}", steps
    m = fleet.map()
    assert m.epoch == 2 and m.writer in ("h2", "h3") and m.phase == "stable", m
    # the handover fenced the old writer (its agent killed), the upgrade started it again
    assert [(node, bool(pid)) for node, pid in fleet.fencer.fenced] == [(WRITER, True)]
    assert "stopped" not in report.steps[3].detail, report.steps[3]
    assert sorted(r.name for r in m.in_sync_readers()) == sorted({"h1", "h2", "h3"} - {m.writer})
    control = transport()
    for h in fleet.hosts.hosts:
        health = Health.from_json(control.request(
            h.name, f"{h.address}:{PORT}", "GET", "/v1/health", timeout=5).body)
        assert (health.version, health.epoch) == (new.version, 2), health
    assert fleet.upgrade(new).plan() == []
    assert fleet.upgrade(new).run().steps == []

    client = recording_client([fleet.coordinator.url], fleet.name)
    assert_history_clean(work.history, client, SEED)
    old_acks = [t for t, _, e in work.acks if e == 1]
    new_acks = [t for t, _, e in work.acks if e == 2]
    assert old_acks and new_acks
    unavailable = min(new_acks) - max(t for t in old_acks if t < min(new_acks))
    print(f"\nseed {SEED}: rolling upgrade {old.version} -> {new.version}: "
          + ", ".join(f"{s.step} {s.seconds:.2f} s" for s in report.steps)
          + f"; handover call {report.handover_seconds:.2f} s; write unavailability at the "
          f"handover (last epoch-1 ack -> first epoch-2 ack) {unavailable:.2f} s; longest gap "
          f"between acks during the upgrade {_longest_gap(work.acks, started, finished):.2f} s; "
          f"{len(work.acks)} acks, "
          f"{sum(1 for o in work.history.ops() if o.kind == 'get' and o.outcome == 'ok')} reads")


def cli_config(fleet: UpgradeFleet, directory: Path) -> Path:
    """An ``rbdfleet.toml`` for the CLI's client side: the harness coordinator, its admin
    client, the test CA (``[tls] dir``). The Ceph and SSH paths are never opened."""
    master, client = directory / "master.key", directory / "client.key"
    for path, data in ((master, TEST_SECRET), (client, TEST_CLIENT_SECRET)):
        path.write_text(data.hex() + "\n")
        path.chmod(0o600)
    vms = "".join(f'[[vm]]\nname = "{h.name}"\ndomain = "d-{h.name}"\naddress = "{h.address}"\n'
                  for h in fleet.hosts.hosts)
    config = directory / "rbdfleet.toml"
    config.write_text(f"""[ceph]
conf = "{directory}/ceph.conf"
keyring = "{directory}/keyring"
[ssh]
key = "{directory}/id"
known_hosts = "{directory}/known_hosts"
[fleet]
name = "{fleet.name}"
image = "img"
size = "1GiB"
writer = "{WRITER}"
secret_file = "{master}"
client = "{TEST_CLIENT}"
client_secret_file = "{client}"
[coordinator]
urls = ["{fleet.coordinator.url}"]
[tls]
dir = "{shared_pki().dir}"
{vms}""")
    return config


def make_inventory(fleet: UpgradeFleet) -> list[InventoryHost]:
    """What `rbdfleet inventory` gives now: each host's group, role and epoch from the map."""
    m = fleet.map()
    return [InventoryHost(h.name, h.address, str(h.root), {
        k: v for k, v in fleet.config(h, m).items()
        if k not in ("secret_file", "tls_cert", "tls_key", "tls_ca")}) for h in fleet.hosts.hosts]


def test_the_upgrade_playbook_goes_reader_by_reader_then_hands_over(
        old_fleet: tuple[UpgradeFleet, AgentPackage], tmp_path: Path) -> None:
    fleet, old = old_fleet
    new = AgentPackage.build()
    pki = shared_pki().dir
    inventory = make_inventory(fleet)
    runner = AnsibleRunner(tmp_path / "ansible", ssh_key=fleet.hosts.ssh_key,
                           known_hosts=fleet.hosts.known_hosts)
    extra = {
        "rbdfleet_agent_package": str(write_package(new, tmp_path)),
        "rbdfleet_agent_version": new.version,
        "rbdfleet_agent_launch": list(DEFAULT_LAUNCH),
        "rbdfleet_agent_secret_src": str(fleet.keys / "{{ inventory_hostname }}.key"),
        "rbdfleet_agent_tls_cert_src": f"{pki}/{{{{ inventory_hostname }}}}.pem",
        "rbdfleet_agent_tls_key_src": f"{pki}/{{{{ inventory_hostname }}}}.key",
        "rbdfleet_agent_tls_ca_src": TEST_CA,
        "rbdfleet_upgrade_cli": str(Path(sys.executable).with_name("rbdfleet")),
        "rbdfleet_upgrade_config": str(cli_config(fleet, tmp_path)),
        "rbdfleet_upgrade_delay": 0.5,
    }
    work = Workload(recording_client([fleet.coordinator.url], fleet.name), History(), SEED)
    work.start()
    try:
        time.sleep(1.5)
        run = runner.run("upgrade.yml", inventory, extra)
        time.sleep(1.0)
    finally:
        work.finish()
    assert all(r.succeeded for r in run.recap.values()), run.recap
    out = run.output
    # readers one at a time (serial: 1): one batch per reader, each waited for in sync
    batches = [part.split("PLAY [", 1)[0] for part in
               out.split("PLAY [Upgrade the readers, one at a time]")[1:]]
    assert [("[h2" in b, "[h3" in b) for b in batches] == [(True, False), (False, True)], out
    assert all("in-sync reader] " in b for b in batches), out
    # the handover (rbdfleet failover --to h2), unless the loaded machine's coordinator had
    # failed the writer over by itself before it: the playbook then upgrades it as a reader
    handover = out.split("TASK [Hand the writer role over to an upgraded in-sync reader]")[1]
    planned = "changed: [h1 -> localhost]" in handover.split("TASK [", 1)[0]
    m = fleet.map()
    assert m.epoch >= 2 and m.writer != WRITER and m.phase == "stable", m
    assert (m.writer, m.epoch) == ("h2", 2) or not planned, m
    assert sorted(r.name for r in m.in_sync_readers()) == sorted({"h1", "h2", "h3"} - {m.writer})
    control = transport()
    for h in fleet.hosts.hosts:
        health = Health.from_json(control.request(
            h.name, f"{h.address}:{PORT}", "GET", "/v1/health", timeout=5).body)
        assert (health.version, health.epoch) == (new.version, m.epoch), health
    assert fleet.fencer.fenced[0][0] == WRITER and fleet.fencer.fenced[0][1], fleet.fencer.fenced
    client = recording_client([fleet.coordinator.url], fleet.name)
    assert_history_clean(work.history, client, SEED)

    # again, with the inventory made again from the map: every node is done, nothing changes
    again = runner.run("upgrade.yml", make_inventory(fleet), extra)
    assert {n: r.changed for n, r in again.recap.items()} == {"h1": 0, "h2": 0, "h3": 0}, \
        again.output[-3000:]
    assert fleet.map().epoch == m.epoch
    print(f"\nseed {SEED}: upgrade.yml {old.version} -> {new.version}: "
          + ("planned handover to h2" if planned else "the writer was failed over by the "
             "coordinator before the handover (load)")
          + f", {run.seconds:.0f} s; second run {again.seconds:.0f} s, nothing changed; "
          f"{len(work.acks)} acks during the first")
