"""Allocator: never hands out a byte twice nor one still quarantined; a saved map that
overlaps is refused; claims of replayed records; next fit."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.allocator import Allocator, Extent
from agents.errors import CorruptMetadata, NoSpace, OverlappingExtents

pytestmark = pytest.mark.unit

B = 4096
START, END = 16 * B, 16 * B + 256 * B

ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 40 * B)),
        st.tuples(st.just("free"), st.integers(0, 1000)),
        st.tuples(st.just("giveback"), st.integers(0, 1000)),
        st.tuples(st.just("release"), st.integers(0, 60)),
    ),
    max_size=80,
)


def _blocks(extents: list[Extent]) -> set[int]:
    return {b for e in extents for b in range(e.offset, e.end, B)}


@settings(max_examples=200)
@given(ops)
def test_no_byte_handed_out_twice_nor_while_quarantined(script: list[tuple[str, int]]) -> None:
    alloc = Allocator(START, END)
    held: list[list[Extent]] = []  # allocated, not yet freed
    quarantined: dict[int, list[Extent]] = {}  # seq -> extents
    seq = 0
    for op, arg in script:
        if op == "alloc":
            before = alloc.free_bytes()
            try:
                got = alloc.allocate(arg)
            except NoSpace:
                assert alloc.free_bytes() == before < -(-arg // B) * B
                continue
            assert sum(e.length for e in got) == -(-arg // B) * B
            taken = _blocks(got)
            busy = {b for h in held for b in _blocks(h)} | {
                b for q in quarantined.values() for b in _blocks(q)
            }
            assert not taken & busy, "handed out a byte that is in use or quarantined"
            assert all(e.offset >= START and e.end <= END for e in got)
            held.append(got)
        elif op in ("free", "giveback") and held:
            extents = held.pop(arg % len(held))
            if op == "free":
                seq += 1
                alloc.quarantine(seq, extents)
                quarantined[seq] = extents
            else:
                alloc.give_back(extents)
        elif op == "release":
            alloc.release_through(arg)
            for s in [s for s in quarantined if s <= arg]:
                del quarantined[s]
        in_use = sum(e.length for h in held for e in h)
        in_q = sum(e.length for q in quarantined.values() for e in q)
        assert alloc.free_bytes() + in_use + in_q == END - START
    free = alloc.free_extents()
    assert all(a.end < b.offset for a, b in itertools.pairwise(free)), "not coalesced"


def test_loaded_from_a_saved_free_map_and_quarantine() -> None:
    free = [Extent(START + 2 * B, 2 * B), Extent(START + 5 * B, 5 * B), Extent(START + 11 * B,
                                                                          END - START - 11 * B)]
    alloc = Allocator.from_free(START, END, free, [(7, Extent(START + 4 * B, B))])
    assert alloc.free_extents() == free
    assert alloc.quarantined() == [(7, Extent(START + 4 * B, B))]
    assert alloc.free_bytes() == END - START - 4 * B
    alloc.release_through(6)
    assert alloc.free_bytes() == END - START - 4 * B
    alloc.release_through(7)
    assert alloc.free_bytes() == END - START - 3 * B
    assert alloc.free_extents()[0] == Extent(START + 2 * B, 8 * B)  # coalesced


def test_a_saved_map_that_overlaps_or_leaves_the_area_is_refused() -> None:
    with pytest.raises(OverlappingExtents):
        Allocator.from_free(START, END, [Extent(START, 2 * B), Extent(START + B, B)])
    with pytest.raises(OverlappingExtents):
        Allocator.from_free(START, END, [Extent(START, 2 * B)], [(1, Extent(START + B, B))])
    with pytest.raises(CorruptMetadata):
        Allocator.from_free(START, END, [Extent(END - B, 2 * B)])
    with pytest.raises(CorruptMetadata):
        Allocator.from_free(START, END, [Extent(START + 1, B)])


def test_claim_takes_named_extents_and_learns_released_quarantine() -> None:
    alloc = Allocator.from_free(START, END, [Extent(START + 4 * B, END - START - 4 * B)],
                                [(3, Extent(START, 4 * B))])
    alloc.claim([Extent(START + B, B), Extent(START + 8 * B, B)])
    # the quarantined extent had been released and reused: what is not claimed is free
    assert alloc.quarantined() == []
    assert alloc.free_bytes() == END - START - 2 * B
    with pytest.raises(OverlappingExtents):
        alloc.claim([Extent(START + 8 * B, B)])  # named twice


def test_next_fit_allocates_after_the_cursor_then_wraps() -> None:
    alloc = Allocator(START, END)
    assert alloc.allocate_after(START + 8 * B, B) == [Extent(START + 8 * B, B)]
    assert alloc.allocate_after(START + 9 * B, B) == [Extent(START + 9 * B, B)]
    assert alloc.allocate_after(END, B) == [Extent(START, B)]  # past the end: first fit


def test_double_free_is_a_bug_not_silence() -> None:
    alloc = Allocator(START, END)
    got = alloc.allocate(B)
    alloc.give_back(got)
    with pytest.raises(ValueError):
        alloc.give_back(got)


def test_fragmented_allocation_uses_several_extents() -> None:
    alloc = Allocator(START, START + 8 * B)
    a = alloc.allocate(2 * B)
    b = alloc.allocate(2 * B)
    alloc.allocate(2 * B)
    alloc.give_back(a)
    del b
    got = alloc.allocate(4 * B)
    assert sum(e.length for e in got) == 4 * B and len(got) == 2
    with pytest.raises(NoSpace):
        alloc.allocate(B)


def test_forget_quarantined_drops_released_and_reused_entries() -> None:
    alloc = Allocator(START, END)
    alloc.quarantine(3, [Extent(START, 4 * B), Extent(START + 8 * B, B)])
    alloc.forget_quarantined([Extent(START + 2 * B, 7 * B)])  # overlaps both, partly
    assert alloc.quarantined() == []
    assert alloc.release_through(10) == 0
    alloc.quarantine(5, [Extent(START, B)])
    with pytest.raises(ValueError):
        alloc.quarantine(6, [Extent(START, 2 * B)])
