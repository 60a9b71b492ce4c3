"""The namespace of format v2: a snapshot of the on-image B+tree plus an in-memory overlay.

Pure (pages are read through the :class:`agents.core.btree.Tree` the caller passes in).

Model:
- ``root`` is the tree of the last checkpoint, which holds the state after ``root_seq``;
  the overlay maps each path changed by a record applied since to its node (None: removed).
  A lookup asks the overlay first, then the tree; a listing merges one tree range scan with
  the overlay's sorted children of the directory. Memory is the overlay (bounded by the
  writer's checkpoint trigger) plus the tree's page cache, never the whole namespace.
- The rules (what put, delete, mkdir, rename do, what they refuse) are
  :class:`agents.core.index.Namespace`'s, shared with the in-memory :class:`Index`: a
  TreeIndex given the same records holds exactly what an Index holds (property-tested).
- :meth:`commit` writes the overlay into a transaction from ``root`` (only the pages on the
  changed paths are written); once the caller made that root durable it calls
  :meth:`switch`, which empties the overlay. A ``checkpoint`` record (journal order) carries
  the new root to readers: applying it switches them at the same seq.
- The root ``/`` is not stored: it is a directory that no record changes.
"""

from __future__ import annotations

import bisect
import posixpath
from collections.abc import Iterator

from agents.core.allocator import Extent
from agents.core.btree import Commit, Tree
from agents.core.index import ROOT, Entry, Namespace, Node, parent_of
from agents.core.pages import (
    PageRef,
    children_range,
    decode_entry,
    encode_entry,
    key_path,
    path_key,
    subtree_ranges,
)
from agents.core.record import Record


class TreeIndex(Namespace):
    """The namespace at ``applied_seq``: the tree at ``root`` (state after ``root_seq``)
    plus the records applied since (see the module docstring)."""

    def __init__(self, tree: Tree, root: PageRef | None, seq: int, epoch: int) -> None:
        self._tree = tree
        self.root = root
        self.root_seq = seq
        self._snapshot = tree.snapshot(root)
        self._overlay: dict[str, Node | None] = {}
        self._overlay_data = 0  # bytes of the overlay's inline files
        self._kids: dict[str, list[str]] = {}  # overlay paths by parent directory, sorted
        self.applied_seq = seq
        self.epoch = epoch

    @property
    def overlay_size(self) -> int:
        """Paths changed since the root: what a checkpoint would write."""
        return len(self._overlay)

    @property
    def overlay_data(self) -> int:
        """Bytes of the files in the overlay whose data travelled in their records (held in
        memory until a checkpoint)."""
        return self._overlay_data

    def inline_files(self, larger_than: int) -> list[tuple[str, Node]]:
        """The overlay's files whose bytes travelled in their records and are more than
        ``larger_than`` bytes, in key order: what a checkpoint moves to data extents."""
        found = [(p, n) for p, n in self._overlay.items()
                 if n is not None and n.inline is not None and len(n.inline) > larger_than]
        return sorted(found, key=lambda pn: path_key(pn[0]))

    def move_home(self, path: str, node: Node) -> None:
        """Replace the overlay's inline file at ``path`` by ``node``, the same version with
        its bytes in data extents (the caller wrote them there)."""
        old = self._overlay.get(path)
        if old is None or old.inline is None or old.entry != node.entry or node.inline:
            raise ValueError(f"{path} is not an inline file of the overlay at this version")
        self._set(path, node)

    # ---- storage primitives --------------------------------------------------------------

    def lookup(self, path: str) -> Node | None:
        if path == "/":
            return ROOT
        if path in self._overlay:
            return self._overlay[path]
        raw = self._snapshot.get(path_key(path))
        return None if raw is None else decode_entry(path, raw)

    def listdir_page(self, path: str, after: str | None, limit: int) -> tuple[list[Entry], bool]:
        self._directory(path)
        lo, hi = children_range(path, after)
        tree = ((key_path(k), v) for k, v in self._snapshot.range(lo, hi))
        kids = self._kids.get(path, [])
        start = 0 if after is None else bisect.bisect_right(kids, posixpath.join(path, after))
        out: list[Entry] = []
        for _, node in self._merge(tree, iter(kids[start:])):
            if len(out) == limit:
                return out, True
            out.append(node.entry)
        return out, False

    def _merge(self, tree: Iterator[tuple[str, bytes]],
               overlay: Iterator[str]) -> Iterator[tuple[str, Node]]:
        """The live nodes of a tree scan and a sorted run of overlay paths over the same key
        range (both in key order), the overlay winning where both name a path."""
        t = next(tree, None)
        o = next(overlay, None)
        while t is not None or o is not None:
            if o is None or (t is not None and path_key(t[0]) < path_key(o)):
                assert t is not None
                if t[0] not in self._overlay:
                    yield t[0], decode_entry(t[0], t[1])
                t = next(tree, None)
                continue
            if t is not None and t[0] == o:
                t = next(tree, None)
            node = self._overlay[o]
            if node is not None:
                yield o, node
            o = next(overlay, None)

    def _subtree(self, path: str) -> Iterator[tuple[str, Node]]:
        """Every live node below ``path`` in key order (parents before children)."""
        prefix = "/" if path == "/" else path + "/"
        ranges = subtree_ranges(path)
        tree = ((key_path(k), v) for lo, hi in ranges
                for k, v in self._snapshot.range(lo, hi))
        overlay = sorted((p for p in self._overlay if p.startswith(prefix) and p != path),
                         key=path_key)
        return self._merge(tree, iter(overlay))

    def _descendants(self, path: str) -> list[str]:
        return [p for p, _ in self._subtree(path)]

    def walk(self) -> Iterator[Node]:
        yield ROOT
        for _, node in self._subtree("/"):
            yield node

    def _link(self, node: Node) -> None:
        self._set(node.entry.path, node)

    def _unlink(self, path: str) -> Node:
        node = self.get(path)
        self._set(path, None)
        return node

    def _set(self, path: str, node: Node | None) -> None:
        if path not in self._overlay:
            bisect.insort(self._kids.setdefault(parent_of(path), []), path)
        elif (old := self._overlay[path]) is not None and old.inline is not None:
            self._overlay_data -= len(old.inline)
        if node is not None and node.inline is not None:
            self._overlay_data += len(node.inline)
        self._overlay[path] = node

    def _no_record(self, record: Record) -> list[Extent]:
        """A checkpoint record: its root holds the state after the seq before it (checked
        by ``check_payload``): read that root from now on (on the writer that made it, the
        root it already reads)."""
        raw = record.payload.get("root")
        self.switch(None if raw is None else PageRef(*raw), record.seq - 1)
        return []

    # ---- checkpoints ---------------------------------------------------------------------

    def commit(self, generation: int) -> Commit:
        """Write the overlay into a transaction from ``root`` (pages of ``generation``, a
        number never used before) and commit it; the state is unchanged until
        :meth:`switch`."""
        txn = self._tree.begin(self.root, generation)
        for path in sorted(self._overlay, key=path_key):
            node = self._overlay[path]
            if node is None:
                txn.delete(path_key(path))
            else:
                txn.put(path_key(path), encode_entry(node))
        return txn.commit()

    def switch(self, root: PageRef | None, seq: int) -> None:
        """``root`` holds the state after ``seq`` (= ``applied_seq``): read it from now on,
        with an empty overlay."""
        if seq != self.applied_seq:
            raise ValueError(f"root of seq {seq} while the state is at {self.applied_seq}")
        self.root = root
        self.root_seq = seq
        self._snapshot = self._tree.snapshot(root)
        self._overlay.clear()
        self._overlay_data = 0
        self._kids.clear()
