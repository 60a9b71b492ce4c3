"""Warm promotion (docs/agent.md, "Warm promotion"): a reader promoted to writer keeps its
state and replays only the journal tail it has not applied.

The property: over random histories, with a reader lagging k records behind, a torn last
record, or a record pushed to the reader but never written, the warm path (``Volume.adopt``,
falling back to ``Volume.open`` when it refuses) ends in the state a cold open of the same image
gives: same index, applied seq, journal cursor, ring accounting and checkpoint slot, and the
same epoch record written at the same place. At ``start_epoch`` both rebuild the writer's
free map the same way (the checkpoint of their root plus the effects of the records after
it), so free lists and quarantines are equal and the two writers then lay out the same later
writes byte for byte.
"""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.agent import Agent, AgentSettings
from agents.backends.file import FileDevice
from agents.committer import Commit
from agents.core import journal, roles
from agents.core.grants import PUSH, Grant, sign
from agents.core.protocol import PushFrame, RecordPush
from agents.core.record import Record
from agents.core.superblock import SLOTS, Superblock, choose
from agents.device import ALIGN, BlockDevice, short_io
from agents.errors import (
    AgentError,
    AlreadyExists,
    BadPath,
    DeviceError,
    NotEmpty,
    NotFound,
    NotWriter,
    StaleEpoch,
    WrongKind,
)
from agents.volume import Volume

pytestmark = pytest.mark.unit

SIZE = 16 << 20
RING = 128 << 10  # 32 blocks: the writer checkpoints every ~15 records, the ring wraps often
NAMES = ["/a", "/b", "/d/c", "/d/e"]


def _image(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(SIZE)
    dev = FileDevice(str(path))
    try:
        Volume.format(dev, fleet="warm", journal_bytes=RING)
    finally:
        dev.close()
    return path


def _old_writer(path: Path) -> Volume:
    vol = Volume.open(FileDevice(str(path)))
    vol.start_epoch(1)
    return vol


def _reader(path: Path) -> Volume:
    return Volume.open(FileDevice(str(path), read_only=True))


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _last_record_offset(vol: Volume) -> tuple[int, int]:
    """Image offset and length of ``vol``'s last applied record."""
    _, start, nbytes = vol._positions[-1]
    return vol.superblock.journal_offset + start, nbytes


def _pushes_to(reader: Volume) -> Callable[[Commit], None]:
    """A commit listener that applies each group commit to ``reader`` (a push that always
    arrives), each record where it lies in the ring."""
    def push(commit: Commit) -> None:
        for (at, nbytes), record in zip(journal.split(commit.data), commit.records,
                                        strict=True):
            reader.apply(record, commit.start + at, nbytes)
    return push


def _state(vol: Volume) -> dict[str, Any]:
    """What a writer builds on (the allocator is compared apart, see the module docstring)."""
    return {"index": vol._index.snapshot(), "root": (vol._index.root, vol._index.root_seq),
            "applied": vol.applied_seq, "epoch": vol.epoch,
            "cursor": vol._cursor, "used": vol._used, "slot": vol._checkpoint_slot,
            "positions": list(vol._positions)}


def _journal(path: Path, vol: Volume) -> bytes:
    sb = vol.superblock
    with path.open("rb") as f:
        f.seek(sb.journal_offset)
        return f.read(sb.journal_bytes)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(NAMES), st.sampled_from([0, 100, 3000, 5000,
                                                                            20000])),
        st.tuples(st.just("delete"), st.sampled_from(NAMES), st.just("")),
        st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
        st.tuples(st.just("checkpoint"), st.just(""), st.just("")),
        st.tuples(st.just("release"), st.just(""), st.just("")),
    ),
    max_size=40,
)


def _run(old: Volume, reader: Volume, pushed: list[Record], script: list[tuple[str, Any, Any]],
         lag: int) -> None:
    """Run ``script`` on the old writer; the reader applies each push as it comes, except
    the last ``lag`` records (still in flight when the writer dies)."""
    applied = 0
    for i, (op, a, b) in enumerate(script):
        try:
            if op == "put":
                old.put(a, [bytes([i % 251]) * b], b, epoch=1, mtime=float(i))
            elif op == "delete":
                old.delete(a, epoch=1)
            elif op == "rename":
                old.rename(a, b, epoch=1)
            elif op == "checkpoint":
                old.checkpoint()
            else:
                old.release_through(min(old.safe_seq(), reader.safe_seq()))
        except (NotFound, AlreadyExists, WrongKind, NotEmpty, BadPath):
            pass
        for record in pushed[applied : max(len(pushed) - lag, applied)]:
            reader.apply(record)
            applied += 1


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(script=ops, lag=st.integers(0, 6), tail=st.sampled_from(["clean", "torn", "phantom"]))
def test_warm_promotion_equals_a_cold_open(script: list[tuple[str, Any, Any]], lag: int,
                                           tail: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = _image(Path(tmp) / "image")
        old = _old_writer(image)
        reader = _reader(image)
        pushed: list[Record] = []
        old.set_commit_listener(lambda commit: pushed.extend(commit.records))
        _run(old, reader, pushed, script, lag)
        if tail != "clean":
            # the old writer's last put never reaches the medium whole. torn: its header
            # landed, nothing after it (the reader never got it); phantom: nothing landed,
            # but the reader applied its push (after every record before it)
            if tail == "phantom":
                for record in pushed:
                    reader.apply(record)
            old.put("/last", [b"L" * 64], 64, epoch=1, mtime=99.0)
            if tail == "phantom":
                reader.apply(pushed[-1])
                assert reader.applied_seq == old.applied_seq
            offset, nbytes = _last_record_offset(old)
            keep = 52 if tail == "torn" else 0
            _overwrite(image, offset + keep, b"\xff" * (nbytes - keep))
        old.close()  # the old writer dies here (fenced: it writes nothing more)
        warm_image, cold_image = Path(tmp) / "warm", Path(tmp) / "cold"
        shutil.copyfile(image, warm_image)
        shutil.copyfile(image, cold_image)

        warm_dev = FileDevice(str(warm_image))
        reason = reader.adopt(warm_dev)
        warm = reader if reason is None else Volume.open(warm_dev)
        cold = Volume.open(FileDevice(str(cold_image)))
        # warm is used exactly when the reader's state is the image's
        assert reason == ("record_not_on_disk" if tail == "phantom" else None)
        assert _state(warm) == _state(cold)
        newest = cold._newest_checkpoint_seq()

        assert warm.start_epoch(2).seq == cold.start_epoch(2).seq
        assert _journal(warm_image, warm) == _journal(cold_image, cold)
        assert newest <= warm.applied_seq
        assert warm._allocator.free_extents() == cold._allocator.free_extents()
        assert warm._allocator.quarantined() == cold._allocator.quarantined()

        # the same writes after the promotion land in the same places on both images
        for i, size in enumerate([5000, 100, 20000]):
            for vol in (warm, cold):
                vol.put(f"/after{i}", [b"A" * size], size, epoch=2, mtime=1.0)
        for vol in (warm, cold):
            vol.checkpoint()
        assert warm_image.read_bytes() == cold_image.read_bytes()
        assert warm.fsck() == []
        for vol in (warm, cold):
            vol.close()


def test_pinned_read_on_the_reader_survives_a_warm_promotion(tmp_path: Path) -> None:
    """A read in flight on the promoted reader keeps its version: the new writer's safe_seq
    counts its pin, so the extents it reads stay quarantined and are not reused."""
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    reader = _reader(image)
    old.set_commit_listener(_pushes_to(reader))
    body = bytes(range(256)) * 256  # 64 KiB: on extents, not inline (see INLINE_MAX)
    old.put("/f", [body], len(body), epoch=1, mtime=0.0)
    stream = reader.read("/f")
    old.delete("/f", epoch=1)  # frees the extents the stream reads, quarantined at this seq
    freed = reader.applied_seq
    old.close()
    assert reader.adopt(FileDevice(str(image))) is None
    reader.start_epoch(2)
    assert reader.safe_seq() < freed
    reader.release_through(reader.safe_seq())
    assert any(seq == freed for seq, _ in reader._allocator.quarantined())
    for i in range(4):  # would reuse the freed extents first if they had been released
        reader.put(f"/g{i}", [b"x" * len(body)], len(body), epoch=2, mtime=1.0)
    assert b"".join(stream) == body
    reader.close()


def test_adopt_refuses_another_superblock_generation(tmp_path: Path) -> None:
    """A superblock rewritten since the reader opened (another generation) is a state built
    on another image: adopt refuses and leaves the reader as it was."""
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    old.put("/a", [b"a"], 1, epoch=1, mtime=0.0)
    old.close()
    reader = _reader(image)
    before = _state(reader)
    ro = reader._device
    raw = image.read_bytes()[: 2 * ALIGN]
    sb = choose([raw[s : s + ALIGN] for s in SLOTS])
    bumped = Superblock(**{**sb.__dict__, "generation": sb.generation + 1})
    _overwrite(image, bumped.slot, bumped.encode())
    assert reader.adopt(FileDevice(str(image))) == "superblock"
    assert reader._device is ro and _state(reader) == before
    reader.close()


def test_return_to_only_before_the_epoch_record(tmp_path: Path) -> None:
    image = _image(tmp_path / "image")
    _old_writer(image).close()
    reader = _reader(image)
    ro = reader._device
    rw = FileDevice(str(image))
    assert reader.adopt(rw) is None
    assert reader.return_to(ro) and reader._device is ro
    assert reader.adopt(rw) is None
    reader.start_epoch(2)
    assert not reader.return_to(ro) and reader._device is rw
    reader.close()


# -- the agent's promotion path (in process, file backend) ------------------------------------


def _agent(image: Path) -> tuple[Agent, list[BlockDevice]]:
    opened: list[BlockDevice] = []

    def open_device(read_only: bool) -> BlockDevice:
        dev = FileDevice(str(image), read_only=read_only)
        opened.append(dev)
        return dev

    settings_ = AgentSettings(node="r1", fleet="warm", keys=(b"k" * 32,),
                              advertise="127.0.0.1:1")
    agent = Agent(settings_, open_device)
    agent.handle(roles.Started(0))
    return agent, opened


def _metric(agent: Agent, mode: str) -> float:
    return agent.m_promotions.value(mode)


def test_agent_promotes_warm_and_replays_the_tail(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    old.put("/a", [b"a"], 1, epoch=1, mtime=0.0)
    agent, opened = _agent(image)
    assert agent.reader is not None
    volume = agent.reader.volume
    for i in range(5):  # the reader never sees these pushed: the tail is on the image only
        old.put(f"/t{i}", [b"t"], 1, epoch=1, mtime=0.0)
    old.close()
    with caplog.at_level(logging.INFO, logger="agents.agent"):
        agent.handle(roles.PromoteRequested(2))
    assert agent.writer is not None and agent.writer.volume is volume
    assert agent.writer.device is opened[-1] and not opened[-1].read_only
    assert (_metric(agent, "warm"), _metric(agent, "cold")) == (1, 0)
    assert "event=promotion_warm" in caplog.text
    assert [e.path for e in volume.list("/")] == ["/a", *(f"/t{i}" for i in range(5))]
    agent.writer.put("/new", [b"n"], 1, mtime=0.0)
    agent.stop()
    assert Volume.open(FileDevice(str(image), read_only=True)).stat("/new").size == 1


def test_agent_falls_back_to_cold_and_says_why(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    image = _image(tmp_path / "image")
    _old_writer(image).close()
    agent, _ = _agent(image)
    assert agent.reader is not None
    volume = agent.reader.volume
    raw = image.read_bytes()[: 2 * ALIGN]
    sb = choose([raw[s : s + ALIGN] for s in SLOTS])
    bumped = Superblock(**{**sb.__dict__, "generation": sb.generation + 1})
    _overwrite(image, bumped.slot, bumped.encode())
    with caplog.at_level(logging.INFO, logger="agents.agent"):
        agent.handle(roles.PromoteRequested(2))
    assert agent.writer is not None and agent.writer.volume is not volume
    assert (_metric(agent, "warm"), _metric(agent, "cold")) == (0, 1)
    assert "event=promotion_cold node=r1 reason=superblock" in caplog.text
    agent.stop()


def test_failed_warm_promotion_keeps_the_reader_serving(tmp_path: Path) -> None:
    """The image holds a newer epoch than the promotion's (the reader had not seen it):
    start_epoch refuses, the promotion fails, and the reader serves from its own read-only
    handle and its own state again (no reload)."""
    image = _image(tmp_path / "image")
    agent, _ = _agent(image)
    assert agent.reader is not None
    reader = agent.reader
    newer = Volume.open(FileDevice(str(image)))
    newer.start_epoch(5)
    newer.put("/five", [b"5"], 1, epoch=5, mtime=0.0)
    newer.close()
    with pytest.raises(StaleEpoch):
        agent.handle(roles.PromoteRequested(2))
    assert agent.state.role == "reader" and agent.writer is None
    assert agent.reader is reader and reader.volume._device is reader.device
    assert reader.device.read_only
    assert b"".join(reader.volume.read("/five")) == b"5"
    assert _metric(agent, "warm") == 1
    agent.stop()


def test_promoted_reader_takes_the_writers_map_not_its_own(tmp_path: Path) -> None:
    """The old writer released a delete's extents and reused them for tree pages at its
    checkpoint; the reader, which cannot follow tree pages, still quarantines them. Promoted,
    it starts from the checkpoint's map (plus the tail), as a cold open does: never from its
    own, which would hand those pages out again."""
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    reader = _reader(image)
    old.set_commit_listener(_pushes_to(reader))
    size = 32 << 10  # on extents (above INLINE_MAX), the size of a tree page
    old.put("/f", [b"f" * size], size, epoch=1, mtime=0.0)
    old.delete("/f", epoch=1)
    old.release_through(reader.safe_seq())
    old.checkpoint()
    old.put("/g", [b"g" * size], size, epoch=1, mtime=0.0)
    old.close()
    cold = Volume.open(FileDevice(str(image)))
    assert reader.adopt(FileDevice(str(image))) is None
    assert set(reader._allocator.quarantined()) - set(cold._allocator.quarantined())
    cold.start_epoch(2)
    reader.start_epoch(3)
    assert reader._allocator.free_extents() == cold._allocator.free_extents()
    assert reader._allocator.quarantined() == cold._allocator.quarantined()
    assert reader.fsck() == []
    reader.close()
    cold.close()


def test_reader_behind_a_wrap_reloads_inside_adopt(tmp_path: Path) -> None:
    """A reader that fell behind the ring (the writer overwrote its next record) reloads the
    newest checkpoint while adopting: the state is then exactly a cold open's, quarantine too."""
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    reader = _reader(image)
    for i in range(60):  # ~4 rings of records, none pushed to the reader
        old.put(f"/w{i % 7}", [b"w" * 5000], 5000, epoch=1, mtime=float(i))
    old.close()
    assert reader.adopt(FileDevice(str(image))) is None
    cold = Volume.open(FileDevice(str(image), read_only=True))
    assert _state(reader) == _state(cold)
    assert reader._allocator.quarantined() == cold._allocator.quarantined()
    reader.close()
    cold.close()


class _FailingWrites(FileDevice):
    """A read-write handle whose writes fail as a fenced one's do (EIO)."""

    def write_at(self, offset: int, data: object) -> None:
        raise DeviceError("write failed", op="write", errno=errno.EIO)


def test_promotion_failing_after_start_epoch_reopens_the_reader(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The epoch record's write fails: the adopted volume may hold a record that is not
    durable, so it is no reader's any more: the agent drops it and opens the image again."""
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    old.put("/a", [b"a"], 1, epoch=1, mtime=0.0)
    old.close()

    def open_device(read_only: bool) -> BlockDevice:
        return FileDevice(str(image), read_only=True) if read_only else _FailingWrites(
            str(image))

    agent = Agent(AgentSettings(node="r1", fleet="warm", keys=(b"k" * 32,),
                                advertise="127.0.0.1:1"), open_device)
    agent.handle(roles.Started(0))
    assert agent.reader is not None
    before = agent.reader
    with caplog.at_level(logging.INFO, logger="agents.agent"), pytest.raises(DeviceError):
        agent.handle(roles.PromoteRequested(2))
    assert "event=promotion_undo_reopens node=r1" in caplog.text
    assert agent.state.role == "reader" and agent.writer is None
    assert agent.reader is not None and agent.reader is not before
    assert agent.reader.volume is not before.volume
    assert b"".join(agent.reader.volume.read("/a")) == b"a"
    agent.stop()


def test_a_push_reaching_the_reader_during_a_promotion_waits_and_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push that passed its grant check (here: one of the promotion's own epoch, which
    only a competing writer could send) waits for the role lock the promotion holds, then
    meets a writer and is refused: nothing enters the state between adopt's checks and the
    epoch record."""
    image = _image(tmp_path / "image")
    old = _old_writer(image)
    agent, _ = _agent(image)
    pushed: list[Commit] = []
    old.set_commit_listener(pushed.append)
    old.put("/p", [b"p"], 1, epoch=1, mtime=0.0)
    old.close()
    entered, release = threading.Event(), threading.Event()
    adopt = Volume.adopt

    def slow_adopt(volume: Volume, device: BlockDevice) -> str | None:
        entered.set()
        assert release.wait(10)
        return adopt(volume, device)

    monkeypatch.setattr(Volume, "adopt", slow_adopt)
    promotion = threading.Thread(target=agent.handle, args=(roles.PromoteRequested(2),))
    promotion.start()
    assert entered.wait(10)
    token = sign(Grant("warm", "r1", PUSH, 2, time.time() + 60, subject="w"), b"k" * 32)
    push = RecordPush(fleet="warm", epoch=2, writer="w", commit_seq=pushed[-1].records[-1].seq,
                      frames=(PushFrame(pushed[-1].start, pushed[-1].data),))
    outcome: list[object] = []
    sender = threading.Thread(target=lambda: outcome.append(_outcome(agent, token, push)))
    sender.start()
    sender.join(0.5)
    assert sender.is_alive() and not outcome  # waiting for the promotion
    release.set()
    promotion.join(10)
    sender.join(10)
    assert agent.writer is not None
    assert isinstance(outcome[0], NotWriter)
    agent.stop()


def _outcome(agent: Agent, token: str, push: RecordPush) -> object:
    try:
        return agent.receive_push(token, push)
    except AgentError as exc:
        return exc


def test_a_read_failing_right_after_the_promotion_does_not_step_the_new_writer_down(
        tmp_path: Path) -> None:
    """A read that began on the reader's read-only disk (unplugged for the promotion) fails
    once the node is the writer: no evidence of a fence, the writer stays; a failed write is."""
    image = _image(tmp_path / "image")
    _old_writer(image).close()
    agent, _ = _agent(image)
    agent.handle(roles.PromoteRequested(2))
    assert agent.writer is not None
    agent.fenced(short_io("read", 9474048))
    assert agent.state.role == "writer" and agent.writer is not None
    agent.fenced(DeviceError("write at 0 failed", op="write", errno=errno.EIO))
    assert agent.state.role == "reader"
    agent.stop()
