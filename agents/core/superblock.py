"""Superblock codec: the image's geometry, stored twice (blocks 0 and 1).

Invariants:
- Copy ``g % 2`` holds generation ``g``; a writer only ever rewrites the copy of the older
  generation, so a torn write leaves the other copy valid and :func:`choose` picks it.
- A copy is valid only with the magic, a known format version, a matching CRC-32 and a sane
  geometry (:func:`check_geometry`: aligned regions in order, inside ``device_size``, a ring
  of at least 16 blocks, chunks a multiple of 4 KiB, inline files that fit a record); the
  caller checks ``device_size`` against the real device.
- Everything a new writer or fsck needs (region offsets, chunk size, fleet) is in here.

Layout (little endian, one 4 KiB block, zero padded)::

    0  8s  magic b"RBDFLEET"     10 u64 generation   18 u32 block size (4096)
    8  u16 format version (3)    22 u64 device size  30 u64 journal offset  38 u64 journal bytes
    46 u64 checkpoint A offset   54 u64 checkpoint B offset   62 u64 checkpoint bytes
    70 u64 data offset   78 u64 data bytes   86 u32 chunk size   90 u32 inline max
    94 16s volume uuid   110 u16 fleet name length, fleet name (UTF-8), then u32 crc32
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from agents.core.record import RecordKey
from agents.device import ALIGN
from agents.errors import (
    BadMagic,
    ChecksumMismatch,
    CorruptMetadata,
    FormatError,
    UnsupportedFormat,
)

MAGIC = b"RBDFLEET"
# 3: journal records sealed with a key from the volume uuid (2 had a CRC-32 anyone can
# compute); an agent of format 2 refuses the image here instead of calling records torn
VERSION = 3
FIXED = struct.Struct("<8sHQIQQQQQQQQII16sH")
CRC = struct.Struct("<I")
SLOTS = (0, ALIGN)
MAX_FLEET = 255
MIN_JOURNAL = 16 * ALIGN
# files up to this many bytes travel inside their put record (one journal write acknowledges
# them) and move to data extents at the next checkpoint (agents/committer.py)
INLINE_MAX = 16 << 10
# the data area starts on an RBD object boundary (4 MiB, the default object size): a 4 MiB
# data write then touches one RADOS object, not two
DATA_ALIGN = 4 << 20
# the smallest piece of an RBD image a discard gives back (librbd's discard granularity): the
# journal ring starts and ends on one, so the ring's give-back never shares a piece with the
# superblocks or checkpoint slot A
RING_ALIGN = 64 << 10


@dataclass(frozen=True)
class Superblock:
    """The image's geometry; offsets and sizes are bytes, multiples of 4 KiB."""

    generation: int
    device_size: int
    journal_offset: int
    journal_bytes: int
    checkpoint_offsets: tuple[int, int]
    checkpoint_bytes: int
    data_offset: int
    data_bytes: int
    chunk_size: int
    inline_max: int
    volume_id: str
    fleet: str

    @property
    def volume_tag(self) -> int:
        """32 bits of the volume uuid, stamped on every journal record of this format."""
        return uuid.UUID(self.volume_id).int >> 96

    @property
    def record_key(self) -> RecordKey:
        """The key that stamps and seals this volume's journal records (never shown to a
        client: it is derived from the volume uuid, which only the image holds)."""
        return RecordKey.for_volume(uuid.UUID(self.volume_id).bytes)

    @property
    def slot(self) -> int:
        """Byte offset of the copy this generation is written to."""
        return SLOTS[self.generation % 2]

    def encode(self) -> bytes:
        """One 4 KiB block."""
        name = self.fleet.encode("utf-8")
        if len(name) > MAX_FLEET:
            raise ValueError("fleet name longer than 255 bytes")
        raw = FIXED.pack(
            MAGIC,
            VERSION,
            self.generation,
            ALIGN,
            self.device_size,
            self.journal_offset,
            self.journal_bytes,
            self.checkpoint_offsets[0],
            self.checkpoint_offsets[1],
            self.checkpoint_bytes,
            self.data_offset,
            self.data_bytes,
            self.chunk_size,
            self.inline_max,
            uuid.UUID(self.volume_id).bytes,
            len(name),
        )
        raw += name
        raw += CRC.pack(zlib.crc32(raw))
        return raw + bytes(ALIGN - len(raw))

    @staticmethod
    def decode(block: bytes) -> Superblock:
        """Parse one copy; raises BadMagic, UnsupportedFormat or ChecksumMismatch."""
        if len(block) < FIXED.size or block[:8] != MAGIC:
            raise BadMagic("no rbdfleet superblock here (bad magic)")
        fields = FIXED.unpack_from(block)
        name_len = fields[-1]
        end = FIXED.size + name_len
        if name_len > MAX_FLEET or end + CRC.size > len(block):
            raise ChecksumMismatch("superblock fleet name length is corrupt")
        (crc,) = CRC.unpack_from(block, end)
        if zlib.crc32(block[:end]) != crc:
            raise ChecksumMismatch("superblock checksum mismatch")
        if fields[1] != VERSION:
            raise UnsupportedFormat(
                f"image format {fields[1]}: this agent reads format {VERSION} only (there is "
                f"no migration: format the image again)", got=fields[1]
            )
        if fields[3] != ALIGN:
            raise UnsupportedFormat(f"block size {fields[3]} (expected {ALIGN})")
        try:
            fleet = block[FIXED.size : end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptMetadata("superblock fleet name is not UTF-8") from exc
        return check_geometry(Superblock(
            generation=fields[2],
            device_size=fields[4],
            journal_offset=fields[5],
            journal_bytes=fields[6],
            checkpoint_offsets=(fields[7], fields[8]),
            checkpoint_bytes=fields[9],
            data_offset=fields[10],
            data_bytes=fields[11],
            chunk_size=fields[12],
            inline_max=fields[13],
            volume_id=str(uuid.UUID(bytes=fields[14])),
            fleet=fleet,
        ))


def check_geometry(sb: Superblock) -> Superblock:
    """``sb`` if its regions make sense, else CorruptMetadata naming the first that does not
    (a CRC only proves the block was written as it is, not by an rbdfleet writer)."""
    regions = [
        ("journal", sb.journal_offset, sb.journal_bytes),
        ("checkpoint A", sb.checkpoint_offsets[0], sb.checkpoint_bytes),
        ("checkpoint B", sb.checkpoint_offsets[1], sb.checkpoint_bytes),
        ("data area", sb.data_offset, sb.data_bytes),
    ]
    if sb.device_size % ALIGN:
        raise CorruptMetadata(f"superblock device size {sb.device_size} is not 4 KiB aligned")
    end = len(SLOTS) * ALIGN  # past the two superblocks
    for name, offset, length in sorted(regions, key=lambda r: r[1]):
        if offset % ALIGN or length % ALIGN or length <= 0:
            raise CorruptMetadata(f"superblock {name} {offset}+{length} is not aligned blocks")
        if offset < end or offset + length > sb.device_size:
            raise CorruptMetadata(f"superblock {name} {offset}+{length} overlaps another "
                                  f"region or passes the device size {sb.device_size}")
        end = offset + length
    if sb.data_offset % DATA_ALIGN:
        raise CorruptMetadata(f"superblock data area at {sb.data_offset} is not on a "
                              f"{DATA_ALIGN}-byte object boundary")
    if sb.journal_bytes < MIN_JOURNAL:
        raise CorruptMetadata(f"superblock journal of {sb.journal_bytes} bytes is too small")
    if sb.chunk_size <= 0 or sb.chunk_size % ALIGN or sb.chunk_size > sb.data_bytes:
        raise CorruptMetadata(f"superblock chunk size {sb.chunk_size}")
    if sb.inline_max > sb.journal_bytes // 4:  # an inline file travels in one record
        raise CorruptMetadata(f"superblock inline max {sb.inline_max} does not fit a record")
    return sb


def choose(copies: list[bytes]) -> Superblock:
    """The valid copy with the highest generation; raises the first copy's error if none is."""
    valid: list[Superblock] = []
    errors: list[FormatError] = []
    for block in copies:
        try:
            valid.append(Superblock.decode(block))
        except (FormatError, UnicodeDecodeError, ValueError) as exc:
            errors.append(exc if isinstance(exc, FormatError) else ChecksumMismatch(str(exc)))
    if valid:
        return max(valid, key=lambda sb: sb.generation)
    raise errors[0]


def layout(
    device_size: int,
    *,
    fleet: str,
    volume_id: str,
    journal_bytes: int | None = None,
    chunk_size: int = 1 << 20,
    inline_max: int | None = None,
) -> Superblock:
    """Plan the regions of a fresh image of ``device_size`` bytes.

    Superblocks, journal (from 64 KiB on, a multiple of 64 KiB: default 1/64 of the image,
    1-256 MiB), two checkpoint slots
    (1/256 of the image each, 1-64 MiB: a free map and a quarantine, not the namespace) and
    the data area from the next 4 MiB object boundary on, in that order.
    """
    size = device_size // ALIGN * ALIGN
    mib = 1 << 20
    if journal_bytes is None:
        journal_bytes = min(max(size // 64, mib), 256 * mib)
    unit = RING_ALIGN if journal_bytes >= RING_ALIGN else ALIGN
    journal_bytes = max(journal_bytes // unit * unit, MIN_JOURNAL)
    if inline_max is None:
        inline_max = min(INLINE_MAX, journal_bytes // 8)  # its record, path and all, fits
    checkpoint_bytes = min(max(size // 256, mib), 64 * mib) // ALIGN * ALIGN
    journal_offset = RING_ALIGN
    ckpt_a = journal_offset + journal_bytes
    ckpt_b = ckpt_a + checkpoint_bytes
    data_offset = -(-(ckpt_b + checkpoint_bytes) // DATA_ALIGN) * DATA_ALIGN
    if data_offset + chunk_size > size:
        raise ValueError(f"device of {device_size} bytes is too small for an rbdfleet volume")
    if chunk_size % ALIGN or chunk_size <= 0:
        raise ValueError("chunk size must be a positive multiple of 4096")
    return Superblock(
        generation=1,
        device_size=size,
        journal_offset=journal_offset,
        journal_bytes=journal_bytes,
        checkpoint_offsets=(ckpt_a, ckpt_b),
        checkpoint_bytes=checkpoint_bytes,
        data_offset=data_offset,
        data_bytes=size - data_offset,
        chunk_size=chunk_size,
        inline_max=inline_max,
        volume_id=volume_id,
        fleet=fleet,
    )
