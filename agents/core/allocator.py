"""Extent allocator for the data area, loaded from a checkpoint's free list at start-up.

Invariants (checked by the property tests):
- An extent is in exactly one of three states: free, in use (handed out by :meth:`allocate`
  or named by the index), or quarantined (freed by the record ``seq``).
- :meth:`allocate` never hands out a byte that is in use or quarantined.
- Quarantined extents become free only through :meth:`release_through` with a seq at least the
  freeing record's: a reader that may still read them has acknowledged that record.
- :meth:`take_released` and :meth:`claim_around` hand extents to the caller instead (a fourth
  state, *held*: neither free nor quarantined) until it gives them back; the writer discards
  them meanwhile, so nothing can allocate bytes whose discard is still in flight.
- Free extents are kept sorted and coalesced; every offset and length is a multiple of 4 KiB.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from agents.device import ALIGN
from agents.errors import CorruptMetadata, NoSpace, OverlappingExtents


@dataclass(frozen=True, order=True)
class Extent:
    """A run of bytes on the device: ``[offset, offset + length)``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.offset + self.length


def coalesce(extents: Iterable[Extent]) -> list[Extent]:
    """``extents`` sorted, adjacent ones merged."""
    merged: list[Extent] = []
    for x in sorted(extents):
        if merged and merged[-1].end == x.offset:
            merged[-1] = Extent(merged[-1].offset, merged[-1].length + x.length)
        else:
            merged.append(x)
    return merged


class Allocator:
    """Free-space map of ``[start, end)`` with a quarantine of recently freed extents."""

    def __init__(self, start: int, end: int) -> None:
        if start % ALIGN or end % ALIGN or end < start:
            raise ValueError("allocator bounds must be 4 KiB aligned")
        self.start = start
        self.end = end
        self._starts: list[int] = [start] if end > start else []
        self._lengths: dict[int, int] = {start: end - start} if end > start else {}
        # quarantined extents never overlap: by start offset, plus a seq-ordered heap
        # (entries whose offset left the map or changed seq are skipped when popped)
        self._q_map: dict[int, tuple[int, Extent]] = {}
        self._q_starts: list[int] = []
        self._q_heap: list[tuple[int, int]] = []

    @classmethod
    def from_free(
        cls,
        start: int,
        end: int,
        free: Iterable[Extent],
        quarantined: Iterable[tuple[int, Extent]] = (),
    ) -> Allocator:
        """The map a checkpoint saved: ``free`` (sorted) and ``quarantined`` ((seq, extent));
        everything else in ``[start, end)`` is in use. Raises OverlappingExtents when an
        extent is unaligned, empty, leaves the area or overlaps another."""
        alloc = cls(start, end)
        alloc._starts, alloc._lengths = [], {}
        held = sorted([(e, -1) for e in free] + [(e, seq) for seq, e in quarantined],
                      key=lambda pair: pair[0].offset)
        cursor = start
        for extent, _seq in held:
            where = f"saved extent {extent.offset}+{extent.length}"
            if extent.length <= 0 or extent.offset % ALIGN or extent.length % ALIGN:
                raise CorruptMetadata(f"{where} is empty or unaligned", offset=extent.offset)
            if extent.offset < start or extent.end > end:
                raise CorruptMetadata(f"{where} is outside the data area", offset=extent.offset)
            if extent.offset < cursor:
                raise OverlappingExtents(f"{where} overlaps another one", offset=extent.offset)
            cursor = extent.end
        for extent, seq in held:
            if seq < 0:
                alloc._insert_free(extent)
        alloc.quarantine_each((seq, e) for e, seq in held if seq >= 0)
        return alloc

    def claim(self, extents: Iterable[Extent]) -> None:
        """A record (replayed or pushed, not allocated here) put data on ``extents``: take
        them out of the free map. A quarantined extent they overlap had been released and
        reused by the writer (release_through is not journaled, so a replay learns it here):
        it leaves the quarantine and what the record does not use of it is free. Raises
        OverlappingExtents for bytes that are neither (two owners: a corrupt journal)."""
        extents = list(extents)
        for other in self._unquarantine_overlapping(extents):
            self._insert_free(other)
        for extent in extents:
            i = bisect.bisect_right(self._starts, extent.offset) - 1
            s = self._starts[i] if i >= 0 else -1
            if s < 0 or s + self._lengths[s] < extent.end:
                raise OverlappingExtents(
                    f"extent {extent.offset}+{extent.length} is named twice (not free)",
                    offset=extent.offset)
            self._take_range(s, extent.offset, extent.length)

    def free_bytes(self) -> int:
        """Bytes available to :meth:`allocate` now."""
        return sum(self._lengths.values())

    def quarantined(self) -> list[tuple[int, Extent]]:
        """(freeing seq, extent) pairs not yet released, oldest first."""
        return sorted(self._q_map.values(), key=lambda p: (p[0], p[1].offset))

    def free_extents(self) -> list[Extent]:
        """The free extents, sorted."""
        return [Extent(s, self._lengths[s]) for s in self._starts]

    def allocate(self, nbytes: int) -> list[Extent]:
        """Extents totalling ``nbytes`` rounded up to 4 KiB: one extent if one fits (first
        fit), else the largest free extents first. Raises NoSpace, leaving the map unchanged."""
        need = -(-max(nbytes, 0) // ALIGN) * ALIGN
        if need == 0:
            return []
        for s in self._starts:
            if self._lengths[s] >= need:
                self._take(s, need)
                return [Extent(s, need)]
        if self.free_bytes() < need:
            raise NoSpace(
                f"no space for {need} bytes ({self.free_bytes()} free, "
                f"{sum(e.length for _, e in self._q_map.values())} quarantined)",
                needed=need,
            )
        got: list[Extent] = []
        for s in sorted(self._starts, key=lambda s: -self._lengths[s]):
            take = min(self._lengths[s], need)
            self._take(s, take)
            got.append(Extent(s, take))
            need -= take
            if need == 0:
                break
        return got

    def allocate_after(self, cursor: int, nbytes: int) -> list[Extent]:
        """Like :meth:`allocate`, but next fit: the first run of ``nbytes`` (rounded up to
        4 KiB) at or after ``cursor`` (a multiple of 4 KiB), wrapping to :meth:`allocate`.
        Space freed behind the cursor is reused only after a whole lap of the free space."""
        need = -(-max(nbytes, 0) // ALIGN) * ALIGN
        i = bisect.bisect_right(self._starts, cursor) - 1
        if i >= 0:
            s = self._starts[i]
            if s + self._lengths[s] - cursor >= need:
                self._take_range(s, cursor, need)
                return [Extent(cursor, need)]
        for s in self._starts[i + 1 :]:
            if self._lengths[s] >= need:
                self._take(s, need)
                return [Extent(s, need)]
        return self.allocate(nbytes)

    def allocate_last(self, nbytes: int) -> Extent | None:
        """The highest run of ``nbytes`` (rounded up to 4 KiB) in one free extent, or None:
        space held for long stays out of the way of first-fit allocation."""
        need = -(-max(nbytes, 0) // ALIGN) * ALIGN
        for s in reversed(self._starts):
            if self._lengths[s] >= need:
                offset = s + self._lengths[s] - need
                self._take_range(s, offset, need)
                return Extent(offset, need)
        return None

    def _take(self, start: int, length: int) -> None:
        """Remove ``[start, start+length)`` from the head of the free extent at ``start``."""
        rest = self._lengths.pop(start) - length
        i = bisect.bisect_left(self._starts, start)
        if rest:
            self._starts[i] = start + length
            self._lengths[start + length] = rest
        else:
            del self._starts[i]

    def give_back(self, extents: Iterable[Extent]) -> None:
        """Return extents that were allocated but never named by a durable record."""
        for extent in extents:
            self._insert_free(extent)

    def quarantine(self, seq: int, extents: Iterable[Extent]) -> None:
        """Extents freed by record ``seq``: unusable until ``release_through(>= seq)``."""
        self.quarantine_each((seq, e) for e in extents)

    def quarantine_each(self, pairs: Iterable[tuple[int, Extent]]) -> None:
        """Quarantine several (seq, extent) pairs."""
        for seq, extent in pairs:
            if extent.length <= 0:
                continue
            i = bisect.bisect_left(self._q_starts, extent.offset)
            for j in (i - 1, i):
                if 0 <= j < len(self._q_starts):
                    other = self._q_map[self._q_starts[j]][1]
                    if other.offset < extent.end and extent.offset < other.end:
                        raise ValueError(f"{extent} is already quarantined")
            self._q_starts.insert(i, extent.offset)
            self._q_map[extent.offset] = (seq, extent)
            heapq.heappush(self._q_heap, (seq, extent.offset))

    def forget_quarantined(self, extents: Iterable[Extent]) -> None:
        """A record put data on ``extents``: any quarantined extent they overlap had been
        released and reused by the writer (release_through is not journaled, so a replay
        learns it here). Drops those quarantine entries whole."""
        self._unquarantine_overlapping(extents)

    def _unquarantine_overlapping(self, extents: Iterable[Extent]) -> list[Extent]:
        """Take every quarantined extent that overlaps one of ``extents`` out of the
        quarantine (whole); returns them. Their heap entries go stale (skipped on release)."""
        dropped: list[Extent] = []
        for extent in extents:
            i = bisect.bisect_left(self._q_starts, extent.offset)
            j = max(i - 1, 0)
            while j < len(self._q_starts) and self._q_starts[j] < extent.end:
                other = self._q_map[self._q_starts[j]][1]
                if other.end > extent.offset:
                    del self._q_map[other.offset]
                    del self._q_starts[j]
                    dropped.append(other)
                else:
                    j += 1
        return dropped

    def release_through(self, seq: int) -> int:
        """Free the extents quarantined by records with seq <= ``seq``; returns bytes freed."""
        released = self.take_released(seq)
        self.give_back(released)
        return sum(e.length for e in released)

    def take_released(self, seq: int) -> list[Extent]:
        """Take the extents quarantined by records with seq <= ``seq`` out of the quarantine
        WITHOUT freeing them: they are held by the caller (sorted, adjacent ones merged)
        until it calls :meth:`give_back`."""
        taken: list[Extent] = []
        while self._q_heap and self._q_heap[0][0] <= seq:
            q_seq, offset = heapq.heappop(self._q_heap)
            entry = self._q_map.get(offset)
            if entry is None or entry[0] != q_seq:
                continue
            del self._q_map[offset]
            del self._q_starts[bisect.bisect_left(self._q_starts, offset)]
            taken.append(entry[1])
        return coalesce(taken)

    def claim_around(self, extent: Extent, unit: int) -> Extent:
        """``extent`` (held by the caller) widened on each side to the next multiple of
        ``unit`` where free space reaches that far; the free bytes added are taken out of the
        map (held too, given back with the rest). Device space is managed in ``unit`` pieces
        (RBD objects): a discard frees an object only when it covers all of it."""
        lo, hi = extent.offset, extent.end
        down = lo - lo % unit
        if down < lo:
            i = bisect.bisect_left(self._starts, lo) - 1
            if i >= 0:
                s = self._starts[i]
                if s <= down and s + self._lengths[s] == lo:
                    self._take_range(s, down, lo - down)
                    lo = down
        up = -(-hi // unit) * unit
        if hi < up and hi in self._lengths and self._lengths[hi] >= up - hi:
            self._take(hi, up - hi)
            hi = up
        return Extent(lo, hi - lo)

    def _take_range(self, start: int, offset: int, length: int) -> None:
        """Remove ``[offset, offset+length)`` from the free extent at ``start``, which holds it."""
        total = self._lengths[start]
        self._take(start, total)
        if offset > start:
            self._insert_free(Extent(start, offset - start))
        self._insert_free(Extent(offset + length, start + total - offset - length))

    def _insert_free(self, extent: Extent) -> None:
        if extent.length <= 0:
            return
        i = bisect.bisect_left(self._starts, extent.offset)
        start, length = extent.offset, extent.length
        if i < len(self._starts) and self._starts[i] < extent.end:
            raise ValueError(f"freeing {extent} which is already free")
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._lengths[prev] > start:
                raise ValueError(f"freeing {extent} which is already free")
            if prev + self._lengths[prev] == start:
                start = prev
                length += self._lengths.pop(prev)
                del self._starts[i - 1]
                i -= 1
        if i < len(self._starts) and self._starts[i] == extent.end:
            nxt = self._starts[i]
            length += self._lengths.pop(nxt)
            del self._starts[i]
        self._starts.insert(i, start)
        self._lengths[start] = length
