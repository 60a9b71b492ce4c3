"""The circular metadata journal: where records go and which ones count.

Positions are byte offsets inside the journal region (the ring). Records are packed: the
records of one group commit (a *batch*) lie back to back, and only the batch as a whole is
padded to the 4 KiB boundary O_DIRECT needs, so a batch starts on a 4 KiB boundary and a
record anywhere.

Invariants:
- Placement, the one rule (:func:`candidates`, :func:`place_batch`, :func:`split`) that the
  writer, the readers (who apply pushed records and must know where the next one starts)
  and fsck share: the record after one that ended at ``pos`` starts at ``pos`` (the next
  record of the same batch), else at the next 4 KiB boundary (a new batch that fit before
  the end of the ring), else at 0 (a new batch that wrapped). A follower tries them in that
  order; the writer puts a batch of ``n`` padded bytes at the boundary if it fits, else at 0.
- Chain: starting from a checkpoint (``seq``, ``pos``), record ``seq + 1`` is the valid record
  at the first of :func:`candidates` (``pos``) holding that seq with an epoch no lower than
  the highest seen. The chain ends at the first position where no such record is found: that
  is the torn or not-yet-written tail. A record with a lower epoch ends it too (a fenced
  writer's late write is never part of the history).
- Write order: the records of one group commit may reach the medium in any order (one
  device write per batch, and a write spanning RBD objects or sectors completes piece by
  piece), and so may the few group commits in flight at once (the writer numbers and writes
  the next batch while earlier ones are being written). None is acknowledged before the
  flush that follows it and before every batch numbered earlier was acknowledged. So after a
  crash any subset of the last few batches may be on disk: a later batch whole while an
  earlier one is torn.
- A torn batch: a record cut by a missing piece fails its seal, so the chain ends there (the
  records after it in the batch cannot be reached: their start is only known from the
  lengths before them, and a later batch's first seq is not the missing one). Padding,
  stale bytes and a client's inline bytes never look like the next record: that needs the
  exact next seq, the volume's tag and a valid seal (keyed with the volume's record key,
  which no client knows: :mod:`agents.core.record`).
- ``commit_seq`` of a record is the highest seq durable (flushed, hence possibly
  acknowledged) when it was numbered: it is below every seq of its own batch and of every
  batch still in flight then. A valid record
  beyond the chain's end with ``commit_seq`` >= the first missing seq proves that seq was
  durable: the journal is corrupt, not torn (:func:`proves_corruption`). Without such a
  witness, nothing at or after the missing seq was ever acknowledged: it is the torn tail.
- Reading order (a writer may be live while another node checks the end): witnesses must be
  read BEFORE the chain is followed. A witness read at time t1 shows its ``commit_seq`` was
  on disk before t1; if a walk started after t1 does not find the missing seq at its place,
  either it was corrupted or the writer wrapped over it, which it only does after writing a
  checkpoint at or above it. Hence: accuse only when no checkpoint reaches the missing seq.
  (Scanning after the walk would let a live writer write the missing record and its witness
  in between: a false accusation.)
- Space: the writer never overwrites bytes from the newest checkpoint's ``journal_pos`` up to
  its head (it counts :func:`consumed` bytes since that checkpoint and checkpoints before the
  count would reach the ring size), so every record after the newest checkpoint is on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agents.core.record import HEADER, Record
from agents.device import ALIGN
from agents.errors import TornRecord


class Numbered(Protocol):
    """What the end-of-journal check needs of a record (a Record or a :class:`Witness`)."""

    @property
    def seq(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def commit_seq(self) -> int: ...


@dataclass(frozen=True)
class Witness:
    """A valid record seen in the ring (seal checked, payload not parsed) and where it starts."""

    start: int
    seq: int
    epoch: int
    commit_seq: int


def align_up(pos: int) -> int:
    """``pos`` rounded up to the 4 KiB boundary a batch starts on."""
    return -(-pos // ALIGN) * ALIGN


def place_batch(pos: int, nbytes: int, ring: int) -> int:
    """Start of a batch of ``nbytes`` (padded to 4 KiB) written when the last record ended at
    ``pos``: the next 4 KiB boundary if the batch fits before the end of the ring, else 0."""
    if nbytes > ring:
        raise ValueError(f"batch of {nbytes} bytes is larger than the {ring}-byte journal")
    start = align_up(pos)
    return start if start + nbytes <= ring else 0


def candidates(pos: int, ring: int) -> list[int]:
    """Where the record after one that ended at ``pos`` may start, in the order a follower
    tries them: ``pos`` (same batch), the next 4 KiB boundary (a new batch), 0 (a new batch
    that wrapped)."""
    out: list[int] = []
    for start in (pos, align_up(pos), 0):
        if start < ring and start not in out:
            out.append(start)
    return out


def split(data: bytes | memoryview) -> list[tuple[int, int]]:
    """(offset, length) of each record packed in ``data`` (one batch's records, back to back,
    without the batch's padding). TornRecord when the bytes are not exactly whole records."""
    out: list[tuple[int, int]] = []
    at = 0
    while at < len(data):
        length = Record.peek_length(data[at : at + HEADER.size])
        if length is None or at + length > len(data):
            raise TornRecord("packed journal records do not add up", offset=at)
        out.append((at, length))
        at += length
    return out


def consumed(pos: int, start: int, nbytes: int, ring: int) -> int:
    """Ring bytes used by writing ``nbytes`` at ``start`` when the last record ended at
    ``pos``: the record, plus what was skipped before it (the padding up to a batch's
    boundary, or the end of the ring when it wrapped to 0)."""
    skipped = start - pos if start >= pos else ring - pos + start
    return skipped + nbytes


def stale_spans(dirty: int, keep: int, head: int, ring: int) -> list[tuple[int, int]]:
    """Ring bytes to give back: the span from ``dirty`` forward to ``keep`` (bytes that may
    still hold records no one needs), less whatever the live span from ``keep`` forward to
    ``head`` has since wrapped over; as (start, length) pieces inside the ring.

    Positions are ring offsets (``head`` may equal ``ring``: a batch that ended at its end).
    The live span is never touched: when it has wrapped into the stale one, the stale span
    starts at ``head`` instead."""
    dirty, keep, head = dirty % ring, keep % ring, head % ring
    stale = (keep - dirty) % ring
    live = (head - keep) % ring
    if stale + live > ring:  # the head wrapped over the stale span's start
        dirty, stale = head, ring - live
    if stale == 0:
        return []
    first = min(stale, ring - dirty)
    pieces = [(dirty, first)]
    if stale > first:
        pieces.append((0, stale - first))
    return pieces


@dataclass
class Cursor:
    """Where the chain stands: next record's head position, next seq, highest epoch."""

    pos: int
    next_seq: int
    epoch: int

    def accepts(self, record: Record) -> bool:
        """True when ``record`` is the next link of the chain."""
        return record.seq == self.next_seq and record.epoch >= self.epoch

    def advance(self, start: int, record_bytes: int) -> None:
        """Move past a record of ``record_bytes`` that started at ``start``."""
        self.pos = start + record_bytes
        self.next_seq += 1


def proves_corruption(orphan: Numbered, missing_seq: int, chain_epoch: int) -> bool:
    """True when a valid record found past the chain's end shows that ``missing_seq`` had
    been made durable (so the chain was broken by corruption, not by a torn write)."""
    return (
        orphan.seq >= missing_seq
        and orphan.commit_seq >= missing_seq
        and orphan.epoch >= chain_epoch
    )
