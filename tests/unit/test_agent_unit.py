"""The agent's systemd unit (agents/service.py): one text for both deployers, and the launcher's
rule that an agent started again with the config of its last start is a reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.service import (
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

TEMPLATE = ANSIBLE_DIR / "roles" / "rbdfleet_agent" / "templates" / "rbdfleet-agent.service.j2"


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
        "ExecStartPost=/bin/sh -c 'echo $$MAINPID > /run/rbdfleet/agent.pid'",
        "Restart=always", f"RestartSec={RESTART_SEC}", "StartLimitIntervalSec=0",
        "StandardOutput=journal", "TimeoutStopSec=5", "NoNewPrivileges=yes",
        "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "CapabilityBoundingSet=", "ReadWritePaths=/var/lib/rbdfleet",
        "Description=rbdfleet agent vm1 (fleet demo)", "WantedBy=multi-user.target",
    ):
        assert line in lines, line
    assert not any(line.startswith("User=") for line in lines)  # root, without capabilities


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
