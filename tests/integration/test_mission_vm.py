"""The whole mission on real VMs: provision -> deploy -> coordinator -> put/get -> a compromised
reader refused -> failover.

The session's three TCG guests (``sandbox_vms``) and Ceph cluster (``ceph_cluster``), one
fleet for the module with its own name, image, cephx users and disk serial; the tests run in
file order and hand the fleet on, as the demo does (``orchestrator.sandbox.demo.Mission``
holds the steps; every product command runs as ``rbdfleet`` in a subprocess). The module
undeploys, stops its coordinator and deprovisions (image deleted) at the end, so the shared
VMs keep no disk of it. Budget: ~2-3 min with the VMs already booted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.remote import Executable, RemoteCommand
from orchestrator.sandbox import processes
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.sandbox.demo import READ_ONLY_ERRORS, Mission, sha256
from orchestrator.sandbox.lifecycle import CLIENT_SECRET, issue_admin_client, render_config
from orchestrator.sandbox.state import StateFile
from orchestrator.sandbox.vms import VmSet

pytestmark = [pytest.mark.integration, pytest.mark.vm]

WRITER, READERS = "vm1", ("vm2", "vm3")
SHARED: dict[str, str] = {}  # handed from one test to the next (they run in file order)


def _say(message: str) -> None:
    print(f"[mission] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def mission(tmp_path_factory: pytest.TempPathFactory, ceph_cluster: CephCluster,
            sandbox_vms: VmSet) -> Iterator[Mission]:
    """A fleet config for the session's VMs and cluster; everything it made undone after."""
    with open_mission(tmp_path_factory, ceph_cluster, sandbox_vms) as m:
        yield m


@contextlib.contextmanager
def open_mission(tmp_path_factory: pytest.TempPathFactory, ceph_cluster: CephCluster,
                 sandbox_vms: VmSet, spares: tuple[str, ...] = (),
                 coordinators: tuple[str, ...] = ()) -> Iterator[Mission]:
    """The ``mission`` fixture's fleet; ``spares``: VMs configured ``spare = true``;
    ``coordinators``: the URLs of ``[coordinator] urls`` instead of the host's one."""
    directory = tmp_path_factory.mktemp("mission")
    fleet = f"m{uuid.uuid4().hex[:6]}"
    secret = directory / "fleet.secret"
    secret.touch(mode=0o600)
    secret.write_text(os.urandom(32).hex() + "\n")
    text = render_config(directory, ceph_cluster, sandbox_vms, None, secret)
    text = text.replace('name = "demo"', f'name = "{fleet}"')
    text = text.replace('image = "rbdfleet-demo"', f'image = "{fleet}"')
    text = text.replace('size = "1GiB"', 'size = "256MiB"')
    if coordinators:
        start = text.index("urls = [", text.index("[coordinator]"))
        end = text.index("\n", start)
        text = text[:start] + f"urls = {json.dumps(list(coordinators))}" + text[end:]
    for vm in spares:
        at = text.index(f'name = "{vm}"')
        flag = text.index("spare = false", at)
        text = text[:flag] + "spare = true" + text[flag + len("spare = false"):]
    config = directory / "rbdfleet.toml"
    config.write_text(text)
    issue_admin_client(config, directory / CLIENT_SECRET)  # as `sandbox up` does
    state = StateFile(directory / "state.json")
    m = Mission(config, state, _say)
    SHARED["ca"] = str(m.config.pki_dir / "ca.pem")  # `rbdfleet provision` makes it
    try:
        yield m
    finally:
        for res in reversed(state.resources):
            with contextlib.suppress(Exception):
                processes.stop_process(res)
        with contextlib.suppress(Exception):
            m.cli("undeploy", timeout=120, check=False)
        with contextlib.suppress(Exception):
            m.cli("deprovision", "--delete-image", "--yes-i-really-mean-it", timeout=180,
                  check=False)
        m.close()


def _health(address: str) -> dict[str, Any]:
    """An agent's /v1/health over TLS, verified against the mission's fleet CA."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=10,
                                       context=ssl.create_default_context(cafile=SHARED["ca"]))
    try:
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        assert resp.status == 200
        result: dict[str, Any] = json.loads(resp.read())
        return result
    finally:
        conn.close()


def _modes(mission: Mission) -> dict[str, str | None]:
    listing = json.loads(mission.cli("vm", "list", "--json").stdout)
    return {row["vm"]: row["mode"] for row in listing["vms"] if row["vm"]}


def test_provision_attaches_the_writer_rw_and_the_readers_ro(mission: Mission) -> None:
    mission.provision()
    assert _modes(mission) == {WRITER: "rw", **{r: "ro" for r in READERS}}


def test_deploy_formats_the_blank_image_and_starts_every_agent(mission: Mission) -> None:
    mission.deploy()
    port = mission.config.fleet.agent_port
    roles = {vm.name: _health(f"{vm.address}:{port}") for vm in mission.config.vms}
    assert {n: h["role"] for n, h in roles.items()} == {
        WRITER: "writer", **{r: "reader" for r in READERS}}
    assert all(h["epoch"] == 1 and h["fleet"] == mission.config.fleet.name
               for h in roles.values())
    again = json.loads(mission.cli("deploy", "--json").stdout)
    assert again["changed"] is False  # running agents left alone, the volume untouched
    assert not again["formatted"] and all(not h["actions"] for h in again["hosts"].values())


# In the guest, as root: the agent's identity (from its pidfile) and its files' owner and mode.
_WHO = r"""
import grp, json, os, pwd
pid = int(open("/run/rbdfleet/agent.pid").read())
status = dict(line.split(":", 1) for line in open("/proc/%d/status" % pid).read().splitlines())
files = {}
for name in ("", "agent.json", "node.key", "agent.key", "agent.crt", "ca.crt"):
    info = os.stat(os.path.join("/etc/rbdfleet", name))
    files[name or "."] = [pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name,
                          info.st_mode & 0o7777]
print(json.dumps({"uid": int(status["Uid"].split()[1]), "groups": status["Groups"].split(),
                  "cap_eff": int(status["CapEff"], 16), "files": files,
                  "disk": grp.getgrnam("disk").gr_gid}))
"""


def test_every_agent_runs_unprivileged_and_its_secrets_are_private(mission: Mission) -> None:
    for vm in mission.config.vms:
        out = mission.shell.run(vm, RemoteCommand(Executable.PYTHON3, ["-c", _WHO]), 60,
                                check=True).stdout
        who = json.loads(out)
        assert who["uid"] != 0 and who["cap_eff"] == 0, (vm.name, who)
        assert str(who["disk"]) in who["groups"], (vm.name, who)  # opens the shared disk
        files = who["files"]
        for name in ("agent.json", "node.key", "agent.key"):
            assert files[name][2] & 0o077 == 0, (vm.name, name, files)  # private
            assert files[name][0] == "rbdfleet-agent", (vm.name, name, files)
        assert files["."] == ["root", "rbdfleet-agent", 0o750], (vm.name, files)
        assert all(mode & 0o002 == 0 for _, _, mode in files.values()), files


def test_coordinator_serves_the_writer_and_two_in_sync_readers(mission: Mission) -> None:
    assert mission.start_coordinator(mission.config_path.parent / "coordinator.log") > 0
    fleet_map = mission.fleet_map()
    assert fleet_map["writer"] == WRITER and fleet_map["epoch"] == 1
    assert sorted(m["name"] for m in fleet_map["members"]
                  if m["role"] == "reader" and m["in_sync"]) == list(READERS)


def test_put_get_from_a_reader_and_status(mission: Mission, tmp_path: Path) -> None:
    mission.put_get(tmp_path, size=2 << 20)
    status = json.loads(mission.cli("status", "--json").stdout)
    assert status["active"] and status["map"]["writer"] == WRITER


def test_a_compromised_reader_vm_cannot_write_the_disk_nor_use_its_key_on_other_nodes(
        mission: Mission) -> None:
    reader, landmark = READERS[0], mission.aim()
    assert landmark.path == "/demo/hello.bin"  # located by put_get: the first put's file
    mission.settle()  # the writer's idle checkpoints are done: only a stray write changes it
    before = mission.snapshot()
    assert before.epoch == 1 and before.writer == WRITER
    # root in the guest, O_DIRECT onto the fleet disk: the <readonly/> attachment refuses it
    error = mission.raw_write_from(reader, landmark)
    assert any(e in error for e in READ_ONLY_ERRORS), error
    # grants minted with the reader's own agent key: good enough for its own agent (so the
    # tokens are well made), refused by every other node, its fleet certificate notwithstanding
    answers = mission.forged_requests_from(reader)
    assert answers[0]["status"] == 200, answers[0]
    assert [a["request"].split()[0] + " " + a["request"].rsplit("/v1/", 1)[1]
            for a in answers[1:]] == ["PUT files/demo/compromised.bin", "POST records",
                                      "POST demote", "POST promote"]
    assert [(a["status"], a["error"]) for a in answers[1:]] == [(401, "bad_signature")] * 4
    # nothing moved: map (epoch, writer, roles), every byte of the image, /demo's entries
    assert mission.snapshot() == before
    assert mission.image_block(landmark.offset) == landmark.data
    assert mission.verify(mission.files) == []


def test_writer_killed_fence_role_switch_promotion_no_acked_write_lost(
        mission: Mission, tmp_path: Path) -> None:
    mission.put_many(10)
    landmark = mission.aim()
    mission.start_stale_writer(WRITER)
    new_map = mission.fail_over(tmp_path)
    # from here on a write of the stale writer that lands is its marker over hello.bin's first
    # block: told before the old writer's disk is released, so without the fence it would land
    mission.end_failover(WRITER)
    new_writer = new_map["writer"]
    assert new_writer in READERS and new_map["epoch"] == 2
    # the coordinator switched roles through libvirt: exactly one rw disk, the new writer's,
    # once the old writer's (fenced) disk is released after the map (in the background)
    switched = {WRITER: "ro", new_writer: "rw", **{r: "ro" for r in READERS if r != new_writer}}
    mission.wait(lambda: _modes(mission) == switched, 30, "the old writer's disk released")
    # the old writer's handle on its read-write disk was fenced by the Ceph blocklist
    mission.wait(lambda: "failed" in mission.stale_writer_log(WRITER), 30, "the stale write")
    # no write of the old writer's landed after the failover: hello.bin's first block is the
    # file's own bytes, not the stale writer's marker (checked first: it is what matters)
    assert mission.image_block(landmark.offset) == landmark.data, mission.stale_writer_log(WRITER)
    outcome = mission.stale_write_outcome(WRITER)
    _say(f"stale writer: {outcome}")
    # Only EIO proves the Ceph fence: its writes (every 10 ms) fail once its QEMU's client is
    # blocklisted, which the law order puts before the role switch pulls the disk (a failure
    # that first met the removed disk, ENOSPC/ENXIO, would prove nothing about the fence).
    assert "errno=5 EIO" in outcome, outcome
    fenced = mission.fenced_addresses(WRITER, mission.config_path.parent / "coordinator.log")
    blocklist = subprocess.run(["ceph", "-c", str(mission.config.ceph.conf), "osd", "blocklist",
                                "ls"], capture_output=True, text=True, timeout=60, check=True)
    assert fenced and all(a in blocklist.stdout + blocklist.stderr for a in fenced)
    # every acknowledged file (hello.bin, the stale writer's target, too) reads back intact
    assert len(mission.files) == 12 and mission.verify(mission.files) == []
    after = sha256((tmp_path / "after-failover.bin").read_bytes())
    assert mission.verify({"/demo/after-failover.bin": after}) == []
    SHARED['after-failover'] = after
    status = json.loads(mission.cli("status", "--json").stdout)
    assert status["map"]["epoch"] == 2  # one failover, no second one after the promotion
    members = {m["name"]: m for m in status["map"]["members"]}
    # out, or already back as a reader: systemd starts a killed agent again, as a reader
    # (tests/fault/test_agent_restart_vm.py); never the writer again
    assert members[WRITER]["role"] in ("out", "reader")
    assert sorted(n for n, m in members.items() if m["role"] == "reader" and m["in_sync"]
                  and n != WRITER) == [r for r in READERS if r != new_writer]
    _say(f"timings: {mission.timings}")



def test_old_writer_rejoins_as_an_in_sync_reader(mission: Mission) -> None:
    mission.rejoin(WRITER)
    port = mission.config.fleet.agent_port
    health = _health(f"{mission.config.vm(WRITER).address}:{port}")
    assert health["role"] == "reader" and health["epoch"] == 2
    reads = mission.client().coordinator.targets("read", "/demo/after-failover.bin")
    assert WRITER in [t.node for t in reads.ordered]  # handed out to clients again
    assert mission.verify({"/demo/after-failover.bin": SHARED["after-failover"]}) == []
