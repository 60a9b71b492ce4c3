"""The coordinator as a service: an active and a standby installed by ``rbdfleet coordinator
install`` as systemd units on two of the session's guests, killed and rebooted under load.

The session's three TCG guests boot systemd like the Debian VMs users run; the fleet's
coordinators run in vm2 and vm3 (beside their readers' agents), installed with the very
command the runbook gives, and nothing runs a coordinator on this host. The guests reach the
sandbox's loopback-only Ceph and libvirtd through an :class:`~orchestrator.sandbox.uplink.Uplink`
each (SSH remote forwards, kept across reboots), as coordinator hosts reach Ceph's public
network and the hypervisors in a cloud. The agents know both coordinators' URLs; clients
follow the active one (a standby answers ``not_active`` naming it).

1. Install: both units enabled and running, one active and one standby; a second install
   changes nothing and restarts nothing.
2. ``kill -9`` of the active coordinator under the recorded workload: the standby takes the
   lease and the workload goes on through it; systemd restarts the killed one, which stands
   by; the fleet never fails over (epoch 1, the same writer), the history is clean.
3. The active coordinator's guest rebooted under a new workload (its reader's agent goes down
   with it): the other takes over; after the boot the coordinator comes back by itself as the
   standby and the reader as an in-sync reader; still epoch 1, the history clean.
4. The Ansible path, ``ansible/deploy-coordinators.yml`` with ``rbdfleet inventory
   --coordinator vm2 --coordinator vm3`` as its dynamic inventory, on vm3: where the CLI
   installed it, ``--check`` reports ``changed=0`` (the same bytes in the same places); made
   fresh by ``coordinator uninstall``, the run installs it as the standby and a second run
   reports ``changed=0``.

Budget: ~15 min with the VMs already booted (the package install into two TCG guests, a TCG
reboot, three playbook runs: each module run costs seconds in a TCG guest).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.ansible import ANSIBLE_DIR, parse_output
from orchestrator.coordinator_hosts import CoordinatorLayout
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.uplink import LIBVIRT_URI, Uplink
from orchestrator.sandbox.vms import VmSet
from orchestrator.transport import Transport
from tests.integration.test_mission_vm import open_mission
from tests.vm_faults import WRITER, GuestReboot, Recorded, rejoined, say_as, settled

pytestmark = [pytest.mark.fault, pytest.mark.vm]

HOSTS = ("vm2", "vm3")
# The playbook's tests run on one host: a module run costs seconds in a TCG guest (~3 min a
# playbook run), and the other host is the active coordinator that keeps the fleet meanwhile.
PLAYBOOK_HOST = "vm3"
PORT = 7470
say = say_as("coordinator-service")


class Pair:
    """The fleet and its two installed coordinators."""

    def __init__(self, fleet: Mission, vms: VmSet) -> None:
        self.fleet, self.vms = fleet, vms
        self.layout = CoordinatorLayout(fleet.config.fleet.name)

    @functools.cached_property
    def transport(self) -> Transport:
        """HTTPS under the fleet CA (which `rbdfleet provision` makes)."""
        return self.fleet.services.transport()

    def url(self, vm: str) -> str:
        return f"https://{self.vms.vm(vm).address}:{PORT}"

    def role(self, vm: str) -> str | None:
        """What the coordinator in ``vm`` answers: active, standby, or None (no answer)."""
        try:
            answer = self.transport.request("coordinator", self.url(vm), "GET", "/v1/health",
                                            timeout=5.0).body
        except Exception:  # any failure to answer is "no answer" here
            return None
        return "active" if answer["fleets"].get(self.fleet.config.fleet.name) else "standby"

    def roles(self) -> dict[str, str | None]:
        return {vm: self.role(vm) for vm in HOSTS}

    def active(self) -> str:
        """The one coordinator answering active (and the other standby), once settled."""
        def one_active() -> bool:
            roles = self.roles()
            return sorted(r or "" for r in roles.values()) == ["active", "standby"]

        self.fleet.wait(one_active, 120, f"one active and one standby coordinator "
                        f"({self.roles()})")
        return next(vm for vm, role in self.roles().items() if role == "active")

    def unit(self, vm: str) -> dict[str, str]:
        done = self.vms.exec(vm, ["systemctl", "show", "--property=ActiveState",
                                  "--property=MainPID", "--property=UnitFileState",
                                  "--property=NRestarts", self.layout.unit_name])
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def epoch_and_writer(self) -> tuple[int, str | None]:
        m = self.fleet.fleet_map()
        return int(m.get("epoch", 0)), m.get("writer")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, ceph_cluster: CephCluster,
         sandbox_vms: VmSet) -> Iterator[Pair]:
    """A fleet provisioned and deployed, its coordinators installed in vm2 and vm3 and
    serving it; everything removed after."""
    urls = tuple(f"https://{sandbox_vms.vm(vm).address}:{PORT}" for vm in HOSTS)
    with contextlib.ExitStack() as stack:
        for vm in HOSTS:
            uplink = stack.enter_context(Uplink(
                sandbox_vms.vm(vm).address, sandbox_vms.ssh_key, sandbox_vms.known_hosts,
                ceph_cluster.conf, (ceph_cluster.mon_port, ceph_cluster.mon_port + 1)))
            uplink.wait_connected(60)
        fleet = stack.enter_context(open_mission(tmp_path_factory, ceph_cluster, sandbox_vms,
                                                 coordinators=urls))
        pair = Pair(fleet, sandbox_vms)
        fleet.provision()
        fleet.deploy()
        stack.callback(fleet.cli, "coordinator", "uninstall", *HOSTS, timeout=180,
                       check=False)
        yield pair


def _install(pair: Pair) -> dict[str, Any]:
    done = pair.fleet.cli("coordinator", "install", *HOSTS, "--libvirt-uri", LIBVIRT_URI,
                          "--json", timeout=600)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_install_puts_an_active_and_a_standby_under_systemd(pair: Pair) -> None:
    first = _install(pair)
    assert set(first) == set(HOSTS)
    assert all("started" in r["actions"] and "enabled" in r["actions"] for r in first.values())
    assert sorted(r["role"] for r in first.values()) == ["active", "standby"], first
    settled(pair.fleet)  # both readers in sync under the installed coordinators
    for vm in HOSTS:
        unit = pair.unit(vm)
        assert (unit["ActiveState"], unit["UnitFileState"]) == ("active", "enabled"), unit
    pids = {vm: pair.unit(vm)["MainPID"] for vm in HOSTS}
    again = _install(pair)
    assert all(r["actions"] == [] for r in again.values()), again  # nothing written, restarted
    assert {vm: pair.unit(vm)["MainPID"] for vm in HOSTS} == pids
    assert pair.epoch_and_writer() == (1, WRITER)


def test_killed_active_coordinator_is_replaced_by_the_standby_and_restarted(pair: Pair) -> None:
    active = pair.active()
    standby = next(vm for vm in HOSTS if vm != active)
    killed_pid = pair.unit(active)["MainPID"]
    recorded = Recorded(pair.fleet, root=f"/kill-{uuid.uuid4().hex[:6]}")
    recorded.start()
    pair.fleet.wait(lambda: len(recorded.acks) >= 3, 60, "the recorded workload")
    acked_before = len(recorded.acks)
    say(f"kill -9 the active coordinator in {active} (pid {killed_pid})")
    done = pair.vms.exec(active, ["kill", "-9", killed_pid])
    assert done.returncode == 0, done.stderr
    killed = time.monotonic()
    pair.fleet.wait(lambda: pair.role(standby) == "active", 60, f"{standby} active")
    took_over = time.monotonic() - killed
    pair.fleet.wait(lambda: pair.role(active) == "standby", 120,
                    f"{active}'s coordinator restarted by systemd, standing by")
    restarted = pair.unit(active)
    assert restarted["MainPID"] != killed_pid and int(restarted["NRestarts"]) >= 1, restarted
    pair.fleet.wait(lambda: len(recorded.acks) >= acked_before + 10, 120,
                    "writes acknowledged through the new active coordinator")
    recorded.finish()
    say(f"{standby} took over in {took_over:.1f} s; {recorded.tally()}")
    assert pair.epoch_and_writer() == (1, WRITER)  # the handover moved no write grant


def test_rebooted_active_coordinator_host_comes_back_as_the_standby(pair: Pair) -> None:
    active = pair.active()
    standby = next(vm for vm in HOSTS if vm != active)
    settled(pair.fleet)
    recorded = Recorded(pair.fleet, root=f"/reboot-{uuid.uuid4().hex[:6]}")
    recorded.start()
    pair.fleet.wait(lambda: len(recorded.acks) >= 3, 60, "the recorded workload")
    reboot = GuestReboot(pair.vms, active)
    say(f"reboot {active}: the active coordinator and a reader's agent")
    try:
        reboot()
        pair.fleet.wait(lambda: pair.role(standby) == "active", 90, f"{standby} active")
        took_over = time.monotonic() - reboot.at
        acked = len(recorded.acks)
        pair.fleet.wait(lambda: len(recorded.acks) >= acked + 10, 120,
                        "writes acknowledged while the rebooted host is down or booting")
        up = reboot.wait_up()
        pair.fleet.wait(lambda: pair.role(active) == "standby", 180,
                        f"{active}'s coordinator back by itself, standing by")
        rejoined(pair.fleet, active, 1)
    finally:
        reboot.restore()
    recorded.finish()
    say(f"{standby} took over {took_over:.1f} s after the reboot; {active} booted at "
        f"{up.booting} s, its agent served at {up.serving} s; {recorded.tally()}")
    assert pair.unit(active)["UnitFileState"] == "enabled"
    assert pair.epoch_and_writer() == (1, WRITER)


def _playbook(pair: Pair, workdir: Path, *options: str, hosts: tuple[str, ...] = HOSTS,
              changed_expected: dict[str, int] | None = None) -> dict[str, Any]:
    """``ansible-playbook deploy-coordinators.yml`` on ``hosts`` as docs/operations.md runs
    it (from ansible/, ``rbdfleet inventory`` as the dynamic inventory); each host's number
    of changed tasks, which must be ``changed_expected`` if given (else the failure names the
    tasks that changed)."""
    if hosts != HOSTS:
        options = (*options, "--limit", ",".join(hosts))
    bin_dir = Path(sys.executable).parent
    script = workdir / "fleet-inventory"
    script.write_text(
        f"#!/bin/sh\nexec {sys.executable} -m orchestrator.cli.app inventory --config "
        f"{pair.fleet.config_path} --package-dir {workdir / 'packages'} "
        + " ".join(f"--coordinator {vm}" for vm in HOSTS)
        + f' --libvirt-uri {LIBVIRT_URI} "$@"\n')
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_HOME=str(workdir / "ansible-home"), ANSIBLE_LOCAL_TEMP=str(workdir / "t"),
               ANSIBLE_NOCOLOR="1", PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}")
    say(f"$ ansible-playbook -i fleet-inventory deploy-coordinators.yml {' '.join(options)}")
    done = subprocess.run([str(bin_dir / "ansible-playbook"), "-i", str(script),
                           "deploy-coordinators.yml", *options], cwd=ANSIBLE_DIR, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    recaps = parse_output(done.stdout, hosts)
    assert done.returncode == 0 and all(r.succeeded for r in recaps.values()), \
        done.stdout[-3000:] + done.stderr[-2000:]
    changed = {vm: recap.changed for vm, recap in recaps.items()}
    if changed_expected is not None:
        assert changed == changed_expected, f"{changed}: {_changed_tasks(done.stdout)}"
    return changed


def _changed_tasks(stdout: str) -> list[str]:
    """The tasks a playbook's output reports changed (with the item, if any)."""
    task, found = "", []
    for line in stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith("changed: "):
            found.append(f"{task}: {line[len('changed: '):][:160]}")
    return found


def test_the_playbook_finds_the_coordinator_the_cli_installed_converged(pair: Pair,
                                                                        tmp_path: Path) -> None:
    """Both installers put the same bytes in the same places: on a host the CLI installed,
    the playbook's ``--check`` finds nothing to change."""
    _playbook(pair, tmp_path, "--check", hosts=(PLAYBOOK_HOST,),
              changed_expected={PLAYBOOK_HOST: 0})


@pytest.mark.timeout(900)  # two playbook runs into a TCG guest: each module run costs seconds
def test_the_playbook_installs_a_coordinator_on_a_fresh_host(pair: Pair, tmp_path: Path
                                                             ) -> None:
    """A host made fresh (``coordinator uninstall``): the run installs and starts its
    coordinator as the standby (the other stays active), a second run changes nothing."""
    fresh = PLAYBOOK_HOST
    pair.fleet.wait(lambda: pair.role(fresh) == "standby", 120, f"{fresh} the standby")
    active = next(vm for vm in HOSTS if vm != fresh)
    pair.fleet.cli("coordinator", "uninstall", fresh, timeout=180)
    assert pair.unit(fresh)["UnitFileState"] != "enabled" and pair.role(fresh) is None
    first = _playbook(pair, tmp_path, hosts=(fresh,))
    assert first[fresh] > 0, first
    unit = pair.unit(fresh)
    assert (unit["ActiveState"], unit["UnitFileState"]) == ("active", "enabled"), unit
    assert pair.role(fresh) == "standby" and pair.role(active) == "active"
    _playbook(pair, tmp_path, hosts=(fresh,), changed_expected={fresh: 0})
    assert pair.unit(fresh)["MainPID"] == unit["MainPID"]  # nothing restarted
    assert pair.epoch_and_writer() == (1, WRITER)
