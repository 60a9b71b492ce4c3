"""A/B checkpoints of format v2: the tree root, the free map and the quarantine at one seq.

Invariants:
- A checkpoint at ``seq`` names the metadata tree root holding exactly the state after
  records ``1..seq`` (its pages are durable before the checkpoint is written), the free
  extents of the data area and the quarantine at that point; record ``seq + 1`` starts at
  ``journal_pos`` in the journal ring (or at 0 if it did not fit there). Its size is that
  of the free map and the quarantine, never of the namespace: a checkpoint is O(changed).
- A new checkpoint goes to the slot NOT holding the newest valid one, so a torn checkpoint
  write leaves the previous one intact; :func:`choose` picks the valid one with the highest seq.
- Valid = magic, known version, header CRC and body CRC all match, and the body decodes
  within bounds: it inflates to at most :func:`inflate_limit` bytes (checked while inflating:
  a compression bomb costs no more than that), is JSON of bounded depth, and its root, free
  list and quarantine have the shapes written. :func:`encode` refuses a body that would break
  the inflate bound, so a checkpoint the writer wrote always decodes.

Layout (little endian): one 4 KiB header block, then the zlib-compressed JSON body::

    0 4s magic b"RBFC"   4 u16 version (2)   6 u16 pad   8 u64 seq   16 u64 epoch
    24 u64 journal_pos   32 u64 body_len   40 u32 body crc32   44 u32 header crc32 (of 0..44)

    body: {"root": [page, generation, crc] or null, "free": [[offset, length]...],
           "quarantine": [[seq, offset, length]...]}
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from agents.core import boundedjson
from agents.core.allocator import Extent
from agents.core.pages import PageRef
from agents.core.record import padded
from agents.device import ALIGN
from agents.errors import (
    BadMagic,
    ChecksumMismatch,
    CorruptMetadata,
    NoSpace,
    TornRecord,
    UnsupportedFormat,
)

MAGIC = b"RBFC"
VERSION = 2
HEADER = struct.Struct("<4sH2xQQQQI")
CRC = struct.Struct("<I")
MAX_EXPANSION = 64  # extent lists deflate 3-10x at level 1; zlib itself allows ~1000x


def inflate_limit(body_len: int) -> int:
    """Most bytes a body of ``body_len`` compressed bytes may inflate to."""
    return max(body_len * MAX_EXPANSION, 1 << 20)


@dataclass(frozen=True)
class CheckpointHeader:
    """The first block of a checkpoint slot."""

    seq: int
    epoch: int
    journal_pos: int
    body_len: int
    body_crc: int

    @property
    def total(self) -> int:
        """Bytes of header + body, padded."""
        return ALIGN + padded(self.body_len)


@dataclass(frozen=True)
class Checkpoint:
    """A decoded checkpoint."""

    header: CheckpointHeader
    root: PageRef | None
    free: list[Extent]
    quarantine: list[tuple[int, Extent]]


def encode(seq: int, epoch: int, root: PageRef | None, free: list[Extent],
           quarantine: list[tuple[int, Extent]], journal_pos: int, slot_bytes: int) -> bytes:
    """Header + body, padded to 4 KiB; NoSpace if it exceeds the slot."""
    body_doc: dict[str, Any] = {
        "root": None if root is None else list(root),
        "free": [[e.offset, e.length] for e in free],
        "quarantine": [[q, e.offset, e.length] for q, e in quarantine],
    }
    text = json.dumps(body_doc, separators=(",", ":")).encode("utf-8")
    body = zlib.compress(text, 1)
    if len(text) > inflate_limit(len(body)):
        raise NoSpace(f"checkpoint inflates {len(text)}/{len(body)} times, over the bound",
                      needed=len(text))
    head = HEADER.pack(MAGIC, VERSION, seq, epoch, journal_pos, len(body), zlib.crc32(body))
    head += CRC.pack(zlib.crc32(head))
    out = head + bytes(ALIGN - len(head)) + body
    out += bytes(padded(len(out)) - len(out))
    if len(out) > slot_bytes:
        raise NoSpace(
            f"checkpoint of {len(out)} bytes does not fit its {slot_bytes}-byte slot",
            needed=len(out),
        )
    return out


def decode_header(block: bytes) -> CheckpointHeader:
    """Parse a checkpoint's first block; raises BadMagic, ChecksumMismatch,
    UnsupportedFormat."""
    if len(block) < HEADER.size + CRC.size or block[:4] != MAGIC:
        raise BadMagic("no checkpoint here (bad magic)")
    (crc,) = CRC.unpack_from(block, HEADER.size)
    if zlib.crc32(block[: HEADER.size]) != crc:
        raise ChecksumMismatch("checkpoint header checksum mismatch")
    _, version, seq, epoch, pos, body_len, body_crc = HEADER.unpack_from(block)
    if version != VERSION:
        raise UnsupportedFormat(f"checkpoint format {version} (this agent reads {VERSION})")
    if pos % ALIGN:
        raise CorruptMetadata(f"checkpoint journal position {pos} is not 4 KiB aligned")
    return CheckpointHeader(seq, epoch, pos, body_len, body_crc)


def decode(header: CheckpointHeader, body: bytes) -> Checkpoint:
    """Parse the body that follows ``header``; raises TornRecord / ChecksumMismatch /
    CorruptMetadata (a body that inflates past its bound, is not bounded JSON, or whose
    root, free list or quarantine is malformed)."""
    data = bytes(body[: header.body_len])
    if len(data) < header.body_len:
        raise TornRecord("checkpoint body cut short")
    if zlib.crc32(data) != header.body_crc:
        raise ChecksumMismatch("checkpoint body checksum mismatch", seq=header.seq)
    limit = inflate_limit(len(data))
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise CorruptMetadata(f"checkpoint body does not inflate: {exc}") from exc
    if inflater.unconsumed_tail:
        raise CorruptMetadata(f"checkpoint body inflates past {limit} bytes", limit=limit)
    if not inflater.eof:
        raise CorruptMetadata("checkpoint body is a cut zlib stream")
    try:
        doc = boundedjson.loads(text)
    except boundedjson.JsonLimit as exc:
        raise CorruptMetadata(f"checkpoint body: {exc}") from exc
    if not isinstance(doc, dict):
        raise CorruptMetadata("checkpoint body is not an object")
    root = doc.get("root")
    if root is not None and not (_ints(root) and len(root) == 3):
        raise CorruptMetadata("checkpoint root is not [page, generation, crc]")
    free = doc.get("free")
    if not isinstance(free, list) or not all(_ints(x) and len(x) == 2 for x in free):
        raise CorruptMetadata("checkpoint free list is not a list of [offset, length]")
    return Checkpoint(header, None if root is None else PageRef(*root),
                      [Extent(off, n) for off, n in free], _quarantine(doc.get("quarantine")))


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _quarantine(raw: Any) -> list[tuple[int, Extent]]:
    if not isinstance(raw, list) or not all(_ints(q) and len(q) == 3 for q in raw):
        raise CorruptMetadata("checkpoint quarantine is not a list of [seq, offset, length]")
    return [(seq, Extent(off, n)) for seq, off, n in raw]


def choose(headers: list[CheckpointHeader | None]) -> list[int]:
    """Slot numbers of the valid headers, newest (highest seq) first."""
    valid = [(h.seq, i) for i, h in enumerate(headers) if h is not None]
    return [i for _, i in sorted(valid, reverse=True)]
