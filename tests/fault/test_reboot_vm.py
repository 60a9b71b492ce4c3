"""Rebooted VMs come back by themselves: a reader's in sync again, the writer's as a reader.

On the session's three TCG guests, which boot systemd like the Debian VMs users run, and the
session's Ceph cluster: one fleet of its own (the ``mission`` fixture of the mission test),
deployed with ``rbdfleet deploy`` (the agent is the enabled ``rbdfleet-agent`` service) and
its coordinator. tests/jepsen.py's recorded workload runs from the host (puts of 100 B to
3 MiB, deletes, renames, mkdirs; reads from every reader). A reboot is the operator's
``systemctl reboot`` in the guest (:meth:`VmSet.reboot`): systemd stops the agent with
SIGTERM, the guest resets in place (the same QEMU: the same disks and Ceph clients; libvirt
reports no lifecycle change, so the coordinator learns of it from the agent alone) and
systemd starts the agent again at boot with the config it was deployed with.

1. A reader's guest reboots under the workload: the fleet goes on at epoch 1 with the same
   writer (no failover); the reader is taken out of the in-sync set, and after the boot it is
   an in-sync reader again with no command from anyone; more writes are acknowledged with it
   in sync; the history is clean under every checker, the final state read on every node
   (the rebooted one included); no acknowledged put lost.
2. The writer's guest reboots under a new workload: exactly one failover (epoch 2, the other
   reader stays in sync), the old writer acknowledges nothing at epoch 2, the history is
   clean, fsck too; after the boot the launcher starts its agent as a reader (its journal
   says so), it is an in-sync reader of epoch 2 holding what the others hold, and the fleet
   stays at epoch 2: it never claims the writer role again.

Budget: ~3-4 min with the VMs already booted (two TCG reboots, ~20-40 s each).
"""

from __future__ import annotations

import time

import pytest

from agents.service import UNIT_NAME
from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.vms import VmSet
from tests.integration.test_mission_vm import mission  # noqa: F401
from tests.vm_faults import (
    WRITER,
    GuestReboot,
    agent_health,
    agent_service,
    confirmed_dead,
    continue_under_stream,
    fail_over_under_stream,
    fsck,
    in_sync_reader,
    member,
    rejoined,
    say_as,
    start_under_stream,
    status_of,
)

pytestmark = [pytest.mark.fault, pytest.mark.vm]

READER = "vm3"
say = say_as("reboot")


def test_rebooted_reader_vm_comes_back_in_sync_by_itself(mission: Mission,  # noqa: F811
                                                         sandbox_vms: VmSet) -> None:
    running = start_under_stream(mission, None, "/reboot")
    recorded = running.recorded
    assert (status_of(mission)["map"]["writer"], in_sync_reader(mission, READER, 1)) == (
        WRITER, True)
    reboot = GuestReboot(sandbox_vms, READER)
    try:
        say(f"rebooting {READER} (systemctl reboot)")
        reboot()
        mission.wait(lambda: not in_sync_reader(mission, READER, 1), 60,
                     f"{READER} out of the in-sync readers")
        out = time.monotonic() - reboot.at
        up = reboot.wait_up()
    finally:
        reboot.restore()
    rejoined(mission, READER, 1)
    back = time.monotonic() - reboot.at
    say(f"{READER}: out of the in-sync set {out:.1f} s after the reboot, new boot at "
        f"{up.booting} s, agent serving at {up.serving} s (started {up.starts} time(s)), SSH "
        f"at {up.ssh} s, in sync again at {back:.1f} s")
    service = agent_service(sandbox_vms, READER)  # started by the boot, not a crash restart
    assert (service["ActiveState"], service["UnitFileState"], service["NRestarts"]) == (
        "active", "enabled", "0"), service
    acked = len(recorded.acks)
    mission.wait(lambda: len(recorded.acks) >= acked + 5, 60,
                 f"writes acknowledged with {READER} back in sync")
    recorded.finish()  # every checker; the final state read on every node, vm3 included

    status = status_of(mission)
    assert (status["map"]["writer"], status["map"]["epoch"]) == (WRITER, 1)  # no failover
    assert not [a for a in recorded.acks if a[1] != WRITER], recorded.acks
    assert (member(status, READER)["role"], member(status, READER)["in_sync"]) == (
        "reader", True)
    health = agent_health(mission, READER)
    assert (health["role"], health["epoch"]) == ("reader", 1)
    lost = mission.verify(running.before)
    assert lost == [], f"acknowledged puts lost: {lost}"
    say(f"history clean on every node, {recorded.tally()}")


def test_rebooted_writer_vm_is_replaced_and_rejoins_as_a_reader(
        mission: Mission, sandbox_vms: VmSet) -> None:  # noqa: F811
    running = continue_under_stream(mission, "/reboot-writer")
    status = status_of(mission)
    old, epoch = status["map"]["writer"], status["map"]["epoch"]
    reboot = GuestReboot(sandbox_vms, old)
    try:
        say(f"rebooting the writer {old} (systemctl reboot)")
        failover = fail_over_under_stream(mission, running, old, reboot, say, epoch=epoch + 1,
                                          back_by_itself=True)
        say(f"{failover.new_writer} announced {failover.announced} s, first write acknowledged"
            f" {failover.first_ack} s after the reboot; {confirmed_dead(running.log, old)}")
        check = fsck(mission)
        assert check.returncode == 0, check.stdout + check.stderr
        up = reboot.wait_up()
    finally:
        reboot.restore()
    rejoined(mission, old, epoch + 1)
    say(f"{old}: new boot at {up.booting} s, agent serving at {up.serving} s (started "
        f"{up.starts} time(s){'; before: ' + up.failed if up.failed else ''}), SSH at "
        f"{up.ssh} s, an in-sync reader of epoch {epoch + 1} at "
        f"{time.monotonic() - reboot.at:.1f} s")
    health = agent_health(mission, old)
    assert (health["role"], health["epoch"]) == ("reader", epoch + 1)
    journal = sandbox_vms.exec(old, ["journalctl", "-b", "-u", UNIT_NAME, "--no-pager",
                                     "-o", "cat"])
    assert "to=writer" not in journal.stdout, journal.stdout  # no writer in this boot
    if old == WRITER:  # its config names it the writer: the launcher made it a reader
        assert "started again with the config of its last start" in journal.stdout
    running.recorded.check()  # the rebooted node holds what the others hold
    assert status_of(mission)["map"]["epoch"] == epoch + 1  # it never claimed the writer role
    check = fsck(mission)
    assert check.returncode == 0, check.stdout + check.stderr
    say(f"fsck clean: {check.stdout.strip().splitlines()[-1]}")
