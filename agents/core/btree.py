"""The metadata engine of format v2: a copy-on-write B+tree of fixed-size pages (LMDB-style).

Pure: every page is read and written through a :class:`PageStore` the caller passes in; page
layout, keys and entry records are in :mod:`agents.core.pages`.

Model:
- One writer, many readers. A :class:`Txn` starts from a root (``None``: the empty tree) and
  copies on write only the pages on the paths from the leaves it changes up to the root; the
  copies live in the transaction (a dirty page is written once at commit, however many of its
  keys changed). :meth:`Txn.commit` writes the dirty pages bottom-up to freshly allocated page
  numbers and returns the new root, the pages written and the pages it *freed* (the originals
  it copied, overflow chains of replaced or deleted values). It never rewrites a page in
  place and never writes a page it did not change. Flipping the root (recording the new root
  in the superblock) is the caller's atomic step; until then the old root is intact, whatever
  part of the commit reached the medium.
- A :class:`Snapshot` of a root reads only pages reachable from that root.
- **Quarantine invariant.** A page in ``Commit.freed`` of the commit of generation ``g`` is
  still part of every root of generation ``< g``. The caller must not hand it back to the
  allocator (``PageStore.free``) while a snapshot of such a root may be read (in rbdfleet: a
  reader that has not acknowledged the commit's record, or a read pinned before it). Kept,
  no snapshot ever sees a page of a later transaction: the only pages a commit writes are
  ones the allocator hands out, which are neither reachable from a live root nor quarantined.
- Every root and child pointer is a ``(page, generation, crc)`` triple (Merkle): a page that
  is not the one its parent was written with is refused, so a broken quarantine or a lost
  write shows up as ``ChecksumMismatch`` naming the page, never as a wrong answer.
- Balance: a page over its size is split in two halves, or, when the key added is above
  every other (a load in key order), into the full page and a new one holding the new key;
  a page a delete (or a smaller value) leaves under a quarter full (of its
  ``page_size - 32`` bytes of cells) is merged with an adjacent sibling, or shares that
  sibling's cells evenly when both do not fit one page. The root is a branch
  only while it has two children or more, and every page below it holds a key of its own.
  So every leaf is at the same depth and the height is logarithmic in the number of keys.
- Hostile pages: a decode checks lengths, counts, key order, generations (pages.py); the
  tree checks that each child's level is one below its parent's (so a walk cannot loop: the
  level falls at every step) and that its keys lie in the range its parent gives. Errors
  are the project's ``FormatError`` kinds with the page number.

Not thread-safe for writing: one Txn at a time, used by one thread. Snapshots are read-only
and may run in any number of threads over one :class:`PageCache`.
"""

from __future__ import annotations

import bisect
import contextlib
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from agents.core.pages import (
    HEADER,
    MAX_VALUE,
    NO_PAGE,
    Branch,
    Layout,
    Leaf,
    Overflow,
    PageRef,
    TreeNode,
    branch_cell,
    children_range,
    decode_node,
    decode_overflow,
    encode_node,
    encode_overflow,
    key_path,
)
from agents.errors import (
    AgentError,
    ChecksumMismatch,
    CorruptMetadata,
    TooLarge,
    TxnStateError,
)


class PageReader(Protocol):
    """Read access to the metadata pages (all a snapshot needs)."""

    def read_page(self, page_no: int) -> bytes:
        """The page's bytes; CorruptMetadata for a page number outside the metadata area."""
        ...


class PageStore(PageReader, Protocol):
    """Where the writer's pages go; the allocator behind it owns the quarantine."""

    def allocate(self) -> int:
        """A page number neither reachable from a live root nor quarantined."""
        ...

    def write_page(self, page_no: int, data: bytes) -> None:
        """Write one whole page."""
        ...

    def free(self, page_no: int) -> None:
        """Give back a page no root references (here: one of a commit that failed)."""
        ...


@dataclass(frozen=True)
class Commit:
    """What a commit did: the new root, the pages written (in write order) and the pages it
    stopped referencing (to quarantine until no snapshot older than ``root`` is read)."""

    root: PageRef
    written: list[int]
    freed: list[int]


@dataclass(frozen=True)
class TreeProblem:
    """One inconsistency found by :func:`check` (``page`` None: not tied to one page)."""

    page: int | None
    kind: str
    detail: str


class PageCache:
    """LRU of decoded pages, keyed by their ``(page, generation, crc)`` triple: a page number
    reused by a later commit has another key, so an entry is never stale. Safe to share
    between reader threads (each dict operation is atomic; a lost race costs a miss)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a page cache holds at least one page")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._pages: OrderedDict[PageRef, TreeNode] = OrderedDict()

    def get(self, ref: PageRef) -> TreeNode | None:
        """The decoded page, or None (counted as a miss)."""
        node = self._pages.get(ref)
        if node is None:
            self.misses += 1
            return None
        self.hits += 1
        with contextlib.suppress(KeyError):  # evicted by another thread meanwhile
            self._pages.move_to_end(ref)
        return node

    def put(self, ref: PageRef, node: TreeNode) -> None:
        """Remember a clean page, evicting the least recently used beyond capacity."""
        self._pages[ref] = node
        while len(self._pages) > self.capacity:
            try:
                self._pages.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break


def _level(node: TreeNode) -> int:
    return node.level if isinstance(node, Branch) else 0


class _Reader:
    """Lookups and range scans over a tree whose pages are clean (read from the store) or,
    in a transaction, dirty (owned by it)."""

    def __init__(self, store: PageReader, layout: Layout, cache: PageCache | None) -> None:
        self._store = store
        self._layout = layout
        self._cache = cache

    def _root(self) -> TreeNode:
        raise NotImplementedError

    def _value_generation(self, leaf: Leaf) -> int:
        """Newest generation an overflow chain of ``leaf`` may have."""
        return leaf.ref.generation if leaf.ref is not None else NO_PAGE

    def _load(self, ref: PageRef, level: int | None, lo: bytes, hi: bytes | None) -> TreeNode:
        node = self._cache.get(ref) if self._cache is not None else None
        if node is None:
            node = decode_node(self._store.read_page(ref.page_no), ref, self._layout)
            if self._cache is not None:
                self._cache.put(ref, node)
        keys = node.keys if isinstance(node, Leaf) else node.keys[1:]
        if level is not None and (_level(node) != level or not keys):
            # below the root, every page has a key of its own (the writer merges emptied
            # pages away): a page can then sit under one parent range only, so no forged
            # DAG makes a scan read a page twice
            raise CorruptMetadata(f"metadata page {ref.page_no} (level {_level(node)}, "
                                  f"{len(node.keys)} keys) where its parent wants a page of "
                                  f"level {level}", page=ref.page_no)
        if keys and (keys[0] < lo or (hi is not None and keys[-1] >= hi)):
            raise CorruptMetadata(f"metadata page {ref.page_no} holds keys outside the range "
                                  f"its parent gives it", page=ref.page_no)
        return node

    def _child(self, node: Branch, i: int, lo: bytes,
               hi: bytes | None) -> tuple[TreeNode, bytes, bytes | None]:
        """Child ``i`` of ``node`` (whose keys lie in [lo, hi)) and the child's bounds."""
        clo = node.keys[i] if i else lo
        chi = node.keys[i + 1] if i + 1 < len(node.keys) else hi
        child = node.children[i]
        if isinstance(child, PageRef):
            return self._load(child, node.level - 1, clo, chi), clo, chi
        return child, clo, chi

    def _value(self, value: bytes | Overflow, generation: int) -> bytes:
        if isinstance(value, bytes):
            return value
        return self._overflow(value, generation)[0]

    def _overflow(self, ref: Overflow, generation: int) -> tuple[bytes, list[int]]:
        """A chain's value and pages; exactly ``ref.pages`` pages are read."""
        parts: list[bytes] = []
        pages: list[int] = []
        page_no = ref.first
        for i in range(ref.pages):
            if page_no in pages:
                raise CorruptMetadata(f"metadata page {page_no}: overflow chain loops",
                                      page=page_no)
            payload, next_page = decode_overflow(self._store.read_page(page_no), page_no,
                                                 generation, self._layout)
            last = i == ref.pages - 1
            if (next_page == NO_PAGE) != last or (
                    not last and len(payload) != self._layout.overflow_payload):
                raise CorruptMetadata(f"metadata page {page_no}: overflow chain shape",
                                      page=page_no)
            parts.append(payload)
            pages.append(page_no)
            page_no = next_page
        value = b"".join(parts)
        if len(value) != ref.length or zlib.crc32(value) != ref.crc:
            raise ChecksumMismatch(f"metadata page {ref.first}: overflow value does not match "
                                   f"its leaf", page=ref.first)
        return value, pages

    def _leaf_for(self, key: bytes) -> Leaf:
        node, lo, hi = self._root(), b"", None
        while isinstance(node, Branch):
            node, lo, hi = self._child(node, bisect.bisect_right(node.keys, key) - 1, lo, hi)
        return node

    def height(self) -> int:
        """Pages on a path from the root to a leaf."""
        return _level(self._root()) + 1

    def get(self, key: bytes) -> bytes | None:
        """The value under ``key``, or None."""
        leaf = self._leaf_for(key)
        i = bisect.bisect_left(leaf.keys, key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            return self._value(leaf.values[i], self._value_generation(leaf))
        return None

    def range(self, lo: bytes = b"", hi: bytes | None = None,
              limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs with ``lo <= key < hi`` in key order, at most ``limit``. Reads
        the pages holding the range and the paths to them, nothing to the right of ``hi``."""
        if limit is not None and limit <= 0:
            return
        produced = 0
        # (branch, child index in use, branch's bounds): the path to the current leaf
        stack: list[tuple[Branch, int, bytes, bytes | None]] = []
        node, nlo, nhi = self._root(), b"", None
        while isinstance(node, Branch):
            i = bisect.bisect_right(node.keys, lo) - 1
            stack.append((node, i, nlo, nhi))
            node, nlo, nhi = self._child(node, i, nlo, nhi)
        start = bisect.bisect_left(node.keys, lo)
        while True:
            for j in range(start, len(node.keys)):
                key = node.keys[j]
                if hi is not None and key >= hi:
                    return
                yield key, self._value(node.values[j], self._value_generation(node))
                produced += 1
                if limit is not None and produced >= limit:
                    return
            while stack:
                branch, i, blo, bhi = stack.pop()
                if i + 1 < len(branch.children):
                    if hi is not None and branch.keys[i + 1] >= hi:
                        return
                    stack.append((branch, i + 1, blo, bhi))
                    node, nlo, nhi = self._child(branch, i + 1, blo, bhi)
                    while isinstance(node, Branch):
                        stack.append((node, 0, nlo, nhi))
                        node, nlo, nhi = self._child(node, 0, nlo, nhi)
                    break
            else:
                return
            start = 0

    def list_children(self, directory: str, after: str | None = None,
                      limit: int | None = None) -> list[tuple[str, bytes]]:
        """(path, value) of up to ``limit`` children of ``directory`` (a normalized path)
        whose names sort after ``after``: one range scan."""
        lo, hi = children_range(directory, after)
        return [(key_path(k), v) for k, v in self.range(lo, hi, limit)]


class Snapshot(_Reader):
    """The tree as of one root; never changes."""

    def __init__(self, root: PageRef | None, store: PageReader, *,
                 layout: Layout | None = None, cache: PageCache | None = None) -> None:
        super().__init__(store, layout or Layout(), cache)
        self.root = root

    def _root(self) -> TreeNode:
        if self.root is None:
            return Leaf([], [], HEADER.size)
        return self._load(self.root, None, b"", None)


class Txn(_Reader):
    """One write transaction from ``base`` (see the module docstring)."""

    def __init__(self, base: PageRef | None, store: PageStore, *,
                 layout: Layout | None = None, cache: PageCache | None = None,
                 generation: int | None = None) -> None:
        super().__init__(store, layout or Layout(), cache)
        self._writer = store
        self.base = base
        floor = base.generation if base is not None else 0
        self.generation = floor + 1 if generation is None else generation
        if self.generation <= floor:
            raise ValueError(f"generation {self.generation} is not above the base's {floor}")
        self._top: PageRef | TreeNode = base if base is not None else Leaf([], [], HEADER.size)
        self._freed: list[int] = []
        self._finished = False
        self._changes = 0

    # ---- reading ---------------------------------------------------------------------------

    def _root(self) -> TreeNode:
        if isinstance(self._top, PageRef):
            return self._load(self._top, None, b"", None)
        return self._top

    def _value_generation(self, leaf: Leaf) -> int:
        # a dirty leaf holds chains of any earlier generation
        return leaf.ref.generation if leaf.ref is not None else self.generation - 1

    def range(self, lo: bytes = b"", hi: bytes | None = None,
              limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """As :meth:`_Reader.range`, over this transaction's own changes; changing the
        transaction while iterating raises TxnStateError at the next step."""
        changes = self._changes
        for item in super().range(lo, hi, limit):
            if self._changes != changes:
                raise TxnStateError("transaction changed during a range scan")
            yield item

    # ---- writing ---------------------------------------------------------------------------

    def _open(self) -> None:
        if self._finished:
            raise TxnStateError("transaction already committed or failed")

    def _own(self, node: TreeNode) -> TreeNode:
        """``node`` if this transaction owns it, else a copy (the original page is freed)."""
        if node.ref is None:
            return node
        self._freed.append(node.ref.page_no)
        if isinstance(node, Leaf):
            return Leaf(list(node.keys), list(node.values), node.size)
        return Branch(node.level, list(node.keys), list(node.children), node.size)

    def _own_child(self, parent: Branch, i: int, lo: bytes, hi: bytes | None) -> TreeNode:
        child = self._own(self._child(parent, i, lo, hi)[0])
        parent.children[i] = child
        return child

    def _descend(self, key: bytes) -> tuple[list[tuple[Branch, int, bytes, bytes | None]], Leaf]:
        """Own the path to ``key``'s leaf: [(branch, child index, branch's bounds)], leaf."""
        node = self._own(self._root())
        self._top = node
        path: list[tuple[Branch, int, bytes, bytes | None]] = []
        lo, hi = b"", None
        while isinstance(node, Branch):
            i = bisect.bisect_right(node.keys, key) - 1
            path.append((node, i, lo, hi))
            lo, hi = (node.keys[i] if i else lo,
                      node.keys[i + 1] if i + 1 < len(node.keys) else hi)
            node = self._own_child(node, i, lo, hi)
        return path, node

    def _drop(self, value: bytes | Overflow) -> None:
        if isinstance(value, Overflow):
            self._freed += self._overflow(value, self.generation - 1)[1]

    def put(self, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value`` (TooLarge past the layout's key or value bound)."""
        self._open()
        if len(key) > self._layout.max_key:
            raise TooLarge(f"key of {len(key)} bytes (at most {self._layout.max_key} with "
                           f"{self._layout.page_size}-byte pages)", limit=self._layout.max_key)
        if len(value) > MAX_VALUE:
            raise TooLarge(f"value of {len(value)} bytes (at most {MAX_VALUE})",
                           limit=MAX_VALUE)
        path, leaf = self._descend(key)
        i = bisect.bisect_left(leaf.keys, key)
        cell = self._layout.leaf_cell(key, value)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            old = leaf.values[i]
            self._drop(old)
            growth = cell - self._layout.leaf_cell(key, old)
            leaf.size += growth
            leaf.values[i] = value
            self._changes += 1
            self._rebalance(path, leaf, shrank=growth < 0)
            return
        leaf.keys.insert(i, key)
        leaf.values.insert(i, value)
        leaf.size += cell
        self._changes += 1
        self._rebalance(path, leaf, shrank=False, appended=i == len(leaf.keys) - 1 and all(
            j == len(branch.children) - 1 for branch, j, _, _ in path))

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False (and nothing copied) if it is absent."""
        self._open()
        leaf = self._leaf_for(key)
        i = bisect.bisect_left(leaf.keys, key)
        if i == len(leaf.keys) or leaf.keys[i] != key:
            return False
        path, leaf = self._descend(key)
        self._drop(leaf.values[i])
        leaf.size -= self._layout.leaf_cell(key, leaf.values[i])
        del leaf.keys[i]
        del leaf.values[i]
        self._changes += 1
        self._rebalance(path, leaf, shrank=True)
        return True

    def _underfull(self, node: TreeNode) -> bool:
        return node.size - HEADER.size < (self._layout.page_size - HEADER.size) // 4

    def _rebalance(self, path: list[tuple[Branch, int, bytes, bytes | None]],
                   node: TreeNode, *, shrank: bool, appended: bool = False) -> None:
        """Bottom-up: split what grew past a page; if the change ``shrank`` its leaf, merge
        what fell under a quarter (only merges shrink the branches above). ``appended``: the
        change added a key above every other, so a split leaves the old pages full and starts
        new ones (keys loaded in order fill their pages)."""
        while path:
            parent, i, lo, hi = path.pop()
            if node.size > self._layout.page_size:
                left, sep, right = self._split(node, appended)
                parent.children[i] = left
                parent.keys.insert(i + 1, sep)
                parent.children.insert(i + 1, right)
                parent.size += branch_cell(sep)
            elif shrank and self._underfull(node) and len(parent.children) > 1:
                self._merge(parent, i - 1 if i else i, lo, hi)
            node = parent
        if node.size > self._layout.page_size:
            left, sep, right = self._split(node, appended)
            node = Branch(_level(node) + 1, [b"", sep], [left, right],
                          HEADER.size + branch_cell(b"") + branch_cell(sep))
        top: PageRef | TreeNode = node
        while isinstance(top, Branch) and len(top.children) == 1:
            top = top.children[0]  # the root lost its last sibling: its child is the root
        self._top = top

    def _split(self, node: TreeNode, at_end: bool = False) -> tuple[TreeNode, bytes, TreeNode]:
        """Two halves of similar byte size, and the separator (lowest key of the right); with
        ``at_end``, everything but the last cell (a branch: the last two children, so that
        the new page has a key of its own) and the rest."""
        if isinstance(node, Leaf):
            sizes = [self._layout.leaf_cell(k, v) for k, v in zip(node.keys, node.values,
                                                                   strict=True)]
        else:
            sizes = [branch_cell(k) for k in node.keys]
        if at_end:
            m = len(sizes) - (1 if isinstance(node, Leaf) else 2)
        else:
            half = sum(sizes) // 2
            acc, m = 0, 0
            while m < len(sizes) - 1 and acc + sizes[m] <= half:
                acc += sizes[m]
                m += 1
            m = max(m, 1)
        left_size = HEADER.size + sum(sizes[:m])
        if isinstance(node, Leaf):
            sep = _separator(node.keys[m - 1], node.keys[m])
            return (Leaf(node.keys[:m], node.values[:m], left_size), sep,
                    Leaf(node.keys[m:], node.values[m:], HEADER.size + sum(sizes[m:])))
        sep = node.keys[m]
        right_size = HEADER.size + branch_cell(b"") + sum(sizes[m + 1 :])
        return (Branch(node.level, node.keys[:m], node.children[:m], left_size), sep,
                Branch(node.level, [b"", *node.keys[m + 1 :]], node.children[m:],
                       right_size))

    def _merge(self, parent: Branch, j: int, lo: bytes, hi: bytes | None) -> None:
        """Join children ``j`` and ``j + 1`` of ``parent`` (bounds [lo, hi)) into one page,
        or into two even ones when they do not fit one."""
        left = self._own_child(parent, j, lo, hi)
        right = self._own_child(parent, j + 1, lo, hi)
        sep = parent.keys.pop(j + 1)
        del parent.children[j + 1]
        parent.size -= branch_cell(sep)
        joined: TreeNode
        if isinstance(left, Leaf) and isinstance(right, Leaf):
            joined = Leaf(left.keys + right.keys, left.values + right.values,
                          left.size + right.size - HEADER.size)
        elif isinstance(left, Branch) and isinstance(right, Branch):
            # the right page's first key is empty; its real lower bound is the separator
            joined = Branch(left.level, [*left.keys, sep, *right.keys[1:]],
                            left.children + right.children,
                            left.size + right.size - HEADER.size + len(sep))
        else:
            raise CorruptMetadata("sibling pages at different levels")
        if joined.size <= self._layout.page_size:
            parent.children[j] = joined
            return
        first, new_sep, second = self._split(joined)
        parent.children[j] = first
        parent.keys.insert(j + 1, new_sep)
        parent.children.insert(j + 1, second)
        parent.size += branch_cell(new_sep)

    def commit(self) -> Commit:
        """Write the dirty pages (children before parents) and finish the transaction. On an
        error the pages it allocated are given back (no root names them) and it re-raises;
        the transaction is finished either way."""
        self._open()
        self._finished = True
        top = self._top
        if isinstance(top, PageRef):
            return Commit(top, [], self._freed)
        if top.ref is not None:
            return Commit(top.ref, [], self._freed)
        allocated: list[int] = []
        written: list[tuple[PageRef, TreeNode]] = []
        try:
            root = self._write(top, allocated, written)
        except BaseException:
            for page_no in allocated:
                self._writer.free(page_no)
            raise
        if self._cache is not None:  # only whole commits: a failed one's pages are reused
            for ref, node in written:
                self._cache.put(ref, node)
        return Commit(root, allocated, self._freed)

    def _allocate(self, allocated: list[int]) -> int:
        page_no = self._writer.allocate()
        allocated.append(page_no)
        return page_no

    def _write(self, node: TreeNode, allocated: list[int],
               written: list[tuple[PageRef, TreeNode]]) -> PageRef:
        if isinstance(node, Branch):
            for i, child in enumerate(node.children):
                if not isinstance(child, PageRef):
                    node.children[i] = self._write(child, allocated, written)
        else:
            for i, (key, value) in enumerate(zip(node.keys, node.values, strict=True)):
                if isinstance(value, bytes) and not self._layout.inline(key, value):
                    node.values[i] = self._write_overflow(value, allocated)
        page_no = self._allocate(allocated)
        data, crc = encode_node(node, page_no, self.generation, self._layout)
        self._writer.write_page(page_no, data)
        ref = PageRef(page_no, self.generation, crc)
        node.ref = ref
        written.append((ref, node))
        return ref

    def _write_overflow(self, value: bytes, allocated: list[int]) -> Overflow:
        step = self._layout.overflow_payload
        pages = [self._allocate(allocated) for _ in range(self._layout.overflow_pages(
            len(value)))]
        for i, page_no in enumerate(pages):
            next_page = pages[i + 1] if i + 1 < len(pages) else NO_PAGE
            self._writer.write_page(page_no, encode_overflow(
                value[i * step : (i + 1) * step], next_page, page_no, self.generation,
                self._layout))
        return Overflow(pages[0], len(pages), len(value), zlib.crc32(value))


def _separator(below: bytes, key: bytes) -> bytes:
    """The shortest prefix of ``key`` above ``below`` (< ``key``): branch keys stay short."""
    n = 0
    while n < len(below) and below[n] == key[n]:
        n += 1
    return key[: n + 1]


class Tree:
    """A store, its page layout and one page cache shared by its snapshots and transactions."""

    def __init__(self, store: PageStore, *, layout: Layout | None = None,
                 cache: PageCache | None = None) -> None:
        self.store = store
        self.layout = layout or Layout()
        self.cache = cache

    def snapshot(self, root: PageRef | None) -> Snapshot:
        """A read-only view of ``root``."""
        return Snapshot(root, self.store, layout=self.layout, cache=self.cache)

    def begin(self, root: PageRef | None, generation: int | None = None) -> Txn:
        """A write transaction from ``root``, writing pages of ``generation`` (default: one
        above the root's; a caller whose root flip can fail after the pages were written
        passes a number it never reuses, such as the journal seq)."""
        return Txn(root, self.store, layout=self.layout, cache=self.cache,
                   generation=generation)


def check(root: PageRef | None, store: PageReader, *, layout: Layout | None = None,
          allocated: set[int] | None = None,
          reached: set[int] | None = None) -> list[TreeProblem]:
    """Walk every page reachable from ``root`` (read-only, no cache) and report what is
    wrong, each problem naming its page: pages that do not decode, levels, key ranges, empty
    pages below the root, a root branch with one child, overflow chains, pages referenced
    twice; with ``allocated`` (the allocator's view of the tree's pages), pages it holds
    that no root reaches and pages reached that it does not hold. Every page is read at
    most once. The pages reached (decoded or not) are added to ``reached`` when given."""
    layout = layout or Layout()
    reader = Snapshot(None, store, layout=layout)
    problems: list[TreeProblem] = []
    seen: set[int] = set() if reached is None else reached
    stack: list[tuple[PageRef, int | None, bytes, bytes | None]] = []
    if root is not None:
        stack.append((root, None, b"", None))
    while stack:
        ref, level, lo, hi = stack.pop()
        if ref.page_no in seen:
            problems.append(TreeProblem(ref.page_no, "double-referenced",
                                        "reached from two places"))
            continue
        seen.add(ref.page_no)
        try:
            node = reader._load(ref, level, lo, hi)
        except AgentError as exc:
            problems.append(TreeProblem(ref.page_no, "page", exc.message))
            continue
        if isinstance(node, Branch):
            if len(node.children) < 2:
                problems.append(TreeProblem(ref.page_no, "balance",
                                            "root branch with one child"))
            for i in range(len(node.children)):
                child = node.children[i]
                assert isinstance(child, PageRef)  # decoded pages hold refs only
                stack.append((child, node.level - 1, node.keys[i] if i else lo,
                              node.keys[i + 1] if i + 1 < len(node.keys) else hi))
            continue
        for value in node.values:
            if isinstance(value, Overflow):
                problems += _check_chain(reader, value, ref, seen)
    if allocated is not None:
        problems += [TreeProblem(p, "leaked", "allocated but unreachable")
                     for p in sorted(allocated - seen)]
        problems += [TreeProblem(p, "unallocated", "reachable but not allocated")
                     for p in sorted(seen - allocated)]
    return problems


def _check_chain(reader: _Reader, value: Overflow, leaf: PageRef,
                 seen: set[int]) -> list[TreeProblem]:
    try:
        pages = reader._overflow(value, leaf.generation)[1]
    except AgentError as exc:
        return [TreeProblem(exc.fields.get("page", leaf.page_no), "overflow", exc.message)]
    twice = [p for p in pages if p in seen]
    seen.update(pages)
    return [TreeProblem(p, "double-referenced", "overflow page reached from two places")
            for p in twice]
