"""docs/format.md is complete: tests/format_reader.py, written from the document alone, reads
images the engine wrote and sees exactly what the engine (and a fresh open) sees, and what the
test wrote. A change of the format that the document does not follow fails here."""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agents.backends.file import FileDevice
from agents.errors import ChecksumMismatch
from agents.volume import Volume
from tests.format_reader import FileInfo, FormatError, Image, Record, read_image

pytestmark = pytest.mark.unit

MiB = 1 << 20
View = dict[str, tuple[str, int, int, int, float, int | None, bytes | None]]


class Harness:
    """A file-backed image, its writer, and the bytes the test put (None: a directory)."""

    def __init__(self, path: Path, size: int, journal_bytes: int | None = None) -> None:
        self.path = path
        with self.path.open("wb") as f:
            f.truncate(size)
        self.devices: list[FileDevice] = []
        self.volumes: list[Volume] = []
        dev = self.device(False)
        Volume.format(dev, fleet="fmt", journal_bytes=journal_bytes)
        self.epoch = 1
        self.vol = self.open(dev)
        self.vol.start_epoch(self.epoch)
        self.sb = read_image(str(path)).superblock  # the geometry: fixed at format
        self.wrote: dict[str, bytes | None] = {}

    def device(self, read_only: bool) -> FileDevice:
        dev = FileDevice(self.path, read_only)
        self.devices.append(dev)
        return dev

    def open(self, dev: FileDevice) -> Volume:
        vol = Volume.open(dev)
        self.volumes.append(vol)
        return vol

    def close(self) -> None:
        for vol in self.volumes:
            vol.close()
        for dev in self.devices:
            dev.close()

    def promote(self, epoch: int) -> None:
        """A new writer (cold open, higher epoch) takes over from the current one."""
        self.vol.close()
        self.vol = self.open(self.device(False))
        self.epoch = epoch
        self.vol.start_epoch(epoch)

    def _parents(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        while parent:
            self.wrote.setdefault(parent, None)
            parent = parent.rsplit("/", 1)[0]

    def put(self, path: str, data: bytes, mtime: float = 1000.25) -> None:
        pieces = (data[i : i + 300_000] for i in range(0, len(data), 300_000))
        self.vol.put(path, pieces, len(data), epoch=self.epoch, mtime=mtime)
        self._parents(path)
        self.wrote[path] = data

    def mkdir(self, path: str, parents: bool = False) -> None:
        self.vol.mkdir(path, epoch=self.epoch, parents=parents)
        self._parents(path)
        self.wrote[path] = None

    def delete(self, path: str) -> None:
        self.vol.delete(path, epoch=self.epoch)
        self.vol.release_through(self.vol.applied_seq)
        del self.wrote[path]

    def rename(self, src: str, dst: str) -> None:
        self.vol.rename(src, dst, epoch=self.epoch)
        self.vol.release_through(self.vol.applied_seq)
        for p in [p for p in self.wrote if p == src or p.startswith(src + "/")]:
            self.wrote[dst + p[len(src) :]] = self.wrote.pop(p)

    def checkpoint(self) -> None:
        self.vol.checkpoint()
        self.vol.release_through(self.vol.applied_seq)

    def check(self) -> Image:
        """The independent reader's view == the writer's == a fresh open's == what was put."""
        image = read_image(str(self.path))
        mine = {p: _info(f) for p, f in image.files.items()}
        assert mine == engine_view(self.vol)
        assert mine == engine_view(self.open(self.device(True)))
        assert {p: f.data for p, f in image.files.items()} == self.wrote
        assert image.applied_seq == self.vol.applied_seq
        assert image.epoch == self.epoch
        return image


def _info(f: FileInfo) -> tuple[str, int, int, int, float, int | None, bytes | None]:
    return (f.kind, f.size, f.version, f.epoch, f.mtime, f.crc, f.data)


def engine_view(vol: Volume) -> View:
    view: View = {}
    todo = ["/"]
    while todo:
        for e in vol.list(todo.pop()):
            data = b"".join(vol.read(e.path)) if e.kind == "file" else None
            view[e.path] = (e.kind, e.size, e.version, e.epoch, e.mtime, e.crc, data)
            if e.kind == "dir":
                todo.append(e.path)
    return view


Make = Callable[..., Harness]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """``make(size, journal_bytes=None)`` -> a Harness on a new image file."""
    made: list[Harness] = []

    def factory(size: int, journal_bytes: int | None = None) -> Harness:
        made.append(Harness(tmp_path / f"image{len(made)}", size, journal_bytes))
        return made[-1]

    yield factory
    for h in made:
        h.close()


def _fill(h: Harness, prefix: str) -> None:
    """Small (inline), boundary and multi-chunk files, nested directories, a delete, two
    overwrites, a mkdir -p of an existing directory, renames of a file (over a file, onto
    itself) and of a directory with children."""
    rnd = os.urandom
    sb = h.sb
    h.put(f"{prefix}/empty", b"")
    h.put(f"{prefix}/tiny", b"tiny")
    h.put(f"{prefix}/a/b/leafdata", rnd(3 * 1024))  # stays in its leaf after a checkpoint
    h.put(f"{prefix}/a/b/home", rnd(5000))  # moves home at a checkpoint
    h.put(f"{prefix}/a/inline-max", rnd(sb.inline_max))
    h.put(f"{prefix}/a/stored-min", rnd(sb.inline_max + 1))
    h.put(f"{prefix}/a/big", rnd(3 * MiB + 12345))
    h.put(f"{prefix}/a/bigger", rnd(5 * MiB))
    h.mkdir(f"{prefix}/x/y/z", parents=True)
    h.mkdir(f"{prefix}/x/y/z", parents=True)  # mkdir -p of an existing directory
    h.mkdir(f"{prefix}/x/empty")
    h.put(f"{prefix}/doomed", rnd(2 * MiB))
    h.delete(f"{prefix}/doomed")
    h.delete(f"{prefix}/x/empty")
    h.put(f"{prefix}/tiny", rnd(2 * MiB + 1))  # small -> large
    h.put(f"{prefix}/a/big", b"small again")  # large -> small
    h.put(f"{prefix}/victim", b"replaced by a rename")
    h.rename(f"{prefix}/a/stored-min", f"{prefix}/victim")  # a file replaces a file
    h.rename(f"{prefix}/a", f"{prefix}/x/y/z/a")  # a directory with children
    h.rename(f"{prefix}/victim", f"{prefix}/victim")  # onto itself: a record, no change


def test_fresh_image_is_empty(make: Make) -> None:
    h = make(16 * MiB)
    image = h.check()
    assert image.files == {}
    assert (image.checkpoint.seq, image.checkpoint.root) == (0, None)
    assert [r.op for r in image.records] == ["epoch-start"]


@pytest.mark.parametrize("layout", ["journal-only", "tree-and-tail", "tree-only"])
def test_reader_agrees_with_engine(make: Make, layout: str) -> None:
    h = make(64 * MiB)
    _fill(h, "/one")
    if layout != "journal-only":
        h.checkpoint()
    if layout == "tree-and-tail":
        _fill(h, "/two")  # records after the checkpoint, over paths of the tree too
        h.put("/one/empty", b"now with bytes")
        h.rename("/one/x", "/two/moved-x")
        h.delete("/one/tiny")
    image = h.check()
    ops = [r.op for r in image.records]
    if layout == "journal-only":
        assert image.checkpoint.root is None and image.checkpoint.seq == 0
        assert {"put", "delete", "mkdir", "rename", "epoch-start"} <= set(ops)
    elif layout == "tree-only":
        assert image.checkpoint.root is not None and ops == ["checkpoint"]
    else:
        assert image.checkpoint.root is not None and ops[0] == "checkpoint"
        assert {"put", "delete", "mkdir", "rename"} <= set(ops[1:])
    # the whole-file CRCs the records and entries carry are the files' own
    for f in image.files.values():
        assert f.kind == "dir" or f.crc == zlib.crc32(f.data or b"")


def test_multi_level_tree(make: Make) -> None:
    h = make(32 * MiB)
    # long keys make a small fan-out: ~8 keys a leaf, ~8 children a branch
    deep = "/" + "/".join(["d" * 250] * 15)
    for i in range(400):
        h.put(f"{deep}/f{i:04d}", i.to_bytes(2, "little") * (i % 7))
    h.checkpoint()
    for i in range(0, 400, 37):
        h.delete(f"{deep}/f{i:04d}")
    h.put(f"{deep}/after", b"tail")
    image = h.check()
    assert image.tree.levels >= 3 and image.tree.branches > 1
    assert len(image.records) > 1


def test_overflow_value(make: Make) -> None:
    """Near full, a checkpoint leaves an inline file above the leaf limit in its tree value,
    which then takes overflow pages (docs/format.md, Small files)."""
    h = make(16 * MiB)
    sb = h.sb
    reserve = max(4, min(2048, sb.data_bytes // 64 // 32768)) * 32768
    h.put("/filler", bytes(h.vol.free_bytes() - reserve - 32 * 1024))
    h.put("/inline", os.urandom(sb.inline_max))
    h.checkpoint()
    image = h.check()
    assert image.tree.overflow_pages >= 1


def test_ring_wraps(make: Make) -> None:
    h = make(16 * MiB, journal_bytes=64 * 1024)
    wrapped = False
    for i in range(400):
        h.put(f"/r/{i % 23}", os.urandom(200 + 37 * i % 1500))
        if i % 5 == 0:
            h.rename(f"/r/{i % 23}", f"/r/moved{i % 3}")
        offsets = [r.offset for r in read_image(str(h.path)).records]
        wrapped = any(b < a for a, b in itertools.pairwise(offsets))
        if wrapped and i > 50:
            break
    assert wrapped
    h.check()


def test_new_writer_epoch(make: Make) -> None:
    h = make(16 * MiB)
    h.put("/e/one", b"written at epoch 1")
    h.mkdir("/e/dir")
    h.promote(7)
    h.put("/e/dir/two", b"written at epoch 7")
    h.rename("/e/one", "/e/dir/one")
    image = h.check()
    assert any(r.op == "epoch-start" and r.epoch == 7 for r in image.records)
    assert image.files["/e/dir/one"].epoch == 7  # a rename gives the moved entry its epoch


def _flip_last_byte(h: Harness, rec: Record) -> None:
    """Break ``rec``'s seal on the image (a torn or corrupt write of it)."""
    at = h.sb.journal_offset + rec.offset + rec.length - 1
    with h.path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_torn_tail_is_dropped_like_the_engine_does(make: Make) -> None:
    h = make(16 * MiB)
    h.put("/t/kept", b"kept")
    h.put("/t/torn", b"torn")
    last = read_image(str(h.path)).records[-1]
    assert last.payload["path"] == "/t/torn"
    h.vol.close()
    _flip_last_byte(h, last)
    del h.wrote["/t/torn"]
    image = read_image(str(h.path))
    assert {p: f.data for p, f in image.files.items()} == h.wrote
    fresh = h.open(h.device(True))
    assert {p: _info(f) for p, f in image.files.items()} == engine_view(fresh)
    assert image.applied_seq == fresh.applied_seq == last.seq - 1


def test_a_witnessed_gap_is_refused_like_the_engine_does(make: Make) -> None:
    """A broken record followed by one whose commit_seq covers it is corruption, not a torn
    tail: the reader and the engine both refuse the image (docs/format.md, Torn tail)."""
    h = make(16 * MiB)
    for name in ("one", "two", "three"):  # one group commit each
        h.put(f"/w/{name}", name.encode())
    *_, middle, last = read_image(str(h.path)).records
    assert last.commit_seq >= middle.seq
    h.vol.close()
    _flip_last_byte(h, middle)
    with pytest.raises(FormatError, match=f"seq {middle.seq} missing"):
        read_image(str(h.path))
    with pytest.raises(ChecksumMismatch):
        h.open(h.device(True))


def test_a_corrupt_tree_page_is_refused_like_the_engine_does(make: Make) -> None:
    h = make(16 * MiB)
    h.put("/c/file", b"x")
    h.checkpoint()
    image = read_image(str(h.path))
    assert image.checkpoint.root is not None
    at = image.checkpoint.root[0] * 4096 + 100
    h.vol.close()
    with h.path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FormatError, match="bad crc"):
        read_image(str(h.path))
    # the engine opens (slot A and the journal before the checkpoint record are whole) and
    # meets the page when it reads the tree, as the reader does when it walks it
    with pytest.raises(ChecksumMismatch, match="metadata page"):
        engine_view(h.open(h.device(True)))
