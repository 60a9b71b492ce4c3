"""The fleet as an Ansible inventory: groups that order the start, hostvars, no secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.core.grants import agent_key
from orchestrator.adapters.ansible import Inventory, InventoryHost
from orchestrator.cli.inventory import write_agent_keys
from orchestrator.config import FleetConfig, from_mapping
from orchestrator.errors import ConfigError
from orchestrator.services import fleet_inventory

pytestmark = pytest.mark.unit


def fleet(tmp_path: Path) -> FleetConfig:
    return from_mapping({
        "ceph": {"conf": f"{tmp_path}/ceph.conf", "keyring": f"{tmp_path}/keyring"},
        "ssh": {"key": f"{tmp_path}/id", "known_hosts": f"{tmp_path}/known_hosts"},
        "fleet": {"name": "demo", "image": "img", "size": "1GiB", "writer": "vm1",
                  "secret_file": f"{tmp_path}/fleet.secret"},
        "vm": [{"name": "vm1", "domain": "d1", "address": "10.87.0.11"},
               {"name": "vm2", "domain": "d2", "address": "10.87.0.12"},
               {"name": "vm3", "domain": "d3", "address": "10.87.0.13", "spare": True}],
    })


def test_bootstrap_roles_groups_and_hostvars(tmp_path: Path) -> None:
    found = fleet_inventory(fleet(tmp_path), coordinators=["http://10.87.0.1:7470"],
                            fleet_map=None, package=(tmp_path / "agents-x.tar.gz", "x" * 16),
                            key_dir=tmp_path / "keys")
    listing = found.to_script()
    assert listing["agents"] == {"children": ["rbdfleet_writer", "rbdfleet_readers",
                                              "rbdfleet_spares"]}
    assert (listing["rbdfleet_writer"], listing["rbdfleet_readers"], listing["rbdfleet_spares"]) \
        == ({"hosts": ["vm1"]}, {"hosts": ["vm2"]}, {"hosts": ["vm3"]})
    vm1 = listing["_meta"]["hostvars"]["vm1"]
    assert (vm1["ansible_host"], vm1["rbdfleet_agent_prefix"]) == ("10.87.0.11", "/")
    assert vm1["rbdfleet_agent_config"]["role"] == "writer"
    assert vm1["rbdfleet_agent_config"]["readers"] == {"vm2": "10.87.0.12:7480"}
    assert vm1["rbdfleet_agent_config"]["coordinator"] == "http://10.87.0.1:7470"
    shared = listing["all"]["vars"]
    # each host's own key, never the fleet's master (secret_file)
    per_host = f"{tmp_path}/keys/" + "{{ inventory_hostname }}.key"
    assert shared["rbdfleet_agent_secret_src"] == per_host
    assert shared["rbdfleet_agent_package"] == f"{tmp_path}/agents-x.tar.gz"
    assert "StrictHostKeyChecking=yes" in shared["ansible_ssh_common_args"]
    assert found.hostvars("vm1") == {**shared, **vm1}
    # the spare's agent is deployed too: it waits for the disk the coordinator attaches
    assert listing["_meta"]["hostvars"]["vm3"]["rbdfleet_agent_config"]["role"] == "spare"
    assert found.hostvars("vm2")["rbdfleet_agent_config"]["role"] == "reader"
    with pytest.raises(ConfigError, match="vm9"):
        found.hostvars("vm9")


def test_each_vm_gets_its_own_derived_key_file(tmp_path: Path) -> None:
    cfg = fleet(tmp_path)
    key_dir = write_agent_keys(cfg, (b"master",), tmp_path / "keys")
    assert key_dir.stat().st_mode & 0o777 == 0o700
    for vm in ("vm1", "vm2", "vm3"):
        path = key_dir / f"{vm}.key"
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_text() == agent_key(b"master", "demo", vm).hex() + "\n"
    assert b"master" not in b"".join(p.read_bytes() for p in key_dir.iterdir())
    # during a rotation (a two-line master file) each VM gets its key under both, in order
    write_agent_keys(cfg, (b"master", b"next"), key_dir)
    assert (key_dir / "vm1.key").read_text().split() == [
        agent_key(b"master", "demo", "vm1").hex(), agent_key(b"next", "demo", "vm1").hex()]


def test_roles_follow_the_coordinators_map_after_a_failover(tmp_path: Path) -> None:
    found = fleet_inventory(fleet(tmp_path), coordinators=(),
                            fleet_map={"writer": "vm2", "epoch": 3}, package=None,
                            key_dir=tmp_path / "keys")
    listing = found.to_script()
    assert (listing["rbdfleet_writer"], listing["rbdfleet_readers"]) == (
        {"hosts": ["vm2"]}, {"hosts": ["vm1"]})
    vm2 = found.hostvars("vm2")["rbdfleet_agent_config"]
    assert (vm2["role"], vm2["epoch"]) == ("writer", 3)
    assert "rbdfleet_agent_package" not in found.hostvars("vm2")


def test_the_static_form_holds_the_same_groups_and_hosts() -> None:
    hosts = [InventoryHost("a", "10.0.0.1", "/", {"node": "a", "role": "writer"}),
             InventoryHost("b", "10.0.0.2", "/r", {"node": "b"}),
             InventoryHost("c", "10.0.0.3", "/", {"node": "c", "role": "spare"}, spare=True)]
    static = Inventory(hosts, {"ansible_user": "root"}).to_static()["all"]
    assert static["vars"] == {"ansible_user": "root"}
    agents = static["children"]["agents"]["children"]
    assert agents["rbdfleet_writer"]["hosts"]["a"]["rbdfleet_agent_config"]["role"] == "writer"
    assert agents["rbdfleet_readers"]["hosts"]["b"]["rbdfleet_agent_prefix"] == "/r"
    assert agents["rbdfleet_spares"]["hosts"]["c"]["rbdfleet_agent_config"]["role"] == "spare"
