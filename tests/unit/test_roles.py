"""Role state machine: truth table of moves, and invariants over random event sequences."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core import roles as r
from agents.errors import IllegalTransition, StaleEpoch

pytestmark = pytest.mark.unit


def run(state: r.RoleState, *events: r.Event) -> tuple[r.RoleState, list[r.Action]]:
    actions: list[r.Action] = []
    for event in events:
        state, out = r.step(state, event)
        actions += out
    return state, actions


def test_start_then_promote_orders_actions() -> None:
    state, actions = run(r.initial(), r.Started(3), r.PromoteRequested(4))
    assert state == r.RoleState("promoting", 4) and not state.accepts_writes
    assert actions == [r.OpenReadOnly(), r.OpenReadWrite(), r.ReplayJournalTail(),
                       r.WriteEpochRecord(4)]
    state, actions = r.step(state, r.EpochRecordWritten(4))
    assert state == r.RoleState("writer", 4) and state.accepts_writes
    assert actions == [r.AcceptWrites(4)]


def test_demote_stops_writes_first() -> None:
    writer, _ = run(r.initial(), r.Started(1), r.PromoteRequested(2), r.EpochRecordWritten(2))
    state, actions = r.step(writer, r.DemoteRequested(3))
    assert state == r.RoleState("reader", 3)
    assert actions == [r.StopWrites(), r.CloseReadWrite(), r.OpenReadOnly()]
    assert r.step(writer, r.NewerEpochSeen(5)) == (r.RoleState("reader", 5), actions)
    assert r.step(writer, r.DeviceFenced(5)) == (r.RoleState("reader", 2), actions)
    assert r.step(writer, r.StopRequested()) == (
        r.RoleState("stopped", 2), [r.StopWrites(), r.CloseReadWrite(), r.CloseDevice()])


def test_idempotent_retries() -> None:
    writer, _ = run(r.initial(), r.Started(1), r.PromoteRequested(2), r.EpochRecordWritten(2))
    assert r.step(writer, r.PromoteRequested(2)) == (writer, [])
    reader = r.RoleState("reader", 4)
    assert r.step(reader, r.DemoteRequested(4)) == (reader, [])
    assert r.step(reader, r.NewerEpochSeen(2)) == (reader, [])


def test_promotion_failure_returns_to_reader() -> None:
    state, _ = run(r.initial(), r.Started(1), r.PromoteRequested(2))
    assert r.step(state, r.PromotionFailed("journal")) == (
        r.RoleState("reader", 2), [r.CloseReadWrite(), r.OpenReadOnly()])


def test_reelection_of_the_writer_writes_a_new_epoch_record() -> None:
    writer = r.RoleState("writer", 2)
    state, actions = r.step(writer, r.PromoteRequested(3))
    assert state == r.RoleState("promoting", 3)
    assert actions == [r.StopWrites(), r.ReplayJournalTail(), r.WriteEpochRecord(3)]


@pytest.mark.parametrize(
    ("state", "event", "error"),
    [
        (r.RoleState("reader", 3), r.PromoteRequested(3), StaleEpoch),
        (r.RoleState("reader", 3), r.PromoteRequested(2), StaleEpoch),
        (r.RoleState("writer", 3), r.DemoteRequested(2), StaleEpoch),
        (r.RoleState("reader", 3), r.DemoteRequested(2), StaleEpoch),
        (r.RoleState("starting", 0), r.PromoteRequested(1), IllegalTransition),
        (r.RoleState("starting", 0), r.DemoteRequested(1), IllegalTransition),
        (r.RoleState("reader", 1), r.Started(1), IllegalTransition),
        (r.RoleState("reader", 1), r.EpochRecordWritten(1), IllegalTransition),
        (r.RoleState("promoting", 2), r.EpochRecordWritten(3), IllegalTransition),
        (r.RoleState("promoting", 2), r.PromoteRequested(3), IllegalTransition),
        (r.RoleState("reader", 1), r.PromotionFailed("x"), IllegalTransition),
        (r.RoleState("reader", 1), r.DeviceFenced(5), IllegalTransition),
        (r.RoleState("stopped", 1), r.Started(1), IllegalTransition),
        (r.RoleState("stopped", 1), r.StopRequested(), IllegalTransition),
    ],
)
def test_refused_moves(state: r.RoleState, event: r.Event, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        r.step(state, event)
    if error is IllegalTransition:
        assert info.value.fields["role"] == state.role  # type: ignore[attr-defined]
        assert info.value.fields["event"] == type(event).__name__  # type: ignore[attr-defined]


epochs = st.integers(0, 6)
events = st.one_of(
    epochs.map(r.Started), epochs.map(r.PromoteRequested), epochs.map(r.EpochRecordWritten),
    st.just(r.PromotionFailed("x")), epochs.map(r.DemoteRequested),
    epochs.map(r.NewerEpochSeen), st.just(r.DeviceFenced(5)), st.just(r.StopRequested()),
)


@given(st.lists(events, max_size=40))
def test_invariants_over_random_events(seq: list[r.Event]) -> None:
    state = r.initial()
    records: list[int] = []
    writing: int | None = None
    for event in seq:
        try:
            new, actions = r.step(state, event)
        except (IllegalTransition, StaleEpoch):
            continue
        assert new.epoch >= state.epoch
        for action in actions:
            match action:
                case r.WriteEpochRecord(epoch=e):
                    assert e not in records and all(e > old for old in records)
                    records.append(e)
                case r.AcceptWrites(epoch=e):
                    assert isinstance(event, r.EpochRecordWritten) and records[-1] == e
                    writing = e
                case r.StopWrites():
                    writing = None
                case r.CloseReadWrite():
                    assert writing is None, "read-write handle closed while writes accepted"
        assert (writing is not None) == new.accepts_writes
        if new.accepts_writes:
            assert writing == new.epoch
        state = new
