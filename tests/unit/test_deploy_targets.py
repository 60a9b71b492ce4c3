"""Deploy targets, Ansible inventory hosts and the SSH shell built from rbdfleet.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.adapters.ansible import InventoryHost
from orchestrator.adapters.ssh import ParamikoShell
from orchestrator.config import SshConfig, load
from orchestrator.deploy import DeployTarget
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "rbdfleet.toml"
    path.write_text(f"""
[ceph]
conf = "{tmp_path}/ceph.conf"
keyring = "{tmp_path}/keyring"
[ssh]
key = "{tmp_path}/id"
known_hosts = "{tmp_path}/known_hosts"
[fleet]
name = "demo"
image = "img"
size = "1GiB"
writer = "vm1"
secret_file = "{tmp_path}/secret"
[[vm]]
name = "vm1"
domain = "d-vm1"
address = "10.87.0.11"
[[host]]
name = "h1"
address = "10.250.0.11"
root = "{tmp_path}/h1/root"
""")
    return path


def test_targets_and_inventory_follow_the_config(tmp_path: Path) -> None:
    config = load(write_config(tmp_path), env={})
    targets = DeployTarget.from_fleet(config, lambda name: {"node": name})
    assert [(t.host.name, t.host.address, t.prefix, dict(t.config)) for t in targets] == [
        ("vm1", "10.87.0.11", "/", {"node": "vm1"}),
        ("h1", "10.250.0.11", f"{tmp_path}/h1/root", {"node": "h1"})]
    assert targets[0].layout.config_path == "/etc/rbdfleet/agent.json"
    inventory = InventoryHost.from_fleet(config, lambda name: {"node": name})
    assert [(i.name, i.address, i.prefix) for i in inventory] == [
        (t.host.name, t.host.address, t.prefix) for t in targets]
    shell = ParamikoShell.from_config(config.ssh, connect_timeout=2.0)
    assert (shell.user, shell.key_file, shell.known_hosts, shell.connect_timeout) == (
        "root", tmp_path / "id", tmp_path / "known_hosts", 2.0)


def test_a_shell_without_pinned_keys_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="known_hosts"):
        ParamikoShell.from_config(SshConfig())
