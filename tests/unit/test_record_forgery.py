"""Records forged by a client. A small file's inline bytes lie in the journal ring verbatim,
the client chose them, and a packed record can straddle a 4 KiB boundary: once the ring has
wrapped, a follower looks for the next batch right there. Bytes planted there that form a
perfect record of format 2's kind (magic, the next seq, the volume tag, a right CRC-32:
nothing secret) must never be applied, by a reader following the ring, a fresh open or fsck;
nor may such bytes anywhere in the ring pass for a witness that makes the volume refuse to
open. Only what a client can do is used: the writer's put, and the record layout.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import pytest

from agents import fsck
from agents.core.journal import align_up
from agents.core.record import OPS, VERSION
from agents.device import ALIGN
from agents.errors import NotFound
from agents.testing import MemoryDevice
from agents.volume import Volume

pytestmark = pytest.mark.unit

RING = 64 << 10
HEAD = struct.Struct("<4sHHIQQQIB3xII")  # the record header, as docs/format.md gives it
# a path long enough that its put's inline bytes begin late in the record's first block and
# run past the 4 KiB boundary: every component at most 255 bytes, the whole under 4096
LONG = "/" + "/".join(["p" * 200] * 9)
INLINE = 3072


def _forged(seq: int, tag: int, op: str, payload: dict[str, Any]) -> bytes:
    """A record of epoch 1 as format 2 sealed it, with a CRC-32 anyone can compute."""
    js = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    length = HEAD.size + len(js) + 4
    raw = HEAD.pack(b"RBFR", VERSION, 0, length, seq, 1, seq - 1, tag, OPS[op], len(js), 0)
    return raw + js + struct.pack("<I", zlib.crc32(raw + js))


def _inline(at: int, planted: bytes) -> bytes:
    """INLINE bytes holding ``planted`` at ``at``, whose CRC-32 has 10 decimal digits (so the
    put's JSON is as long as the probe's)."""
    for nonce in range(1 << 16):
        data = (b"f" * at + planted + nonce.to_bytes(4, "little")).ljust(INLINE, b"f")
        if zlib.crc32(data) >= 10**9:
            return data
    raise AssertionError("no nonce gives a 10-digit CRC")


def _json_length(payload: dict[str, Any]) -> int:
    """Bytes of a record's JSON payload (docs/format.md: UTF-8, sorted keys, no blob)."""
    body = {k: v for k, v in payload.items() if k != "data"}
    return len(json.dumps(body, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode())


def _not_applied(vol: Volume, writer: Volume, victim: bytes) -> None:
    assert vol.applied_seq == writer.applied_seq
    with pytest.raises(NotFound):
        vol.stat("/planted")
    assert b"".join(vol.read("/victim")) == victim


def test_a_record_planted_at_a_batch_boundary_is_never_applied() -> None:
    medium = MemoryDevice(16 << 20)
    Volume.format(medium, fleet="forge", journal_bytes=RING)
    writer = Volume.open(medium)
    writer.start_epoch(1)
    sb = writer.superblock
    victim = bytes(range(256)) * 64  # another client's file, with extents in the data area
    v = writer.put("/victim", [victim], len(victim), epoch=1, mtime=1.0).payload
    reader = Volume.open(medium.reopen(read_only=True))
    # the client's forgery: a file of its own naming the victim's extents (their bytes then
    # read as its own); a client can guess a layout, here it is simply handed over
    stolen = {"path": "/planted", "size": len(victim), "mtime": 1.0, "crc": zlib.crc32(victim),
              "chunk": v["chunk"], "extents": v["extents"], "sums": v["sums"]}
    probe = writer.put(LONG, [_inline(0, b"")], INLINE, epoch=1, mtime=1.0)
    at = ALIGN - HEAD.size - _json_length(probe.payload)  # blob offset on the 4 KiB boundary
    writer.checkpoint()  # the planting put then has a batch of its own, starting on a block
    seq = writer.applied_seq + 1 + 16  # planted + one lap of one-block batches + 1
    forged = _forged(seq, sb.volume_tag, "put", stolen)
    plant = writer.put(LONG, [_inline(at, forged)], INLINE, epoch=1, mtime=1.0)
    start = writer.journal_position(plant.seq)
    boundary = start + ALIGN
    assert start % ALIGN == 0
    assert medium.read_at(sb.journal_offset + boundary, len(forged)) == forged
    # one lap of the ring, a block per batch, until the last record ends just before the
    # planted bytes: the next batch belongs at align_up(head) == boundary, still unwritten
    ops = 0
    while not (align_up(writer._cursor.pos) == boundary and ops > 0):
        if ops % 3 == 2:
            writer.checkpoint()
        else:
            writer.put(f"/fill{ops}", [b"x"], 1, epoch=1, mtime=1.0)
        ops += 1
        assert ops <= RING // ALIGN
    assert writer.applied_seq + 1 == seq  # the planted record claims the next seq
    assert medium.read_at(sb.journal_offset + boundary, len(forged)) == forged

    reader.refresh()
    _not_applied(reader, writer, victim)
    fresh = Volume.open(medium.reopen(read_only=True))
    _not_applied(fresh, writer, victim)
    assert fsck.check(medium.reopen(read_only=True)) == []
    # the real record of that seq then lands on the boundary, and the followers take it
    writer.put("/after", [b"a"], 1, epoch=1, mtime=1.0)
    for follower in (reader, fresh):
        follower.refresh()
        _not_applied(follower, writer, victim)
        assert follower.stat("/after").size == 1


def test_a_planted_witness_never_makes_the_volume_refuse_to_open() -> None:
    """A record claiming that a seq far past the journal's end was durable, anywhere in the
    ring (a witness is looked for at every byte), would prove the journal corrupt."""
    medium = MemoryDevice(16 << 20)
    Volume.format(medium, fleet="forge", journal_bytes=RING)
    writer = Volume.open(medium)
    writer.start_epoch(1)
    far = 1 << 40
    forged = HEAD.pack(b"RBFR", VERSION, 0, HEAD.size + 2 + 4, far, 1, far,
                       writer.superblock.volume_tag, OPS["delete"], 2, 0) + b"{}"
    forged += struct.pack("<I", zlib.crc32(forged))
    writer.put("/note", [_inline(1000, forged)], INLINE, epoch=1, mtime=1.0)
    opened = Volume.open(medium.reopen(read_only=True))
    assert opened.applied_seq == writer.applied_seq
    assert fsck.check(medium.reopen(read_only=True)) == []
