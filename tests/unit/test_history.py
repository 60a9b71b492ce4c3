"""The history checker finds lost writes, stale reads and two writers in one epoch."""

from __future__ import annotations

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from orchestrator.testing.history import (
    History,
    check_all,
    check_final_state,
    check_one_writer_per_epoch,
    check_reads,
)

pytestmark = pytest.mark.unit


def test_a_clean_sequential_history_passes() -> None:
    h = History()
    p = h.invoke("c1", "put", "k", "v1")
    h.ok(p, epoch=1, node="w")
    g = h.invoke("c2", "get", "k")
    h.ok(g, "v1")
    assert check_all(h.ops(), {"k": "v1"}) == []


def test_a_read_older_than_an_acknowledged_put_is_caught() -> None:
    h = History()
    h.ok(h.invoke("c1", "put", "k", "v1"), epoch=1, node="w")
    h.ok(h.invoke("c1", "put", "k", "v2"), epoch=1, node="w")
    g = h.invoke("c2", "get", "k")
    h.ok(g, "v1")
    [anomaly] = check_reads(h.ops())
    assert anomaly.checker == "reads" and anomaly.ops == (g,)


def test_a_read_of_absent_after_an_ack_is_caught_but_before_it_is_fine() -> None:
    h = History()
    g0 = h.invoke("c2", "get", "k")
    h.ok(g0, None)
    h.ok(h.invoke("c1", "put", "k", "v1"), epoch=1, node="w")
    g1 = h.invoke("c2", "get", "k")
    h.ok(g1, None)
    assert [a.ops for a in check_reads(h.ops())] == [(g1,)]


def test_a_read_concurrent_with_a_put_may_see_either_version() -> None:
    h = History()
    h.ok(h.invoke("c1", "put", "k", "v1"), epoch=1, node="w")
    p = h.invoke("c1", "put", "k", "v2")
    g1 = h.invoke("c2", "get", "k")
    g2 = h.invoke("c3", "get", "k")
    h.ok(g1, "v1")
    h.ok(g2, "v2")
    h.ok(p, epoch=1, node="w")
    assert check_reads(h.ops()) == []


def test_unknown_writes_may_or_may_not_show_and_failed_ones_never() -> None:
    h = History()
    h.ok(h.invoke("c1", "put", "k", "v1"), epoch=1, node="w")
    h.unknown(h.invoke("c1", "put", "k", "v2"))
    h.fail(h.invoke("c1", "put", "k", "v3"))
    assert check_final_state(h.ops(), {"k": "v2"}) == []
    assert check_final_state(h.ops(), {"k": "v1"}) == []
    assert [a.checker for a in check_final_state(h.ops(), {"k": "v3"})] == ["final-state"]


def test_a_lost_acknowledged_write_is_caught() -> None:
    h = History()
    h.ok(h.invoke("c1", "put", "a", "v1"), epoch=1, node="w")
    h.ok(h.invoke("c1", "delete", "b"), epoch=2, node="r1")
    assert check_final_state(h.ops(), {"a": "v1", "b": None}) == []
    assert len(check_final_state(h.ops(), {"a": None, "b": None})) == 1
    assert len(check_final_state(h.ops(), {"b": None})) == 1  # no final read of a


def test_two_writers_in_one_epoch_are_caught() -> None:
    h = History()
    h.ok(h.invoke("c1", "put", "a", "v1"), epoch=3, node="w")
    h.ok(h.invoke("c2", "put", "b", "v2"), epoch=3, node="r1")
    h.ok(h.invoke("c2", "put", "b", "v3"), epoch=4, node="r1")
    [anomaly] = check_one_writer_per_epoch(h.ops())
    assert "epoch 3" in anomaly.message


def test_pending_ops_count_as_unknown_and_double_completion_is_refused() -> None:
    h = History()
    p = h.invoke("c1", "put", "k", "v1")
    assert check_final_state(h.ops(), {"k": "v1"}) == []
    h.ok(p)
    with pytest.raises(ValueError):
        h.fail(p)


# Property: histories produced by a real atomic register always pass; changing one read to a
# value overwritten before the read began always fails.
OPS = st.lists(
    st.tuples(st.sampled_from(["put", "delete", "get"]), st.sampled_from(["a", "b"])),
    min_size=1,
    max_size=30,
)


@seed(11)
@settings(max_examples=200)
@given(OPS)
def test_atomic_register_histories_pass(ops: list[tuple[str, str]]) -> None:
    h, store, n = History(), {}, 0
    for kind, key in ops:
        if kind == "get":
            g = h.invoke("c", "get", key)
            h.ok(g, store.get(key))
        else:
            n += 1
            value = f"v{n}" if kind == "put" else None
            op = h.invoke("c", kind, key, value)  # type: ignore[arg-type]
            store[key] = value
            h.ok(op, epoch=1, node="w")
    assert check_all(h.ops(), {k: store.get(k) for k in ("a", "b")}) == []


@seed(12)
@settings(max_examples=200)
@given(st.integers(2, 10))
def test_a_stale_read_always_fails(writes: int) -> None:
    h = History()
    for i in range(writes):
        h.ok(h.invoke("c", "put", "k", f"v{i}"), epoch=1, node="w")
    h.ok(h.invoke("c", "get", "k"), f"v{writes - 2}")
    assert len(check_reads(h.ops())) == 1
