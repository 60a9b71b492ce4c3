"""The namespace: path -> current version (entry + extents + chunk checksums or inline bytes).

Invariants:
- ``apply(record)`` is deterministic and all-or-nothing: it validates first, then mutates, so
  a refused record leaves the index as it was. Replaying a journal gives the live state.
- ``/`` always exists; every entry's parent is a directory; a directory's children are
  exactly the entries whose parent it is.
- Nodes are immutable: a reader holding a node reads that version even after an overwrite.
- ``apply`` returns the extents the record stopped referencing (overwrite, delete, rename
  over a file): the caller quarantines them under the record's seq.
- Untrusted structure is checked before use: a record's payload (:func:`check_payload`, also
  run on pushed records) and a checkpoint's nodes (:meth:`Index.from_json`) either have the
  types and shapes a writer produces (a file's checksums cover its chunks, its extents cover
  its size, parents exist and are directories) or raise ``CorruptMetadata``: never a
  TypeError half-way through a mutation.
"""

from __future__ import annotations

import bisect
import functools
import math
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from agents.core.allocator import Extent
from agents.core.record import Record
from agents.device import ALIGN
from agents.errors import (
    AlreadyExists,
    BadPath,
    CorruptMetadata,
    NotEmpty,
    NotFound,
    StaleEpoch,
    WrongKind,
)

MAX_NAME = 255
MAX_PATH = 4096
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: never part of a name


def normalize_path(path: str) -> str:
    """The one validator of paths: absolute POSIX, no ``..``/``.``/empty components, no
    control characters (NUL, newline, escape, C1...), valid UTF-8, NFC-normalized (so one
    name has one spelling), components <= 255 bytes, whole path <= 4096 bytes. Returns
    ``/a/b``."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadPath("path must be absolute (start with '/')", path=repr(path)[:100])
    control = _CONTROL.search(path)
    if control is not None:
        raise BadPath(f"path contains the control character {control.group()!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadPath("path is not valid UTF-8") from exc
    path = unicodedata.normalize("NFC", path)
    encoded = path.encode("utf-8")
    if len(encoded) > MAX_PATH:
        raise BadPath(f"path longer than {MAX_PATH} bytes")
    if path == "/":
        return "/"
    parts = path[1:].split("/")
    if parts and parts[-1] == "":
        parts.pop()
    for part in parts:
        if part in ("", ".", ".."):
            raise BadPath(f"path component {part!r} is not allowed", path=path[:200])
        if len(part.encode("utf-8")) > MAX_NAME:
            raise BadPath(f"path component longer than {MAX_NAME} bytes")
    return "/" + "/".join(parts)


def _typed(d: dict[str, Any], key: str, tp: type) -> Any:
    value = d.get(key)
    if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
        raise CorruptMetadata(f"field {key!r} is not a {tp.__name__}", field=key)
    return value


def _int_field(d: dict[str, Any], key: str) -> int:
    value: int = _typed(d, key, int)
    if value < 0:
        raise CorruptMetadata(f"field {key!r} is negative", field=key)
    return value


def _number_field(d: dict[str, Any], key: str) -> float:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CorruptMetadata(f"field {key!r} is not a finite number", field=key)
    return float(value)


def _path_field(d: dict[str, Any], key: str) -> str:
    try:
        return normalize_path(_typed(d, key, str))
    except BadPath as exc:
        raise CorruptMetadata(f"field {key!r}: {exc.message}", field=key) from exc


def _int_list(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CorruptMetadata(f"field {key!r} is not a list of non-negative integers", field=key)
    return value


def _extent_list(d: dict[str, Any]) -> tuple[Extent, ...]:
    raw = d.get("extents")
    if not isinstance(raw, list) or not all(isinstance(x, list) and len(x) == 2 for x in raw):
        raise CorruptMetadata("field 'extents' is not a list of [offset, length]",
                              field="extents")
    return tuple(Extent(*_int_list(x, "extents")) for x in raw)


def _file_layout(d: dict[str, Any], entry: Entry) -> tuple[tuple[Extent, ...], tuple[int, ...],
                                                            int]:
    """The extents, chunk checksums and chunk size of a stored (not inline) file."""
    extents = _extent_list(d)
    sums = tuple(_int_list(d.get("sums"), "sums"))
    chunk = _int_field(d, "chunk")
    _check_layout(entry, extents=extents, sums=sums, chunk=chunk)
    return extents, sums, chunk


def _check_layout(entry: Entry, *, inline: bytes | None = None,
                  extents: tuple[Extent, ...] = (), sums: tuple[int, ...] = (),
                  chunk: int = 0) -> None:
    """What serving a read relies on: inline bytes are the file; otherwise aligned, non-empty
    extents cover the file and there is one 32-bit checksum per ``chunk`` (a multiple of
    4 KiB). Where the extents lie is checked against the data area by the allocator."""
    if inline is not None:
        if len(inline) != entry.size:
            raise CorruptMetadata("inline data size differs from the entry", path=entry.path)
        return
    if chunk <= 0 or chunk % ALIGN:
        raise CorruptMetadata(f"chunk size {chunk}", path=entry.path)
    if len(sums) != -(-entry.size // chunk) or any(s >= 1 << 32 for s in sums):
        raise CorruptMetadata(f"{len(sums)} checksums for a {entry.size}-byte file",
                              path=entry.path)
    if any(x.offset % ALIGN or x.length % ALIGN or x.length == 0 for x in extents):
        raise CorruptMetadata("extent unaligned or empty", path=entry.path)
    if sum(x.length for x in extents) < entry.size:
        raise CorruptMetadata("extents shorter than the file", path=entry.path)


def check_payload(record: Record) -> None:
    """CorruptMetadata unless ``record``'s payload has the fields, types and shapes a writer
    writes for its op (whether it applies to the index is :meth:`Index.apply`'s business)."""
    p = record.payload
    if record.op == "put":
        path = _path_field(p, "path")
        crc = p.get("crc")
        if crc is not None:
            crc = _int_field(p, "crc")
        entry = Entry(path, "file", _int_field(p, "size"), record.seq, record.epoch,
                      _number_field(p, "mtime"), crc)
        if "data" in p:
            _check_layout(entry, inline=_typed(p, "data", bytes))
        else:
            _file_layout(p, entry)
    elif record.op in ("delete", "mkdir"):
        _path_field(p, "path")
        if record.op == "mkdir":
            _number_field(p, "mtime")
    elif record.op == "rename":
        _path_field(p, "src")
        _path_field(p, "dst")
    elif record.op == "checkpoint":
        root = p.get("root")
        if root is not None and len(_int_list(root, "root")) != 3:
            raise CorruptMetadata("field 'root' is not [page, generation, crc]", field="root")
        if "extents" in p:  # where it moved inline files home
            _extent_list(p)
        if _int_field(p, "seq") != record.seq - 1:
            raise CorruptMetadata("a checkpoint record must follow the seq it covers",
                                  field="seq", seq=record.seq)


def check_extents_within(record: Record, start: int, end: int) -> None:
    """CorruptMetadata unless ``record`` is well formed (:func:`check_payload`) and every
    extent it names lies in the data area ``[start, end)``: a pushed record pointing at the
    superblocks or the journal would have readers serve those bytes as file data."""
    check_payload(record)
    for offset, length in record.payload.get("extents") or ():
        if offset < start or offset + length > end:
            raise CorruptMetadata(
                f"extent {offset}+{length} of record {record.seq} is outside the data area "
                f"[{start}, {end})", field="extents", seq=record.seq)


def parent_of(path: str) -> str:
    """Parent directory of a normalized path (``/`` for top-level entries)."""
    return posixpath.dirname(path)


@dataclass(frozen=True)
class Entry:
    """What ``stat``/``list`` return about one path."""

    path: str
    kind: Literal["file", "dir"]
    size: int
    version: int
    epoch: int
    mtime: float
    crc: int | None


@dataclass(frozen=True)
class Node:
    """One version of a path: the entry plus where its bytes are."""

    entry: Entry
    extents: tuple[Extent, ...] = ()
    sums: tuple[int, ...] = ()
    chunk: int = 0
    inline: bytes | None = None

    def locate(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Device (offset, length) pieces holding file bytes ``[offset, offset + length)``;
        the extents lay the file out in order, so a range may span several of them."""
        return locate(self.extents, offset, length)



def locate(extents: Iterable[Extent], offset: int, length: int) -> list[tuple[int, int]]:
    """Device (offset, length) pieces for logical bytes ``[offset, offset + length)`` of a
    file laid out over ``extents`` in order; ValueError if the range passes their end."""
    pieces: list[tuple[int, int]] = []
    logical = 0
    end = offset + length
    for extent in extents:
        if logical >= end:
            break
        lo = max(offset, logical)
        hi = min(end, logical + extent.length)
        if lo < hi:
            pieces.append((extent.offset + lo - logical, hi - lo))
        logical += extent.length
    if sum(n for _, n in pieces) != length:
        raise ValueError(f"range {offset}+{length} passes the end of the extents")
    return pieces


def _gf2_times(matrix: tuple[int, ...] | list[int], vector: int) -> int:
    total = 0
    i = 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


@functools.lru_cache(maxsize=64)
def _crc32_shift(length: int) -> tuple[int, ...]:
    """The GF(2) operator (32 columns) that appends ``length`` zero bytes to a CRC-32
    register: zlib's crc32_combine, with the operator kept so it is built once per length."""
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    steps: list[list[int]] = []
    n = length
    while n:
        even = _gf2_square(odd)
        if n & 1:
            steps.append(even)
        n >>= 1
        if not n:
            break
        odd = _gf2_square(even)
        if n & 1:
            steps.append(odd)
        n >>= 1
    columns = []
    for bit in range(32):
        v = 1 << bit
        for step in steps:
            v = _gf2_times(step, v)
        columns.append(v)
    return tuple(columns)


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (no data needed),
    so a file's CRC comes from its chunk checksums."""
    if length2 <= 0:
        return crc1
    return _gf2_times(_crc32_shift(length2), crc1) ^ crc2


def file_crc(sums: Iterable[int], size: int, chunk: int) -> int:
    """CRC-32 of a whole file from the CRC-32 of each of its ``chunk``-byte pieces."""
    crc = 0
    for i, part in enumerate(sums):
        crc = crc32_combine(crc, part, min(chunk, size - i * chunk))
    return crc


def put_payload(
    path: str,
    *,
    size: int,
    mtime: float,
    crc: int,
    chunk: int,
    extents: list[Extent],
    sums: list[int],
    inline: bytes | None,
) -> dict[str, Any]:
    """The payload of a put record (inline files carry their bytes as ``data``)."""
    payload: dict[str, Any] = {"path": path, "size": size, "mtime": mtime, "crc": crc}
    if inline is not None:
        payload["data"] = inline
    else:
        payload["chunk"] = chunk
        payload["extents"] = [[e.offset, e.length] for e in extents]
        payload["sums"] = sums
    return payload


ROOT = Node(Entry("/", "dir", 0, 0, 0, 0.0, None))


class Namespace:
    """The rules of the namespace at ``applied_seq`` (the highest epoch seen is ``epoch``):
    what each record does, validated before anything changes. Where the nodes live is the
    subclass's business (:class:`Index`: a dict in memory; ``agents.core.treeindex``: an
    on-image tree plus an overlay), through five primitives: :meth:`lookup`,
    :meth:`listdir_page`, :meth:`_descendants`, :meth:`_link` and :meth:`_unlink`."""

    applied_seq: int
    epoch: int

    # ---- storage primitives --------------------------------------------------------------

    def lookup(self, path: str) -> Node | None:
        """The node at a normalized path, or None."""
        raise NotImplementedError

    def listdir_page(self, path: str, after: str | None, limit: int) -> tuple[list[Entry], bool]:
        """Up to ``limit`` entries of a directory whose names sort after ``after`` (all when
        None), sorted, and whether more follow. Resuming after the last name of a page never
        repeats an entry and never skips one that existed throughout, whatever was added or
        removed in between: the cursor is a name, not a position."""
        raise NotImplementedError

    def _descendants(self, path: str) -> list[str]:
        """Every path below directory ``path`` (not itself), parents before children."""
        raise NotImplementedError

    def _link(self, node: Node) -> None:
        """Store ``node`` at its path (new, or replacing the node there)."""
        raise NotImplementedError

    def _unlink(self, path: str) -> Node:
        """Remove the (existing) node at ``path`` and return it."""
        raise NotImplementedError

    def _no_record(self, record: Record) -> list[Extent]:
        """A record that changes no path (a checkpoint's root switch, for the namespace)."""
        return []

    # ---- queries -------------------------------------------------------------------------

    def get(self, path: str) -> Node:
        """The node at a normalized path; raises NotFound."""
        node = self.lookup(path)
        if node is None:
            raise NotFound(f"no such file or directory: {path}", path=path)
        return node

    def listdir(self, path: str) -> list[Entry]:
        """Entries of a directory, sorted by path; raises NotFound / WrongKind."""
        return self.listdir_page(path, None, 1 << 62)[0]

    def _directory(self, path: str) -> Node:
        node = self.get(path)
        if node.entry.kind != "dir":
            raise WrongKind(f"not a directory: {path}", path=path)
        return node

    def walk(self) -> Iterator[Node]:
        """Every node, parents before children."""
        yield self.get("/")
        for path in self._descendants("/"):
            yield self.get(path)

    def snapshot(self) -> dict[str, Node]:
        """The whole path -> node map (equality checks; O(n))."""
        return {n.entry.path: n for n in self.walk()}

    # ---- mutation ------------------------------------------------------------------------

    def apply(self, record: Record) -> list[Extent]:
        """Apply one record (validated first, all-or-nothing); returns the extents it frees."""
        handler = {
            "put": self._put,
            "delete": self._delete,
            "mkdir": self._mkdir,
            "rename": self._rename,
            "epoch-start": self._epoch_start,
            "checkpoint": self._no_record,
        }[record.op]
        check_payload(record)
        freed = handler(record)
        self.applied_seq = record.seq
        self.epoch = max(self.epoch, record.epoch)
        return freed

    def _missing_parents(self, path: str) -> list[str]:
        """Ancestors of ``path`` that do not exist, outermost first; WrongKind if one is a
        file."""
        missing: list[str] = []
        parent = parent_of(path)
        while True:
            node = self.lookup(parent)
            if node is not None:
                if node.entry.kind != "dir":
                    raise WrongKind(f"not a directory: {parent}", path=parent)
                break
            missing.append(parent)
            parent = parent_of(parent)
        return missing[::-1]

    def _dir(self, path: str, record: Record, mtime: float) -> Node:
        return Node(Entry(path, "dir", 0, record.seq, record.epoch, mtime, None))

    def _put(self, record: Record) -> list[Extent]:
        p = record.payload
        path = normalize_path(p["path"])
        if path == "/":
            raise WrongKind("cannot write to /", path=path)
        old = self.lookup(path)
        if old is not None and old.entry.kind == "dir":
            raise WrongKind(f"is a directory: {path}", path=path)
        missing = self._missing_parents(path)
        mtime = float(p["mtime"])
        entry = Entry(path, "file", int(p["size"]), record.seq, record.epoch, mtime, p["crc"])
        if "data" in p:
            node = Node(entry, inline=p["data"])
        else:
            node = Node(
                entry,
                tuple(Extent(o, n) for o, n in p["extents"]),
                tuple(p["sums"]),
                int(p["chunk"]),
            )
        for d in missing:
            self._link(self._dir(d, record, mtime))
        self._link(node)
        return list(old.extents) if old is not None else []

    def _delete(self, record: Record) -> list[Extent]:
        path = normalize_path(record.payload["path"])
        if path == "/":
            raise WrongKind("cannot delete /", path=path)
        node = self.get(path)
        if node.entry.kind == "dir" and self.listdir_page(path, None, 1)[0]:
            raise NotEmpty(f"directory not empty: {path}", path=path)
        self._unlink(path)
        return list(node.extents)

    def _mkdir(self, record: Record) -> list[Extent]:
        p = record.payload
        path = normalize_path(p["path"])
        mtime = float(p["mtime"])
        existing = self.lookup(path)
        if existing is not None:
            if existing.entry.kind == "dir" and p.get("parents"):
                return []
            if existing.entry.kind == "dir":
                raise AlreadyExists(f"directory exists: {path}", path=path)
            raise WrongKind(f"exists and is a file: {path}", path=path)
        missing = self._missing_parents(path)
        if missing and not p.get("parents"):
            raise NotFound(f"parent directory missing: {missing[-1]}", path=missing[-1])
        for d in [*missing, path]:
            self._link(self._dir(d, record, mtime))
        return []

    def _rename(self, record: Record) -> list[Extent]:
        p = record.payload
        src = normalize_path(p["src"])
        dst = normalize_path(p["dst"])
        node = self.get(src)
        if src == "/" or dst == "/":
            raise WrongKind("cannot rename /", path="/")
        if dst == src:
            return []
        if dst.startswith(src + "/"):
            raise BadPath(f"cannot move {src} inside itself", path=dst)
        dst_parent = self.lookup(parent_of(dst))
        if dst_parent is None:
            raise NotFound(f"parent directory missing: {parent_of(dst)}", path=parent_of(dst))
        if dst_parent.entry.kind != "dir":
            raise WrongKind(f"not a directory: {parent_of(dst)}", path=parent_of(dst))
        old = self.lookup(dst)
        if old is not None and (old.entry.kind == "dir" or node.entry.kind == "dir"):
            raise AlreadyExists(f"destination exists: {dst}", path=dst)
        moved = [src]
        if node.entry.kind == "dir":
            moved += self._descendants(src)
        longest = max(len(q.encode("utf-8")) for q in moved) - len(src.encode("utf-8"))
        if longest + len(dst.encode("utf-8")) > MAX_PATH:
            raise BadPath(f"moving {src} to {dst} makes a path longer than {MAX_PATH} bytes",
                          path=dst[:200])
        freed = list(old.extents) if old is not None else []
        if old is not None:
            self._unlink(dst)
        nodes = [self._unlink(q) for q in reversed(moved)][::-1]
        for n in nodes:
            new_path = dst + n.entry.path[len(src) :]
            entry = replace(n.entry, path=new_path)
            if n.entry.path == src:
                entry = replace(entry, version=record.seq, epoch=record.epoch)
            self._link(replace(n, entry=entry))
        return freed

    def _epoch_start(self, record: Record) -> list[Extent]:
        if record.epoch < self.epoch:
            raise StaleEpoch(
                f"epoch {record.epoch} is below {self.epoch}", current=self.epoch, got=record.epoch
            )
        return []


class Index(Namespace):
    """The namespace held whole in memory: the reference model of the rules (and of what
    the on-image tree must hold), small and obviously right."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {"/": ROOT}
        # a directory's children (full paths) kept sorted: a page of a listing is a bisect
        # and a slice, never a sort of the whole directory
        self.children: dict[str, list[str]] = {"/": []}
        self.applied_seq = 0
        self.epoch = 0

    def lookup(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def listdir_page(self, path: str, after: str | None, limit: int) -> tuple[list[Entry], bool]:
        self._directory(path)
        kids = self.children[path]
        start = 0 if after is None else bisect.bisect_right(kids, posixpath.join(path, after))
        page = kids[start : start + limit]
        return [self.nodes[c].entry for c in page], start + limit < len(kids)

    def _descendants(self, path: str) -> list[str]:
        out: list[str] = []
        level = [path]
        while level:
            level = [c for d in level for c in self.children.get(d, ())]
            out += level
        return out

    def _link(self, node: Node) -> None:
        path = node.entry.path
        if path not in self.nodes:
            bisect.insort(self.children[parent_of(path)], path)
        self.nodes[path] = node
        if node.entry.kind == "dir":
            self.children.setdefault(path, [])

    def _unlink(self, path: str) -> Node:
        node = self.nodes.pop(path)
        siblings = self.children[parent_of(path)]
        del siblings[bisect.bisect_left(siblings, path)]
        if node.entry.kind == "dir":
            del self.children[path]
        return node
