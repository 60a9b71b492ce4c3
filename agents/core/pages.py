"""Byte layout of the metadata pages (the copy-on-write B+tree of :mod:`agents.core.btree`),
of its keys and of the entry record stored under them: the codec of docs/format.md's
"Metadata tree", which is the specification (page header, leaf, branch and overflow cells,
keys, entries, byte by byte).

Pure codecs: bytes in, objects out, nothing read or written here. Every decoder bounds-checks
what it is given (a page of another image, random bytes, a page whose CRC an attacker
recomputed) and raises the project's errors naming the page number: ``BadMagic``,
``UnsupportedFormat``, ``ChecksumMismatch`` (the page's own CRC, or the CRC its parent holds
for it: a stale or misdirected page), ``CorruptMetadata`` (anything else that does not
decode); never IndexError, struct.error or a loop whose length the page chooses unbounded.

:class:`Layout` takes the page size (4 to 32 KiB: the unit tests use small pages to build
deep trees quickly); images use 32 KiB (``agents.follower.TREE_PAGE``), the only size whose
keys hold every valid path. A value is stored in its cell when the cell fits a quarter of the
page after the header (``max_cell``), else in a chain of overflow pages read for exactly the
count its cell names. Keys are at most ``max_cell - 23`` bytes and are never spilled, so a
page holds at least four cells and a split of any full page into two halves always fits.

The child's generation and CRC in its parent make the tree a Merkle tree: a reader that
trusts the root's (page, generation, CRC) triple (the checkpoint holds it) detects a page
that is self-consistent but not the one its parent was written with (a lost or misdirected
write, a page number reused too early). A child's generation is never above its parent's.

Keys: a path's key is its parent's path, NUL, its last component; so a directory's children
are one key range (a listing is one range scan) and its deeper descendants one more (a
directory rename is two). A (depth, path) key would scatter one subtree over one range per
depth.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from agents.core.allocator import Extent
from agents.core.index import Entry, Node
from agents.core.index import _check_layout as check_layout  # the one check of a layout
from agents.errors import BadMagic, ChecksumMismatch, CorruptMetadata, UnsupportedFormat

MAGIC = b"RBFM"
VERSION = 1
KIND_LEAF = 1
KIND_BRANCH = 2
KIND_OVERFLOW = 3
HEADER = struct.Struct("<4sBBBBHHIQQ")
LEAF_CELL = struct.Struct("<HIB")
OVERFLOW_REF = struct.Struct("<QII")
BRANCH_CELL = struct.Struct("<HQQI")
OVERFLOW_HEAD = struct.Struct("<QI")
ENTRY = struct.Struct("<BBQQQdIIII")
NO_PAGE = (1 << 64) - 1
FLAG_OVERFLOW = 1
MAX_VALUE = 1 << 26  # as v1: a record (and so an entry) fits a quarter of a 256 MiB ring
MAX_LEVEL = 48  # fan-out is at least 2, so 48 levels hold more entries than any image
_CRC_AT = 12


class PageRef(NamedTuple):
    """Where a page is and what it must be: the parent's (or superblock's) view of it."""

    page_no: int
    generation: int
    crc: int


class Overflow(NamedTuple):
    """A value stored in a chain of overflow pages."""

    first: int
    pages: int
    length: int
    crc: int


@dataclass(eq=False, slots=True)
class Leaf:
    """A leaf page in memory. ``ref`` is None while a transaction owns (may mutate) it; a
    page read from the store or committed has its ref and is never mutated again."""

    keys: list[bytes]
    values: list[bytes | Overflow]
    size: int  # encoded bytes (header + cells)
    ref: PageRef | None = None


@dataclass(eq=False, slots=True)
class Branch:
    """A branch page in memory; a child is a PageRef or, while dirty, the node itself."""

    level: int
    keys: list[bytes]
    children: list[PageRef | Leaf | Branch]
    size: int
    ref: PageRef | None = None


TreeNode = Leaf | Branch


@dataclass(frozen=True)
class Layout:
    """The sizes that follow from the page size."""

    page_size: int = 4096
    max_cell: int = field(init=False)
    max_key: int = field(init=False)
    overflow_payload: int = field(init=False)

    def __post_init__(self) -> None:
        if self.page_size not in (4096, 8192, 16384, 32768):
            raise ValueError(f"page size {self.page_size}: 4, 8, 16 or 32 KiB")
        cell = (self.page_size - HEADER.size) // 4
        object.__setattr__(self, "max_cell", cell)
        object.__setattr__(self, "max_key", cell - LEAF_CELL.size - OVERFLOW_REF.size)
        object.__setattr__(self, "overflow_payload",
                           self.page_size - HEADER.size - OVERFLOW_HEAD.size)

    def inline(self, key: bytes, value: bytes) -> bool:
        """Whether ``value`` is stored in its leaf cell (else in overflow pages)."""
        return LEAF_CELL.size + len(key) + len(value) <= self.max_cell

    def leaf_cell(self, key: bytes, value: bytes | Overflow) -> int:
        """Encoded size of a leaf cell."""
        if isinstance(value, bytes) and self.inline(key, value):
            return LEAF_CELL.size + len(key) + len(value)
        return LEAF_CELL.size + len(key) + OVERFLOW_REF.size

    def overflow_pages(self, length: int) -> int:
        """Pages of the overflow chain of a ``length``-byte value."""
        return max(1, -(-length // self.overflow_payload))


def branch_cell(key: bytes) -> int:
    """Encoded size of a branch cell."""
    return BRANCH_CELL.size + len(key)


# ---- pages -------------------------------------------------------------------------------


def _seal(body: bytearray, kind: int, level: int, count: int, page_no: int, generation: int,
          page_size: int) -> tuple[bytes, int]:
    used = len(body)
    if used > page_size:
        raise ValueError(f"page of {used} bytes does not fit {page_size}")
    HEADER.pack_into(body, 0, MAGIC, VERSION, kind, level, 0, count, used, 0, page_no,
                     generation)
    body.extend(bytes(page_size - used))
    crc = page_crc(body)
    struct.pack_into("<I", body, _CRC_AT, crc)
    return bytes(body), crc


def page_crc(page: bytes | bytearray) -> int:
    """CRC-32 of a page without its CRC field."""
    view = memoryview(page)
    return zlib.crc32(view[_CRC_AT + 4 :], zlib.crc32(view[:_CRC_AT]))


def encode_node(node: TreeNode, page_no: int, generation: int,
                layout: Layout) -> tuple[bytes, int]:
    """The page image of a node whose children and overflow values are all written (refs),
    and its CRC."""
    body = bytearray(HEADER.size)
    if isinstance(node, Leaf):
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(value, Overflow):
                body += LEAF_CELL.pack(len(key), value.length, FLAG_OVERFLOW) + key
                body += OVERFLOW_REF.pack(value.first, value.pages, value.crc)
            else:
                body += LEAF_CELL.pack(len(key), len(value), 0) + key + value
        return _seal(body, KIND_LEAF, 0, len(node.keys), page_no, generation, layout.page_size)
    for key, child in zip(node.keys, node.children, strict=True):
        if not isinstance(child, PageRef):
            raise ValueError("a branch is written after its children")
        body += BRANCH_CELL.pack(len(key), *child) + key
    return _seal(body, KIND_BRANCH, node.level, len(node.keys), page_no, generation,
                 layout.page_size)


def encode_overflow(payload: bytes, next_page: int, page_no: int, generation: int,
                    layout: Layout) -> bytes:
    """One page of an overflow chain."""
    body = bytearray(HEADER.size) + OVERFLOW_HEAD.pack(next_page, len(payload)) + payload
    return _seal(body, KIND_OVERFLOW, 0, 0, page_no, generation, layout.page_size)[0]


def _header(data: bytes, page_no: int,
            layout: Layout) -> tuple[int, int, int, int, int, int]:
    """(kind, level, count, used, generation, crc) of a page whose magic, version, CRC and
    self page number check out."""
    if len(data) != layout.page_size:
        raise CorruptMetadata(f"metadata page {page_no} is {len(data)} bytes, not "
                              f"{layout.page_size}", page=page_no)
    magic, version, kind, level, reserved, count, used, crc, own_no, generation = \
        HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadMagic(f"metadata page {page_no}: bad magic", page=page_no)
    if version != VERSION:
        raise UnsupportedFormat(f"metadata page {page_no}: version {version} (this agent "
                                f"reads {VERSION})", page=page_no)
    if page_crc(data) != crc:
        raise ChecksumMismatch(f"metadata page {page_no}: checksum mismatch", page=page_no)
    if own_no != page_no:
        raise CorruptMetadata(f"metadata page {page_no} says it is page {own_no}",
                              page=page_no)
    if reserved or not HEADER.size <= used <= layout.page_size:
        raise CorruptMetadata(f"metadata page {page_no}: bad header", page=page_no)
    return kind, level, count, used, generation, crc


def decode_node(data: bytes, ref: PageRef, layout: Layout) -> TreeNode:
    """The leaf or branch at ``ref``; every length, offset, key order and child generation
    checked (see the module docstring for what is raised)."""
    page_no = ref.page_no
    kind, level, count, used, generation, crc = _header(data, page_no, layout)
    if generation != ref.generation or crc != ref.crc:
        raise ChecksumMismatch(
            f"metadata page {page_no} (generation {generation}) is not the page its parent "
            f"names (generation {ref.generation}): a lost or misplaced write", page=page_no)
    if kind == KIND_LEAF and level == 0:
        node: TreeNode = _decode_leaf(data, page_no, count, used, layout)
    elif kind == KIND_BRANCH and 1 <= level <= MAX_LEVEL:
        node = _decode_branch(data, page_no, level, count, used, generation, layout)
    else:
        raise CorruptMetadata(f"metadata page {page_no}: kind {kind} at level {level}",
                              page=page_no)
    node.ref = ref
    return node


def _corrupt(page_no: int, what: str) -> CorruptMetadata:
    return CorruptMetadata(f"metadata page {page_no}: {what}", page=page_no)


def _decode_leaf(data: bytes, page_no: int, count: int, used: int, layout: Layout) -> Leaf:
    if count > (used - HEADER.size) // LEAF_CELL.size:
        raise _corrupt(page_no, f"{count} cells cannot fit")
    # the hot loop of every cache miss: locals, one bounds check per cell kind
    unpack, fixed = LEAF_CELL.unpack_from, LEAF_CELL.size
    max_key, max_cell = layout.max_key, layout.max_cell
    keys: list[bytes] = []
    values: list[bytes | Overflow] = []
    pos = HEADER.size
    for _ in range(count):
        if pos + fixed > used:
            raise _corrupt(page_no, "cell past the used bytes")
        klen, vlen, flags = unpack(data, pos)
        start = pos + fixed
        pos = start + klen
        if flags == 0:
            end = pos + vlen
            if end > used or klen > max_key or fixed + klen + vlen > max_cell:
                raise _corrupt(page_no, f"cell of a {klen}-byte key and a {vlen}-byte value")
            values.append(data[pos:end])
        elif flags == FLAG_OVERFLOW:
            end = pos + OVERFLOW_REF.size
            if end > used or klen > max_key:
                raise _corrupt(page_no, f"overflow cell of a {klen}-byte key")
            first, pages, crc = OVERFLOW_REF.unpack_from(data, pos)
            if vlen > MAX_VALUE or pages != layout.overflow_pages(vlen):
                raise _corrupt(page_no, f"overflow value of {vlen} bytes in {pages} pages")
            values.append(Overflow(first, pages, vlen, crc))
        else:
            raise _corrupt(page_no, f"cell flags {flags}")
        key = data[start:pos]
        if keys and key <= keys[-1]:
            raise _corrupt(page_no, "keys out of order")
        keys.append(key)
        pos = end
    if pos != used:
        raise _corrupt(page_no, f"cells end at {pos}, the header says {used}")
    return Leaf(keys, values, used)


def _decode_branch(data: bytes, page_no: int, level: int, count: int, used: int,
                   generation: int, layout: Layout) -> Branch:
    if not 1 <= count <= (used - HEADER.size) // BRANCH_CELL.size:
        raise _corrupt(page_no, f"branch of {count} children")
    keys: list[bytes] = []
    children: list[PageRef | Leaf | Branch] = []
    pos = HEADER.size
    for i in range(count):
        if pos + BRANCH_CELL.size > used:
            raise _corrupt(page_no, "cell past the used bytes")
        klen, child, child_gen, child_crc = BRANCH_CELL.unpack_from(data, pos)
        pos += BRANCH_CELL.size
        if klen > layout.max_key or pos + klen > used:
            raise _corrupt(page_no, f"key of {klen} bytes")
        key = data[pos : pos + klen]
        pos += klen
        if (i == 0) != (key == b"") or (keys and key <= keys[-1]):
            raise _corrupt(page_no, "keys out of order")
        if child_gen > generation:
            raise _corrupt(page_no, f"child {child} of generation {child_gen}, newer than "
                                    f"its parent")
        keys.append(key)
        children.append(PageRef(child, child_gen, child_crc))
    if pos != used:
        raise _corrupt(page_no, f"cells end at {pos}, the header says {used}")
    return Branch(level, keys, children, used)


def decode_overflow(data: bytes, page_no: int, max_generation: int,
                    layout: Layout) -> tuple[bytes, int]:
    """(payload, next page) of one overflow page written no later than ``max_generation``."""
    kind, level, count, used, generation, _ = _header(data, page_no, layout)
    if kind != KIND_OVERFLOW or level or count:
        raise _corrupt(page_no, f"kind {kind} where an overflow page should be")
    if generation > max_generation:
        raise ChecksumMismatch(f"metadata page {page_no}: overflow page of generation "
                               f"{generation}, newer than its leaf ({max_generation})",
                               page=page_no)
    next_page, length = OVERFLOW_HEAD.unpack_from(data, HEADER.size)
    start = HEADER.size + OVERFLOW_HEAD.size
    if start + length != used:
        raise _corrupt(page_no, f"overflow payload of {length} bytes")
    return data[start:used], next_page


# ---- keys --------------------------------------------------------------------------------


def path_key(path: str) -> bytes:
    """The key of a normalized path."""
    if path == "/":
        return b""
    parent, _, name = path.rpartition("/")
    return (parent or "/").encode("utf-8") + b"\x00" + name.encode("utf-8")


def key_path(key: bytes) -> str:
    """Inverse of :func:`path_key`; CorruptMetadata for a key no path has."""
    if key == b"":
        return "/"
    parent, nul, name = key.partition(b"\x00")
    if not nul or not parent.startswith(b"/") or not name or b"\x00" in name or b"/" in name:
        raise CorruptMetadata(f"key {key[:100]!r} is not a path")
    try:
        text = parent.decode("utf-8"), name.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptMetadata(f"key {key[:100]!r} is not UTF-8") from exc
    return f"/{text[1]}" if text[0] == "/" else f"{text[0]}/{text[1]}"


def children_range(directory: str, after: str | None = None) -> tuple[bytes, bytes]:
    """[lo, hi) of the keys of ``directory``'s children whose names sort after ``after``."""
    prefix = directory.encode("utf-8")
    lo = prefix + b"\x00" + (b"" if after is None else after.encode("utf-8") + b"\x00")
    return lo, prefix + b"\x01"


def subtree_ranges(directory: str) -> list[tuple[bytes, bytes | None]]:
    """Key ranges [lo, hi) (hi None: to the end) holding every descendant of ``directory``."""
    if directory == "/":
        return [(b"/\x00", None)]
    prefix = directory.encode("utf-8")
    return [(prefix + b"\x00", prefix + b"\x01"), (prefix + b"/", prefix + b"0")]


# ---- entry records -----------------------------------------------------------------------

_KINDS = {"file": 1, "dir": 2}
_FLAG_CRC = 1
_FLAG_INLINE = 2


def encode_entry(node: Node) -> bytes:
    """The value stored under ``node``'s path."""
    e = node.entry
    flags = (_FLAG_CRC if e.crc is not None else 0) | (
        _FLAG_INLINE if node.inline is not None else 0)
    tail = node.inline if node.inline is not None else struct.pack(
        f"<{len(node.sums)}I", *node.sums)
    head = ENTRY.pack(_KINDS[e.kind], flags, e.size, e.version, e.epoch, e.mtime, e.crc or 0,
                      node.chunk, len(node.extents),
                      len(node.inline) if node.inline is not None else len(node.sums))
    flat = [n for x in node.extents for n in (x.offset, x.length)]
    return head + struct.pack(f"<{len(flat)}Q", *flat) + tail


def decode_entry(path: str, value: bytes) -> Node:
    """Inverse of :func:`encode_entry`; CorruptMetadata unless ``value`` is an entry as the
    writer writes it (lengths exact, layout of a file as :func:`check_layout` wants)."""
    if len(value) < ENTRY.size:
        raise CorruptMetadata(f"entry of {path} is {len(value)} bytes", path=path)
    kind_code, flags, size, version, epoch, mtime, crc, chunk, n_ext, m = \
        ENTRY.unpack_from(value)
    kind = {1: "file", 2: "dir"}.get(kind_code)
    inline = bool(flags & _FLAG_INLINE)
    expected = ENTRY.size + 16 * n_ext + (m if inline else 4 * m)
    if (kind is None or flags & ~(_FLAG_CRC | _FLAG_INLINE) or len(value) != expected
            or not math.isfinite(mtime)
            or (kind == "dir" and (flags or size or chunk or n_ext or m))):
        raise CorruptMetadata(f"entry of {path} is malformed", path=path)
    entry = Entry(path, "file" if kind == "file" else "dir", size, version, epoch, mtime,
                  crc if flags & _FLAG_CRC else None)
    if kind == "dir":
        return Node(entry)
    pos = ENTRY.size + 16 * n_ext
    flat = struct.unpack_from(f"<{2 * n_ext}Q", value, ENTRY.size)
    extents = tuple(Extent(flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
    if inline:
        if n_ext or chunk:
            raise CorruptMetadata(f"inline entry of {path} names extents", path=path)
        data = value[pos:]
        check_layout(entry, inline=data)
        return Node(entry, inline=data)
    sums = struct.unpack_from(f"<{m}I", value, pos)
    check_layout(entry, extents=extents, sums=sums, chunk=chunk)
    return Node(entry, extents, sums, chunk)
