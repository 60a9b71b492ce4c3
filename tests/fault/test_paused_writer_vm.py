"""The writer VM is paused (``virsh suspend``) under a stream of puts, then comes back.

On the session's three TCG guests and Ceph cluster, one fleet of its own (the ``mission``
fixture of the mission test: own name, image, users, serial; everything undone after):

1. a client streams small puts; a process in the writer's VM keeps writing to its read-write
   disk (as a stale writer would); the writer VM is paused;
2. the coordinator fences it (Ceph blocklist) and switches roles although the paused guest
   cannot release its disk: the new writer accepts writes, exactly one failover (epoch 2,
   no candidate fenced), no acknowledged put lost;
3. the VM is resumed: the stale process's next write fails with EIO, not a byte of the image
   changes (sha256 of the whole image, fsck clean), the coordinator re-attaches its disk
   ``<readonly/>`` and it stays ``out`` (no flapping in and out of sync) until its agent is
   restarted, when it rejoins as an in-sync reader.

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
    _say(f"new writer announced {failover.announced} s, first streamed put acknowledged by it "
         f"{failover.first_ack} s after the pause (the put in flight to the frozen writer "
         "waited for the client's 5 s I/O timeout)")
    # the paused guest still holds its (fenced, useless) read-write disk: the proof was the
    # blocklist, logged as such by the role switch
    assert _modes(mission) == {WRITER: "rw", failover.new_writer: "rw", failover.other: "ro"}
    assert "still holds a fenced read-write disk" in running.log.read_text()
    image_before = image_digest(mission)

    sandbox_vms.resume(WRITER)
    resumed = time.monotonic()
    mission.wait(lambda: "failed" in mission.stale_writer_log(WRITER), 60,
                 "the resumed stale writer's failed write")
    outcome = mission.stale_write_outcome(WRITER)
    _say(f"stale writer after resume: {outcome}")
    assert "errno=5 EIO" in outcome
    old_writer_steps_down(mission, running, WRITER, image_before, resumed, _say)
    _say(f"failover with a paused writer VM: announced {failover.announced} s, put "
         f"acknowledged {failover.first_ack} s; rejoin {mission.timings['rejoin']} s")
