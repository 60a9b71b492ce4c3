"""Hostile images on the file backend: garbage pages, lengths past the device, compression
bombs, malformed checkpoints and tree roots, records whose checksum is right but whose
content is not. Each gives the project's clear error (a refused open: a FormatError) or a
problem report from fsck, quickly; never a TypeError, a RecursionError, a zlib.error, a
hang or a memory blow-up.

The structures are forged with their checksums right (an attacker, or a buggy writer, can do
that), journal records sealed with the volume's key (whoever can write the image can read the
key in its superblock): only the decoders' own bounds stand between them and the agent.
(Bytes that a *client* plants in the ring, without the key: tests/unit/test_record_forgery.py.)
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents import fsck
from agents.backends.file import FileDevice
from agents.core import checkpoint as ckpt
from agents.core import record as rec
from agents.core.allocator import Extent
from agents.core.record import Record, RecordKey
from agents.core.superblock import FIXED, SLOTS, Superblock, choose
from agents.device import ALIGN
from agents.errors import AgentError, CorruptMetadata, FormatError
from agents.volume import Volume

pytestmark = pytest.mark.unit

SIZE = 8 << 20
FAST = 5.0  # seconds: every refusal here is a bounded amount of work


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    """A formatted 8 MiB file image holding /d/small (inline) and /d/big (one chunk)."""
    path = tmp_path / "image.raw"
    with path.open("wb") as f:
        f.truncate(SIZE)
    device = FileDevice(path)
    Volume.format(device, fleet="hostile")
    vol = Volume.open(device)
    vol.start_epoch(1)
    vol.mkdir("/d", epoch=1)
    vol.put("/d/small", [b"s" * 100], 100, epoch=1, mtime=1.0)
    vol.put("/d/big", [b"b" * 20000], 20000, epoch=1, mtime=2.0)
    vol.close()
    device.close()
    yield path


def _superblock(path: Path) -> Superblock:
    with path.open("rb") as f:
        raw = f.read(2 * ALIGN)
    return choose([raw[s : s + ALIGN] for s in SLOTS])


def _write(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _refused(path: Path) -> FormatError:
    """Volume.open refuses the image with a FormatError, quickly."""
    device = FileDevice(path, read_only=True)
    started = time.monotonic()
    try:
        with pytest.raises(FormatError) as info:
            Volume.open(device)
    finally:
        device.close()
    assert time.monotonic() - started < FAST
    return info.value


def _fsck(path: Path) -> list[fsck.Problem]:
    """fsck reports problems (never raises), quickly; the exit status says so too."""
    device = FileDevice(path, read_only=True)
    started = time.monotonic()
    try:
        problems = fsck.check(device)
    finally:
        device.close()
    assert time.monotonic() - started < FAST
    assert problems
    assert fsck.main([str(path)]) in (1, 2)
    return problems


def _both_superblocks(path: Path, **changes: Any) -> None:
    """Rewrite both copies with ``changes`` and a correct CRC."""
    sb = _superblock(path)
    for generation in (sb.generation + 1, sb.generation + 2):
        forged = Superblock(**{**sb.__dict__, **changes, "generation": generation})
        _write(path, forged.slot, forged.encode())


# ---- superblock ---------------------------------------------------------------------------


def test_garbage_pages_over_the_superblocks(image: Path) -> None:
    _write(image, 0, os.urandom(2 * ALIGN))
    _refused(image)
    assert all(p.kind == "superblock" for p in _fsck(image))


@pytest.mark.parametrize(
    "changes",
    [
        {"data_bytes": 1 << 40},  # past the device size it declares
        {"journal_offset": ALIGN},  # over superblock B
        {"checkpoint_offsets": (2 * ALIGN, 3 * ALIGN)},  # over the journal
        {"journal_bytes": ALIGN},  # a ring too small for one batch
        {"journal_offset": 2 * ALIGN + 1},  # unaligned
        {"chunk_size": 0},
        {"chunk_size": 1000},
        {"inline_max": 1 << 31},  # a PUT would buffer that much in memory
    ],
)
def test_superblock_geometry_is_checked(image: Path, changes: dict[str, Any]) -> None:
    _both_superblocks(image, **changes)
    assert isinstance(_refused(image), CorruptMetadata)
    _fsck(image)


def test_volume_larger_than_the_device(image: Path) -> None:
    sb = _superblock(image)
    extra = 1 << 30
    _both_superblocks(image, device_size=sb.device_size + extra,
                      data_bytes=sb.data_bytes + extra)
    assert "smaller than the volume" in _refused(image).message
    _fsck(image)


def test_fleet_name_that_is_not_utf8(image: Path) -> None:
    sb = _superblock(image)
    for generation in (sb.generation + 1, sb.generation + 2):
        block = bytearray(Superblock(**{**sb.__dict__, "fleet": "ab",
                                        "generation": generation}).encode())
        name_at = FIXED.size  # the name follows the fixed fields; the CRC follows the name
        block[name_at : name_at + 2] = b"\xff\xfe"
        end = name_at + 2
        block[end : end + 4] = zlib.crc32(bytes(block[:end])).to_bytes(4, "little")
        _write(image, SLOTS[generation % 2], bytes(block))
    assert isinstance(_refused(image), CorruptMetadata)
    _fsck(image)


# ---- checkpoints --------------------------------------------------------------------------


def _forge_checkpoints(path: Path, body: bytes, *, seq: int = 1, journal_pos: int = 0) -> None:
    """Both checkpoint slots hold ``body`` (already compressed) with correct CRCs."""
    sb = _superblock(path)
    head = ckpt.HEADER.pack(ckpt.MAGIC, ckpt.VERSION, seq, 1, journal_pos, len(body),
                            zlib.crc32(body))
    head += ckpt.CRC.pack(zlib.crc32(head))
    block = head + bytes(ALIGN - len(head)) + body
    for offset in sb.checkpoint_offsets:
        _write(path, offset, block)
    # no journal record may follow: the chain must start from the forged checkpoint
    _write(path, sb.journal_offset, bytes(sb.journal_bytes))


def _bomb(inflated: int) -> bytes:
    """zlib of ``inflated`` spaces, made a MiB at a time (never held whole)."""
    deflater = zlib.compressobj(9)
    block = b" " * (1 << 20)
    parts = [deflater.compress(block) for _ in range(inflated >> 20)]
    return b"".join(parts) + deflater.flush()


def test_compression_bomb_is_cut_at_its_bound(image: Path) -> None:
    body = _bomb(256 << 20)  # 256 MiB of spaces in about 250 KiB
    assert len(body) < _superblock(image).checkpoint_bytes // 2
    _forge_checkpoints(image, body)
    err = _refused(image)
    assert isinstance(err, CorruptMetadata) and "inflates past" in err.message
    assert any("inflates past" in p.detail for p in _fsck(image))


def _doc(root: Any = None, free: Any = None, quarantine: Any = ()) -> bytes:
    doc = {"root": root, "free": [[4 << 20, 4 << 20]] if free is None else free,
           "quarantine": list(quarantine)}
    return zlib.compress(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (zlib.compress(b"[" * 200_000), "nested deeper"),
        (zlib.compress(b'{"root": ' + b"9" * 5000 + b"}"), "20 digits"),
        (zlib.compress(b"\xff\xfe garbage"), "not valid JSON"),
        (b"definitely not zlib", "does not inflate"),
        (zlib.compress(b"[]"), "not an object"),
        (_doc(root=[1, 2]), "root"),
        (_doc(root="x"), "root"),
        (_doc(free="x"), "free list"),
        (_doc(free=[[1, "b"]]), "free list"),
        (_doc(quarantine=[[1, "x"]]), "quarantine"),
        (_doc(free=[[4 << 20, 8192], [(4 << 20) + 4096, 8192]]), "overlaps"),
        (_doc(free=[[(4 << 20) + 1, 4096]]), "unaligned"),
    ],
)
def test_malformed_checkpoints_are_refused(image: Path, body: bytes, says: str) -> None:
    _forge_checkpoints(image, body)
    err = _refused(image)
    assert says in err.message, err.message
    _fsck(image)


def test_checkpoint_extents_past_the_device(image: Path) -> None:
    """Well-formed but pointing past the data area: the allocator refuses the extent."""
    _forge_checkpoints(image, _doc(free=[[1 << 50, 8192]]))
    assert "outside the data area" in _refused(image).message
    _fsck(image)


@pytest.mark.parametrize("page", [1 << 50, (4 << 20) // ALIGN, 2])
def test_checkpoint_root_that_is_no_tree_page(image: Path, page: int) -> None:
    """A root past the device, on file data (garbage for a page) or on the journal: the
    open reads the root page and refuses the checkpoint, naming the page."""
    _forge_checkpoints(image, _doc(root=[page, 1, 0], free=[]))
    err = _refused(image)
    assert f"page {page}" in err.message, err.message
    assert any(p.kind in ("tree", "checkpoint") for p in _fsck(image))


def test_checkpoint_journal_position_past_the_ring(image: Path) -> None:
    _forge_checkpoints(image, _doc(), journal_pos=1 << 40)
    assert isinstance(_refused(image), CorruptMetadata)
    _fsck(image)


def test_a_checkpoint_whose_journal_position_is_the_ring_end_opens(image: Path) -> None:
    """The last record before a checkpoint may end exactly at the ring's end (the next one
    starts at 0): a power cut then left a checkpoint the open refused as corrupt (crash test,
    1 interleaving in about 100 runs)."""
    ring = _superblock(image).journal_bytes
    _forge_checkpoints(image, _doc(), journal_pos=ring)
    device = FileDevice(image, read_only=True)
    try:
        Volume.open(device).close()
    finally:
        device.close()


def test_a_checkpoint_the_writer_wrote_always_decodes() -> None:
    """encode refuses what decode would (the inflate bound holds for both)."""
    free = [Extent(k * 8192, 4096) for k in range(30000)]
    raw = ckpt.encode(0, 1, None, free, [], 0, 64 << 20)
    header = ckpt.decode_header(raw[:ALIGN])
    assert ckpt.decode(header, raw[ALIGN:]).free == free


# ---- journal records ----------------------------------------------------------------------


Make = Callable[[int, int, RecordKey], bytes]


def _append(path: Path, *makes: Make) -> None:
    """Write ``make(seq, epoch, key)`` for each of ``makes`` where the next records of the
    chain belong (one after the other: the ring of an 8 MiB image does not wrap here)."""
    device = FileDevice(path, read_only=True)
    try:
        vol = Volume.open(device)
        seq, pos, key = vol.applied_seq + 1, vol._cursor.pos, vol.superblock.record_key
        journal_offset = vol.superblock.journal_offset
        vol.close()
    finally:
        device.close()
    for make in makes:
        data = make(seq, 1, key)
        _write(path, journal_offset + pos, data)
        seq, pos = seq + 1, pos + len(data)


def _raw_record(seq: int, epoch: int, key: RecordKey, op: str, js: bytes) -> bytes:
    """A record of any JSON bytes, sealed with the volume's key."""
    length = rec.HEADER.size + len(js) + rec.SEAL
    head = rec.HEADER.pack(rec.MAGIC, rec.VERSION, 0, length, seq, epoch, seq - 1, key.tag,
                           rec.OPS[op], len(js), 0)
    raw = head + js
    raw += key.seal(raw)
    return raw + bytes(rec.padded(length) - length)


@pytest.mark.parametrize(
    "payload",
    [
        {"path": 5, "size": 1, "mtime": 1.0, "crc": 0, "data": b"x"},
        {"path": "/p", "size": "1", "mtime": 1.0, "crc": 0, "data": b"x"},
        {"path": "/p", "size": 1, "mtime": 1.0, "crc": 0},  # no data, no layout
        {"path": "/p", "size": 9000, "mtime": 1.0, "crc": 0, "chunk": 1 << 20,
         "extents": [[6 << 20, 4096]], "sums": [0]},  # extents shorter than the file
        {"path": "/p", "size": 9000, "mtime": 1.0, "crc": 0, "chunk": 1 << 20,
         "extents": "all of them", "sums": [0]},
        {"path": "/p\n", "size": 1, "mtime": 1.0, "crc": 0, "data": b"x"},
        {"path": "/p", "size": 1, "mtime": 1.0, "crc": 0, "data": b"too long"},
    ],
)
def test_put_records_with_hostile_payloads(image: Path, payload: dict[str, Any]) -> None:
    _append(image, lambda seq, epoch, key: Record(seq, epoch, "put", payload,
                                                  commit_seq=seq - 1).encode(key))
    assert isinstance(_refused(image), CorruptMetadata)
    _fsck(image)


@pytest.mark.parametrize(
    "js",
    [
        b"[" * 100_000,
        b'{"path": "/p", "size": ' + b"1" * 5000 + b"}",
        b'{"path": "/p", "size": NaN}',
        b"\xff\xfe",
    ],
)
def test_record_payloads_that_do_not_parse_end_the_chain(image: Path, js: bytes) -> None:
    """Not JSON within bounds: the record is torn (the chain ends before it), as a torn
    write would; the image still opens, quickly, with everything before it."""
    _append(image, lambda seq, epoch, key: _raw_record(seq, epoch, key, "put", js))
    device = FileDevice(image, read_only=True)
    started = time.monotonic()
    try:
        vol = Volume.open(device)
        assert vol.stat("/d/big").size == 20000
        vol.close()
    finally:
        device.close()
    assert time.monotonic() - started < FAST


def test_record_length_past_the_ring(image: Path) -> None:
    def huge(seq: int, epoch: int, key: RecordKey) -> bytes:
        raw = bytearray(Record(seq, epoch, "delete", {"path": "/d/small"}).encode(key))
        raw[8:12] = (0xFFFFFFF0).to_bytes(4, "little")  # announced length: ~4 GiB
        return bytes(raw)

    _append(image, huge)
    device = FileDevice(image, read_only=True)
    try:
        assert Volume.open(device).stat("/d/small").size == 100  # the record never counted
    finally:
        device.close()


def test_records_that_free_the_same_extent_twice(image: Path) -> None:
    """Two files forged onto one extent, both deleted: the allocator trips over the double
    free; the open is refused as corrupt metadata, not a ValueError."""
    extent = [[6 << 20, 8192]]
    layout = {"size": 8192, "mtime": 1.0, "crc": 0, "chunk": 1 << 20, "extents": extent,
              "sums": [0]}
    payloads = [("put", {"path": "/x", **layout}), ("put", {"path": "/y", **layout}),
                ("delete", {"path": "/x"}), ("delete", {"path": "/y"})]

    def maker(op: str, payload: dict[str, Any]) -> Make:
        return lambda seq, epoch, key: Record(seq, epoch, op, payload,
                                              commit_seq=seq - 1).encode(key)

    _append(image, *(maker(op, payload) for op, payload in payloads))
    assert isinstance(_refused(image), CorruptMetadata)


def test_a_reader_refresh_meets_a_hostile_record(image: Path) -> None:
    """The tail loop's refresh raises the clear error (which the loop logs) and the volume
    keeps serving what it had."""
    device = FileDevice(image, read_only=True)
    try:
        vol = Volume.open(device)
        _append(image, lambda seq, epoch, key: Record(
            seq, epoch, "mkdir", {"path": ["not", "a", "path"], "mtime": 1.0},
            commit_seq=seq - 1).encode(key))
        with pytest.raises(CorruptMetadata):
            vol.refresh()
        assert vol.stat("/d/small").size == 100
        vol.close()
    finally:
        device.close()


def test_a_rename_that_would_make_a_cycle(image: Path) -> None:
    """A directory moved inside itself would make the namespace a cycle: the record does not
    apply, the open is refused naming it, fsck reports it; nothing loops."""
    _append(image, lambda seq, epoch, key: Record(
        seq, epoch, "rename", {"src": "/d", "dst": "/d/small/d"},
        commit_seq=seq - 1).encode(key))
    device = FileDevice(image, read_only=True)
    try:
        with pytest.raises(AgentError) as info:
            Volume.open(device)
    finally:
        device.close()
    assert "inside itself" in info.value.message
    assert any("does not apply" in p.detail for p in _fsck(image))
