"""Election: law order, confirm-before-act, fencing before promotion, one writer per epoch."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from orchestrator.coordinator.executor import Executor
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.core import election as el
from orchestrator.core.fleetmap import initial_map
from orchestrator.errors import (
    DetachPending,
    DeviceAttachError,
    FencingFailed,
    IllegalFleetTransition,
)
from orchestrator.ports import CoordinatorPorts
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore
from orchestrator.testing.simnet import SimFleet

pytestmark = pytest.mark.unit


def state3() -> el.ElectionState:
    m = initial_map(
        "f",
        "w",
        {
            "w": ("w:1", "writer"),
            "r1": ("r1:1", "reader"),
            "r2": ("r2:1", "reader"),
            "s": ("s:1", "spare"),
        },
    )
    m = m.set_progress("r1", 10, True).set_progress("r2", 12, True)
    return el.ElectionState(map=m, persisted_epoch=1, published_revision=m.revision)


def kinds(actions: list[el.Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_writer_failure_plans_persist_fence_promote_publish_in_that_order() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    assert kinds(actions) == ["PersistEpoch", "FenceNode", "GrantWritePath", "PromoteNode",
                              "PublishMap"]
    persist, fence, path, promote, publish = actions
    assert isinstance(persist, el.PersistEpoch) and persist.map.epoch == 2
    assert persist.map.phase == "failover"
    assert fence == el.FenceNode("w", 2)
    assert path == el.GrantWritePath("r2", 2)
    assert promote == el.PromoteNode("r2", 2, "r2:1")  # highest applied seq
    assert isinstance(publish, el.PublishMap)
    assert [t.name for t in publish.map.write_targets()] == ["r2", "r1"]
    assert all(not el.is_background(a) for a in actions)
    st1, more = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))
    assert st1.map == publish.map and st1.map.phase == "stable"
    # only now, off the critical path: the fenced old writer's read-write disk goes
    assert more == [el.ReleaseWritePath("w", 2)] and el.is_background(more[0])


def test_failed_fence_blocks_promotion_and_is_retried_after_the_delay() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st1, more = el.step(st0, el.BatchExecuted(tuple(actions[:1]), actions[1], "EIO", 1.1))
    assert more == []  # held back
    assert st1.last_error == "EIO"
    st2, more = el.step(st1, el.Tick(1.2))
    assert more == []
    _st3, more = el.step(st2, el.Tick(1.1 + st2.config.retry_delay))
    assert kinds(more) == ["FenceNode", "GrantWritePath", "PromoteNode", "PublishMap"]


def test_failed_promotion_fences_the_candidate_and_moves_on_at_a_new_epoch() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st1, _ = el.step(st0, el.BatchExecuted(tuple(actions[:3]), actions[3], "refused", 1.1))
    st2, more = el.step(st1, el.Tick(2.0))
    assert kinds(more) == ["PersistEpoch", "FenceNode", "GrantWritePath", "PromoteNode",
                           "PublishMap"]
    assert more[1] == el.FenceNode("r2", 3)
    assert more[3] == el.PromoteNode("r1", 3, "r1:1")
    # the candidate got a read-write disk before it failed: released once r1 is published
    assert st2.to_release >= {"w", "r2"}


def test_a_failed_role_switch_keeps_the_candidate_and_fences_nobody_more() -> None:
    # The hypervisor could not switch the disks (a paused old writer's disk): the candidate
    # never got the grant, so it is not fenced; the same promotion is retried after the delay.
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st1, more = el.step(st0, el.BatchExecuted(tuple(actions[:2]), actions[2], "detach timed out",
                                              1.1, infrastructure=True))
    assert actions[2] == el.GrantWritePath("r2", 2)
    assert more == [] and st1.map.epoch == 2 and st1.map.writer == "r2"
    assert st1.to_fence == frozenset() and st1.last_error == "detach timed out"
    for attempt in range(5):  # however often it fails, readers are never fenced one by one
        at = 1.1 + (attempt + 1) * st1.config.retry_delay
        st1, more = el.step(st1, el.Tick(at))
        assert more == [el.GrantWritePath("r2", 2), el.PromoteNode("r2", 2, "r2:1"),
                        el.PublishMap(el.target_map(st1))]
        st1, _ = el.step(st1, el.BatchExecuted((), more[0], "still paused", at, True))
    assert st1.map.epoch == 2 and {m.name for m in st1.map.members if m.role == "out"} == {"w"}
    st2, more = el.step(st1, el.Tick(100.0))
    st3, _ = el.step(st2, el.BatchExecuted(tuple(more), None, "", 100.1))
    assert st3.map.phase == "stable" and st3.map.writer == "r2" and st3.map.epoch == 2


def failed_over() -> el.ElectionState:
    """w failed and was fenced, r2 is the writer of epoch 2, w's disk re-attached read-only."""
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st1, release = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))
    assert st1.map.member("w").role == "out" and st1.map.epoch == 2
    st2, more = el.step(st1, el.BatchExecuted(tuple(release), None, "", 1.2))
    assert more == [] and st2.to_release == frozenset()
    return st2


def test_a_fenced_writer_that_stepped_down_by_itself_is_demoted_not_readmitted() -> None:
    # Resumed after a pause, its write met EIO and it became a reader of its old epoch.
    st1, acts = el.step(failed_over(), el.HeartbeatObserved("w", "reader", 1, 9, 2.0))
    assert acts == [el.DemoteNode("w", 2, "w:1")]
    assert st1.map.member("w").role == "out"


def test_an_out_node_with_a_failed_self_test_stays_out_no_flapping() -> None:
    st = failed_over()
    revision = st.map.revision
    for i in range(6):  # heartbeats keep coming with the self-test still failed
        st, acts = el.step(st, el.HeartbeatObserved("w", "reader", 2, 12, 2.0 + i, "failed"))
        assert acts == [] and st.map.member("w").role == "out"
    assert st.map.revision == revision  # nothing to announce: it never came in
    st, _ = el.step(st, el.HeartbeatObserved("w", "reader", 2, 12, 9.0, "ok"))  # restarted
    assert st.map.member("w").role == "reader"


def test_an_out_node_rejoins_when_it_reports_a_reader_of_this_epoch() -> None:
    st, _ = el.step(failed_over(), el.HeartbeatObserved("w", "reader", 2, 5, 2.0, "pending"))
    assert st.map.member("w").role == "reader" and not st.map.member("w").in_sync
    st, _ = el.step(st, el.HeartbeatObserved("w", "reader", 2, 12, 3.0))
    assert not st.map.member("w").in_sync  # its own word that it caught up is not enough
    st, acts = el.step(st, el.WriterSyncObserved("r2", 2, 1, frozenset({"w", "r1"}), 3.1))
    assert st.map.member("w").in_sync and kinds(acts) == ["PublishMap"]


def test_reader_failure_routes_around_at_once_and_attaches_a_spare() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("r1", 1.0))
    assert kinds(actions) == ["PublishMap", "AttachSpare"]
    publish = actions[0]
    assert isinstance(publish, el.PublishMap) and publish.map.epoch == 1
    assert [t.name for t in publish.map.write_targets()] == ["w", "r2"]
    assert actions[1] == el.AttachSpare("s", 1, "s:1")
    st1, _ = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))
    # The spare is handed out only once the writer says it waits for its acks.
    st2, _ = el.step(st1, el.HeartbeatObserved("w", "writer", 1, 20, 1.2))
    st3, acts = el.step(st2, el.HeartbeatObserved("s", "reader", 1, 20, 1.3))
    assert acts == [] and "s" not in [m.name for m in st3.map.in_sync_readers()]
    st4, acts = el.step(st3, el.WriterSyncObserved("w", 1, 3, frozenset({"r2", "s"}), 1.4))
    assert kinds(acts) == ["PublishMap"]
    assert "s" in [m.name for m in st4.map.in_sync_readers()]


def test_lagging_reader_is_dropped_until_caught_up() -> None:
    st0, acts = el.step(state3(), el.ReaderLagging("r1", 1.0))
    assert kinds(acts) == ["PublishMap"]
    assert "r1" not in [m.name for m in st0.map.write_targets()]


def test_stale_writer_heartbeat_gets_a_demotion() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st1, _ = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))
    _st2, acts = el.step(st1, el.HeartbeatObserved("w", "writer", 1, 9, 2.0))
    assert acts == [el.DemoteNode("w", 2, "w:1")]


def test_manual_failover_to_a_catching_up_reader_is_refused_naming_the_pair() -> None:
    s = state3()
    s = el.step(s, el.ReaderLagging("r1", 0.5))[0]
    with pytest.raises(IllegalFleetTransition, match="catching-up reader -> writer"):
        el.step(s, el.FailoverRequested("r1", 1.0))
    with pytest.raises(IllegalFleetTransition, match="spare -> writer"):
        el.step(state3(), el.FailoverRequested("s", 1.0))


def test_manual_failover_fences_the_live_writer_first() -> None:
    _, acts = el.step(state3(), el.FailoverRequested("r1", 1.0))
    assert kinds(acts) == ["PersistEpoch", "FenceNode", "GrantWritePath", "PromoteNode",
                           "PublishMap"]
    assert acts[1] == el.FenceNode("w", 2) and acts[3] == el.PromoteNode("r1", 2, "r1:1")


def test_fencing_a_reader_takes_it_out_then_fences() -> None:
    _, acts = el.step(state3(), el.FenceRequested("r1", 1.0))
    assert kinds(acts) == ["FenceNode", "PublishMap", "AttachSpare"]


def test_a_new_coordinator_resumes_a_half_done_failover_from_the_fence() -> None:
    _st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    persisted = actions[0]
    assert isinstance(persisted, el.PersistEpoch)
    fresh = el.resume(persisted.map)
    assert kinds(el.plan(fresh)) == ["FenceNode", "GrantWritePath", "PromoteNode", "PublishMap"]
    assert fresh.to_release == {"w"}  # after the map, whatever the predecessor did


def test_no_eligible_writer_leaves_the_fleet_writerless_until_a_reader_is_in_sync() -> None:
    m = initial_map("f", "w", {"w": ("w:1", "writer"), "r": ("r:1", "reader")})
    s = el.ElectionState(map=m, persisted_epoch=1, published_revision=m.revision)
    s, acts = el.step(s, el.NodeFailed("w", 1.0))
    assert kinds(acts) == ["PersistEpoch", "FenceNode", "PublishMap"]
    assert s.map.writer is None and s.last_error == "no eligible writer"
    s, acts = el.step(s, el.BatchExecuted(tuple(acts), None, "", 1.1))
    assert acts == [el.ReleaseWritePath("w", 2)]
    # The reader catches up from the journal: it is elected at once, at a new epoch.
    s, acts = el.step(s, el.HeartbeatObserved("r", "reader", 1, 0, 2.0))
    assert kinds(acts) == ["PersistEpoch", "GrantWritePath", "PromoteNode", "PublishMap"]
    assert acts[2] == el.PromoteNode("r", 3, "r:1")


# -- scenario through the simulated network -------------------------------------------------


def test_one_lost_probe_causes_no_failover() -> None:
    sim = SimFleet.build(["w", "r1", "r2"])
    sim.drop_probes("w", 1)
    sim.run(3.0)
    assert sim.published[-1].epoch == 1 and len(sim.published) == 1


def test_killed_writer_is_replaced_and_a_resumed_one_cannot_write() -> None:
    sim = SimFleet.build(["w", "r1", "r2"])
    sim.run(0.5)
    assert sim.client_write()
    sim.pause("w")
    sim.run(2.5)
    assert sim.published[-1].writer in ("r1", "r2") and sim.published[-1].epoch == 2
    sim.resume("w")
    assert not sim.stale_write("w"), "\n".join(sim.trace)
    sim.run(0.5)
    assert sim.nodes["w"].role == "reader"  # demoted
    assert sim.client_write()


# -- properties over random nemesis schedules ------------------------------------------------

NEMESIS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "kill",
                "pause",
                "pause_writer",
                "resume",
                "drop",
                "fence_fail",
                "promote_fail",
                "write",
                "stale",
                "run",
            ]
        ),
        st.integers(0, 4),
    ),
    max_size=25,
)


@seed(20261126)
@settings(max_examples=200, deadline=None)
@given(NEMESIS)
def test_laws_hold_under_random_faults(schedule: list[tuple[str, int]]) -> None:
    sim = SimFleet.build(["n0", "n1", "n2", "n3"], spares=1)
    names = sorted(sim.nodes)
    for op, arg in schedule:
        name = names[arg % len(names)]
        if op == "kill":
            sim.kill(name)
        elif op == "pause":
            sim.pause(name)
        elif op == "pause_writer" and sim.published[-1].writer:
            sim.pause(sim.published[-1].writer)
        elif op == "resume":
            sim.resume(name)
            sim.stale_write(name)  # in-flight work of a resumed ex-writer runs at once
            sim.client_write()
        elif op == "drop":
            sim.drop_probes(name, 1)
        elif op == "fence_fail":
            sim.set_fail_fences(arg)
        elif op == "promote_fail":
            sim.set_fail_promotions(1)
        elif op == "write":
            sim.client_write()
        elif op == "stale":
            for n in names:  # every resumed ex-writer tries to write on its old belief
                sim.stale_write(n)
        sim.run(0.3 * (arg + 1))
    transcript = "\n".join(sim.trace)
    # One writer per epoch, in acknowledgements and in published maps.
    per_epoch: dict[int, set[str]] = {}
    for epoch, node, _ in sim.acks:
        per_epoch.setdefault(epoch, set()).add(node)
    for m in sim.published:
        if m.writer is not None:
            per_epoch.setdefault(m.epoch, set()).add(m.writer)
    assert all(len(v) == 1 for v in per_epoch.values()), transcript
    # Epochs of published maps never go back.
    epochs = [m.epoch for m in sim.published]
    assert epochs == sorted(epochs), transcript
    # No write is acknowledged at an older epoch once a newer writer was published.
    for i, (epoch, _, t) in enumerate(sim.acks):
        later_newer = [e for e, _, t2 in sim.acks[:i] if e > epoch and t2 <= t]
        assert not later_newer, f"write at epoch {epoch} after one at {later_newer}\n{transcript}"
    # Every batch respects law order; PromoteNode never precedes fencing the old writer; a
    # release never rides along with a step of the critical path (the map is out first).
    for batch in sim.batches:
        el.assert_law_order(batch)
        if any(isinstance(a, el.ReleaseWritePath) for a in batch):
            assert not any(isinstance(a, el.CRITICAL_PATH) for a in batch), batch


# -- the executor: order, first failure, lease -----------------------------------------------


class RecordingPorts:
    """Fencer + AgentControl + RoleSwitch recording calls; ``fail_fence`` makes fences fail,
    ``fail_switch`` the hypervisor's role switch."""

    def __init__(self, fail_fence: bool = False, fail_switch: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_fence = fail_fence
        self.fail_switch = fail_switch

    def make_writer(self, node: str) -> None:
        self.calls.append(f"rw {node}")
        if self.fail_switch:
            raise DeviceAttachError(f"detach from {node}: timed out")

    def make_reader(self, node: str) -> None:
        self.calls.append(f"ro {node}")
        if self.fail_switch:
            raise DetachPending(f"detach from {node}: paused", node)

    def fence(self, vm: str) -> list[str]:
        self.calls.append(f"fence {vm}")
        if self.fail_fence:
            raise FencingFailed(f"cannot fence {vm}")
        return []

    def health(self, address: str, timeout: float) -> Any:
        raise AssertionError("not probed here")

    def promote(self, address: str, request: Any, grant: str) -> None:
        self.calls.append(f"promote {request.node}@{request.epoch}")

    def demote(self, address: str, request: Any, grant: str) -> None:
        self.calls.append(f"demote {request.node}")


def executor_for(ports: RecordingPorts, lease: float = 2.0,
                 role_switch: bool = False) -> tuple[Executor, FakeClock]:
    clock = FakeClock()
    s = state3()
    store = MemoryStateStore(MemoryLeaseBoard(clock), "f", "c1", lease)
    assert store.acquire()
    store.save(s.map, None)
    announced: list[Any] = []
    ex = Executor(
        CoordinatorPorts(store=store, fencer=ports, agents=ports, clock=clock,
                         wall=lambda: 0.0, role_switch=ports if role_switch else None),
        keys=FleetKeys("f", (b"k",), lambda: 0.0),
        announce=announced.append,
        persisted=s.map,
    )
    return ex, clock


def test_executor_runs_in_law_order_and_stops_at_the_first_failure() -> None:
    _, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    ports = RecordingPorts(fail_fence=True)
    ex, _ = executor_for(ports)
    result = ex.run(actions)
    assert kinds(list(result.done)) == ["PersistEpoch"] and isinstance(result.failed, el.FenceNode)
    assert ports.calls == ["fence w"]  # never promoted
    ok = RecordingPorts()
    ex, _ = executor_for(ok)
    assert ex.run(actions).failed is None
    assert ok.calls == ["fence w", "promote r2@2"]
    assert ex.ports.store.load() == actions[-1].map  # type: ignore[union-attr]


def test_executor_with_a_lost_lease_touches_no_node() -> None:
    _, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    ports = RecordingPorts()
    ex, clock = executor_for(ports, lease=2.0)
    clock.forward(2.5)  # paused past the lease
    result = ex.run(actions)
    assert result.lease_lost and result.done == () and ports.calls == []


def test_executor_tells_a_failed_role_switch_from_a_failed_promotion() -> None:
    _, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    ports = RecordingPorts(fail_switch=True)
    ex, _ = executor_for(ports, role_switch=True)
    result = ex.run(actions)
    assert isinstance(result.failed, el.GrantWritePath) and result.infrastructure
    assert ports.calls == ["fence w", "rw r2"]  # the agent was never asked to promote
    ok = RecordingPorts()
    ex, _ = executor_for(ok, role_switch=True)
    result = ex.run(actions)
    assert result.failed is None and not result.infrastructure
    assert ok.calls == ["fence w", "rw r2", "promote r2@2"]


class PreparingPorts(RecordingPorts):
    """RecordingPorts whose role switch also prepares a write path: slowly (the guest's
    unplug), on the executor's thread of its own; ``fail_prepare`` makes it fail."""

    def __init__(self, fail_fence: bool = False, fail_prepare: bool = False) -> None:
        super().__init__(fail_fence=fail_fence)
        self.fail_prepare = fail_prepare
        self.prepared = threading.Event()

    def prepare_writer(self, node: str) -> None:
        time.sleep(0.2)
        self.calls.append(f"prepared {node}")
        self.prepared.set()
        if self.fail_prepare:
            raise DetachPending(f"detach from {node}: timed out", node)

    def fence(self, vm: str) -> list[str]:
        assert not self.prepared.is_set()  # the unplug runs beside the fence
        return super().fence(vm)


def test_executor_prepares_the_write_path_beside_the_fence_and_grants_it_after() -> None:
    _, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    ports = PreparingPorts()
    ex, _ = executor_for(ports, role_switch=True)
    assert ex.run(actions).failed is None
    assert ports.calls == ["fence w", "prepared r2", "rw r2", "promote r2@2"]
    failing = PreparingPorts(fail_prepare=True)  # only logged: the grant switches it all
    ex, _ = executor_for(failing, role_switch=True)
    assert ex.run(actions).failed is None
    assert failing.calls == ["fence w", "prepared r2", "rw r2", "promote r2@2"]


def test_a_batch_stopped_at_its_fence_waits_for_its_preparation() -> None:
    _, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    ports = PreparingPorts(fail_fence=True)
    ex, _ = executor_for(ports, role_switch=True)
    result = ex.run(actions)
    assert isinstance(result.failed, el.FenceNode)
    assert ports.calls == ["fence w", "prepared r2"]  # no hot-plug left running, no grant
    plain = PreparingPorts()
    ex, _ = executor_for(plain, role_switch=True)
    assert ex.run([a for a in actions if not isinstance(a, el.FenceNode)]).failed is None
    assert plain.calls == ["rw r2", "promote r2@2"]  # nothing to fence: nothing beside it


def test_executor_demotes_through_the_hypervisor_then_the_agent() -> None:
    demote = el.DemoteNode("w", 2, "w:1")
    ports = RecordingPorts()
    ex, _ = executor_for(ports, role_switch=True)
    assert ex.run([demote]).failed is None
    assert ports.calls == ["ro w", "demote w"]  # the agent reopens a read-only disk
    paused = RecordingPorts(fail_switch=True)
    ex, _ = executor_for(paused, role_switch=True)
    result = ex.run([demote])
    assert result.failed == demote and paused.calls == ["ro w", "demote w"]  # still told


def test_a_writer_word_older_than_a_lagging_report_admits_nobody() -> None:
    """The writer's heartbeat naming r1 in sync was sent before it dropped r1 and reported it
    lagging, but arrives after the report: r1 must stay out of the map's in-sync set."""
    st, acts = el.step(state3(), el.ReaderLagging("r1", 1.0, epoch=1, sync_revision=5))
    assert kinds(acts) == ["PublishMap"] and not st.map.member("r1").in_sync
    st = el.step(st, el.BatchExecuted(tuple(acts), None, "", 1.05))[0]
    st, acts = el.step(st, el.WriterSyncObserved("w", 1, 4, frozenset({"r1", "r2"}), 1.1))
    assert acts == [] and not st.map.member("r1").in_sync
    st, acts = el.step(st, el.WriterSyncObserved("w", 1, 6, frozenset({"r1", "r2"}), 1.2))
    assert kinds(acts) == ["PublishMap"] and st.map.member("r1").in_sync


def test_a_reader_taken_out_is_readmitted_only_on_a_newer_writer_word() -> None:
    """r1 is confirmed dead and restarts at once; the writer, which has not heard yet, keeps
    repeating its word of revision 4 naming r1 in sync. That word predates the removal: it
    must not hand the restarted r1 out (the writer retires r1's link when the reader set
    reaches it, and acknowledges writes without it). Its next word does."""
    st = el.step(state3(), el.WriterSyncObserved("w", 1, 4, frozenset({"r1", "r2"}), 1.0))[0]
    st = el.step(st, el.NodeFailed("r1", 1.5))[0]
    assert st.map.member("r1").role == "out"
    st = el.step(st, el.HeartbeatObserved("r1", "reader", 1, 10, 2.0))[0]  # restarted
    assert st.map.member("r1").role == "reader" and not st.map.member("r1").in_sync
    st = el.step(st, el.WriterSyncObserved("w", 1, 4, frozenset({"r1", "r2"}), 2.1))[0]
    assert not st.map.member("r1").in_sync
    st = el.step(st, el.WriterSyncObserved("w", 1, 5, frozenset({"r2"}), 2.2))[0]  # retired
    st = el.step(st, el.WriterSyncObserved("w", 1, 6, frozenset({"r1", "r2"}), 3.0))[0]
    assert st.map.member("r1").in_sync  # earned again: admitted


def test_after_a_takeover_an_out_reader_is_readmitted_only_on_a_word_newer_than_the_first(
        ) -> None:
    """The predecessor took r1 out; its successor loads that map but not the floor. The
    writer, not told yet, repeats its word naming r1: the first word the successor sees may
    be that stale one, so it admits nobody who was out; a newer one does."""
    st = el.step(state3(), el.NodeFailed("r1", 1.5))[0]
    taken_over = el.resume(st.map)
    assert taken_over.map.member("r1").role == "out"
    st = el.step(taken_over, el.HeartbeatObserved("r1", "reader", 1, 10, 2.0))[0]
    assert st.map.member("r1").role == "reader" and not st.map.member("r1").in_sync
    st = el.step(st, el.WriterSyncObserved("w", 1, 4, frozenset({"r1", "r2"}), 2.1))[0]
    assert not st.map.member("r1").in_sync and st.map.member("r2").in_sync
    st = el.step(st, el.WriterSyncObserved("w", 1, 4, frozenset({"r1", "r2"}), 2.2))[0]
    assert not st.map.member("r1").in_sync  # the same word again
    st = el.step(st, el.WriterSyncObserved("w", 1, 5, frozenset({"r1", "r2"}), 3.0))[0]
    assert st.map.member("r1").in_sync


def test_only_the_current_writer_vouches_for_readers() -> None:
    st = el.step(state3(), el.ReaderLagging("r1", 1.0, epoch=1, sync_revision=1))[0]
    for word in (el.WriterSyncObserved("r2", 1, 9, frozenset({"r1"}), 1.1),  # not the writer
                 el.WriterSyncObserved("w", 0, 9, frozenset({"r1"}), 1.1)):  # older epoch
        assert not el.step(st, word)[0].map.member("r1").in_sync


def test_the_writer_dropping_a_reader_takes_it_out_of_the_map_at_once() -> None:
    st, acts = el.step(state3(), el.WriterSyncObserved("w", 1, 2, frozenset({"r2"}), 1.0))
    assert kinds(acts) == ["PublishMap"]
    assert [m.name for m in st.map.in_sync_readers()] == ["r2"]


def test_a_failed_demotion_backs_off_instead_of_flapping() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))[0]
    demotions = []
    t = 2.0
    while t < 10.0:  # the stale writer answers every probe (0.2 s) for 8 s
        st, acts = el.step(st, el.HeartbeatObserved("w", "writer", 1, 9, t))
        for act in acts:
            if isinstance(act, el.DemoteNode):
                demotions.append(t)
                st = el.step(st, el.BatchExecuted((), act, "vm is the writer", t + 0.01))[0]
        t = round(t + 0.2, 2)
    # held 0.5, 1, 2 s after each failure: four tries in 8 s, not forty
    assert len(demotions) == 4, demotions
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(demotions)]
    assert gaps == sorted(gaps) and gaps[0] >= 0.5


def test_a_stale_answer_from_before_a_demotion_asks_for_no_second_one() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))[0]
    st, acts = el.step(st, el.HeartbeatObserved("w", "writer", 1, 9, 2.0))
    assert acts == [el.DemoteNode("w", 2, "w:1")]
    st = el.step(st, el.BatchExecuted(tuple(acts), None, "", 2.1))[0]
    # a probe answered before the demotion, observed after it: nothing more to do
    st, acts = el.step(st, el.HeartbeatObserved("w", "writer", 1, 9, 2.2))
    assert acts == []
    st, acts = el.step(st, el.HeartbeatObserved("w", "reader", 2, 9, 2.3))
    assert st.map.member("w").role == "reader" and acts == [el.PublishMap(st.map)]


def test_a_reader_that_keeps_dying_is_kept_out_for_a_growing_hold() -> None:
    """Confirmed dead three times in two minutes: its next return is held 10 s, the one after
    a further death 20 s; a reader that died once rejoins at its first heartbeat."""
    st = state3()
    rejoined_at = []
    t = 0.0
    for _ in range(5):
        t += 5.0
        st = el.step(st, el.NodeFailed("r1", t))[0]
        assert st.map.member("r1").role == "out"
        back = t + 0.5
        while st.map.member("r1").role == "out":
            st = el.step(st, el.HeartbeatObserved("r1", "reader", 1, 10, back))[0]
            back = round(back + 0.5, 1)
        rejoined_at.append(round(back - 0.5 - t, 1))
        t = back
    assert rejoined_at[:2] == [0.5, 0.5]  # the first deaths: back at once
    assert rejoined_at[2] >= 10.0 and rejoined_at[3] >= 20.0 and rejoined_at[4] >= 40.0
    assert "kept out" in st.last_error


# -- the critical path and the background release ---------------------------------------------


def test_the_critical_path_and_the_background_table() -> None:
    critical = (el.PersistEpoch, el.FenceNode, el.GrantWritePath, el.PromoteNode, el.PublishMap)
    background = (el.ReleaseWritePath, el.DemoteNode)
    assert critical == el.CRITICAL_PATH and background == el.BACKGROUND
    assert not set(el.CRITICAL_PATH) & set(el.BACKGROUND)
    order = el.ACTION_ORDER
    assert all(order.index(c) < order.index(b) for c in el.CRITICAL_PATH for b in el.BACKGROUND)


def test_the_release_waits_for_the_published_map() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    assert st0.to_release == {"w"} and el.ReleaseWritePath("w", 2) not in actions
    # persisted, fenced, switched, promoted, but not published yet: still no release
    st1, more = el.step(st0, el.BatchExecuted(tuple(actions[:4]), actions[4], "StaleMap", 1.1))
    st1, more = el.step(st1, el.Tick(5.0))
    assert kinds(more) == ["PublishMap"]
    st2, more = el.step(st1, el.BatchExecuted(tuple(more), None, "", 5.1))
    assert st2.map.phase == "stable" and more == [el.ReleaseWritePath("w", 2)]


def test_a_failed_release_keeps_the_failover_and_backs_off() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st, release = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))
    published = st.map
    delays = []
    at = 1.2
    for attempt in range(1, 7):
        st, more = el.step(st, el.BatchExecuted((), release[0], "detach refused", at, True))
        assert more == [] and st.map == published  # the failover stands: same map, no retry_at
        assert st.retry_at is None and "detach refused" in st.last_error
        node, not_before, delay, attempts, reason = st.release_retry[0]
        assert (node, attempts, reason) == ("w", attempt, "detach refused")
        delays.append(delay)
        assert el.step(st, el.Tick(not_before - 0.01))[1] == []  # held back...
        st, release = el.step(st, el.Tick(not_before))  # ...then tried again
        assert release == [el.ReleaseWritePath("w", 2)]
        at = not_before
    cfg = st.config
    assert delays == [min(cfg.release_backoff * 2 ** i, cfg.release_backoff_max)
                      for i in range(6)]
    assert el.plan(st) == [el.ReleaseWritePath("w", 2)]  # status lists it whatever the hold
    st, more = el.step(st, el.BatchExecuted(tuple(release), None, "", at + 0.1))
    assert more == [] and st.to_release == frozenset() and st.release_retry == ()


def test_a_demotion_releases_too_and_a_re_elected_node_is_not_released() -> None:
    st0, actions = el.step(state3(), el.NodeFailed("w", 1.0))
    st, _ = el.step(st0, el.BatchExecuted(tuple(actions), None, "", 1.1))
    st, acts = el.step(st, el.HeartbeatObserved("w", "writer", 1, 9, 1.2))
    assert acts == [el.DemoteNode("w", 2, "w:1")]  # the demotion re-attaches it read-only
    st, acts = el.step(st, el.BatchExecuted(tuple(acts), None, "", 1.3))
    assert acts == [] and st.to_release == frozenset()
    # r2 (with a read-write disk) is fenced by the operator: released, unless re-elected
    st, acts = el.step(st, el.HeartbeatObserved("w", "reader", 2, 12, 1.4))
    st, _ = el.step(st, el.BatchExecuted(tuple(acts), None, "", 1.5))
    st, acts = el.step(st, el.FenceRequested("r2", 2.0))
    assert "r2" in st.to_release and st.map.writer != "r2"


def test_executor_switches_the_write_path_and_releases_through_the_hypervisor() -> None:
    ports = RecordingPorts()
    ex, _ = executor_for(ports, role_switch=True)
    assert ex.run([el.GrantWritePath("r2", 2)]).failed is None
    assert ex.run([el.ReleaseWritePath("w", 2)]).failed is None
    assert ports.calls == ["rw r2", "ro w"]
    refusing = RecordingPorts(fail_switch=True)
    ex, _ = executor_for(refusing, role_switch=True)
    result = ex.run([el.ReleaseWritePath("w", 2)])
    assert result.failed == el.ReleaseWritePath("w", 2) and result.infrastructure
    bare = RecordingPorts()
    ex, _ = executor_for(bare)  # processes: no disks to switch, nothing to fail
    assert ex.run([el.GrantWritePath("r2", 2), el.ReleaseWritePath("w", 2)]).failed is None
    assert bare.calls == []
