"""The circular metadata journal: where records go and which ones count.

Positions are byte offsets inside the journal region (the ring), multiples of 4 KiB.

Invariants:
- Placement: a record of ``n`` bytes goes at the current position ``pos`` if it fits before
  the end of the ring, else at 0. Writer, reader and fsck use this one rule
  (:func:`place`), so a reader that applied a pushed record knows where the next one starts.
- Chain: starting from a checkpoint (``seq``, ``pos``), record ``seq + 1`` is the valid record
  at ``place(pos)`` (tried at ``pos``, then at 0) with that seq and an epoch no lower than the
  highest seen. The chain ends at the first position where no such record is found: that is
  the torn or not-yet-written tail. A record with a lower epoch ends it too (a fenced writer's
  late write is never part of the history).
- Write order: the records of one group commit may reach the medium in any order (one
  device write per contiguous run, two when the batch wraps, and a write spanning RBD objects
  completes object by object); none of them is acknowledged before the flush that follows
  all of them, and the next group commit is written only after that flush. So after a crash
  any subset of the last batch may be on disk, and nothing after the batch exists.
- ``commit_seq`` of a record is the highest seq durable (flushed, hence possibly
  acknowledged) when it was written: it is below every seq of its own batch. A valid record
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

from agents.core.record import Record


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
    """A valid record seen in the ring (CRC checked, payload not parsed) and where it starts."""

    start: int
    seq: int
    epoch: int
    commit_seq: int


def place(pos: int, nbytes: int, ring: int) -> int:
    """Start of a record of ``nbytes`` written when the head is at ``pos``."""
    if nbytes > ring:
        raise ValueError(f"record of {nbytes} bytes is larger than the {ring}-byte journal")
    return pos if pos + nbytes <= ring else 0


def candidates(pos: int, ring: int) -> list[int]:
    """Where the record after head ``pos`` may start: ``pos`` itself, else the ring start."""
    if pos >= ring:
        return [0]
    return [pos] if pos == 0 else [pos, 0]


def consumed(pos: int, start: int, nbytes: int, ring: int) -> int:
    """Ring bytes used by writing ``nbytes`` at ``start`` when the head was at ``pos``: the
    record, plus the skipped end of the ring when it wrapped to 0."""
    skipped = ring - pos if start == 0 and pos != 0 else 0
    return skipped + nbytes


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
