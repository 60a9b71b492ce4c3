"""An independent reader of an rbdfleet image (format 3), written from docs/format.md alone.

Stdlib only, and nothing from ``agents`` or ``orchestrator``: it exists to prove that the
document specifies the on-disk format completely (tests/unit/test_format_reader.py compares
its view of an image with the engine's). ``read_image(path)`` returns what it read: the
superblock, the checkpoint, the chain of records after it, and every path of the namespace
(``/`` excluded) with its kind, size, version, epoch, mtime, whole-file CRC and, for files,
the bytes, every checksum on the way verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

BLOCK = 4096
OBJECT = 4 << 20
PAGE = 32768
MAX_CELL = (PAGE - 32) // 4  # 8184
OVERFLOW_PAYLOAD = PAGE - 44  # 32724
NO_PAGE = 2**64 - 1

SB = struct.Struct("<8sHQIQQQQQQQQII16sH")  # up to the fleet name length (112 bytes)
RECORD = struct.Struct("<4sHHIQQQIB3xII")  # 52 bytes
CKPT = struct.Struct("<4sH2xQQQQII")  # 48 bytes
PAGE_HDR = struct.Struct("<4sBBBBHHIQQ")  # 32 bytes
LEAF_CELL = struct.Struct("<HIB")
OVERFLOW_REF = struct.Struct("<QII")
BRANCH_CELL = struct.Struct("<HQQI")
ENTRY = struct.Struct("<BBQQQdIIII")  # 50 bytes
EXTENT = struct.Struct("<QQ")
OPS = {1: "put", 2: "delete", 3: "mkdir", 4: "rename", 5: "epoch-start", 6: "checkpoint"}
SEAL = 8


class FormatError(Exception):
    """The image does not follow docs/format.md (or this reader misread the document)."""


def align_up(n: int, to: int = BLOCK) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Superblock:
    generation: int
    device_size: int
    journal_offset: int
    journal_bytes: int
    checkpoints: tuple[int, int]
    checkpoint_bytes: int
    data_offset: int
    data_bytes: int
    chunk_size: int
    inline_max: int
    uuid: bytes
    fleet: str

    @property
    def tag(self) -> int:
        return int.from_bytes(self.uuid[0:4], "big")

    @property
    def record_key(self) -> bytes:
        return hashlib.blake2b(b"rbdfleet-record" + self.uuid, digest_size=32).digest()


@dataclass(frozen=True)
class Checkpoint:
    slot: int
    seq: int
    epoch: int
    journal_pos: int
    root: tuple[int, int, int] | None


@dataclass(frozen=True)
class Record:
    offset: int  # ring offset
    length: int
    seq: int
    epoch: int
    commit_seq: int
    op: str
    payload: dict[str, Any]
    blob: bytes


@dataclass(frozen=True)
class Node:
    """One path of the namespace; files carry inline bytes or (chunk, extents, sums)."""

    kind: str  # "file" | "dir"
    size: int
    version: int
    epoch: int
    mtime: float
    crc: int | None
    inline: bytes | None = None
    chunk: int = 0
    extents: tuple[tuple[int, int], ...] = ()
    sums: tuple[int, ...] = ()


@dataclass(frozen=True)
class FileInfo:
    kind: str
    size: int
    version: int
    epoch: int
    mtime: float
    crc: int | None
    data: bytes | None  # None for a directory


@dataclass
class TreeStats:
    levels: int = 0  # 0: empty tree, 1: a root leaf, ...
    branches: int = 0
    overflow_pages: int = 0


@dataclass
class Image:
    superblock: Superblock
    checkpoint: Checkpoint
    applied_seq: int
    epoch: int
    records: list[Record]
    tree: TreeStats
    files: dict[str, FileInfo] = field(default_factory=dict)


class Reader:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise FormatError(f"read [{offset}, +{length}) outside the image")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise FormatError(f"short read at {offset}")
        return data

    # -- superblock ---------------------------------------------------------------------

    def superblock_copy(self, copy: int) -> Superblock:
        raw = self.pread(copy * BLOCK, BLOCK)
        (magic, version, generation, block, device_size, j_off, j_bytes, ck_a, ck_b, ck_bytes,
         d_off, d_bytes, chunk, inline_max, uuid, name_len) = SB.unpack_from(raw)
        if magic != b"RBDFLEET":
            raise FormatError(f"superblock {copy}: bad magic")
        end = SB.size + name_len
        if name_len > 255 or end + 4 > BLOCK:
            raise FormatError(f"superblock {copy}: fleet name length {name_len}")
        (crc,) = struct.unpack_from("<I", raw, end)
        if zlib.crc32(raw[:end]) != crc:
            raise FormatError(f"superblock {copy}: bad crc")
        if version != 3:
            raise FormatError(f"superblock {copy}: image format {version}")
        if block != BLOCK:
            raise FormatError(f"superblock {copy}: block size {block}")
        sb = Superblock(generation, device_size, j_off, j_bytes, (ck_a, ck_b), ck_bytes, d_off,
                        d_bytes, chunk, inline_max, uuid, raw[SB.size:end].decode())
        check_geometry(sb)
        if self.size < device_size:
            raise FormatError("device smaller than the superblock's device size")
        return sb

    def superblock(self) -> Superblock:
        copies: list[Superblock] = []
        errors: list[FormatError] = []
        for copy in (0, 1):
            try:
                copies.append(self.superblock_copy(copy))
            except FormatError as exc:
                errors.append(exc)
        if not copies:
            raise errors[0]
        return max(copies, key=lambda sb: sb.generation)

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint_header(self, sb: Superblock, slot: int) -> tuple[int, int, int, int, int]:
        raw = self.pread(sb.checkpoints[slot], BLOCK)
        magic, version, seq, epoch, pos, body_len, body_crc, hdr_crc = CKPT.unpack_from(raw)
        if magic != b"RBFC" or version != 2 or zlib.crc32(raw[:44]) != hdr_crc:
            raise FormatError(f"checkpoint slot {slot}: bad header")
        if BLOCK + body_len > sb.checkpoint_bytes:
            raise FormatError(f"checkpoint slot {slot}: body length {body_len}")
        if pos % BLOCK or pos > sb.journal_bytes:
            raise FormatError(f"checkpoint slot {slot}: journal_pos {pos}")
        return seq, epoch, pos, body_len, body_crc

    def checkpoint_body(self, sb: Superblock, slot: int, seq: int, epoch: int, pos: int,
                        body_len: int, body_crc: int) -> Checkpoint:
        body = self.pread(sb.checkpoints[slot] + BLOCK, body_len)
        if zlib.crc32(body) != body_crc:
            raise FormatError(f"checkpoint slot {slot}: bad body crc")
        inflater = zlib.decompressobj()
        limit = max(64 * body_len, 1 << 20)
        text = inflater.decompress(body, limit)
        if inflater.unconsumed_tail or not inflater.eof:
            raise FormatError(f"checkpoint slot {slot}: body does not inflate within bounds")
        doc = bounded_json(text)
        if not isinstance(doc, dict):
            raise FormatError(f"checkpoint slot {slot}: body is no object")
        runs = [(o, n) for o, n in doc["free"]] + [(o, n) for _s, o, n in doc["quarantine"]]
        runs.sort()
        end = sb.data_offset
        for off, length in runs:
            if off % BLOCK or length % BLOCK or length <= 0 or off < end:
                raise FormatError(f"checkpoint slot {slot}: bad run {off}+{length}")
            end = off + length
        if end > sb.data_offset + sb.data_bytes:
            raise FormatError(f"checkpoint slot {slot}: run past the data area")
        root = triple(doc["root"])
        if root is not None:
            self.page(sb, root[0], root[2])
        return Checkpoint(slot, seq, epoch, pos, root)

    def checkpoint(self, sb: Superblock) -> Checkpoint:
        headers: list[tuple[int, tuple[int, int, int, int, int]]] = []
        for slot in (0, 1):
            try:
                headers.append((slot, self.checkpoint_header(sb, slot)))
            except FormatError:
                continue
        # the highest seq, slot B on a tie; the other slot if its body fails
        headers.sort(key=lambda h: (h[1][0], h[0]), reverse=True)
        for slot, hdr in headers:
            try:
                return self.checkpoint_body(sb, slot, *hdr)
            except FormatError:
                continue
        raise FormatError("no valid checkpoint")

    # -- tree -----------------------------------------------------------------------------

    def raw_page(self, sb: Superblock, page_no: int
                 ) -> tuple[tuple[Any, ...], bytes]:
        """The header fields and bytes of page ``page_no``, its place and own CRC checked."""
        at = page_no * BLOCK
        if at < sb.data_offset or at + PAGE > sb.data_offset + sb.data_bytes:
            raise FormatError(f"page {page_no} outside the data area")
        raw = self.pread(at, PAGE)
        header = PAGE_HDR.unpack_from(raw)
        if zlib.crc32(raw[16:], zlib.crc32(raw[:12])) != header[7]:
            raise FormatError(f"page {page_no}: bad crc")
        return header, raw

    def page(self, sb: Superblock, page_no: int, crc: int) -> tuple[int, int, int, int, bytes]:
        """(kind, level, count, generation, page bytes) of a page whose CRC is ``crc``."""
        header, raw = self.raw_page(sb, page_no)
        magic, version, kind, level, reserved, count, used, own_crc, number, gen = header
        if magic != b"RBFM" or version != 1 or reserved or kind not in (1, 2, 3):
            raise FormatError(f"page {page_no}: bad header")
        if own_crc != crc:
            raise FormatError(f"page {page_no}: not the page its parent names (crc)")
        if number != page_no:
            raise FormatError(f"page {page_no}: says it is page {number}")
        if not PAGE_HDR.size <= used <= PAGE or any(raw[used:]):
            raise FormatError(f"page {page_no}: used {used}")
        if kind != 2 and level != 0:
            raise FormatError(f"page {page_no}: level {level}")
        return kind, level, count, gen, raw[:used]

    def walk(self, sb: Superblock, root: tuple[int, int, int] | None,
             stats: TreeStats) -> dict[str, Node]:
        nodes: dict[str, Node] = {}
        if root is None:
            return nodes
        levels: list[int] = []

        def visit(ptr: tuple[int, int, int], lo: bytes, hi: bytes | None,
                  want_level: int | None) -> None:
            page_no, generation, crc = ptr
            kind, level, count, gen, raw = self.page(sb, page_no, crc)
            if gen != generation:
                raise FormatError(f"page {page_no}: generation {gen}, parent says {generation}")
            if kind == 3 or (want_level is not None and level != want_level):
                raise FormatError(f"page {page_no}: kind {kind} level {level} unexpected")
            if want_level is None:
                levels.append(level + 1)
            at = PAGE_HDR.size
            prev: bytes | None = None
            children: list[tuple[bytes, tuple[int, int, int]]] = []
            for _ in range(count):
                if kind == 1:
                    k, v, flags = LEAF_CELL.unpack_from(raw, at)
                    at += LEAF_CELL.size
                else:
                    k, c_page, c_gen, c_crc = BRANCH_CELL.unpack_from(raw, at)
                    at += BRANCH_CELL.size
                key = raw[at : at + k]
                at += k
                if len(key) != k or (prev is not None and key <= prev):
                    raise FormatError(f"page {page_no}: keys out of order")
                prev = key
                if kind == 2:
                    if c_gen > gen:
                        raise FormatError(f"page {page_no}: child newer than its parent")
                    children.append((key, (c_page, c_gen, c_crc)))
                    continue
                if key < lo or (hi is not None and key >= hi):
                    raise FormatError(f"page {page_no}: key {key!r} outside its range")
                if flags == 0:
                    if LEAF_CELL.size + k + v > MAX_CELL:
                        raise FormatError(f"page {page_no}: oversized inline value")
                    value = raw[at : at + v]
                    at += v
                elif flags == 1:
                    if LEAF_CELL.size + k + v <= MAX_CELL:
                        raise FormatError(f"page {page_no}: overflow value that fits a cell")
                    first, n_pages, value_crc = OVERFLOW_REF.unpack_from(raw, at)
                    at += OVERFLOW_REF.size
                    value = self.overflow(sb, first, n_pages, v, value_crc, stats)
                else:
                    raise FormatError(f"page {page_no}: cell flags {flags}")
                if len(value) != v:
                    raise FormatError(f"page {page_no}: value cut short")
                path = key_path(key)
                nodes[path] = decode_entry(value, path)
            if at != len(raw):
                raise FormatError(f"page {page_no}: cells end at {at}, used says {len(raw)}")
            if kind == 1:
                return
            stats.branches += 1
            if level == 0 or not children or children[0][0] != b"":
                raise FormatError(f"page {page_no}: bad branch")
            for i, (key, child) in enumerate(children):
                child_lo = lo if i == 0 else key
                if i and key <= lo:
                    raise FormatError(f"page {page_no}: child key below the range")
                child_hi = children[i + 1][0] if i + 1 < len(children) else hi
                if i + 1 == len(children) and hi is not None and key >= hi:
                    raise FormatError(f"page {page_no}: child key above the range")
                visit(child, child_lo, child_hi, level - 1)

        visit(root, b"", None, None)
        stats.levels = levels[0]
        return nodes

    def overflow(self, sb: Superblock, first: int, n_pages: int, v: int, value_crc: int,
                 stats: TreeStats) -> bytes:
        if n_pages != -(-v // OVERFLOW_PAYLOAD) or v > 64 << 20:
            raise FormatError(f"overflow at {first}: {n_pages} pages for {v} bytes")
        parts: list[bytes] = []
        page_no = first
        for i in range(n_pages):
            header, raw = self.raw_page(sb, page_no)
            magic, version, kind, level, reserved, count, used, _crc, number, _gen = header
            if (magic, version, kind, level, reserved, count, number) != (
                    b"RBFM", 1, 3, 0, 0, 0, page_no):
                raise FormatError(f"overflow page {page_no}: bad header")
            nxt, length = struct.unpack_from("<QI", raw, 32)
            last = i == n_pages - 1
            want = v - OVERFLOW_PAYLOAD * i if last else OVERFLOW_PAYLOAD
            if length != want or (nxt == NO_PAGE) != last or used != 44 + length:
                raise FormatError(f"overflow page {page_no}: length {length} next {nxt}")
            parts.append(raw[44 : 44 + length])
            stats.overflow_pages += 1
            page_no = nxt
        value = b"".join(parts)
        if zlib.crc32(value) != value_crc:
            raise FormatError(f"overflow at {first}: bad value crc")
        return value

    # -- journal --------------------------------------------------------------------------

    def record_at(self, sb: Superblock, place: int) -> Record | None:
        """The valid record of this volume starting at ring offset ``place``, else None."""
        ring = sb.journal_bytes
        if place + RECORD.size > ring:
            return None
        base = sb.journal_offset + place
        hdr = self.pread(base, RECORD.size)
        (magic, version, flags, length, seq, epoch, commit_seq, tag, op, json_len,
         blob_len) = RECORD.unpack(hdr)
        if magic != b"RBFR" or tag != sb.tag or length < RECORD.size + SEAL:
            return None
        if place + length > ring:
            return None
        data = self.pread(base, length)
        seal = hashlib.blake2b(data[:-SEAL], key=sb.record_key, digest_size=SEAL).digest()
        if seal != data[-SEAL:]:
            return None
        if version != 3:
            raise FormatError(f"record at {place}: sealed record of format {version}")
        if length != RECORD.size + json_len + blob_len + SEAL:
            return None
        if op not in OPS or flags not in (0, 1) or (flags == 0 and blob_len):
            raise FormatError(f"record at {place}: op {op} flags {flags}")
        try:
            payload = bounded_json(data[RECORD.size : RECORD.size + json_len])
        except FormatError:
            return None
        if not isinstance(payload, dict):
            return None
        blob = data[RECORD.size + json_len : length - SEAL]
        return Record(place, length, seq, epoch, commit_seq, OPS[op], payload, blob)

    def next_record(self, sb: Superblock, pos: int, seq: int, highest: int) -> Record | None:
        """The chain's record ``seq`` after one that ended at ring offset ``pos``."""
        for place in dict.fromkeys((pos, align_up(pos), 0)):
            if place < sb.journal_bytes:
                rec = self.record_at(sb, place)
                if rec is not None and rec.seq == seq and rec.epoch >= highest:
                    return rec
        return None

    def chain(self, sb: Superblock, ck: Checkpoint) -> list[Record]:
        pos = 0 if ck.journal_pos == sb.journal_bytes else ck.journal_pos
        seq, highest = ck.seq, ck.epoch
        records: list[Record] = []
        while (rec := self.next_record(sb, pos, seq + 1, highest)) is not None:
            records.append(rec)
            seq, highest, pos = rec.seq, max(highest, rec.epoch), rec.offset + rec.length
        return records

    def witnesses(self, sb: Superblock, missing: int, epoch: int) -> Record | None:
        """A valid record proving seq ``missing`` had been durable (see Torn tail)."""
        ring = self.pread(sb.journal_offset, sb.journal_bytes)
        at = ring.find(b"RBFR")
        while at >= 0:
            rec = self.record_at(sb, at)
            if rec and rec.seq >= missing and rec.commit_seq >= missing and rec.epoch >= epoch:
                return rec
            at = ring.find(b"RBFR", at + 1)
        return None

    # -- file bytes -----------------------------------------------------------------------

    def file_bytes(self, sb: Superblock, path: str, node: Node) -> bytes:
        if node.inline is not None:
            data = node.inline
        else:
            if node.chunk <= 0 or len(node.sums) != -(-node.size // node.chunk):
                raise FormatError(f"{path}: {len(node.sums)} sums for {node.size} bytes")
            parts: list[bytes] = []
            for off, length in node.extents:
                if off % BLOCK or length % BLOCK or off < sb.data_offset or \
                        off + length > sb.data_offset + sb.data_bytes:
                    raise FormatError(f"{path}: extent {off}+{length} outside the data area")
                parts.append(self.pread(off, length))
            padded = b"".join(parts)
            # laid out in order over the extents, the last block zero padded
            if len(padded) != align_up(node.size) or any(padded[node.size :]):
                raise FormatError(f"{path}: extents of {len(padded)} bytes for {node.size}")
            data = padded[: node.size]
            for i, crc in enumerate(node.sums):
                if zlib.crc32(data[i * node.chunk : (i + 1) * node.chunk]) != crc:
                    raise FormatError(f"{path}: chunk {i} checksum mismatch")
        if len(data) != node.size:
            raise FormatError(f"{path}: {len(data)} bytes, size {node.size}")
        if node.crc is not None and zlib.crc32(data) != node.crc:
            raise FormatError(f"{path}: whole-file checksum mismatch")
        return data


def check_geometry(sb: Superblock) -> None:
    regions = sorted([
        (sb.journal_offset, sb.journal_bytes),
        (sb.checkpoints[0], sb.checkpoint_bytes),
        (sb.checkpoints[1], sb.checkpoint_bytes),
        (sb.data_offset, sb.data_bytes),
    ])
    end = 2 * BLOCK
    for off, length in regions:
        if length <= 0 or off % BLOCK or length % BLOCK or off < end:
            raise FormatError(f"bad geometry: region {off}+{length}")
        end = off + length
    if sb.device_size % BLOCK or end > sb.device_size or sb.data_offset % OBJECT:
        raise FormatError("bad geometry: device size or data offset")
    if sb.journal_bytes < 16 * BLOCK or sb.inline_max > sb.journal_bytes // 4:
        raise FormatError("bad geometry: journal")
    if sb.chunk_size <= 0 or sb.chunk_size % BLOCK or sb.chunk_size > sb.data_bytes:
        raise FormatError("bad geometry: chunk size")


def bounded_json(text: bytes) -> Any:
    def no_constant(name: str) -> Any:
        raise FormatError(f"json constant {name}")

    def bounded_int(s: str) -> int:
        if len(s.lstrip("-")) > 20:
            raise FormatError("json integer too long")
        return int(s)

    try:
        doc = json.loads(text.decode(), parse_constant=no_constant, parse_int=bounded_int)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"bad json: {exc}") from exc

    def depth(x: Any) -> int:
        if isinstance(x, dict):
            return 1 + max(map(depth, x.values()), default=0)
        if isinstance(x, list):
            return 1 + max(map(depth, x), default=0)
        return 0

    if depth(doc) > 16:
        raise FormatError("json nested too deep")
    return doc


def triple(x: Any) -> tuple[int, int, int] | None:
    if x is None:
        return None
    page, generation, crc = x
    return int(page), int(generation), int(crc)


def key_path(key: bytes) -> str:
    parent, sep, name = key.partition(b"\x00")
    if not sep or not parent.startswith(b"/") or not name or b"/" in name:
        raise FormatError(f"bad key {key!r}")
    return (parent.rstrip(b"/") + b"/" + name).decode()


def decode_entry(value: bytes, path: str) -> Node:
    if len(value) < ENTRY.size:
        raise FormatError(f"{path}: entry cut short")
    kind, flags, size, version, epoch, mtime, crc, chunk, n, m = ENTRY.unpack_from(value)
    var = value[ENTRY.size :]
    if kind == 2:
        if (flags, size, chunk, n, m, len(var)) != (0, 0, 0, 0, 0, 0):
            raise FormatError(f"{path}: bad directory entry")
        return Node("dir", 0, version, epoch, mtime, None)
    if kind != 1 or flags & ~3:
        raise FormatError(f"{path}: kind {kind} flags {flags}")
    crc_or_none = crc if flags & 1 else None
    if flags & 2:
        if chunk or n or m != size or len(var) != m:
            raise FormatError(f"{path}: bad inline entry")
        return Node("file", size, version, epoch, mtime, crc_or_none, inline=var)
    if chunk <= 0 or m != -(-size // chunk) or len(var) != 16 * n + 4 * m:
        raise FormatError(f"{path}: bad stored entry")
    extents = tuple(EXTENT.iter_unpack(var[: 16 * n]))
    sums = struct.unpack_from(f"<{m}I", var, 16 * n)
    return Node("file", size, version, epoch, mtime, crc_or_none, None, chunk, extents, sums)


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def apply(ns: dict[str, Node], rec: Record) -> None:
    """Apply one record of the chain to the namespace (docs/format.md, Payloads)."""
    p = rec.payload

    def need_dir(path: str) -> None:
        if path != "/" and (path not in ns or ns[path].kind != "dir"):
            raise FormatError(f"seq {rec.seq}: {path} is no directory")

    def make_parents(path: str, mtime: float) -> None:
        missing: list[str] = []
        d = parent_of(path)
        while d != "/" and d not in ns:
            missing.append(d)
            d = parent_of(d)
        need_dir(d)
        for d in reversed(missing):
            ns[d] = Node("dir", 0, rec.seq, rec.epoch, mtime, None)

    if rec.op == "put":
        path, size, mtime, crc = p["path"], p["size"], float(p["mtime"]), p.get("crc")
        if path in ns and ns[path].kind != "file":
            raise FormatError(f"seq {rec.seq}: put over directory {path}")
        make_parents(path, mtime)
        if "extents" in p:
            ns[path] = Node("file", size, rec.seq, rec.epoch, mtime, crc, None, p["chunk"],
                            tuple((o, n) for o, n in p["extents"]), tuple(p["sums"]))
        else:
            ns[path] = Node("file", size, rec.seq, rec.epoch, mtime, crc, inline=rec.blob)
    elif rec.op == "delete":
        path = p["path"]
        if path not in ns or any(q.startswith(path + "/") for q in ns):
            raise FormatError(f"seq {rec.seq}: cannot delete {path}")
        del ns[path]
    elif rec.op == "mkdir":
        path, mtime = p["path"], float(p["mtime"])
        if p["parents"] and path in ns and ns[path].kind == "dir":
            return  # mkdir -p of an existing directory: a record, and no change
        if path in ns:
            raise FormatError(f"seq {rec.seq}: {path} exists")
        if p["parents"]:
            make_parents(path, mtime)
        need_dir(parent_of(path))
        ns[path] = Node("dir", 0, rec.seq, rec.epoch, mtime, None)
    elif rec.op == "rename":
        src, dst = p["src"], p["dst"]
        if src == dst and src in ns:
            return  # a rename onto itself: a record, and no change (not even the version)
        if src not in ns or dst.startswith(src + "/"):
            raise FormatError(f"seq {rec.seq}: cannot rename {src} to {dst}")
        need_dir(parent_of(dst))
        moved = ns[src]
        if dst in ns and (ns[dst].kind == "dir" or moved.kind == "dir"):
            raise FormatError(f"seq {rec.seq}: {dst} exists")
        for q in [q for q in ns if q.startswith(src + "/")]:
            ns[dst + q[len(src) :]] = ns.pop(q)
        del ns[src]
        ns[dst] = replace(moved, version=rec.seq, epoch=rec.epoch)
    elif rec.op == "epoch-start":
        if p["epoch"] != rec.epoch:
            raise FormatError(f"seq {rec.seq}: epoch-start payload {p['epoch']}")
    elif rec.op == "checkpoint" and p["seq"] != rec.seq - 1:
        raise FormatError(f"seq {rec.seq}: checkpoint record for seq {p['seq']}")


def read_image(path: str) -> Image:
    """Everything the image at ``path`` holds, read and checked as docs/format.md says."""
    r = Reader(path)
    try:
        sb = r.superblock()
        ck = r.checkpoint(sb)
        stats = TreeStats()
        ns = r.walk(sb, ck.root, stats)
        root = ck.root
        records = r.chain(sb, ck)
        epoch = ck.epoch
        for rec in records:
            if rec.op == "checkpoint" and triple(rec.payload["root"]) != root:
                # a reader switches to the record's root (the state after its seq)
                root = triple(rec.payload["root"])
                stats = TreeStats()
                ns = r.walk(sb, root, stats)
            else:
                apply(ns, rec)
            epoch = max(epoch, rec.epoch)
        applied = records[-1].seq if records else ck.seq
        if (w := r.witnesses(sb, applied + 1, epoch)) is not None:
            raise FormatError(f"seq {applied + 1} missing, witnessed by seq {w.seq} at "
                              f"ring offset {w.offset}")
        files = {
            p: FileInfo(n.kind, n.size, n.version, n.epoch, n.mtime, n.crc,
                        r.file_bytes(sb, p, n) if n.kind == "file" else None)
            for p, n in sorted(ns.items())
        }
        return Image(sb, ck, applied, epoch, records, stats, files)
    finally:
        r.close()
