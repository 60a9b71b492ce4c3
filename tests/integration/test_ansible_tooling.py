"""The Ansible tree as tools see it: ansible-lint's production profile, the systemd unit as
systemd-analyze reads it, and `rbdfleet inventory` as ansible-inventory reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.service import UnitParams, render_unit
from orchestrator.adapters.ansible import ANSIBLE_DIR

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROLE = ANSIBLE_DIR / "roles" / "rbdfleet_agent"


def ansible_env(tmp_path: Path) -> dict[str, str]:
    """Ansible's state in the test's own directory, never ~/.ansible."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_HOME=str(tmp_path / "ansible-home"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "t"),
               ANSIBLE_NOCOLOR="1", NO_COLOR="1", PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}")
    return env


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "ansible-lint"), "--profile", "production", "--offline",
                           "ansible/"], cwd=ANSIBLE_DIR.parent, env=ansible_env(tmp_path),
                          capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "0 failure(s), 0 warning(s)" in output and "it passed" in output


def test_the_systemd_unit_is_rendered_from_the_role_variables(tmp_path: Path) -> None:
    """The role's own defaults and vars render the template into the unit `rbdfleet deploy`
    writes; systemd-analyze accepts it."""
    given = {"rbdfleet_agent_version": "0123456789abcdef", "rbdfleet_agent_prefix": "/",
             "rbdfleet_agent_launch": ["-m", "agents", "serve"], "rbdfleet_agent_stop_timeout": 7,
             "rbdfleet_agent_config": {"node": "vm1", "fleet": "demo", "role": "writer",
                                       "backend": "file:/srv/rbdfleet/vol.img"}}
    (tmp_path / "given.json").write_text(json.dumps(given))
    unit = tmp_path / "rbdfleet-agent.service"
    proc = subprocess.run([
        str(BIN / "ansible"), "localhost", "-i", "localhost,", "-c", "local",
        "-e", f"ansible_python_interpreter={sys.executable}",
        "-e", f"@{ROLE / 'defaults/main.yml'}", "-e", f"@{ROLE / 'vars/main.yml'}",
        "-e", f"@{tmp_path / 'given.json'}", "-m", "ansible.builtin.template",
        "-a", f"src={ROLE / 'templates/rbdfleet-agent.service.j2'} dest={unit} mode=0644"],
        env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = unit.read_text()
    # byte for byte what `rbdfleet deploy` installs for the same host: neither deployer sees
    # the other's unit as changed
    assert text == render_unit(UnitParams(
        release="/opt/rbdfleet/releases/0123456789abcdef", workdir="/var/lib/rbdfleet",
        config_path="/etc/rbdfleet/agent.json", pidfile="/run/rbdfleet/agent.pid",
        config=given["rbdfleet_agent_config"], stop_timeout=7))  # type: ignore[arg-type]
    for line in ("TimeoutStopSec=7", "Restart=always", "ProtectSystem=strict",
                 "ReadWritePaths=/var/lib/rbdfleet /srv/rbdfleet"):
        assert f"\n{line}\n" in text, line
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert (verify.returncode, verify.stderr) == (0, ""), verify.stderr


def test_rbdfleet_inventory_is_a_dynamic_inventory(tmp_path: Path) -> None:
    secret = tmp_path / "fleet.secret"
    secret.write_text("top-secret-value\n")
    secret.chmod(0o600)
    config = tmp_path / "rbdfleet.toml"
    config.write_text(f"""
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
secret_file = "{secret}"
[coordinator]
urls = ["http://127.0.0.1:9"]
[[vm]]
name = "vm1"
domain = "d1"
address = "10.87.0.11"
[[vm]]
name = "vm2"
domain = "d2"
address = "10.87.0.12"
[[vm]]
name = "vm3"
domain = "d3"
address = "10.87.0.13"
spare = true
""")
    script = tmp_path / "inventory.sh"
    script.write_text(f'#!/bin/sh\nexec {BIN / "rbdfleet"} inventory --config {config} '
                      f'--package-dir {tmp_path / "packages"} "$@"\n')
    script.chmod(0o755)
    env = ansible_env(tmp_path)
    listed = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(script), "--list"],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "top-secret-value" not in listed.stdout
    data = json.loads(listed.stdout)
    assert sorted(data["agents"]["children"]) == ["rbdfleet_readers", "rbdfleet_spares",
                                                  "rbdfleet_writer"]
    assert data["rbdfleet_writer"]["hosts"] == ["vm1"]
    assert data["rbdfleet_readers"]["hosts"] == ["vm2"]
    assert data["rbdfleet_spares"]["hosts"] == ["vm3"]
    assert data["_meta"]["hostvars"]["vm3"]["rbdfleet_agent_config"]["role"] == "spare"
    vm1 = data["_meta"]["hostvars"]["vm1"]
    assert vm1["rbdfleet_agent_config"]["role"] == "writer"
    assert Path(vm1["rbdfleet_agent_package"]).is_file()
    one = subprocess.run([str(script), "--host", "vm2"], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert json.loads(one.stdout)["rbdfleet_agent_config"]["listen"] == "10.87.0.12:7480"
    table = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120,
                           check=False)
    assert table.stdout.splitlines()[1:] == ["vm1   rbdfleet_writer   10.87.0.11",
                                             "vm2   rbdfleet_readers  10.87.0.12",
                                             "vm3   rbdfleet_spares   10.87.0.13"]
