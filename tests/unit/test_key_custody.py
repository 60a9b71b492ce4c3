"""The admin's Ceph key never leaves the admin host: what rollout, deploy and the Ansible
inventory hand to a VM or host carries no Ceph credential at all (a VM reads the disk libvirt
attached with its own cephx user, whose key lives in a libvirt secret on the hypervisor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.adapters.ansible import InventoryHost, ssh_vars
from orchestrator.config import FleetConfig, from_mapping
from orchestrator.deploy import DeployTarget
from orchestrator.rollout import agent_config

pytestmark = pytest.mark.unit

KEYRING = "/etc/ceph/ceph.client.admin.keyring"
CEPH_CONF = "/etc/ceph/ceph.conf"


def config() -> FleetConfig:
    return from_mapping({
        "ceph": {"conf": CEPH_CONF, "keyring": KEYRING, "mon_host": "127.0.0.1:1"},
        "ssh": {"key": "/k", "known_hosts": "/kh"},
        "fleet": {"name": "demo", "image": "img", "size": "64MiB", "writer": "vm1",
                  "secret_file": "/s"},
        "vm": [{"name": f"vm{i}", "domain": f"d{i}", "address": f"10.0.0.{i}"}
               for i in (1, 2, 3)],
    })


def test_agent_configs_name_the_disk_by_serial_and_hold_no_ceph_credential() -> None:
    cfg = config()
    for name in ("vm1", "vm2", "vm3"):
        shipped = agent_config(cfg, name, coordinators=["http://10.0.0.9:1"])
        text = json.dumps(shipped)
        assert str(shipped["backend"]).startswith("device:rbdfleet-"), shipped
        assert not any(key.startswith("ceph") for key in shipped), shipped
        assert KEYRING not in text and CEPH_CONF not in text and "admin" not in text


def test_deploy_and_the_ansible_inventory_ship_only_the_agent_config() -> None:
    cfg = config()
    targets = DeployTarget.from_fleet(cfg, lambda name: agent_config(cfg, name, coordinators=()))
    for target in targets:
        assert KEYRING.encode() not in target.config_bytes()
    inventory = [h.hostvars() for h in InventoryHost.from_fleet(
        cfg, lambda name: agent_config(cfg, name, coordinators=()))]
    inventory.append(ssh_vars("root", Path("/k"), Path("/kh")))
    assert KEYRING not in json.dumps(inventory) and CEPH_CONF not in json.dumps(inventory)


def test_the_ansible_role_installs_no_ceph_keyring() -> None:
    role = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "rbdfleet_agent"
    copied = []
    for tasks in sorted((role / "tasks").glob("*.yml")):
        text = tasks.read_text()
        if "ansible.builtin.copy" in text:
            copied.append(tasks.name)
        # the format task may name a keyring path the host already has; it copies none
        assert "keyring_src" not in text and "client.admin" not in text, tasks.name
    assert copied == ["config.yml"]
    config_tasks = (role / "tasks" / "config.yml").read_text()
    assert "keyring" not in config_tasks and "ceph" not in config_tasks
