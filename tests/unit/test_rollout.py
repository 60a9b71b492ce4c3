"""orchestrator.rollout: per-VM agent configs, step order, roles from the map, running agents
left alone, the secret only ever in a 0600 file (the logic above the SSH port, in-memory)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agents.core.protocol import Health
from orchestrator import config
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.core.remote import RemoteCommand, RemoteResult, SshHost
from orchestrator.deploy import AgentDeployer, DeployTarget, HostResult
from orchestrator.errors import DeployError
from orchestrator.packaging import AgentPackage
from orchestrator.rollout import GUEST_SECRET, FleetRollout, agent_config

pytestmark = pytest.mark.unit

SECRET = b"0123456789abcdef-fleet-secret"
CFG = config.from_mapping({
    "ceph": {"conf": "/c/ceph.conf", "keyring": "/c/keyring", "pool": "rbd"},
    "ssh": {"key": "/k/id", "known_hosts": "/k/known_hosts"},
    "fleet": {"name": "demo", "image": "img", "size": "64MiB", "writer": "vm1",
              "secret_file": "/k/fleet.secret"},
    "vm": [{"name": "vm1", "domain": "d1", "address": "10.0.0.1"},
           {"name": "vm2", "domain": "d2", "address": "10.0.0.2"},
           {"name": "vm3", "domain": "d3", "address": "10.0.0.3"},
           {"name": "vm4", "domain": "d4", "address": "10.0.0.4", "spare": True}],
    "tls": {"insecure_plaintext": True},  # the steps alone; the TLS files: tests/unit/test_pki.py
}, env={})


class FakeShell:
    """RemoteShell in memory: records every command and file; the disk script answers."""

    def __init__(self, fail_disk_on: str = "") -> None:
        self.log: list[tuple[str, str, Any]] = []
        self.fail_disk_on = fail_disk_on

    def run(self, host: SshHost, cmd: RemoteCommand, timeout: float = 30.0, *,
            check: bool = False, stdin: bytes | None = None) -> RemoteResult:
        self.log.append(("run", host.name, cmd.args))
        if "-c" in cmd.args and host.name == self.fail_disk_on:
            return RemoteResult(1, "", "the fleet's disk is not visible in the guest")
        if "-c" in cmd.args:
            out = "disk /dev/vdc\n"
            if cmd.args[-1] == "format":
                out += "formatted device:x for fleet demo\n"
            return RemoteResult(0, out, "")
        return RemoteResult(0, "", "")

    def put_file(self, host: SshHost, source: Path | bytes, remote_path: str,
                 mode: int = 0o644, timeout: float = 60.0) -> None:
        self.log.append(("put", host.name, (remote_path, mode, source)))

    def start_background(self, host: SshHost, cmd: RemoteCommand, *, workdir: str,
                         log_path: str, env: Mapping[str, str] | None = None,
                         timeout: float = 30.0) -> int:
        raise AssertionError("the rollout starts agents through the deployer")


class FakeDeployer(AgentDeployer):
    """The deployer's public steps, recorded; ``running`` agents report a pid."""

    def __init__(self, shell: FakeShell, running: Sequence[str] = ()) -> None:
        super().__init__(shell, AgentPackage(b"", "v1"))
        self.fake = shell
        self.running = set(running)
        self.calls: list[tuple[str, list[str]]] = []
        self.configs: dict[str, Mapping[str, Any]] = {}

    def _record(self, step: str, targets: Sequence[DeployTarget], pid: int | None
                ) -> dict[str, HostResult]:
        names = [t.host.name for t in targets]
        self.calls.append((step, names))
        return {t.host.name: HostResult(t.host.name, ok=True, changed=step != "status",
                                        actions=(step,) if step != "status" else (),
                                        pid=pid if pid or t.host.name not in self.running
                                        else 100, version="v1")
                for t in targets}

    def status(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        return self._record("status", targets, None)

    def install(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        self.configs.update({t.host.name: t.config for t in targets})
        return self._record("install", targets, None)

    def deploy(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        return self._record("deploy", targets, 42)

    def put_files(self, target: DeployTarget, files: Sequence[tuple[bytes, str, int]]) -> None:
        # what the deployer does with them: tests/unit/test_deploy_ownership.py
        self.fake.log.append(("put_files", target.host.name, list(files)))


def healthy(address: str, timeout: float) -> Health:
    return Health(node="x", fleet="demo", role="reader", epoch=1, applied_seq=0, safe_seq=0,
                  selftest="ok")


def test_agent_config_writer_pushes_to_the_other_active_vms() -> None:
    writer = agent_config(CFG, "vm1", coordinators=["http://10.0.0.254:7470"])
    assert writer["role"] == "writer" and writer["epoch"] == 1
    assert writer["readers"] == {"vm2": "10.0.0.2:7480", "vm3": "10.0.0.3:7480"}  # no spare
    assert writer["listen"] == writer["advertise"] == "10.0.0.1:7480"
    assert writer["backend"].startswith("device:rbdfleet-")
    assert writer["secret_file"] == GUEST_SECRET and writer["coordinator"].endswith(":7470")
    reader = agent_config(CFG, "vm2", coordinators=())
    assert reader["role"] == "reader" and "readers" not in reader and "coordinator" not in reader
    assert reader["backend"] == writer["backend"]  # one disk serial for the whole fleet
    assert agent_config(CFG, "vm4", coordinators=())["role"] == "spare"  # waits for a disk


def test_agent_config_carries_the_fleets_agent_timings_which_the_agent_accepts(
        tmp_path: Path) -> None:
    import dataclasses
    import json

    from agents.daemon import load_config

    cfg = dataclasses.replace(CFG, agents=config.AgentTimings(idle_checkpoint=1.0,
                                                               ack_timeout=3.0))
    deployed = agent_config(cfg, "vm2", coordinators=())
    assert deployed["idle_checkpoint"] == 1.0 and "tail_interval" not in deployed
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(deployed))
    loaded = load_config(str(path), {})
    assert (loaded.idle_checkpoint, loaded.ack_timeout, loaded.tail_interval) == (1.0, 3.0, 0.5)


def test_agent_config_roles_from_the_current_map() -> None:
    assert agent_config(CFG, "vm1", coordinators=(), writer="vm2", epoch=3)["role"] == "reader"
    promoted = agent_config(CFG, "vm2", coordinators=(), writer="vm2", epoch=3)
    assert (promoted["role"], promoted["epoch"]) == ("writer", 3)
    assert set(promoted["readers"]) == {"vm1", "vm3"}


def test_bootstrap_installs_all_formats_on_the_writer_starts_readers_first() -> None:
    shell = FakeShell()
    deployer = FakeDeployer(shell)
    report = FleetRollout(CFG, shell, deployer, SECRET, health=healthy,
                          progress=lambda _: None).deploy()
    assert deployer.calls == [("status", ["vm2", "vm3", "vm4", "vm1"]),
                              ("install", ["vm2", "vm3", "vm4", "vm1"]),
                              ("deploy", ["vm2", "vm3", "vm4"]), ("deploy", ["vm1"])]
    # the spare's agent waits for the disk the coordinator attaches: no disk step there
    assert deployer.configs["vm4"]["role"] == "spare"
    formats = [name for kind, name, args in shell.log if kind == "run" and args[-1] == "format"]
    assert formats == ["vm1"]
    disk_steps = {name for kind, name, args in shell.log
                  if kind == "run" and args[-1] in ("format", "wait")}
    assert disk_steps == {"vm1", "vm2", "vm3"}
    assert report.formatted.startswith("formatted") and report.changed
    assert report.disks == {"vm1": "/dev/vdc", "vm2": "/dev/vdc", "vm3": "/dev/vdc"}
    assert report.hosts["vm1"].actions == ("install", "deploy")
    # each VM gets its own key (derived from the master, which never leaves this machine)
    keys = FleetKeys(CFG.fleet.name, (SECRET,), time.time)
    puts = {name: args for kind, name, args in shell.log if kind == "put_files"}
    assert puts == {vm: [(keys.node_key_file(vm), GUEST_SECRET, 0o600)]
                    for vm in ("vm1", "vm2", "vm3", "vm4")}
    assert not any(SECRET in content for files in puts.values() for content, _, _ in files)
    commands = [" ".join(args) for kind, _, args in shell.log if kind == "run"]
    assert not any(SECRET.decode() in c for c in commands)  # never on a command line


def test_running_agents_are_left_alone_and_roles_follow_the_map() -> None:
    shell = FakeShell()
    deployer = FakeDeployer(shell, running=("vm2", "vm3", "vm4"))
    fleet_map = {"writer": "vm2", "epoch": 2}
    report = FleetRollout(CFG, shell, deployer, SECRET, health=healthy, fleet_map=fleet_map,
                          progress=lambda _: None).deploy()
    assert deployer.calls == [("status", ["vm1", "vm3", "vm4", "vm2"]), ("install", ["vm1"]),
                              ("deploy", ["vm1"]), ("deploy", [])]
    assert deployer.configs["vm1"]["role"] == "reader" and deployer.configs["vm1"]["epoch"] == 2
    assert not report.formatted  # the writer is running: its volume is not touched
    assert report.hosts["vm2"].pid == 100 and report.hosts["vm2"].actions == ()


def test_everything_running_changes_nothing() -> None:
    shell = FakeShell()
    deployer = FakeDeployer(shell, running=("vm1", "vm2", "vm3", "vm4"))
    report = FleetRollout(CFG, shell, deployer, SECRET, progress=lambda _: None).deploy()
    assert deployer.calls == [("status", ["vm2", "vm3", "vm4", "vm1"])]
    assert not report.changed and shell.log == []


def test_a_vm_without_the_disk_fails_the_deploy_naming_it() -> None:
    shell = FakeShell(fail_disk_on="vm3")
    deployer = FakeDeployer(shell)
    with pytest.raises(DeployError, match=r"vm3: .*not visible") as caught:
        FleetRollout(CFG, shell, deployer, SECRET, progress=lambda _: None).deploy()
    assert not caught.value.results["vm3"].ok and caught.value.results["vm1"].ok
    assert [c for c, _ in deployer.calls] == ["status", "install"]  # nothing started


def test_agents_are_given_every_coordinator_and_a_lone_one_as_before() -> None:
    pair = ["https://10.0.0.253:7470", "https://10.0.0.254:7470"]
    assert agent_config(CFG, "vm2", coordinators=pair)["coordinator"] == pair
    assert agent_config(CFG, "vm2", coordinators=pair[:1])["coordinator"] == pair[0]
    assert "coordinator" not in agent_config(CFG, "vm2", coordinators=[])
