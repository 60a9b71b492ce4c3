"""Namespace test hosts: identity, routing safety, faults, teardown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import SandboxError
from orchestrator.sandbox.hosts import (
    HostSet,
    TestHost,
    start_hosts,
    teardown_run,
)
from orchestrator.sandbox.identity import same_process, start_time
from orchestrator.sandbox.state import StateFile
from tests.fixtures.hosts import host_set, sweep_orphans

pytestmark = pytest.mark.integration


def ssh_banner(host: TestHost, timeout: float = 2.0) -> bytes:
    """The first bytes sshd sends; raises OSError (refused / timed out) like a real client."""
    with socket.create_connection((host.address, host.port), timeout=timeout) as sock:
        return sock.recv(64)


def route_get(address: str) -> dict[str, object]:
    out = subprocess.run(["ip", "-j", "route", "get", address], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out)[0])


def test_each_host_has_its_own_name_address_and_processes(hosts5: HostSet) -> None:
    for host in hosts5.hosts:
        assert ssh_banner(host).startswith(b"SSH-2.0-")
        seen = hosts5.exec_on(host.name, ["sh", "-c", "hostname; ip -4 -o addr show dev eth0; "
                                          "ip route; ps -e -o comm="])
        lines = seen.stdout.splitlines()
        assert lines[0] == host.name
        assert f"inet {host.address}/24" in lines[1]
        routes = [line for line in lines if line.startswith(("default", hosts5.subnet))]
        assert routes == [f"{hosts5.subnet} dev eth0 proto kernel scope link src {host.address} "]
        assert "sshd" in lines  # pid 1, and only this host's processes
        assert len(lines) - 3 < 8


def test_traffic_to_the_subnet_stays_on_the_bridge(hosts5: HostSet) -> None:
    for host in hosts5.hosts:
        assert route_get(host.address)["dev"] == hosts5.bridge
    guard = subprocess.run(["ip", "-j", "route", "show", "type", "unreachable", hosts5.subnet],
                           capture_output=True, text=True, check=True).stdout
    assert json.loads(guard)[0]["metric"] == 9999
    # An address of the subnet that no host holds still routes to the bridge, never off-box.
    assert route_get(hosts5.subnet.replace(".0/24", ".200"))["dev"] == hosts5.bridge


def test_crash_kills_every_process_and_start_brings_the_host_back(hosts3: HostSet) -> None:
    hosts3.exec_on("h1", ["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 </dev/null &"])
    marker = hosts3.host("h1").root / "survives"
    marker.write_text("still here")
    before = {p: start_time(p) or 0 for p in hosts3.pids("h1")}
    assert len(before) >= 2
    hosts3.crash("h1")
    assert not [p for p, s in before.items() if same_process(p, s)]
    with pytest.raises(ConnectionRefusedError):
        ssh_banner(hosts3.host("h1"))
    assert ssh_banner(hosts3.host("h2")).startswith(b"SSH-2.0-")
    hosts3.start("h1")
    assert ssh_banner(hosts3.host("h1")).startswith(b"SSH-2.0-")
    assert marker.read_text() == "still here"
    # The crashed wrapper's record is gone, the new one is recorded and alive.
    records = [r for r in hosts3.state.resources
               if r["kind"] == "testhost.sshd" and r["host"] == "h1"]
    assert len(records) == 1 and same_process(records[0]["pid"], records[0]["start"])


def test_partition_cuts_one_host_until_healed(hosts3: HostSet) -> None:
    hosts3.partition("h2")
    with pytest.raises(TimeoutError):
        ssh_banner(hosts3.host("h2"), timeout=1.0)
    assert ssh_banner(hosts3.host("h1")).startswith(b"SSH-2.0-")
    # Host to host too: h1 cannot reach h2.
    probe = hosts3.exec_on("h1", ["bash", "-c", f"timeout 1 bash -c "
                                  f"'</dev/tcp/{hosts3.host('h2').address}/22' && echo open"])
    assert "open" not in probe.stdout
    hosts3.heal("h2")
    assert ssh_banner(hosts3.host("h2")).startswith(b"SSH-2.0-")


def test_frozen_host_accepts_tcp_but_never_answers(hosts3: HostSet) -> None:
    hosts3.freeze("h3")
    with pytest.raises(TimeoutError):
        ssh_banner(hosts3.host("h3"), timeout=1.0)  # connect works (backlog), recv times out
    hosts3.thaw("h3")
    assert ssh_banner(hosts3.host("h3")).startswith(b"SSH-2.0-")


def test_graceful_stop_then_start(hosts3: HostSet) -> None:
    hosts3.stop("h2")
    with pytest.raises(ConnectionRefusedError):
        ssh_banner(hosts3.host("h2"))
    with pytest.raises(SandboxError, match="not running"):
        hosts3.exec_on("h2", ["true"])
    hosts3.start("h2")
    assert hosts3.exec_on("h2", ["hostname"]).stdout.strip() == "h2"


def test_two_sets_side_by_side_and_teardown_from_the_state_file(tmp_path: Path) -> None:
    with host_set(tmp_path / "a", 2) as first:
        state_b = StateFile(tmp_path / "b" / "state.json")
        second = start_hosts(tmp_path / "b" / "hosts", state_b, 2)
        try:
            assert first.subnet != second.subnet and first.bridge != second.bridge
            for host in (*first.hosts, *second.hosts):
                assert ssh_banner(host).startswith(b"SSH-2.0-")
            recorded = list(state_b.resources)
        finally:
            # As after a crash of the process that made it: only the state file is left.
            errors = teardown_run(StateFile(state_b.path), second.run)
        assert errors == []
        assert StateFile(state_b.path).resources == []
        for res in recorded:
            kind = res["kind"]
            if kind == "testhost.sshd":
                assert not same_process(res["pid"], res["start"])
            elif kind == "testhost.netns":
                assert not Path("/run/netns", res["name"]).exists()
            elif kind in ("testhost.veth", "testhost.bridge"):
                assert not Path("/sys/class/net", res["name"]).exists()
            elif kind == "testhost.route":
                shown = subprocess.run(["ip", "route", "show", "type", "unreachable",
                                        res["subnet"]], capture_output=True, text=True).stdout
                assert shown == ""
        second.down()  # reaps the wrappers; nothing is left to undo
        # The first set is untouched by the second's teardown.
        for host in first.hosts:
            assert ssh_banner(host).startswith(b"SSH-2.0-")


def test_bad_count_or_busy_directory_is_refused_before_anything_is_made(
        hosts3: HostSet, tmp_path: Path) -> None:
    state = StateFile(tmp_path / "other-state.json")
    with pytest.raises(SandboxError, match="host count"):
        start_hosts(tmp_path / "hosts", state, 0)
    assert state.resources == []
    before = hosts3.state.resources
    keys = hosts3.known_hosts.read_text()
    with pytest.raises(SandboxError, match=f"host set {hosts3.run} is running"):
        start_hosts(hosts3.dir, hosts3.state, 1)
    assert hosts3.state.resources == before and hosts3.known_hosts.read_text() == keys


def test_sets_of_a_killed_session_are_swept_and_live_ones_kept(
        hosts3: HostSet, tmp_path: Path) -> None:
    orphan_dir = tmp_path / "pytest-0" / "t"
    orphan_dir.mkdir(parents=True)
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\n"
         "from tests.fixtures.hosts import host_set\n"
         "with host_set(Path(sys.argv[1]), 1):\n"
         "    print('up', flush=True); time.sleep(120)\n", str(orphan_dir)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert owner.stdout is not None and owner.stdout.readline() == "up\n"
    recorded = StateFile(orphan_dir / "state.json").resources
    sweep_orphans(tmp_path)  # the owner is alive: nothing happens
    assert StateFile(orphan_dir / "state.json").resources == recorded
    os.kill(owner.pid, signal.SIGKILL)  # a killed pytest: no teardown ran
    owner.wait()
    owner.stdout.close()
    sweep_orphans(tmp_path)
    assert StateFile(orphan_dir / "state.json").resources == []
    netns = [r["name"] for r in recorded if r["kind"] == "testhost.netns"]
    assert netns and not Path("/run/netns", netns[0]).exists()
    assert ssh_banner(hosts3.host("h1")).startswith(b"SSH-2.0-")  # a live set is untouched
