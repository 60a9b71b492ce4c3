"""Packed journal records through the real Volume: any sequence of group commits, the last
one torn at any set of 512-byte sectors, opens to exactly the durable prefix; a corrupt
record that a later commit vouches for is reported with its witness, never dropped."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import fsck
from agents.committer import Commit
from agents.core import journal
from agents.errors import BadRequest, ChecksumMismatch
from agents.testing import MemoryDevice
from agents.volume import Volume

pytestmark = pytest.mark.unit

SIZE = 16 << 20
RING = 64 << 10  # small: a few dozen commits wrap it and trigger checkpoints
SECTOR = 512

# one group commit: the name lengths of its mkdir records (record sizes vary with them)
batches = st.lists(st.lists(st.integers(1, 240), min_size=1, max_size=6), min_size=1,
                   max_size=14)


def _volume() -> tuple[MemoryDevice, Volume]:
    dev = MemoryDevice(SIZE)
    Volume.format(dev, fleet="pack", journal_bytes=RING)
    vol = Volume.open(dev)
    vol.start_epoch(1)
    return dev, vol


def _commit(vol: Volume, names: list[int], serial: list[int]) -> list[int]:
    """One group commit of mkdirs; the seqs it made durable."""
    tickets = []
    for length in names:
        serial[0] += 1
        path = f"/d{serial[0]}-" + "x" * length
        tickets.append(vol._ticket("mkdir", {"path": path, "parents": False, "mtime": 0.0}, 1))
    vol._write_batch(tickets)
    return [t.record.seq for t in tickets if t.record is not None]


def _where(vol: Volume, seqs: list[int]) -> list[tuple[int, int]]:
    """(ring start, bytes) of each of ``seqs``, from the writer's own bookkeeping."""
    spans = {seq: (start, n) for seq, start, n in vol._positions}
    return [spans[s] for s in seqs]


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.data())
def test_a_torn_last_commit_leaves_exactly_the_durable_prefix(
        plan: list[list[int]], data: st.DataObject) -> None:
    dev, vol = _volume()
    serial = [0]
    for names in plan[:-1]:
        _commit(vol, names, serial)
    base = vol.applied_seq
    journal_at = vol.superblock.journal_offset
    before = dev.read_at(journal_at, RING)
    _commit(vol, plan[-1], serial)
    # every record of the write, a checkpoint record leading it included (format 2)
    last = list(range(base + 1, vol.applied_seq + 1))
    written = dev.read_at(journal_at, RING)
    spans = _where(vol, last)
    lo, hi = spans[0][0], journal.align_up(spans[-1][0] + spans[-1][1])
    assert lo % 4096 == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))  # packed
    # the power cut: each sector of the last commit's write landed or not, independently
    for sector in data.draw(st.sets(st.sampled_from(range(lo // 512, hi // 512)))):
        dev.corrupt(journal_at + sector * 512, before[sector * 512 : (sector + 1) * 512])
    after = dev.read_at(journal_at, RING)
    intact = 0  # the chain reaches a record only through every one before it
    while intact < len(spans):
        at, n = spans[intact]
        if after[at : at + n] != written[at : at + n]:
            break
        intact += 1
    reopened = Volume.open(dev.reopen(read_only=True))
    assert reopened.applied_seq == base + intact
    assert fsck.check(dev.reopen(read_only=True)) == []


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(batches.filter(lambda plan: len(plan) >= 2), st.data())
def test_a_corrupt_record_vouched_for_by_a_later_commit_is_reported(
        plan: list[list[int]], data: st.DataObject) -> None:
    dev, vol = _volume()
    serial = [0]
    earlier: list[int] = []
    for names in plan[:-1]:
        earlier += _commit(vol, names, serial)
    _commit(vol, plan[-1], serial)  # whole: its records' commit_seq covers every earlier seq
    checkpointed = max(h.seq for h in vol._checkpoint_headers() if h is not None)
    on_disk = {seq for seq, _, _ in vol._positions}
    exposed = [s for s in earlier if s > checkpointed and s in on_disk]
    if not exposed:
        return  # every earlier record is behind the checkpoint: nothing to corrupt
    victim = data.draw(st.sampled_from(exposed))
    (at, n), = _where(vol, [victim])
    offset = vol.superblock.journal_offset + at + data.draw(st.integers(0, n - 1))
    dev.corrupt(offset, bytes([dev.read_at(offset - offset % 4096, 4096)[offset % 4096] ^ 0xFF]))
    with pytest.raises(ChecksumMismatch, match=f"seq {victim} is corrupt") as info:
        Volume.open(dev.reopen(read_only=True))
    assert info.value.fields["seq"] == victim
    problems = fsck.check(dev.reopen(read_only=True))
    assert [p.kind for p in problems] == ["journal"]
    assert f"seq {victim}" in problems[0].location


def test_a_pushed_record_is_applied_only_where_the_next_one_may_start() -> None:
    dev, vol = _volume()
    reader = Volume.open(dev.reopen(read_only=True))
    pushed: list[Commit] = []
    vol.set_commit_listener(pushed.append)
    _commit(vol, [5, 9], [0])
    commit = pushed[-1]
    (a, n), (b, m) = journal.split(commit.data)
    first, second = commit.records
    with pytest.raises(BadRequest):  # not after the record the reader holds
        reader.apply(first, commit.start + 8, n)
    reader.apply(first, commit.start + a, n)
    with pytest.raises(BadRequest) as refused:  # inside the record before it
        reader.apply(second, commit.start + b - 8, m)
    # the refusal says where the reader's last record lies and how it came (diagnosis)
    assert (f"({first.seq}, {commit.start + a}, {n}), read from the push"
            in refused.value.message), refused.value.message
    reader.apply(second, commit.start + b, m)
    assert reader.applied_seq == second.seq and reader.journal_head == vol.journal_head
