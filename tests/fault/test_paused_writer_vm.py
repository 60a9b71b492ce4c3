"""The writer VM is paused (``virsh suspend``) under the recorded workload, then comes back.

On the session's three TCG guests and Ceph cluster, one fleet of its own (the ``mission``
fixture of the mission test: own name, image, users, serial; everything undone after):

1. tests/jepsen.py's workload runs from this host through ``rbdfleet coordinator run``
   (puts of 100 B to 3 MiB, deletes, renames, mkdirs; reads from every reader); a process in
   the writer's VM keeps writing to its read-write disk (as a stale writer would); the writer
   VM is paused;
2. the coordinator fences it (Ceph blocklist) and switches roles although the paused guest
   cannot release its disk: the new writer accepts writes, exactly one failover (epoch 2,
   no candidate fenced); the history is clean under every checker, the final state read on
   every node handed out;
3. the VM is resumed and the stale process told the failover is over (from then on it
   writes a marker of its own, so a write that lands would change the image): its next write
   fails with EIO, a put with an epoch-1 write grant sent to the resumed writer is refused
   (it acknowledges nothing), not a byte of the image changes (sha256 of the whole image, the
   aimed block, fsck clean), the coordinator re-attaches its disk ``<readonly/>`` and it stays
   ``out`` (no flapping in and out of sync) until its agent is restarted, when it rejoins as
   an in-sync reader and holds what the others hold.

Budget: ~2 min with the VMs already booted.
"""

from __future__ import annotations

import sys
import time

import pytest

from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.vms import VmSet
from tests.integration.test_mission_vm import _modes, mission  # noqa: F401
from tests.vm_faults import (
    fail_over_under_stream,
    image_digest,
    old_writer_steps_down,
    stale_put,
    start_under_stream,
)

pytestmark = [pytest.mark.fault, pytest.mark.vm]

WRITER = "vm1"


def _say(message: str) -> None:
    print(f"[paused-writer] {message}", file=sys.stderr, flush=True)


def test_paused_writer_is_replaced_and_cannot_change_a_byte_when_it_comes_back(
        mission: Mission, sandbox_vms: VmSet) -> None:  # noqa: F811
    running = start_under_stream(mission, WRITER, "/paused")
    _say("pausing the writer VM")
    failover = fail_over_under_stream(mission, running, WRITER,
                                      lambda: sandbox_vms.pause(WRITER), _say)
    _say(f"new writer announced {failover.announced} s, first write acknowledged by it "
         f"{failover.first_ack} s after the pause")
    # the paused guest still holds its (fenced, useless) read-write disk: the proof was the
    # blocklist, logged as such by the role switch
    assert _modes(mission) == {WRITER: "rw", failover.new_writer: "rw", failover.other: "ro"}
    assert "still holds a fenced read-write disk" in running.log.read_text()
    image_before = image_digest(mission)

    sandbox_vms.resume(WRITER)
    resumed = time.monotonic()
    mission.end_failover(WRITER)  # a stale write that lands from now on changes the image
    address = f"{mission.config.vm(WRITER).address}:{mission.config.fleet.agent_port}"
    stale = stale_put(mission, sandbox_vms, failover.other, address)
    # refused, whether it met the fenced disk (not_writer) or the demotion came first
    assert stale in ((409, "not_writer"), (409, "stale_epoch")), stale
    mission.wait(lambda: "failed" in mission.stale_writer_log(WRITER), 60,
                 "the resumed stale writer's failed write")
    outcome = mission.stale_write_outcome(WRITER)
    _say(f"stale writer after resume: {outcome}; epoch-1 put to the resumed writer -> {stale}")
    assert "errno=5 EIO" in outcome
    _say(mission.landmark_intact())
    old_writer_steps_down(mission, running, WRITER, image_before, resumed, _say)
    _say(f"failover with a paused writer VM: announced {failover.announced} s, put "
         f"acknowledged {failover.first_ack} s; rejoin {mission.timings['rejoin']} s")
