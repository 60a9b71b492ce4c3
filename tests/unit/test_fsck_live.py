"""fsck on an image whose writer keeps working: what the writer changes under the check is
never reported as damage, and real damage still is (agents/fsck.py, ``check``)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from agents import fsck
from agents.device import ALIGN
from agents.testing import MemoryDevice
from agents.volume import Volume

pytestmark = pytest.mark.unit

SIZE = 64 << 20


class _Interrupting(MemoryDevice):
    """A read-only view whose ``n``-th read first lets ``action`` run (the live writer)."""

    n = 0
    reads = 0
    action: Callable[[], None] = staticmethod(lambda: None)

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads += 1
        if self.reads == self.n:
            self.action()
        return super().read_at(offset, length)


def _writer(medium: MemoryDevice) -> Volume:
    """A writer of 60 files (one checkpoint in), then 30 deleted and 40 put after it."""
    Volume.format(medium, fleet="live", journal_bytes=1 << 20)
    writer = Volume.open(medium)
    writer.start_epoch(1)
    for i in range(60):
        size = 3000 if i % 2 else 70_000
        writer.put(f"/a/{i}", [os.urandom(size)], size, epoch=1, mtime=0.0)
    writer.checkpoint()
    for i in range(30):
        writer.delete(f"/a/{i}", epoch=1)
    for i in range(40):
        writer.put(f"/b/{i}", [os.urandom(3000)], 3000, epoch=1, mtime=0.0)
    return writer


def _work(writer: Volume) -> Callable[[], None]:
    """At rest, then more: idle checkpoints with their frees released (pages of the
    checkpoint fsck loaded get reused), deletes and puts, and rest again."""
    def rest() -> None:
        for _ in range(3):
            writer.checkpoint_if_idle(0.0)
            writer.release_through(writer.safe_seq())

    def work() -> None:
        rest()
        for i in range(30, 45):
            writer.delete(f"/a/{i}", epoch=1)
        for i in range(20):
            writer.put(f"/c/{i}", [os.urandom(9000)], 9000, epoch=1, mtime=0.0)
        rest()
    return work


def _view(medium: MemoryDevice) -> _Interrupting:
    view = medium.reopen(read_only=True)
    view.__class__ = _Interrupting
    assert isinstance(view, _Interrupting)
    return view


def test_a_writer_working_at_any_point_of_the_check_is_never_reported_as_damage() -> None:
    quiet = MemoryDevice(SIZE)
    _writer(quiet)
    reads = _view(quiet)
    assert fsck.check(reads) == []
    for n in range(1, reads.reads + 1):
        medium = MemoryDevice(SIZE)
        writer = _writer(medium)
        view = _view(medium)
        view.n, view.action = n, _work(writer)
        assert fsck.check(view) == [], f"the writer worked at read {n} of the check"


def test_damage_on_a_quiet_image_is_reported_once_and_not_blamed_on_a_writer() -> None:
    medium = MemoryDevice(SIZE)
    writer = _writer(medium)
    writer.checkpoint()
    victim = next(n for n in writer.walk() if n.entry.kind == "file" and n.extents)
    offset = victim.extents[0].offset
    medium.write_at(offset, b"\xff" * ALIGN)
    problems = fsck.check(_view(medium))
    assert [p.kind for p in problems] == ["checksum"]
    assert victim.entry.path in problems[0].location


def test_damage_under_a_writer_that_never_rests_says_the_check_may_have_raced_it() -> None:
    medium = MemoryDevice(SIZE)
    writer = _writer(medium)
    writer.checkpoint()
    victim = next(n for n in writer.walk() if n.entry.kind == "file" and n.extents)
    medium.write_at(victim.extents[0].offset, b"\xff" * ALIGN)
    view = _view(medium)
    counter = iter(range(10**6))

    def keeps_writing() -> None:
        writer.put(f"/busy/{next(counter)}", [b"x" * 100], 100, epoch=1, mtime=0.0)
        view.n = view.reads + 5  # and again a few reads later

    view.n, view.action = 3, keeps_writing
    problems = fsck.check(view)
    assert [p.kind for p in problems] == ["checksum", "live"]
