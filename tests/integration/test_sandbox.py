"""The sandbox as a product: up → status → down leaves nothing; down after a killed up;
two sandboxes side by side. Checked from outside: processes, `ip netns`, virsh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.sandbox import identity, lifecycle

pytestmark = [pytest.mark.integration, pytest.mark.vm]

RBDFLEET = [sys.executable, "-m", "orchestrator.cli.app"]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RBDFLEET, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


# libvirtd is shared by every sandbox on the machine: `down` stops it only when unused.
SHARED_KINDS = {"libvirt.daemon"}


def _out(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False).stdout


def traces_left(state: dict[str, Any]) -> list[str]:
    """Everything the state recorded that still exists, as outside tools see it."""
    netns = _out("ip", "netns", "list").split()
    links = {line.split(":")[1].strip().split("@")[0] for line in _out("ip", "-o", "link")
             .splitlines()}
    routes = _out("ip", "route", "show", "table", "all")
    domains = _out("virsh", "-c", "qemu:///system", "list", "--all", "--name").split()
    networks = _out("virsh", "-c", "qemu:///system", "net-list", "--all", "--name").split()
    checks: dict[str, Callable[[dict[str, Any]], bool]] = {
        "testhost.netns": lambda r: r["name"] in netns,
        "testhost.bridge": lambda r: r["name"] in links,
        "testhost.veth": lambda r: r["name"] in links,
        "testhost.route": lambda r: f"unreachable {r['subnet']}" in routes,
        "vm.route": lambda r: f"unreachable {r['subnet']}" in routes,
        "vm.domain": lambda r: r["name"] in domains,
        "vm.network": lambda r: r["name"] in networks,
        "ceph.dir": lambda r: Path(r["path"]).exists(),
        "vm.dir": lambda r: Path(r["path"]).exists(),
    }
    left = []
    for res in state["resources"]:
        kind = res["kind"]
        # Daemons of a finished `up` are reaped lazily by PID 1: a zombie counts as gone.
        if "pid" in res and kind not in SHARED_KINDS and identity.running(int(res["pid"])):
            left.append(f"{kind} pid {res['pid']}")
        check = checks.get(kind)
        if check is not None and check(res):
            left.append(f"{kind} {res}")
    return left


def test_up_status_down_leaves_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "sb"
    up = run_cli("sandbox", "up", "--dir", str(directory), "--vms", "1", "--hosts", "2",
                 "--json")
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout)
    assert len(summary["vms"]) == 1 and len(summary["hosts"]) == 2
    config = Path(summary["config"]).read_text()
    assert "[ceph]" in config and "[[vm]]" in config and "[[host]]" in config
    secret = directory / "fleet.secret"
    assert secret.stat().st_mode & 0o777 == 0o600

    status = run_cli("sandbox", "status", "--dir", str(directory), "--json")
    report = json.loads(status.stdout)
    assert report["running"] is True
    assert all(r["alive"] is not False for r in report["resources"])
    state = json.loads((directory / "state.json").read_text())
    seen = " ".join(traces_left(state))
    for kind in ("ceph.daemon", "testhost.netns", "vm.domain", "vm.network", "vm.route"):
        assert kind in seen  # the checker sees what is up, so an empty list below means gone

    again = run_cli("sandbox", "up", "--dir", str(directory), "--vms", "0")
    assert again.returncode != 0 and "already" in again.stderr

    down = run_cli("sandbox", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert traces_left(state) == []
    assert not (directory / "state.json").exists()


def test_down_after_killed_up(tmp_path: Path) -> None:
    directory = tmp_path / "killed"
    proc = subprocess.Popen([*RBDFLEET, "sandbox", "up", "--dir", str(directory), "--vms", "1",
                             "--hosts", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state_file = directory / "state.json"
    deadline = time.monotonic() + 120
    # Kill once a domain is recorded: Ceph, hosts and the VM are then half made.
    while time.monotonic() < deadline:
        if state_file.exists() and '"domain"' in state_file.read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("up never recorded a domain")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(state_file.read_text())
    down = run_cli("sandbox", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert traces_left(state) == []


def test_two_sandboxes_side_by_side(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    request = lifecycle.SandboxRequest(vms=0, hosts=1)
    a = lifecycle.up(first, request)
    try:
        b = lifecycle.up(second, request)
        try:
            assert a.mon != b.mon
            assert a.hosts[0]["address"] != b.hosts[0]["address"]
            for summary in (a, b):
                env = {**os.environ, "CEPH_CONF": str(summary.ceph_conf)}
                out = subprocess.run(["rbd", "ls", "rbd"], env=env, capture_output=True,
                                     timeout=60, check=False)
                assert out.returncode == 0, out.stderr
        finally:
            assert lifecycle.down(second) == []
    finally:
        assert lifecycle.down(first) == []


@pytest.mark.parametrize("flags,message", [
    (["--vms", "99"], "--vms"),
    (["--osds", "0"], "--osds"),
    (["--objectstore", "zfs"], "objectstore"),
])
def test_bad_flags_give_one_clear_line(tmp_path: Path, flags: list[str], message: str) -> None:
    result = run_cli("sandbox", "up", "--dir", str(tmp_path / "bad"), *flags)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "bad" / "state.json").exists()
