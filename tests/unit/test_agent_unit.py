"""The agent's systemd unit (agents/service.py): one text for both deployers, and the launcher's
rule that an agent started again with the config of its last start is a reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.service import (
    AGENT_USER,
    DEVICE_GROUP,
    RESTART_SEC,
    STATE_FILE,
    UnitParams,
    ansible_template,
    read_write_paths,
    render_unit,
    role_override,
)
from orchestrator.adapters.ansible import ANSIBLE_DIR

pytestmark = pytest.mark.unit

ROLE = ANSIBLE_DIR / "roles" / "rbdfleet_agent"
TEMPLATE = ROLE / "templates" / "rbdfleet-agent.service.j2"


def _params(**config: object) -> UnitParams:
    return UnitParams(release="/opt/rbdfleet/releases/0123456789abcdef",
                      workdir="/var/lib/rbdfleet", config_path="/etc/rbdfleet/agent.json",
                      pidfile="/run/rbdfleet/agent.pid",
                      config={"node": "vm1", "fleet": "demo", **config})


def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_the_ansible_template_is_generated_from_the_one_unit_text() -> None:
    """Regenerate with: python -m agents.service --ansible-template > <the .j2 file>."""
    assert TEMPLATE.read_text() == ansible_template()


def test_a_vm_unit_supervises_and_hardens_the_agent() -> None:
    lines = _lines(render_unit(_params(backend="device:rbdfleet-abc")))
    for line in (
        "Environment=PYTHONPATH=/opt/rbdfleet/releases/0123456789abcdef",
        "ExecStart=/usr/bin/python3 -m agents.service --config /etc/rbdfleet/agent.json "
        "--state-dir /var/lib/rbdfleet -- -m agents serve",
        "Restart=always", f"RestartSec={RESTART_SEC}", "StartLimitIntervalSec=0",
        "StandardOutput=journal", "TimeoutStopSec=5", "NoNewPrivileges=yes",
        "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "CapabilityBoundingSet=", "ReadWritePaths=/var/lib/rbdfleet",
        "Description=rbdfleet agent vm1 (fleet demo)", "WantedBy=multi-user.target",
    ):
        assert line in lines, line


def test_the_agent_runs_as_its_own_account_without_a_capability() -> None:
    lines = _lines(render_unit(_params(backend="device:rbdfleet-abc")))
    for line in (
        f"User={AGENT_USER}", f"Group={AGENT_USER}", f"SupplementaryGroups={DEVICE_GROUP}",
        "CapabilityBoundingSet=", "AmbientCapabilities=", "NoNewPrivileges=yes",
        # the launcher's marker: in a directory systemd gives the agent (and its contents
        # whenever its top was not the agent's), mode 0750, writable under ProtectSystem
        "StateDirectory=rbdfleet", "StateDirectoryMode=0750",
        "WorkingDirectory=/var/lib/rbdfleet", "UMask=0077",
        # the pidfile the deployers signal as root is written by root ("+"), where only root
        # writes: the agent cannot name another process for them to kill
        "ExecStartPost=+/bin/sh -c 'mkdir -p -m 0755 /run/rbdfleet "
        "&& echo $$MAINPID > /run/rbdfleet/agent.pid'",
        "ExecStopPost=+/bin/rm -f /run/rbdfleet/agent.pid",
    ):
        assert line in lines, line
    # nothing it could write /run/rbdfleet through, no capability granted anywhere
    assert not any(line.startswith(("RuntimeDirectory", "ExecStart=+", "ExecStart=!",
                                    "PermissionsStartOnly"))
                   or (line.startswith(("AmbientCapabilities=", "CapabilityBoundingSet="))
                       and line.split("=", 1)[1]) for line in lines)


def test_the_roles_account_is_the_units() -> None:
    assert f"\nrbdfleet_agent_user: {AGENT_USER}\n" in (ROLE / "vars" / "main.yml").read_text()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any account may enter (pytest's tmp_path is its owner's alone)."""
    path = Path(tempfile.mkdtemp(prefix="rbdfleet-unit-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged uid needs root")
def test_the_launcher_works_as_an_unprivileged_account(open_dir: Path) -> None:
    """The unit's ExecStart as nobody, with the VM's ownership: the config its own and 0600 in
    a directory it may only read, its state directory its own; it records the start and execs
    the daemon (here a stand-in that prints what it was given)."""
    nobody = 65534
    etc, state = open_dir / "etc", open_dir / "state"
    etc.mkdir(mode=0o750)
    state.mkdir(mode=0o750)
    os.chown(etc, 0, nobody)
    os.chown(state, nobody, nobody)
    config = etc / "agent.json"
    config.write_text(json.dumps({"node": "vm1", "role": "writer", "coordinator": "http://c"}))
    os.chown(config, nobody, nobody)
    config.chmod(0o600)

    def start() -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "agents.service", "--config", str(config), "--state-dir",
             str(state), "--", "-c", "import sys; print(sys.argv[1:])"],
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])}, cwd=state,
            user=nobody, group=nobody, extra_groups=[], umask=0o077,
            capture_output=True, text=True, timeout=60, check=True)
        return proc.stdout.strip()

    assert start() == f"['--config', '{config}']"  # a deploy's start: as configured
    marker = state / STATE_FILE
    assert (marker.stat().st_uid, oct(marker.stat().st_mode & 0o777)) == (nobody, "0o600")
    assert start() == f"['--config', '{config}', '--role', 'reader']"  # restarted: a reader


def test_what_the_agent_writes_is_writable() -> None:
    assert read_write_paths("/w", {"backend": "file:/srv/img/vol.img",
                                   "ready_file": "/srv/img/ready"}) == ["/w", "/srv/img"]
    assert read_write_paths("/w", {"backend": "rbd:pool/img", "ready_file": "/run/x/a"}) \
        == ["/w", "/run/x"]


def test_launch_arguments_are_quoted_for_systemd() -> None:
    params = UnitParams(release="/r", workdir="/w", config_path="/c.json", pidfile="/p",
                        config={"node": "h1"}, launch=("-c", "import time; time.sleep(600)"),
                        stop_timeout=2.5)
    lines = _lines(render_unit(params))
    assert "ExecStart=/usr/bin/python3 -m agents.service --config /c.json --state-dir /w -- " \
           "-c 'import time; time.sleep(600)'" in lines
    assert "TimeoutStopSec=2.5" in lines


@pytest.mark.parametrize(("config", "second_start"), [
    ({"role": "writer", "coordinator": "http://c:7470"}, "reader"),
    ({"role": "reader", "coordinator": "http://c:7470"}, None),
    ({"role": "writer"}, None),  # no coordinator: nobody else could name a writer
])
def test_a_start_with_the_last_starts_config_takes_no_writer_role(
        tmp_path: Path, config: dict[str, str], second_start: str | None) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"node": "vm1", **config}))
    assert role_override(str(path), str(tmp_path)) is None  # the deploy's start: as configured
    assert (tmp_path / STATE_FILE).is_file()
    assert role_override(str(path), str(tmp_path)) == second_start  # restart, reboot
    assert role_override(str(path), str(tmp_path)) == second_start


def test_a_new_config_is_honoured_once(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"role": "writer", "epoch": 1, "coordinator": "http://c"}))
    role_override(str(path), str(tmp_path))
    assert role_override(str(path), str(tmp_path)) == "reader"
    path.write_text(json.dumps({"role": "writer", "epoch": 3, "coordinator": "http://c"}))
    assert role_override(str(path), str(tmp_path)) is None  # deployed again: a writer once
    assert role_override(str(path), str(tmp_path)) == "reader"
