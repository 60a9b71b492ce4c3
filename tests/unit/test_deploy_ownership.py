"""orchestrator.deploy: who owns the agent's files. Where systemd runs the agent it runs as its
own account, which the deployer makes and hands its private files to; elsewhere (namespace test
hosts) the SSH user keeps everything, as written (the remote shell scripted, or LocalShell)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents.service import AGENT_USER, DEVICE_GROUP
from orchestrator.core.remote import Executable, RemoteCommand, RemoteResult, SshHost
from orchestrator.deploy import AgentDeployer, DeployTarget
from orchestrator.packaging import AgentPackage
from orchestrator.testing.fakes import LocalShell

pytestmark = pytest.mark.unit

PACKAGE = AgentPackage(b"tarball", "0123456789abcdef")
AGENT = f"{AGENT_USER}:{AGENT_USER}"


@dataclass(frozen=True)
class Host:
    name: str = "vm1"
    address: str = "10.0.0.1"


class ScriptedShell:
    """RemoteShell that answers the deployer's probe as a host with (or without) systemd and
    an agent at ``installed`` state; records every command and file."""

    def __init__(self, *, systemd: bool, installed: Mapping[str, Any] | None = None) -> None:
        self.systemd = systemd
        self.installed = dict(installed or {})
        self.commands: list[RemoteCommand] = []
        self.files: list[tuple[str, int, bytes]] = []

    def run(self, host: SshHost, cmd: RemoteCommand, timeout: float = 30.0, *,
            check: bool = False, stdin: bytes | None = None) -> RemoteResult:
        self.commands.append(cmd)
        if cmd.executable is Executable.PYTHON3 and "unit_sha" in cmd.args[1]:  # the probe
            return RemoteResult(0, json.dumps({
                "version": None, "config_sha256": None, "pid": None, "log_tail": "",
                "unit_sha256": None, **self.installed, "systemd": self.systemd}), "")
        return RemoteResult(0, "", "")

    def put_file(self, host: SshHost, source: Path | bytes, remote_path: str,
                 mode: int = 0o644, timeout: float = 60.0) -> None:
        data = source.read_bytes() if isinstance(source, Path) else source
        self.files.append((remote_path, mode, data))

    def start_background(self, host: SshHost, cmd: RemoteCommand, *, workdir: str,
                         log_path: str, env: Mapping[str, str] | None = None,
                         timeout: float = 30.0) -> int:
        raise AssertionError("install and put_files start nothing")

    def accounts(self) -> list[tuple[str, ...]]:
        """The arguments of each run of the account script (after ``-c SCRIPT``)."""
        return [c.args[2:] for c in self.commands
                if c.executable is Executable.PYTHON3 and "useradd" in c.args[1]]


TARGET = DeployTarget(Host(), "/", {"node": "vm1", "fleet": "demo"})


def test_a_systemd_host_gets_the_account_and_the_agent_owns_its_config() -> None:
    shell = ScriptedShell(systemd=True)
    AgentDeployer(shell, PACKAGE).install([TARGET])
    assert {(path, mode) for path, mode, _ in shell.files} == {
        ("/opt/rbdfleet/.incoming-0123456789abcdef.tar.gz", 0o600),
        ("/etc/rbdfleet/agent.json", 0o600),
        ("/etc/systemd/system/rbdfleet-agent.service", 0o644)}
    # after every file is written: the account, then root's 0750 directory of the agent's
    # group, the config the agent's own (its key file reader refuses a group bit)
    assert shell.accounts() == [(AGENT_USER, DEVICE_GROUP, "/var/lib/rbdfleet",
                                 "/etc/rbdfleet", f"root:{AGENT_USER}", "750",
                                 "/etc/rbdfleet/agent.json", AGENT, "600")]
    assert shell.commands[-1].args[2:] == shell.accounts()[0]
    unit = next(data for path, _, data in shell.files if path.endswith(".service")).decode()
    assert f"\nUser={AGENT_USER}\n" in unit and f"\nSupplementaryGroups={DEVICE_GROUP}\n" in unit


def test_a_converged_systemd_host_is_left_alone() -> None:
    first = ScriptedShell(systemd=True)
    AgentDeployer(first, PACKAGE).install([TARGET])
    files = {path: data for path, _, data in first.files}
    shell = ScriptedShell(systemd=True, installed={
        "version": PACKAGE.version,
        "config_sha256": hashlib.sha256(files["/etc/rbdfleet/agent.json"]).hexdigest(),
        "unit_sha256": hashlib.sha256(
            files["/etc/systemd/system/rbdfleet-agent.service"]).hexdigest()})
    AgentDeployer(shell, PACKAGE).install([TARGET])
    assert shell.files == [] and shell.accounts() == [] and len(shell.commands) == 1


def test_without_systemd_no_account_is_made_and_nothing_changes_hands() -> None:
    shell = ScriptedShell(systemd=False)
    deployer = AgentDeployer(shell, PACKAGE)
    deployer.install([TARGET])
    deployer.put_files(TARGET, [(b"k\n", "/etc/rbdfleet/node.key", 0o600)])
    assert ("/etc/rbdfleet/agent.json", 0o600) in {(p, m) for p, m, _ in shell.files}
    assert shell.accounts() == []


def test_key_files_are_the_agents_and_certificates_roots_where_systemd_runs_it() -> None:
    shell = ScriptedShell(systemd=True)
    AgentDeployer(shell, PACKAGE).put_files(TARGET, [
        (b"key\n", "/etc/rbdfleet/node.key", 0o600),
        (b"CERT", "/etc/rbdfleet/agent.crt", 0o644),
        (b"PRIVATE", "/etc/rbdfleet/agent.key", 0o600),
        (b"CA", "/etc/rbdfleet/ca.crt", 0o644)])
    assert [(path, mode) for path, mode, _ in shell.files] == [
        ("/etc/rbdfleet/node.key", 0o600), ("/etc/rbdfleet/agent.crt", 0o644),
        ("/etc/rbdfleet/agent.key", 0o600), ("/etc/rbdfleet/ca.crt", 0o644)]
    assert shell.accounts() == [(AGENT_USER, DEVICE_GROUP, "/var/lib/rbdfleet",
                                 "/etc/rbdfleet/node.key", AGENT, "600",
                                 "/etc/rbdfleet/agent.crt", "root:root", "644",
                                 "/etc/rbdfleet/agent.key", AGENT, "600",
                                 "/etc/rbdfleet/ca.crt", "root:root", "644")]
    secrets = [c for c in shell.commands for arg in c.args if arg in ("key\n", "PRIVATE")]
    assert secrets == []  # contents travel as files, never on a command line


def test_on_a_host_without_systemd_the_files_keep_the_ssh_users_ownership(
        tmp_path: Path) -> None:
    """The namespace test hosts' path for real (LocalShell, a prefix): modes as given, owner
    whoever wrote them, no account asked for."""
    target = DeployTarget(Host(), str(tmp_path), {"node": "vm1"})
    deployer = AgentDeployer(LocalShell(), AgentPackage.build())
    deployer.install([target])
    key = target.layout.config_path.replace("agent.json", "node.key")
    deployer.put_files(target, [(b"k\n", key, 0o600)])
    for path in (target.layout.config_path, key):
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert not Path(target.layout.unit_path).exists()
