"""Journal record codec: ``{seq, epoch, op, payload, crc}`` as variable-length bytes.

Invariants:
- ``Record.decode(r.encode()) == r`` for every record whose payload is JSON-able (plus one
  optional ``data`` bytes value, the inline content of a small file).
- A record decodes only if it is complete and its CRC-32 matches: any truncation below its
  length, any flipped bit inside it raises ``TornRecord`` or ``ChecksumMismatch``.
- Decoding allocates nothing beyond the bytes given: lengths in the header are checked
  against them (and each other) first, and the payload is bounded JSON
  (:mod:`agents.core.boundedjson`).
- The encoded length is exactly the header, payload, blob and CRC (no padding: the records
  of one group commit are packed back to back and only the batch is padded to 4 KiB, see
  :mod:`agents.core.journal`) and does not depend on ``seq``, ``epoch`` or ``commit_seq``
  (the writer sizes a batch before numbering it).
- Format 1 (each record zero padded to 4 KiB) is refused with ``UnsupportedFormat`` naming
  it; the header layout is the same in both, so the volume tag of an old record can still be
  read (records of an earlier format of the same image are skipped by their tag).

Layout (little endian)::

    0  4s  magic b"RBFR"           28 u64 commit_seq (highest seq durable when written)
    4  u16 format version (2)      36 u32 volume tag (from the volume uuid: records of an
    6  u16 flags (1: has blob)            earlier format of the same image never count)
    8  u32 length (header..crc)    40 u8  op code      41 3x pad
    12 u64 seq                     44 u32 json_len     48 u32 blob_len
    20 u64 epoch                   52 json payload, blob, u32 crc32 of bytes [0, length-4)
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from agents.core import boundedjson
from agents.device import ALIGN
from agents.errors import ChecksumMismatch, TornRecord, UnsupportedFormat

MAGIC = b"RBFR"
VERSION = 2
HEADER = struct.Struct("<4sHHIQQQIB3xII")
CRC = struct.Struct("<I")
FLAG_BLOB = 1

OPS: dict[str, int] = {
    "put": 1, "delete": 2, "mkdir": 3, "rename": 4, "epoch-start": 5, "checkpoint": 6,
}
OP_NAMES: dict[int, str] = {code: name for name, code in OPS.items()}
BLOB_KEY = "data"


def padded(length: int) -> int:
    """``length`` rounded up to the 4 KiB alignment."""
    return -(-length // ALIGN) * ALIGN


@dataclass(frozen=True)
class Record:
    """One metadata change, exactly as stored in the journal and pushed to readers."""

    seq: int
    epoch: int
    op: str
    payload: dict[str, Any]
    commit_seq: int = field(default=0, compare=False)
    volume_tag: int = field(default=0, compare=False)

    def encode(self) -> bytes:
        """The record's journal bytes (exactly ``length`` of them)."""
        if self.op not in OPS:
            raise ValueError(f"unknown journal op {self.op!r}")
        body = dict(self.payload)
        blob = body.pop(BLOB_KEY, None)
        if blob is not None and not isinstance(blob, bytes):
            raise TypeError("payload 'data' must be bytes")
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        js = text.encode("utf-8")
        blob_bytes = blob or b""
        length = HEADER.size + len(js) + len(blob_bytes) + CRC.size
        head = HEADER.pack(
            MAGIC,
            VERSION,
            FLAG_BLOB if blob is not None else 0,
            length,
            self.seq,
            self.epoch,
            self.commit_seq,
            self.volume_tag,
            OPS[self.op],
            len(js),
            len(blob_bytes),
        )
        raw = b"".join((head, js, blob_bytes))
        return raw + CRC.pack(zlib.crc32(raw))

    @staticmethod
    def peek_length(data: bytes | memoryview) -> int | None:
        """The length announced by a record header, or None if ``data`` is no header."""
        if len(data) < HEADER.size or data[:4] != MAGIC:
            return None
        length: int = HEADER.unpack_from(data)[3]
        if length < HEADER.size + CRC.size:
            return None
        return length

    @staticmethod
    def peek_numbers(data: bytes | memoryview) -> tuple[int, int, int, int] | None:
        """(seq, epoch, commit_seq, volume_tag) from a header, unverified (a cheap filter
        before :meth:`decode`), or None if ``data`` is no header."""
        if Record.peek_length(data) is None:
            return None
        fields = HEADER.unpack_from(data)
        return fields[4], fields[5], fields[6], fields[7]

    @staticmethod
    def verify(data: bytes | memoryview) -> tuple[int, int, int, int]:
        """(seq, epoch, commit_seq, volume_tag) of a complete record whose CRC matches, without
        parsing its payload (a cheap check of many records); raises like :meth:`decode`."""
        fields = _verified_fields(data)
        return fields[4], fields[5], fields[6], fields[7]

    @staticmethod
    def decode(data: bytes | memoryview) -> Record:
        """Parse one record; raises TornRecord, ChecksumMismatch or UnsupportedFormat."""
        _, _, flags, _, seq, epoch, commit, tag, op, js_len, blob_len = _verified_fields(data)
        start = HEADER.size
        try:
            payload = boundedjson.loads(bytes(data[start : start + js_len]))
        except boundedjson.JsonLimit as exc:
            raise TornRecord(f"journal record payload: {exc}") from exc
        if not isinstance(payload, dict):
            raise TornRecord("journal record payload is not an object")
        if flags & FLAG_BLOB:
            payload[BLOB_KEY] = bytes(data[start + js_len : start + js_len + blob_len])
        return Record(seq, epoch, OP_NAMES[op], payload, commit_seq=commit, volume_tag=tag)


def _verified_fields(data: bytes | memoryview) -> tuple[Any, ...]:
    """The header fields of a complete, CRC-correct record of a known version and op."""
    if len(data) < HEADER.size:
        raise TornRecord("journal record shorter than its header", got=len(data))
    fields: tuple[Any, ...] = HEADER.unpack_from(data)
    magic, version, flags, length, seq, _epoch, _commit, _tag, op, js_len, blob_len = fields
    if magic != MAGIC:
        raise TornRecord("no journal record here (bad magic)")
    if length != HEADER.size + js_len + blob_len + CRC.size:
        raise TornRecord("journal record lengths disagree", length=length)
    if len(data) < length:
        raise TornRecord("journal record cut short", length=length, got=len(data))
    (crc,) = CRC.unpack_from(data, length - CRC.size)
    if zlib.crc32(memoryview(data)[: length - CRC.size]) != crc:
        raise ChecksumMismatch("journal record checksum mismatch", seq=seq)
    if version != VERSION:
        older = " (4 KiB padded records: format the image again)" if version < VERSION else ""
        raise UnsupportedFormat(
            f"journal record format {version}{older}; this agent reads format {VERSION}",
            got=version,
        )
    if op not in OP_NAMES or flags & ~FLAG_BLOB:
        raise UnsupportedFormat("unknown journal op or flags", op=op, flags=flags)
    return fields
