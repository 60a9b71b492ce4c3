"""Journal record codec: ``{seq, epoch, op, payload}`` as variable-length bytes, sealed with
the volume's record key.

Invariants:
- ``Record.decode(r.encode(key), key) == r`` for every record whose payload is JSON-able (plus
  one optional ``data`` bytes value, the inline content of a small file).
- A record decodes only under the key it was sealed with, complete and unaltered, from
  exactly its own bytes: any truncation below its length, any byte beyond it, any flipped
  bit inside it, any other key raises ``TornRecord`` or ``ChecksumMismatch``. So bytes that
  the volume's writer did not seal are never a record, whoever chose them: a small file's
  inline bytes lie in the ring verbatim and a client picks them, but a client cannot compute
  the seal (the CRC-32 of format 2 anyone could, and a planted record then passed for the
  next one after a wrap).
- The key (:class:`RecordKey`) comes from the volume uuid, which only the superblock holds:
  agents, fsck and anyone else who can read the image know it; a client of the HTTP API
  never sees it (docs/security.md).
- The seal is checked before anything else in the record is believed: only a sealed
  record has its version read (``UnsupportedFormat``: an agent of another format sealed it),
  so no bytes a client chose can make an agent refuse the journal.
- Decoding allocates nothing beyond the bytes given: lengths in the header are checked
  against them (and each other), and the payload is bounded JSON
  (:mod:`agents.core.boundedjson`).
- The encoded length is exactly the header, payload, blob and seal (no padding: the records
  of one group commit are packed back to back and only the batch is padded to 4 KiB, see
  :mod:`agents.core.journal`) and does not depend on ``seq``, ``epoch``, ``commit_seq`` or
  the key (the writer sizes a batch before numbering it: :meth:`Record.encoded_length`).
- Records of an earlier format of the image carry another volume's tag (format draws a new
  uuid) and are skipped by it; format 2's (sealed with a CRC-32) never verify either.

Layout (little endian)::

    0  4s  magic b"RBFR"           28 u64 commit_seq (highest seq durable when written)
    4  u16 format version (3)      36 u32 volume tag (top 32 bits of the volume uuid)
    6  u16 flags (1: has blob)     40 u8  op code      41 3x pad
    8  u32 length (header..seal)   44 u32 json_len     48 u32 blob_len
    12 u64 seq                     52 json payload, blob, 8-byte seal:
    20 u64 epoch                      BLAKE2b(bytes [0, length-8), key=secret, digest 8 bytes)

where ``secret = BLAKE2b(b"rbdfleet-record" + uuid bytes, digest 32 bytes)`` (unkeyed).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from agents.core import boundedjson
from agents.device import ALIGN
from agents.errors import ChecksumMismatch, TornRecord, UnsupportedFormat

MAGIC = b"RBFR"
VERSION = 3
HEADER = struct.Struct("<4sHHIQQQIB3xII")
SEAL = 8  # bytes of keyed BLAKE2b that end a record: 2**-64 for a blind forgery
KEY_LABEL = b"rbdfleet-record"
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
class RecordKey:
    """What stamps and seals the records of one volume: the tag, in the clear in every header
    (tells this volume's records from an earlier format's), and the secret of the seal."""

    tag: int
    secret: bytes = field(repr=False)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def for_volume(volume_uuid: bytes) -> RecordKey:
        """The key of the volume with this uuid (16 bytes; derived once per uuid)."""
        if len(volume_uuid) != 16:
            raise ValueError("a volume uuid is 16 bytes")
        secret = hashlib.blake2b(KEY_LABEL + volume_uuid, digest_size=32).digest()
        return RecordKey(int.from_bytes(volume_uuid[:4], "big"), secret)

    def seal(self, data: bytes | memoryview) -> bytes:
        """The seal of a record whose bytes before the seal are ``data``."""
        return hashlib.blake2b(data, key=self.secret, digest_size=SEAL).digest()


@dataclass(frozen=True)
class Record:
    """One metadata change, exactly as stored in the journal and pushed to readers.
    ``volume_tag`` is the tag a decoded record was stamped with (encode stamps its key's)."""

    seq: int
    epoch: int
    op: str
    payload: dict[str, Any]
    commit_seq: int = field(default=0, compare=False)
    volume_tag: int = field(default=0, compare=False)

    def _parts(self) -> tuple[bytes, bytes | None]:
        """The JSON payload and the blob (None: no blob)."""
        if self.op not in OPS:
            raise ValueError(f"unknown journal op {self.op!r}")
        body = dict(self.payload)
        blob = body.pop(BLOB_KEY, None)
        if blob is not None and not isinstance(blob, bytes):
            raise TypeError("payload 'data' must be bytes")
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8"), blob

    def encoded_length(self) -> int:
        """The length of :meth:`encode`'s bytes, whatever the key and the numbers."""
        js, blob = self._parts()
        return HEADER.size + len(js) + len(blob or b"") + SEAL

    def encode(self, key: RecordKey) -> bytes:
        """The record's journal bytes (exactly ``length`` of them), stamped with ``key``'s
        tag and sealed with it."""
        js, blob = self._parts()
        blob_bytes = blob or b""
        length = HEADER.size + len(js) + len(blob_bytes) + SEAL
        head = HEADER.pack(
            MAGIC,
            VERSION,
            FLAG_BLOB if blob is not None else 0,
            length,
            self.seq,
            self.epoch,
            self.commit_seq,
            key.tag,
            OPS[self.op],
            len(js),
            len(blob_bytes),
        )
        raw = b"".join((head, js, blob_bytes))
        return raw + key.seal(raw)

    @staticmethod
    def peek_length(data: bytes | memoryview) -> int | None:
        """The length announced by a record header, or None if ``data`` is no header."""
        if len(data) < HEADER.size or data[:4] != MAGIC:
            return None
        length: int = HEADER.unpack_from(data)[3]
        if length < HEADER.size + SEAL:
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
    def verify(data: bytes | memoryview, key: RecordKey) -> tuple[int, int, int, int]:
        """(seq, epoch, commit_seq, volume_tag) of a complete record sealed with ``key``,
        without parsing its payload (a cheap check of many records); raises like
        :meth:`decode`."""
        fields = _verified_fields(data, key)
        return fields[4], fields[5], fields[6], fields[7]

    @staticmethod
    def decode(data: bytes | memoryview, key: RecordKey) -> Record:
        """Parse one record sealed with ``key``; raises TornRecord, ChecksumMismatch or
        UnsupportedFormat."""
        _, _, flags, _, seq, epoch, commit, tag, op, js_len, blob_len = _verified_fields(
            data, key)
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


def _verified_fields(data: bytes | memoryview, key: RecordKey) -> tuple[Any, ...]:
    """The header fields of a complete record sealed with ``key``, of a known version and op.
    Only the magic, the tag and the length (bytes 0-12 and 36-40, which every record format
    keeps) are read before the seal is checked: what a record says is believed only once
    the volume's writer is known to have written it."""
    if len(data) < HEADER.size:
        raise TornRecord("journal record shorter than its header", got=len(data))
    fields: tuple[Any, ...] = HEADER.unpack_from(data)
    magic, version, flags, length, seq, _epoch, _commit, tag, op, js_len, blob_len = fields
    if magic != MAGIC:
        raise TornRecord("no journal record here (bad magic)")
    if tag != key.tag:
        raise TornRecord("journal record of another volume (tag mismatch)")
    if length < HEADER.size + SEAL:
        raise TornRecord("journal record shorter than its header", length=length)
    if len(data) != length:
        # longer bytes too: a caller that took the length from another read of the ring
        # (an older record's header at the same place) must not be told the record has it
        raise TornRecord("journal record cut short" if len(data) < length else
                         "journal record bytes longer than the record", length=length,
                         got=len(data))
    view = memoryview(data)
    if not hmac.compare_digest(key.seal(view[: length - SEAL]), view[length - SEAL : length]):
        raise ChecksumMismatch("journal record seal mismatch (torn, corrupt, or not sealed "
                               "with this volume's key)", seq=seq)
    if version != VERSION:
        raise UnsupportedFormat(
            f"journal record format {version}; this agent reads format {VERSION}", got=version)
    if length != HEADER.size + js_len + blob_len + SEAL:
        raise TornRecord("journal record lengths disagree", length=length)
    if op not in OP_NAMES or flags & ~FLAG_BLOB:
        raise UnsupportedFormat("unknown journal op or flags", op=op, flags=flags)
    return fields
