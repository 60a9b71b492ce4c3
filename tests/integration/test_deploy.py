"""Agent deployment over SSH to namespace hosts: copy, configure, start/stop, idempotence.

The Ansible path (and how the two deployers share one agent) is tests/integration/
test_ansible_deploy.py."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.adapters.ssh import ParamikoShell
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.core.remote import Executable, RemoteCommand
from orchestrator.deploy import AgentDeployer, DeployTarget
from orchestrator.errors import DeployError
from orchestrator.packaging import DEFAULT_LAUNCH, AgentPackage
from orchestrator.sandbox.hosts import HostSet
from orchestrator.sandbox.vms import VmSet

pytestmark = pytest.mark.integration

# Stands in for the daemon: proves the package imports from the install dir, then waits.
HOLD = ("-c", "import agents, sys, time; "
              "open('imported-from', 'w').write(agents.__file__ + ' ' + sys.argv[-1]); "
              "time.sleep(600)")


def targets_for(hosts: HostSet, **config: object) -> list[DeployTarget]:
    return [DeployTarget(h, prefix=str(h.root), config={"node": h.name, **config})
            for h in hosts.hosts]


def test_deploy_copies_configures_starts_and_then_does_nothing(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage) -> None:
    deployer = AgentDeployer(shell3, package, launch=HOLD, settle=0.3)
    targets = targets_for(hosts3, port=7480)
    first = deployer.deploy(targets)
    for target in targets:
        result, root = first[target.host.name], Path(target.prefix)
        assert result.ok and result.changed and result.pid is not None
        assert result.version == package.version
        release = root / "opt/rbdfleet/releases" / package.version
        assert (root / "opt/rbdfleet/current").resolve() == release
        assert {p.name for p in (release / "agents").iterdir()} >= {"__init__.py", "py.typed"}
        config = root / "etc/rbdfleet/agent.json"
        assert json.loads(config.read_text()) == {"node": target.host.name, "port": 7480}
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        imported = (root / "var/lib/rbdfleet/imported-from").read_text().split()
        assert imported == [str(release / "agents/__init__.py"), str(config)]
        assert not list((root / "opt/rbdfleet").glob(".incoming-*"))
    stamp = {t.host.name: Path(t.prefix, "opt/rbdfleet/current").lstat().st_mtime_ns
             for t in targets}
    again = deployer.deploy(targets)
    for target in targets:
        name = target.host.name
        assert (again[name].ok, again[name].changed, again[name].actions) == (True, False, ())
        assert again[name].pid == first[name].pid
        assert Path(target.prefix, "opt/rbdfleet/current").lstat().st_mtime_ns == stamp[name]


def test_a_changed_config_restarts_only_that_host(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage) -> None:
    deployer = AgentDeployer(shell3, package, launch=HOLD, settle=0.3)
    targets = targets_for(hosts3, port=7480)
    first = deployer.deploy(targets)
    targets[1] = DeployTarget(targets[1].host, targets[1].prefix, {"node": "h2", "port": 7481})
    second = deployer.deploy(targets)
    assert second["h2"].actions[0] == "configured" and "stopped" in second["h2"].actions
    assert second["h2"].pid is not None and second["h2"].pid != first["h2"].pid
    assert (second["h1"].changed, second["h3"].changed) == (False, False)
    assert (second["h1"].pid, second["h3"].pid) == (first["h1"].pid, first["h3"].pid)


def test_one_failed_host_never_hides_the_others(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage) -> None:
    hosts3.crash("h2")
    deployer = AgentDeployer(shell3, package, launch=HOLD, settle=0.3)
    with pytest.raises(DeployError, match="h2") as info:
        deployer.deploy(targets_for(hosts3))
    results = info.value.results
    assert results["h1"].ok and results["h3"].ok and results["h1"].pid is not None
    assert not results["h2"].ok and "h2" in str(results["h2"].error)
    hosts3.start("h2")
    healed = deployer.deploy(targets_for(hosts3))
    assert healed["h2"].changed and not healed["h1"].changed


def test_stop_status_and_an_agent_that_dies_at_start(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage) -> None:
    targets = targets_for(hosts3)
    deployer = AgentDeployer(shell3, package, launch=HOLD, settle=0.3)
    started = deployer.deploy(targets)
    stopped = deployer.stop(targets)
    assert all(r.ok and r.changed and r.pid is None for r in stopped.values())
    h1 = hosts3.host("h1")
    ps = hosts3.exec_on("h1", ["ps", "-e", "-o", "pid="]).stdout.split()
    assert str(started["h1"].pid) not in ps
    assert not Path(h1.root, "run/rbdfleet/agent.pid").exists()
    assert all(not r.changed for r in deployer.stop(targets).values())  # nothing to stop
    status = deployer.status(targets)
    assert all(r.pid is None and r.version == package.version for r in status.values())

    dying = AgentDeployer(shell3, package,
                          launch=("-c", "import sys; sys.exit('bad agent config')"), settle=0.5)
    with pytest.raises(DeployError) as info:
        dying.start(targets[:1])
    assert "bad agent config" in str(info.value.results["h1"].error)


def health(address: str, deadline: float) -> dict[str, object]:
    """The agent's /v1/health, polled until it answers or ``deadline`` passes."""
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}:7480/v1/health", timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_real_agent_runs_as_writer_and_readers_on_a_shared_file(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage, tmp_path: Path) -> None:
    """python3 -m agents serve on each host; the hosts share the image like VMs share a disk."""
    image = tmp_path / "shared.img"
    with open(image, "wb") as out:
        out.truncate(32 << 20)
    subprocess.run([sys.executable, "-m", "agents", "format", "--backend", f"file:{image}",
                    "--fleet", "t"], check=True, capture_output=True)
    keys = FleetKeys("t", (b"s" * 64,), time.time)  # each host gets its own key, as deploy does
    for h in hosts3.hosts:
        path = tmp_path / f"{h.name}.key"
        path.write_bytes(keys.node_key_file(h.name))
        path.chmod(0o600)
    readers = {h.name: f"{h.address}:7480" for h in hosts3.hosts[1:]}
    targets = [DeployTarget(h, str(h.root), {
        "node": h.name, "fleet": "t", "backend": f"file:{image}",
        "secret_file": str(tmp_path / f"{h.name}.key"),
        "listen": "0.0.0.0:7480", "advertise": f"{h.address}:7480",
        "role": "writer" if h.name == "h1" else "reader",
        "insecure_plaintext": True,  # on purpose: the deploy mechanics (TLS: test_tls.py)
        **({"readers": readers, "push_grants": keys.push_grants_to("h1", list(readers), 1)}
           if h.name == "h1" else {})}) for h in hosts3.hosts]
    deployer = AgentDeployer(shell3, package, launch=DEFAULT_LAUNCH)
    started = deployer.deploy(targets)
    deadline = time.monotonic() + 60
    seen = {h.name: health(h.address, deadline) for h in hosts3.hosts}
    assert {n: (s["node"], s["role"]) for n, s in seen.items()} == {
        "h1": ("h1", "writer"), "h2": ("h2", "reader"), "h3": ("h3", "reader")}
    # the readers start beside the writer: each joins once its first push is answered
    while sorted(seen["h1"]["in_sync"]) != ["h2", "h3"]:  # type: ignore[call-overload]
        assert time.monotonic() < deadline, f"readers never in sync: {seen['h1']}"
        time.sleep(0.1)
        seen["h1"] = health(hosts3.hosts[0].address, deadline)
    stopped = deployer.stop(targets)
    assert all(stopped[n].actions == (f"stopped pid {started[n].pid}",) for n in stopped)
    log = Path(targets[0].prefix, "var/log/rbdfleet/agent.log").read_text()
    assert "event=signal signal=SIGTERM" in log and "event=stopped node=h1" in log


# Formatted as root over SSH; under systemd the agent opens it as its own account, which
# put_files made: the volume is handed to that account, as a disk is by the disk group.
FORMAT_LOCAL_IMAGE = """
import os, pwd, sys
sys.path.insert(0, sys.argv[1])
from agents.daemon import main
with open(sys.argv[2], "wb") as image:
    image.truncate(16 << 20)
rc = main(["format", "--backend", "file:" + sys.argv[2], "--fleet", "vmtest"])
try:
    account = pwd.getpwnam("rbdfleet-agent")
except KeyError:  # no systemd: the agent runs as the SSH user
    pass
else:
    os.chown(sys.argv[2], account.pw_uid, account.pw_gid)
sys.exit(rc)
"""


def test_deploy_to_real_vms_runs_the_agent_and_is_idempotent(
        sandbox_vms: VmSet, package: AgentPackage) -> None:
    """The real agent on TCG guests (prefix "/"), each on a volume in its own filesystem."""
    targets = [DeployTarget(vm, "/", {
        "node": vm.name, "fleet": "vmtest", "backend": "file:/var/lib/rbdfleet/vol.img",
        "secret_file": "/etc/rbdfleet/fleet.secret", "listen": "0.0.0.0:7480",
        "role": "writer",
        "insecure_plaintext": True,  # on purpose: the deploy mechanics (TLS: test_tls.py)
    }) for vm in sandbox_vms.vms]
    with ParamikoShell(user="root", key_file=sandbox_vms.ssh_key,
                       known_hosts=sandbox_vms.known_hosts, connect_timeout=10.0) as shell:
        deployer = AgentDeployer(shell, package, settle=1.0, command_timeout=120.0)
        installed = deployer.install(targets)
        assert all(r.changed and r.version == package.version for r in installed.values())
        for target in targets:
            layout = target.layout
            deployer.put_files(target, [(b"ab" * 32 + b"\n", "/etc/rbdfleet/fleet.secret", 0o600)])
            shell.run(target.host, RemoteCommand(Executable.PYTHON3, [
                "-c", FORMAT_LOCAL_IMAGE, layout.release(package.version),
                "/var/lib/rbdfleet/vol.img"]), timeout=120.0, check=True)
        try:
            started = deployer.start(targets)
            deadline = time.monotonic() + 120
            for vm in sandbox_vms.vms:
                seen = health(vm.address, deadline)
                assert (seen["node"], seen["role"], seen["fleet"]) == (vm.name, "writer",
                                                                       "vmtest")
            again = deployer.deploy(targets)
            assert all(not r.changed and r.pid == started[n].pid for n, r in again.items())
        finally:
            # the VMs are shared with the later VM tests: no agent of this fleet (under
            # systemd, restarted forever) may outlive this test
            stopped = deployer.stop(targets)
        assert all(r.pid is None and r.changed for r in stopped.values())
