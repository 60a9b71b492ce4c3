"""Repeated writer faults, each one a single clean failover (loop devices in namespace hosts,
the coordinator's own fence and role switch; ~2 min).

Seen on the demo fleet: one 8 s pause of the writer VM made the coordinator confirm two
healthy writers dead with 0 failed probes (its loop had been blocked in a demotion), fence
them, and run four epochs; demotions of the returning ex-writer were retried 7-14 times in
0.6 s and nodes flapped reader -> out -> reader. Here the writer (whichever node it is) is
paused (SIGSTOP) and later resumed, or cut off from the coordinator and later healed, five
times each, alternating, under two workloads at once: the project's recorded one
(:class:`tests.jepsen.Workload`, every checker over its history and the final state of every
node) and :class:`tests.read_after_ack.ReadAfterAck` (every put read back at once from every
node handed out). Each fault must give exactly one new epoch, only the faulted writer may be
confirmed dead, the returning ex-writer rejoins as an in-sync reader without anyone's
command (stepping down by itself, or demoted once), and no read anywhere is older than
a put acknowledged before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.core.election import ElectionConfig
from orchestrator.core.liveness import LivenessConfig
from orchestrator.sandbox.hosts import HostSet
from orchestrator.testing.history import History
from tests.coordinator_harness import fleet_client, wait_until
from tests.fault.test_coordinator_faults import (  # noqa: F401 (a fixture)
    LoopFleet,
    LoopFleetFactory,
    _cut,
    loop_fleet_factory,
)
from tests.jepsen import SEED, Workload, assert_history_clean
from tests.read_after_ack import ReadAfterAck

pytestmark = pytest.mark.fault

HOST_OF = {"w": "h1", "r1": "h2", "r2": "h3"}
CYCLES = 5


def _rejoined(loop: LoopFleet, node: str, epoch: int) -> bool:
    m = loop.service.require_active()
    return loop.role(node) == ("reader", epoch) and node in [r.name for r in m.in_sync_readers()]


def _one_fault(loop: LoopFleet, hosts: HostSet, kind: str) -> tuple[str, int]:
    """Fault the current writer, wait for the next epoch's writer, heal, wait for the old
    writer's rejoin; (faulted node, new epoch)."""
    before = loop.service.require_active()
    victim = before.writer
    assert victim is not None
    fault: Callable[[], None]
    heal: Callable[[], None]
    if kind == "pause":
        fault, heal = loop.fleet[victim].pause, loop.fleet[victim].resume
    else:
        fault = lambda: _cut(hosts, HOST_OF[victim])  # noqa: E731
        heal = lambda: _cut(hosts, HOST_OF[victim], heal=True)  # noqa: E731
    fault()
    try:
        wait_until(lambda: loop.service.require_active().epoch > before.epoch
                   and loop.service.require_active().phase == "stable", 20,
                   f"failover away from {victim} ({kind})")
        wait_until(lambda: len(loop.service.require_active().in_sync_readers()) >= 1, 10,
                   "the new writer's in-sync reader")
    finally:
        heal()
    after = loop.service.require_active()
    wait_until(lambda: _rejoined(loop, victim, after.epoch), 30,
               f"{victim} back as an in-sync reader of epoch {after.epoch} ({kind})")
    return victim, after.epoch


def test_each_pause_or_cut_of_the_writer_is_one_failover_and_nothing_else(
    loop_fleet_factory: LoopFleetFactory, hosts3: HostSet,  # noqa: F811
) -> None:
    seed = SEED + 7
    # Every death here is one the test injected on purpose, five per node in about a minute:
    # the hold that keeps a node failing again and again out (tested in test_election) would
    # only slow the rejoins this test is about.
    # Probes get 0.6 s (not 0.3): ten failovers and rejoins back to back on a loaded 2-core
    # machine answer slowly at times, and this test is about the coordinator's own blocking
    # never counting as a death, not about where slow turns into dead.
    loop = loop_fleet_factory(hosts3, election=ElectionConfig(flap_limit=1000),
                              liveness=LivenessConfig(probe_timeout=0.6, suspect_after=0.8,
                                                      dead_after=2.0))
    faulted: list[str] = []
    marks: list[int] = []  # where each fault's part of the coordinator's timeline starts
    recorded = Workload(loop.client(), History(), seed)
    recorded.start(writers=1, readers=2)
    try:
        with ReadAfterAck(loop.fleet, loop.coordinator) as work:
            for i in range(2 * CYCLES):
                epoch = loop.service.require_active().epoch
                marks.append(len(loop.service.timeline))
                victim, new_epoch = _one_fault(loop, hosts3, "pause" if i % 2 == 0 else "cut")
                faulted.append(victim)
                assert new_epoch == epoch + 1, (
                    f"seed {seed}: fault {i} on {victim}: epoch {epoch} -> {new_epoch}")
            # enough checked reads to mean something, however fast the cycles went (faster
            # failovers leave fewer acknowledged puts in the same ten faults)
            wait_until(lambda: work.acks > 100
                       and all(work.checked.get(n, 0) > 20 for n in HOST_OF), 60,
                       f"100 acknowledged puts and 20 checked reads per node (seed {seed})")
    finally:
        recorded.finish()
    assert_history_clean(recorded.history, loop.client(), seed)
    timeline = list(loop.service.timeline)
    kept = loop.service.timeline.maxlen
    assert kept is not None and len(timeline) < kept  # nothing dropped: the marks still hold
    deaths = [node for _, what, node in timeline if what == "NodeFailed"]
    # The returning ex-writer steps down by itself when it hears of the newer epoch first (a
    # push's answer, a grant) and by the coordinator's demotion otherwise: at most one
    # demotion per fault, of its victim (the cascade retried them 7-14 times).
    demotions = [[node for _, what, node in timeline[start:end] if what == "DemoteNode"]
                 for start, end in itertools.pairwise([*marks, len(timeline)])]
    assert not work.errors, work.errors
    assert not work.stale, f"{len(work.stale)} stale reads, first: {work.stale[:5]}"
    assert deaths == faulted, f"confirmed dead {deaths}, faulted {faulted}"
    assert all(d in ([], [v]) for d, v in zip(demotions, faulted, strict=True)), (
        f"demotions per fault {demotions} for faults {faulted}")
    assert loop.service.require_active().epoch == 1 + 2 * CYCLES
    assert work.acks > 100 and all(work.checked.get(n, 0) > 20 for n in HOST_OF), (
        work.acks, work.checked)
    loop.fsck()


def test_a_put_sent_to_a_paused_writer_is_resent_at_the_next_one_while_it_sleeps(
    loop_fleet_factory: LoopFleetFactory,  # noqa: F811
) -> None:
    """A put in flight to a writer that was just paused used to wait out the client's 30 s
    I/O timeout (or the writer's resumption). The client abandons it once the map names
    another writer and resends it there: it is acknowledged at epoch 2 while the old writer
    still sleeps."""
    loop = loop_fleet_factory()
    client = fleet_client([loop.coordinator.url], loop.fleet.name)
    client.io_timeout = 30.0
    client.put_bytes(b"before", "/p")
    old = loop.fleet["w"]
    old.pause()
    try:
        result = client.put_bytes(b"after", "/p")  # reaches the paused writer first
        assert _stopped(old.proc.pid if old.proc else -1), "the old writer was resumed"
    finally:
        old.resume()
    assert result.epoch == 2 and result.node in ("r1", "r2"), result
    assert client.get_bytes("/p") == b"after"


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP): state T in /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"
