"""Crashed agents come back by themselves: systemd restarts them, they rejoin as readers.

On the session's three TCG guests, which boot systemd like the Debian VMs users run, and the
session's Ceph cluster: one fleet of its own (the ``mission`` fixture of the mission test),
deployed with ``rbdfleet deploy``, which installs each agent as the ``rbdfleet-agent`` service
(agents/service.py). tests/jepsen.py's recorded workload runs from the host the whole time
(puts of 100 B to 3 MiB, deletes, renames, mkdirs; reads from every reader).

1. ``kill -9`` a reader's agent: systemd starts it again (one automatic restart, a new main
   pid) and it is an in-sync reader of epoch 1 again, with no command from anyone;
2. ``kill -9`` the writer's agent: the coordinator fails over (epoch 2, exactly one
   failover); systemd starts the old writer's agent again, with the config that named it
   writer of epoch 1, yet it comes back as a reader (the launcher's rule; its journal says
   so), is demoted/caught up to epoch 2 and handed out in sync, and the fleet stays at
   epoch 2 — it never claims the writer role again;
3. the history is clean under every checker, the final state read on every node (the
   restarted one included); fsck is clean;
4. the writer VM is powered off (``virsh destroy``) under a new workload: the hypervisor's
   lifecycle event is the evidence, a reader is promoted (one more epoch), the history is
   clean and fsck too; the VM boots again (``virsh start``), systemd starts its agent, and it
   comes back as an in-sync reader by itself, holding what the others hold.

Budget: ~4 min with the VMs already booted (the power-off test boots a TCG guest).
"""

from __future__ import annotations

import time

import pytest

from agents.service import UNIT_NAME
from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.vms import VmSet
from tests.integration.test_mission_vm import mission  # noqa: F401
from tests.vm_faults import (
    Recorded,
    agent_health,
    agent_service,
    confirmed_dead,
    continue_under_stream,
    domain_running,
    fail_over_under_stream,
    fsck,
    in_sync_reader,
    rejoined,
    say_as,
    status_of,
)

pytestmark = [pytest.mark.fault, pytest.mark.vm]

WRITER, READER = "vm1", "vm3"
say = say_as("agent-restart")


def _restarted(vms: VmSet, vm: str, before: dict[str, str]) -> bool:
    now = agent_service(vms, vm)
    return (now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
            and int(now["NRestarts"]) == int(before["NRestarts"]) + 1)


def test_killed_agents_come_back_by_themselves(mission: Mission,  # noqa: F811
                                               sandbox_vms: VmSet) -> None:
    mission.provision()
    mission.deploy()
    for vm in (v.name for v in mission.config.vms):
        service = agent_service(sandbox_vms, vm)
        assert service["ActiveState"] == "active" and service["UnitFileState"] == "enabled"
        pidfile = sandbox_vms.exec(vm, ["cat", "/run/rbdfleet/agent.pid"]).stdout.strip()
        assert pidfile == service["MainPID"], (vm, service, pidfile)
    mission.start_coordinator(mission.config_path.parent / "coordinator.log")
    before = mission.put_many(5, prefix="/restart/before")
    recorded = Recorded(mission)
    recorded.start()
    mission.wait(lambda: len(recorded.acks) >= 3, 60, "the recorded workload")

    # 1. a reader's agent crashes: the demo's step 6
    service = agent_service(sandbox_vms, READER)
    mission.crash_and_self_heal(READER)
    assert _restarted(sandbox_vms, READER, service)
    say(f"{READER}: in sync again {mission.timings['self_heal']} s after kill -9, restarted "
        "by systemd")
    assert in_sync_reader(mission, READER, 1)
    assert agent_health(mission, READER)["role"] == "reader"
    acked_before_writer_kill = len(recorded.acks)

    # 2. the writer's agent crashes
    service = agent_service(sandbox_vms, WRITER)
    mission.kill_agent(WRITER)
    killed = time.monotonic()
    mission.wait(lambda: mission.fleet_map().get("writer") not in (None, WRITER)
                 and mission.fleet_map().get("phase") == "stable", 120, "a new writer")
    announced = round(time.monotonic() - killed, 1)
    mission.wait(lambda: _restarted(sandbox_vms, WRITER, service), 60,
                 f"systemd restarting {WRITER}'s agent")
    rejoined(mission, WRITER, 2)
    say(f"{WRITER}: new writer announced {announced} s after kill -9; the old writer's agent "
        f"back in sync as a reader {time.monotonic() - killed:.1f} s after it")
    health = agent_health(mission, WRITER)
    assert (health["role"], health["epoch"]) == ("reader", 2)
    journal = sandbox_vms.exec(WRITER, ["journalctl", "-u", UNIT_NAME, "--no-pager", "-o", "cat"])
    assert "started again with the config of its last start" in journal.stdout, journal.stdout
    mission.wait(lambda: len(recorded.acks) > acked_before_writer_kill + 5, 60,
                 "writes acknowledged by the new writer")
    recorded.finish()  # every checker; the final state read on every node, vm1 included

    status = status_of(mission)
    assert status["map"]["epoch"] == 2 and status["map"]["writer"] != WRITER  # one failover
    assert not [a for a in recorded.acks if a[1] == WRITER and a[2] >= 2], recorded.acks
    lost = mission.verify(before)
    assert lost == [], f"acknowledged puts lost: {lost}"
    check = fsck(mission)
    assert check.returncode == 0, check.stdout + check.stderr
    say(f"history clean on every node, {recorded.tally()}; fsck clean")


def test_powered_off_writer_vm_is_replaced_and_its_agent_comes_back_by_itself(
        mission: Mission, sandbox_vms: VmSet) -> None:  # noqa: F811
    running = continue_under_stream(mission, "/poweroff")
    status = status_of(mission)
    old, epoch = status["map"]["writer"], status["map"]["epoch"]
    try:
        say(f"powering {old} off (virsh destroy)")
        failover = fail_over_under_stream(mission, running, old,
                                          lambda: sandbox_vms.crash(old), say, epoch=epoch + 1)
        evidence = confirmed_dead(running.log, old)
        say(f"{failover.new_writer} announced {failover.announced} s, first write acknowledged"
            f" {failover.first_ack} s after the power-off; {evidence}")
        # libvirt's word reached the coordinator; whether it or the failed probes confirmed
        # the death first depends on the host's load (the event comes once QEMU is reaped)
        assert f"event=hypervisor_reported fleet={mission.config.fleet.name} node={old} " \
            "state=stopped detail=destroyed" in running.log.read_text()
        check = fsck(mission)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:  # the session's guest must run again for the tests after this one
        if not domain_running(sandbox_vms, old):
            booted = time.monotonic()
            sandbox_vms.start(old)
            say(f"{old} booted again in {time.monotonic() - booted:.1f} s")
    rejoined(mission, old, epoch + 1)
    health = agent_health(mission, old)
    assert (health["role"], health["epoch"]) == ("reader", epoch + 1)
    running.recorded.check()  # the rebooted node holds what the others hold
    assert status_of(mission)["map"]["epoch"] == epoch + 1
