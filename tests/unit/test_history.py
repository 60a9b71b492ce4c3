"""Each history checker rejects a real-shaped bad history and accepts the good one beside it;
histories of a simulated linearizable store always pass; the fault tier's self-check mutations
are each caught; errors are classified as the client raises them; the fault tier's generator,
run over an in-memory fleet, records a clean varied history, catches a lagging replica and a
lying writer, fails on a crashing client thread and replays each thread from the seed."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from agents.errors import (
    AgentError,
    CatchingUp,
    DeviceError,
    NoSpace,
    NotFound,
    NotWriter,
    StaleEpoch,
    error_from_wire,
)
from orchestrator.client import CoordinatorClient, FleetClient, WriteResult
from orchestrator.errors import AgentUnreachable, RequestOutcomeUnknown
from orchestrator.testing.history import (
    DIR,
    Final,
    History,
    Op,
    Value,
    check_all,
    check_epoch_order,
    check_final_state,
    check_monotonic_reads,
    check_one_writer_per_epoch,
    check_refused_writes_invisible,
    check_stale_reads,
    check_torn_or_forged,
    value_hash,
)
from tests.jepsen import NodeSeen, Workload, make_value, mutations, outcome_of

pytestmark = pytest.mark.unit

V1, V2, V3 = (value_hash(f"v{i}".encode()) for i in (1, 2, 3))


def put(h: History, key: str, value: str, epoch: int = 1, node: str = "w", seq: int = 0,
        process: str = "c1") -> int:
    """One acknowledged put, invoked and completed back to back."""
    op = h.invoke(process, "put", key, value)
    h.ok(op, epoch=epoch, node=node, seq=seq)
    return op


def read(h: History, key: str, value: Value, node: str = "r1", seq: int | None = None,
         process: str = "c2") -> int:
    op = h.invoke(process, "get", key)
    h.ok(op, value, epoch=1, node=node, seq=seq)
    return op


def checkers(anomalies: Sequence[object]) -> list[str]:
    return [str(a).split(":", 1)[0] for a in anomalies]


# -- 1. stale reads, whichever node served them ------------------------------------------------


@pytest.mark.parametrize("node", ["r1", "r2", "w"])
def test_a_read_of_a_version_an_acked_put_superseded_is_stale_on_any_node(node: str) -> None:
    h = History()
    old = put(h, "/k", V1, seq=10)
    new = put(h, "/k", V2, seq=11)
    g = read(h, "/k", V1, node=node, seq=10)
    [anomaly] = check_stale_reads(h.ops())
    assert anomaly.checker == "stale-read" and anomaly.ops == (g, old, new)
    assert f"served by {node} at seq 10" in anomaly.message and "seq 11" in anomaly.message


def test_a_read_concurrent_with_the_newer_put_may_return_either_version() -> None:
    h = History()
    put(h, "/k", V1)
    p = h.invoke("c1", "put", "/k", V2)
    g1, g2 = h.invoke("c2", "get", "/k"), h.invoke("c3", "get", "/k")
    h.ok(g1, V1, epoch=1, node="r1")
    h.ok(g2, V2, epoch=1, node="r2")
    h.ok(p, epoch=1, node="w")
    g3 = read(h, "/k", V2)
    assert check_stale_reads(h.ops()) == []
    # ... but once the newer put was acknowledged before a read began, the old one is stale
    g4 = read(h, "/k", V1)
    assert [a.ops[0] for a in check_stale_reads(h.ops())] == [g4] and g3 < g4


def test_two_concurrent_acked_puts_may_end_in_either_order() -> None:
    h = History()
    a, b = h.invoke("c1", "put", "/k", V1), h.invoke("c3", "put", "/k", V2)
    h.ok(a, epoch=1, node="w")
    h.ok(b, epoch=1, node="w")
    read(h, "/k", V1)
    assert check_stale_reads(h.ops()) == []
    assert check_final_state(h.ops(), {"r1": {"/k": V2}, "r2": {"/k": V2}}) == []


def test_absent_after_an_acked_put_is_stale_and_before_it_is_not() -> None:
    h = History()
    read(h, "/k", None)
    put(h, "/k", V1)
    g = read(h, "/k", None)
    assert [a.ops[0] for a in check_stale_reads(h.ops())] == [g]


def test_a_read_of_a_deleted_value_after_the_delete_was_acked_is_stale() -> None:
    h = History()
    put(h, "/k", V1)
    d = h.invoke("c1", "delete", "/k")
    h.ok(d, epoch=1, node="w", seq=5)
    read(h, "/k", None)
    assert check_stale_reads(h.ops()) == []
    g = read(h, "/k", V1, node="r2")
    [anomaly] = check_stale_reads(h.ops())
    assert anomaly.ops[0] == g and anomaly.ops[2] == d


def test_a_rename_supersedes_both_its_source_and_its_destination() -> None:
    h = History()
    put(h, "/k", V1)
    put(h, "/tmp/w0", V2)
    mv = h.invoke_rename("c1", "/tmp/w0", "/k", V2)
    h.ok(mv, epoch=1, node="w", seq=7)
    ok_src, ok_dst = read(h, "/tmp/w0", None), read(h, "/k", V2, seq=7)
    assert check_all(h.ops(), {"r1": {"/k": V2, "/tmp/w0": None}}) == []
    stale_src, stale_dst = read(h, "/tmp/w0", V2), read(h, "/k", V1)
    assert sorted(a.ops[0] for a in check_stale_reads(h.ops())) == [stale_src, stale_dst]
    assert ok_src < ok_dst < stale_src


def test_a_value_whose_write_began_after_the_read_ended_is_flagged() -> None:
    h = History()
    g = read(h, "/k", V1)
    put(h, "/k", V1)
    [anomaly] = check_stale_reads(h.ops())
    assert anomaly.ops[0] == g and "began after the read ended" in anomaly.message


def test_directories_are_registers_too() -> None:
    h = History()
    mk = h.invoke("c1", "mkdir", "/d0")
    h.ok(mk, epoch=1, node="w")
    read(h, "/d0", DIR)
    rm = h.invoke("c1", "delete", "/d0")
    h.ok(rm, epoch=1, node="w")
    assert check_stale_reads(h.ops()) == []
    g = read(h, "/d0", DIR)
    assert [a.ops[0] for a in check_stale_reads(h.ops())] == [g]


# -- 6. refused writes are failures; unknown ones may land any time after they began ----------


def test_an_unknown_put_may_show_any_time_after_it_began_and_never_supersedes() -> None:
    h = History()
    put(h, "/k", V1)
    u = h.invoke("c1", "put", "/k", V2)
    h.unknown(u)
    read(h, "/k", V1)
    read(h, "/k", V2)
    read(h, "/k", V1, process="c3")  # the client never learnt whether v2 happened
    assert check_all(h.ops(), {"r1": {"/k": V2}}) == []
    assert check_final_state(h.ops(), {"r1": {"/k": V1}}) != []  # observed: it happened


def test_an_unknown_put_never_observed_then_overwritten_is_fine_either_way() -> None:
    h = History()
    put(h, "/k", V1)
    h.unknown(h.invoke("c1", "put", "/k", V2))
    put(h, "/k", V3)
    read(h, "/k", V3)
    assert check_all(h.ops(), {"r1": {"/k": V3}}) == []  # it never happened, or before v3
    assert check_all(h.ops(), {"r1": {"/k": V2}}) == []  # it landed late, after v3
    [anomaly] = check_final_state(h.ops(), {"r1": {"/k": V1}})  # v3 was lost
    assert "lost" in anomaly.message


def test_an_observed_unknown_put_counts_as_happened_at_the_end() -> None:
    h = History()
    put(h, "/k", V1)
    u = h.invoke("c1", "put", "/k", V2)
    h.unknown(u)
    read(h, "/k", V2, node="r1")
    good = {"r1": {"/k": V2}, "r2": {"/k": V2}}
    assert check_all(h.ops(), good) == []
    lost = {"r1": {"/k": V2}, "r2": {"/k": V1}}
    found = check_final_state(h.ops(), lost)
    assert any("reads " + V1[:12] + " on r2" in a.message for a in found)
    assert any("disagree" in a.message for a in found)


def test_an_unknown_put_seen_only_at_the_end_on_one_node_is_lost_on_the_other() -> None:
    h = History()
    put(h, "/k", V1)
    h.unknown(h.invoke("c1", "put", "/k", V2))
    assert check_final_state(h.ops(), {"r1": {"/k": V1}, "r2": {"/k": V1}}) == []
    found = check_final_state(h.ops(), {"r1": {"/k": V2}, "r2": {"/k": V1}})
    assert any("on r2" in a.message and "lost" in a.message for a in found)


def test_a_read_of_a_refused_put_is_caught() -> None:
    h = History()
    put(h, "/k", V1)
    f = h.invoke("c1", "put", "/k", V2)
    h.fail(f, epoch=1)
    read(h, "/k", V1)
    assert check_all(h.ops(), {"r1": {"/k": V1}}) == []
    g = read(h, "/k", V2)
    [anomaly] = check_refused_writes_invisible(h.ops())
    assert anomaly.ops == (g, f)
    assert check_stale_reads(h.ops()) == [] and check_torn_or_forged(h.ops()) == []
    assert checkers(check_final_state(h.ops(), {"r1": {"/k": V2}})) == ["final-state"]


def test_a_refused_rename_leaves_both_keys_as_they_were() -> None:
    h = History()
    put(h, "/tmp/w0", V1)
    mv = h.invoke_rename("c1", "/tmp/w0", "/k", V1)
    h.fail(mv)
    assert check_all(h.ops(), {"r1": {"/tmp/w0": V1, "/k": None}}) == []
    read(h, "/k", V1)
    assert checkers(check_all(h.ops(), {"r1": {"/tmp/w0": V1, "/k": None}})) == [
        "refused-write-visible"
    ]


# -- 2. epochs acknowledged in real-time order ---------------------------------------------------


def test_a_write_acked_at_an_older_epoch_after_a_newer_epoch_ack_is_caught() -> None:
    h = History()
    put(h, "/a", V1, epoch=1, node="w", seq=1)
    new = put(h, "/a", V2, epoch=2, node="r1", seq=2)
    late = h.invoke("stale", "put", "/b", V3)
    h.ok(late, epoch=1, node="w", seq=3)
    [anomaly] = check_epoch_order(h.ops())
    assert anomaly.ops == (new, late) and "epoch 1" in anomaly.message


def test_an_older_epoch_ack_overlapping_the_newer_one_is_allowed() -> None:
    h = History()
    slow = h.invoke("c1", "put", "/b", V3)  # sent to the old writer before the failover
    put(h, "/a", V2, epoch=2, node="r1")
    h.ok(slow, epoch=1, node="w")
    assert check_epoch_order(h.ops()) == []


# -- 3. one acknowledging node per epoch ---------------------------------------------------------


def test_two_writers_in_one_epoch_are_caught() -> None:
    h = History()
    put(h, "/a", V1, epoch=3, node="w")
    put(h, "/b", V2, epoch=3, node="r1")
    put(h, "/b", V3, epoch=4, node="r1")
    [anomaly] = check_one_writer_per_epoch(h.ops())
    assert "epoch 3" in anomaly.message


# -- 4. monotonic reads per process --------------------------------------------------------------


def test_a_process_reading_new_then_old_while_the_put_is_in_flight_is_caught() -> None:
    """Regular, not monotonic: r1 applied v2 before r2; both reads overlap the put."""
    h = History()
    put(h, "/k", V1, seq=1)
    p = h.invoke("w0", "put", "/k", V2)
    first = read(h, "/k", V2, node="r1", seq=2, process="c2")
    second = read(h, "/k", V1, node="r2", seq=1, process="c2")
    h.ok(p, epoch=1, node="w", seq=2)
    assert check_stale_reads(h.ops()) == []
    [anomaly] = check_monotonic_reads(h.ops())
    assert anomaly.ops == (first, second) and "r1" in anomaly.message and "r2" in anomaly.message


def test_reads_moving_forward_or_by_other_processes_are_fine() -> None:
    h = History()
    put(h, "/k", V1, seq=1)
    p = h.invoke("w0", "put", "/k", V2)
    read(h, "/k", V2, node="r1", seq=2, process="c2")
    read(h, "/k", V1, node="r2", seq=1, process="c3")  # another process: only regular
    read(h, "/k", V1, node="r2", seq=1, process="c4")
    read(h, "/k", V2, node="r1", seq=2, process="c4")
    h.ok(p, epoch=1, node="w", seq=2)
    assert check_monotonic_reads(h.ops()) == []


def test_the_seq_served_orders_concurrent_puts() -> None:
    h = History()
    a, b = h.invoke("w0", "put", "/k", V1), h.invoke("w1", "put", "/k", V2)
    h.ok(a, epoch=1, node="w", seq=11)
    h.ok(b, epoch=1, node="w", seq=12)
    read(h, "/k", V2, seq=12)
    read(h, "/k", V1, seq=11)
    assert check_stale_reads(h.ops()) == []  # concurrent puts: either may be the last
    [anomaly] = check_monotonic_reads(h.ops())
    assert "seq 11 < 12" in anomaly.message


def test_absent_after_a_value_with_no_delete_is_an_inversion() -> None:
    h = History()
    p = h.invoke("w0", "put", "/k", V1)
    read(h, "/k", V1)
    read(h, "/k", None)
    h.unknown(p)
    assert check_stale_reads(h.ops()) == []
    assert checkers(check_monotonic_reads(h.ops())) == ["monotonic-reads"]


# -- 5. every value read is one written ----------------------------------------------------------


def test_a_torn_value_is_caught() -> None:
    data = make_value(random.Random(1), "w0-1")
    h = History()
    put(h, "/k", value_hash(data))
    read(h, "/k", value_hash(data))
    assert check_torn_or_forged(h.ops()) == []
    torn = read(h, "/k", value_hash(data[: len(data) // 2]))
    elsewhere = read(h, "/other", value_hash(data))  # written, but to another key
    a_dir = read(h, "/k", DIR)
    found = check_torn_or_forged(h.ops())
    assert [a.ops for a in found] == [(torn,), (elsewhere,), (a_dir,)]
    assert check_stale_reads(h.ops()) == []  # reported once, by the right checker


# -- 7. the final state on every node ------------------------------------------------------------


def test_every_node_must_hold_the_last_acked_version() -> None:
    h = History()
    put(h, "/a", V1)
    d = h.invoke("c1", "delete", "/b")
    h.ok(d, epoch=2, node="r1")
    good: Final = {"w": {"/a": V1, "/b": None}, "r1": {"/a": V1, "/b": None}}
    assert check_final_state(h.ops(), good) == []
    lagging: Final = {"w": {"/a": V1, "/b": None}, "r1": {"/a": None, "/b": None}}
    found = check_final_state(h.ops(), lagging)
    assert [a.checker for a in found] == ["final-state", "final-state"]
    assert "on r1" in found[0].message and "disagree" in found[1].message
    missing: Final = {"w": {"/a": V1, "/b": None}, "r1": {"/b": None}}
    [anomaly] = check_final_state(h.ops(), missing)
    assert anomaly.message == "no final read of '/a' on r1"
    assert check_final_state(h.ops(), {}) != []


# -- the recorder --------------------------------------------------------------------------------


def test_pending_ops_count_as_unknown_and_double_completion_is_refused() -> None:
    h = History()
    p = h.invoke("c1", "put", "/k", V1)
    assert check_final_state(h.ops(), {"r1": {"/k": V1}}) == []
    h.ok(p)
    with pytest.raises(ValueError):
        h.fail(p)


def test_a_rename_is_a_delete_and_a_put_completed_together() -> None:
    h = History()
    mv = h.invoke_rename("c1", "/tmp/w0", "/k", V1)
    h.ok(mv, epoch=2, node="r1", seq=9)
    gone, moved = h.ops()
    assert (gone.kind, gone.key, gone.value, moved.kind, moved.key, moved.value) == (
        "delete", "/tmp/w0", None, "put", "/k", V1)
    assert gone.joint == moved.id and moved.joint == gone.id
    assert (gone.invoke, gone.complete, gone.seq) == (moved.invoke, moved.complete, 9)


# -- properties: a linearizable store always passes; its histories mutated never do -------------

PROCESSES = ("w0", "w1", "r0", "r1")
FILES = ("/a", "/b")


@dataclass
class Sim:
    """A linearizable single-copy store driven by interleaved client steps.

    A process invokes an op, later it takes effect (its linearization point), later it
    completes. Writes may be refused (no effect), or end unknown before or after taking
    effect; one that ends unknown before may still take effect at a later step.
    """

    h: History = field(default_factory=History)
    store: dict[str, tuple[Value, int]] = field(default_factory=dict)  # key -> (value, seq)
    seq: int = 0
    busy: dict[str, tuple[int, Op, str]] = field(default_factory=dict)  # proc -> (id, op, phase)
    orphans: list[Op] = field(default_factory=list)
    made: int = 0
    read_back: dict[int, tuple[Value, int | None]] = field(default_factory=dict)
    applied: dict[int, int] = field(default_factory=dict)  # write op id -> its seq

    def apply(self, op: Op) -> None:
        self.seq += 1
        self.applied[op.id] = self.seq
        if op.joint is not None:
            self.store[op.key] = (op.value, self.seq)
            src = next(o for o in self.h.ops() if o.id == op.joint)
            self.store[src.key] = (None, self.seq)
        else:
            self.store[op.key] = (op.value, self.seq)

    def begin(self, proc: str, choice: int) -> None:
        if proc.startswith("r"):
            op_id = self.h.invoke(proc, "get", FILES[choice % 2])
        else:
            self.made += 1
            own = f"/t{proc}"
            value = value_hash(f"{proc}-{self.made}".encode())
            held = self.store.get(own, (None, 0))[0]
            kind = choice % 4
            if kind == 3 and held is not None:
                op_id = self.h.invoke_rename(proc, own, FILES[choice % 2], held)
            elif kind == 2:
                op_id = self.h.invoke(proc, "put", own, value)
            elif kind == 1:
                op_id = self.h.invoke(proc, "delete", FILES[choice % 2])
            else:
                op_id = self.h.invoke(proc, "put", FILES[choice % 2], value)
        op = next(o for o in self.h.ops() if o.id == op_id)
        self.busy[proc] = (op_id, op, "invoked")

    def step(self, proc: str, choice: int) -> None:
        if choice % 13 == 0 and self.orphans:
            self.apply(self.orphans.pop(0))
            return
        if proc not in self.busy:
            self.begin(proc, choice)
            return
        op_id, op, phase = self.busy[proc]
        mine = op.key.startswith("/t") or op.joint is not None  # own file: never left unknown
        if phase == "invoked":
            if op.is_write and choice % 7 == 0:
                self.h.fail(op_id, epoch=1)
                del self.busy[proc]
            elif op.is_write and choice % 11 == 0 and not mine:
                self.h.unknown(op_id, epoch=1)
                self.orphans.append(op)
                del self.busy[proc]
            else:
                if op.is_write:
                    self.apply(op)
                else:
                    value, at = self.store.get(op.key, (None, 0))
                    self.read_back[op_id] = (value, at if value is not None else None)
                self.busy[proc] = (op_id, op, "done")
        elif op.is_write and choice % 5 == 0 and not mine:
            self.h.unknown(op_id, epoch=1)
            del self.busy[proc]
        else:
            if op.is_write:
                self.h.ok(op_id, epoch=1, node="w", seq=self.applied[op_id])
            else:
                value, served = self.read_back[op_id]
                self.h.ok(op_id, value, epoch=1, node=f"r{choice % 2 + 1}", seq=served)
            del self.busy[proc]

    def final(self) -> dict[str, dict[str, Value]]:
        held = {key: value for key, (value, _) in self.store.items()}
        keys = {o.key for o in self.h.ops() if o.is_write}
        return {node: {k: held.get(k) for k in keys} for node in ("w", "r1", "r2")}


STEPS = st.lists(st.tuples(st.sampled_from(PROCESSES), st.integers(0, 1000)), max_size=120)


def simulate(steps: list[tuple[str, int]]) -> Sim:
    sim = Sim()
    for proc, choice in steps:
        sim.step(proc, choice)
    return sim


@seed(11)
@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_histories_of_a_linearizable_store_pass_every_checker(steps: list[tuple[str, int]]) -> None:
    sim = simulate(steps)
    assert check_all(sim.h.ops(), sim.final()) == []


@seed(12)
@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_every_self_check_mutation_of_a_good_history_is_caught(
    steps: list[tuple[str, int]],
) -> None:
    sim = simulate(steps)
    for checker, ops, final in mutations(sim.h.ops(), sim.final()):
        assert checker in [a.checker for a in check_all(ops, final)], checker


def _stale_candidates(ops: list[Op]) -> Iterator[tuple[Op, Value]]:
    """(ok read, value of an acked put that an ack invoked after it superseded before the read
    began)."""
    acked = [o for o in ops if o.is_write and o.outcome == "ok"]
    for r in ops:
        if r.kind != "get" or r.outcome != "ok":
            continue
        for old in acked:
            if old.kind == "put" and old.key == r.key and any(
                q.key == r.key and q.invoke > old.complete and q.complete < r.invoke
                for q in acked
            ):
                yield r, old.value


@seed(13)
@settings(max_examples=300, deadline=None)
@given(STEPS, st.integers(0, 10**6))
def test_turning_any_read_stale_is_always_caught(steps: list[tuple[str, int]], pick: int) -> None:
    ops = simulate(steps).h.ops()
    candidates = list(_stale_candidates(ops))
    if not candidates:
        return
    r, old = candidates[pick % len(candidates)]
    stale = [replace(o, value=old, seq=None) if o.id == r.id else o for o in ops]
    assert [a.ops[0] for a in check_stale_reads(stale)] == [r.id]


def test_the_simulation_covers_what_the_properties_claim() -> None:
    """The steps reach renames, refusals, unknowns landing late, and stale candidates."""
    sim = simulate([(p, c) for c in range(400) for p in PROCESSES])
    ops = sim.h.ops()
    assert {o.outcome for o in ops} == {"ok", "fail", "unknown"}
    assert any(o.joint is not None and o.outcome == "ok" for o in ops)
    assert any(_stale_candidates(ops))
    assert check_all(ops, sim.final()) == []
    assert {c for c, _, _ in mutations(ops, sim.final())} == {
        "final-state", "stale-read", "monotonic-reads", "epoch-order", "one-writer-per-epoch",
        "torn-or-forged", "refused-write-visible",
    }


# -- how the generator classifies what the client raised ---------------------------------------


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (NotWriter("not the writer"), "fail"),
        (StaleEpoch("epoch 1 < 2"), "fail"),
        (NotFound("no such file"), "fail"),
        (CatchingUp("catching up"), "fail"),
        (NoSpace("full"), "fail"),
        (AgentUnreachable("w", "127.0.0.1:1", "connection refused"), "fail"),
        (error_from_wire({"error": "teapot", "message": "?"}, 418), "fail"),
        (RequestOutcomeUnknown("w", "127.0.0.1:1", "timed out"), "unknown"),
        (DeviceError("EIO"), "unknown"),
        (AgentError("internal error"), "unknown"),
        (error_from_wire({"error": "weird", "message": "?"}, 502), "unknown"),
    ],
)
def test_refusals_fail_and_only_lost_answers_stay_unknown(
    exc: AgentError | AgentUnreachable, outcome: str
) -> None:
    assert outcome_of(exc) == outcome


def test_values_span_inline_records_to_data_extents_and_are_unique() -> None:
    rng = random.Random("7-w0")
    values = [make_value(rng, f"w0-{i}") for i in range(400)]
    sizes = sorted(len(v) for v in values)
    assert sizes[0] >= 100 and sizes[-1] <= 3 << 20
    assert sizes[len(sizes) // 2] < 4 << 10  # mostly small
    assert any(s > 64 << 10 for s in sizes)  # some on data extents
    assert len({value_hash(v) for v in values}) == len(values)


# -- the generator end to end, over an in-memory fleet -------------------------------------------


class MemoryFleet(FleetClient):
    """A FleetClient over one in-memory store (no coordinator is ever contacted).

    ``lag``: that share of reads is served by a replica one write behind; ``lie``: that share
    of applied writes is answered 409 not_writer; ``lose``: that share answered as lost
    connections (they did happen); ``crash``: reads raise this.
    """

    def __init__(self, rng: random.Random, lag: float = 0.0, lie: float = 0.0,
                 lose: float = 0.0, crash: BaseException | None = None) -> None:
        super().__init__(CoordinatorClient(["http://127.0.0.1:9"], "mem", b"secret"))
        self.rng, self.lag, self.lie, self.lose, self.crash = rng, lag, lie, lose, crash
        self.lock = threading.Lock()
        self.store: dict[str, tuple[bytes | None, int]] = {}  # None: a directory
        self.behind: dict[str, tuple[bytes | None, int]] = {}
        self.seq = 0

    def _apply(self, change: Callable[[], object]) -> WriteResult:
        with self.lock:
            self.behind = dict(self.store)
            self.seq += 1
            change()
            seq, roll = self.seq, self.rng.random()
        if roll < self.lose:
            raise RequestOutcomeUnknown("w", "mem", "connection reset")
        if roll < self.lose + self.lie:
            raise NotWriter("no longer the writer")
        return WriteResult("w", 1, seq, {})

    def put_bytes(self, data: bytes, remote: str) -> WriteResult:
        return self._apply(lambda: self.store.__setitem__(remote, (data, self.seq)))

    def delete(self, remote: str) -> WriteResult:
        with self.lock:
            if remote not in self.store:
                raise NotFound(f"no such file: {remote}")
        return self._apply(lambda: self.store.pop(remote, None))

    def rename(self, src: str, dst: str) -> WriteResult:
        def move() -> None:
            self.store[dst] = (self.store.pop(src)[0], self.seq)

        return self._apply(move)

    def mkdir(self, remote: str, parents: bool = False) -> WriteResult:
        return self._apply(lambda: self.store.__setitem__(remote, (None, self.seq)))

    def _held(self, remote: str) -> tuple[bytes | None, int]:
        if self.crash is not None:
            raise self.crash
        with self.lock:
            held = self.behind if self.rng.random() < self.lag else self.store
            if remote not in held:
                raise NotFound(f"no such file: {remote}")
            return held[remote]

    def get_with_version(self, remote: str) -> tuple[bytes, int, str]:
        data, seq = self._held(remote)
        assert data is not None
        return data, seq, "r1"

    def stat(self, remote: str) -> dict[str, Any]:
        data, seq = self._held(remote)
        return {"kind": "dir" if data is None else "file", "version": seq}

    def final(self, ops: list[Op]) -> Final:
        """What the one node holds of every key ``ops`` wrote."""
        held: dict[str, Value] = {}
        for key in {o.key for o in ops if o.is_write}:
            if key in self.store:
                data = self.store[key][0]
                held[key] = DIR if data is None else value_hash(data)
            else:
                held[key] = None
        return {"r1": held}


def run(fleet: MemoryFleet, seconds: float = 0.6, seed_: int = 5) -> list[Op]:
    work = Workload(fleet, History(), seed_)
    work.start()
    time.sleep(seconds)
    work.finish()
    return work.history.ops()


def test_the_generator_over_a_linearizable_store_records_a_clean_varied_history() -> None:
    fleet = MemoryFleet(random.Random(1), lose=0.03)
    ops = run(fleet)
    assert check_all(ops, fleet.final(ops)) == []
    kinds = {(o.kind, o.joint is not None, o.outcome) for o in ops}
    assert {("put", False, "ok"), ("put", True, "ok"), ("delete", True, "ok"),
            ("delete", False, "fail"), ("mkdir", False, "ok"), ("get", False, "ok"),
            ("put", False, "unknown")} <= kinds
    assert any(o.kind == "get" and o.value == DIR for o in ops)
    assert {c for c, _, _ in mutations(ops, fleet.final(ops))} >= {"stale-read", "final-state"}


def test_the_generator_catches_a_lagging_replica_and_a_writer_that_lies() -> None:
    lagging = MemoryFleet(random.Random(2), lag=0.3)
    ops = run(lagging)
    assert "stale-read" in {a.checker for a in check_all(ops, lagging.final(ops))}
    lying = MemoryFleet(random.Random(3), lie=0.1)
    ops = run(lying)
    found = {a.checker for a in check_all(ops, lying.final(ops))}
    assert "refused-write-visible" in found


def test_a_client_thread_that_raises_fails_the_workload() -> None:
    fleet = MemoryFleet(random.Random(4), crash=RuntimeError("bug in the client"))
    with pytest.raises(RuntimeError, match="bug in the client") as caught:
        run(fleet, 0.2)
    assert any("client thread r" in note for note in caught.value.__notes__)


def test_each_thread_replays_its_own_stream_from_the_seed() -> None:
    def writes(seed_: int) -> dict[str, list[tuple[str, str, Value]]]:
        ops = run(MemoryFleet(random.Random(0)), 0.3, seed_)
        out: dict[str, list[tuple[str, str, Value]]] = {}
        for o in ops:
            if o.process.startswith("w") and o.key.startswith("/k"):
                out.setdefault(o.process, []).append((o.kind, o.key, o.value))
        return out

    first, again, other = writes(7), writes(7), writes(8)
    n = min(len(s) for s in (*first.values(), *again.values()))
    assert n >= 5
    assert {p: s[:n] for p, s in first.items()} == {p: s[:n] for p, s in again.items()}
    assert first["w0"][:n] != other["w0"][:n]


class _NotFoundHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(NotFound("no such file: /k0").to_wire()).encode()
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_recording_transport_names_the_node_that_answered_not_found() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHandler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        sent = NodeSeen()
        address = f"http://127.0.0.1:{server.server_address[1]}"  # a plain HTTP stub
        with pytest.raises(NotFound):
            sent.request("r2", address, "GET", "/v1/files/k0", timeout=5.0)
        assert sent.last_node() == "r2"
        elsewhere: list[str | None] = []
        other = threading.Thread(target=lambda: elsewhere.append(sent.last_node()))
        other.start()
        other.join()
        assert elsewhere == [None]  # per thread: a reader never sees another's node
    finally:
        server.shutdown()
        server.server_close()
