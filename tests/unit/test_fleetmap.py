"""FleetMap: ordered/labelled targets, legal role changes, versioned round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from agents.errors import DecodeError, UnsupportedVersion
from orchestrator.core.fleetmap import FleetMap, Member, initial_map
from orchestrator.errors import IllegalFleetTransition

pytestmark = pytest.mark.unit


def fleet3() -> FleetMap:
    m = initial_map(
        "f",
        "vm1",
        {
            "vm1": ("10.0.0.1:7480", "writer"),
            "vm2": ("10.0.0.2:7480", "reader"),
            "vm3": ("10.0.0.3:7480", "reader"),
            "vm4": ("10.0.0.4:7480", "spare"),
        },
    )
    m = m.set_progress("vm2", 5, True)
    return m.set_progress("vm3", 7, True)


def test_write_targets_are_writer_first_then_in_sync_readers() -> None:
    m = fleet3()
    assert [t.name for t in m.write_targets()] == ["vm1", "vm2", "vm3"]
    assert [t.name for t in m.read_targets()] == ["vm2", "vm3", "vm1"]


def test_a_catching_up_reader_is_never_handed_out() -> None:
    m = fleet3().set_progress("vm2", 5, False)
    assert [t.name for t in m.write_targets()] == ["vm1", "vm3"]
    assert "vm2" not in [t.name for t in m.read_targets()]


def test_promotion_candidate_is_highest_applied_seq_then_name() -> None:
    m = fleet3()
    assert m.promotion_candidate() == m.member("vm3")
    m = m.set_progress("vm2", 7, True)
    cand = m.promotion_candidate()
    assert cand is not None and cand.name == "vm2"
    assert m.promotion_candidate(exclude=frozenset({"vm2", "vm3"})) is None


def test_begin_failover_bumps_epoch_and_outs_the_old_writer() -> None:
    m = fleet3()
    n = m.begin_failover("vm3")
    assert (n.epoch, n.writer, n.phase) == (2, "vm3", "failover")
    assert n.member("vm1").role == "out"
    assert n.write_targets() == []  # not announced before promotion
    done = n.complete_failover()
    assert [t.name for t in done.write_targets()] == ["vm3", "vm2"]
    assert done.revision == n.revision + 1 and done.epoch == 2


@pytest.mark.parametrize(
    ("change", "pair"),
    [
        (lambda m: m.begin_failover("vm4"), ("spare", "writer")),
        (lambda m: m.begin_failover("vm1"), ("writer", "writer")),
        (
            lambda m: m.set_progress("vm2", 1, False).begin_failover("vm2"),
            ("catching-up reader", "writer"),
        ),
        (lambda m: m.set_role("vm1", "reader"), ("writer", "reader")),
        (lambda m: m.set_role("vm2", "spare"), ("reader", "spare")),
        (lambda m: m.complete_failover(), ("stable", "stable")),
    ],
)
def test_illegal_transitions_are_refused_naming_the_pair(change, pair) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IllegalFleetTransition) as info:
        change(fleet3())
    assert (info.value.from_, info.value.to) == pair
    assert f"{pair[0]} -> {pair[1]}" in str(info.value)


def test_two_writers_cannot_be_built() -> None:
    with pytest.raises(IllegalFleetTransition):
        FleetMap("f", 1, 1, "a", (Member("a", "x", "writer"), Member("b", "y", "writer")))


def test_remove_writer_leaves_no_writer_at_the_next_epoch() -> None:
    m = fleet3().remove_writer()
    assert (m.writer, m.epoch, m.phase) == (None, 2, "failover")
    assert m.write_targets() == []
    assert [t.name for t in m.read_targets()] == ["vm2", "vm3"]


def test_unknown_version_and_garbage_are_refused() -> None:
    data = fleet3().to_json()
    data["v"] = 99
    with pytest.raises(UnsupportedVersion):
        FleetMap.from_json(data)
    with pytest.raises(DecodeError):
        FleetMap.decode(b"{not json")
    with pytest.raises(DecodeError):
        FleetMap.decode(b'{"v": 1, "fleet": "f"}')


names = st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=5, unique=True)


@seed(20261126)
@settings(max_examples=200)
@given(names, st.data())
def test_encode_decode_round_trip(members: list[str], data: st.DataObject) -> None:
    writer = members[0]
    roles = {
        n: (f"10.0.0.{i}:7480", data.draw(st.sampled_from(["reader", "spare"])))
        for i, n in enumerate(members)
    }
    m = initial_map("fleet", writer, roles)  # type: ignore[arg-type]
    for n in members[1:]:
        if m.member(n).role == "reader":
            m = m.set_progress(n, data.draw(st.integers(0, 10**9)), data.draw(st.booleans()))
    assert FleetMap.decode(m.encode()) == m
    assert FleetMap.decode(m.encode()).encode() == m.encode()


@pytest.mark.parametrize("module", ["fleetmap", "election", "liveness"])
def test_core_modules_do_no_io(module: str) -> None:
    """The pure core imports no I/O module and calls no clock, sleep or open."""
    import ast
    from pathlib import Path

    source = Path(__file__).parents[2] / "orchestrator" / "core" / f"{module}.py"
    tree = ast.parse(source.read_text())
    banned = {"socket", "subprocess", "threading", "time", "os", "http", "urllib", "rados", "rbd"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & banned, ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in banned, node.module
            assert not (node.module or "").startswith("orchestrator.adapters")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", f"{module} calls open()"
