"""Format v2 metadata tree (agents/core/btree.py, pages.py): a dict model across many
transactions with old snapshots held open, page-level crash consistency, hostile pages, and
the page counts that make it scale (reads per lookup, pages written per commit)."""

from __future__ import annotations

import contextlib
import errno
import random
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agents.core.allocator import Extent
from agents.core.btree import (
    Commit,
    PageCache,
    Snapshot,
    Tree,
    Txn,
    TxnStateError,
    check,
)
from agents.core.index import Entry, Node
from agents.core.pages import (
    BRANCH_CELL,
    HEADER,
    KIND_BRANCH,
    KIND_LEAF,
    KIND_OVERFLOW,
    LEAF_CELL,
    MAGIC,
    MAX_VALUE,
    NO_PAGE,
    OVERFLOW_HEAD,
    OVERFLOW_REF,
    VERSION,
    Branch,
    Layout,
    Leaf,
    PageRef,
    children_range,
    decode_entry,
    encode_entry,
    key_path,
    page_crc,
    path_key,
    subtree_ranges,
)
from agents.errors import (
    ChecksumMismatch,
    CorruptMetadata,
    DeviceError,
    FormatError,
    TooLarge,
)

pytestmark = pytest.mark.unit

LAYOUT = Layout()
PAGE = LAYOUT.page_size


class MemoryPages:
    """A PageStore in memory that reuses a freed page number at once (last freed, first
    handed out), counts reads and writes, and can fail (or tear) the n-th write."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.free_list: list[int] = []
        self.next_page = 0
        self.reads = 0
        self.writes = 0
        self.fail_at: int | None = None  # the write number that fails
        self.tear = False  # the failing write leaves half a page behind

    def read_page(self, page_no: int) -> bytes:
        self.reads += 1
        if page_no not in self.pages:
            raise CorruptMetadata(f"page {page_no} is outside the metadata area", page=page_no)
        return self.pages[page_no]

    def allocate(self) -> int:
        if self.free_list:
            return self.free_list.pop()
        self.next_page += 1
        return self.next_page - 1

    def write_page(self, page_no: int, data: bytes) -> None:
        assert len(data) == PAGE
        if self.fail_at is not None and self.writes == self.fail_at:
            if self.tear:
                self.pages[page_no] = data[: PAGE // 2] + self.pages.get(page_no, bytes(PAGE))[
                    PAGE // 2 :]
            raise DeviceError("injected write failure", op="write", errno=errno.EIO)
        self.writes += 1
        self.pages[page_no] = data

    def free(self, page_no: int) -> None:
        assert page_no not in self.free_list, f"page {page_no} freed twice"
        self.free_list.append(page_no)

    def in_use(self) -> set[int]:
        return set(range(self.next_page)) - set(self.free_list)


@dataclass
class Writer:
    """The caller's side of the protocol: commits, a quarantine of freed pages, and open
    snapshots that keep it from being released."""

    store: MemoryPages = field(default_factory=MemoryPages)
    cache: PageCache | None = None
    root: PageRef | None = None
    quarantine: list[tuple[int, list[int]]] = field(default_factory=list)
    open_snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def tree(self) -> Tree:
        return Tree(self.store, cache=self.cache)

    def commit(self, ops: Mapping[bytes, bytes | None]) -> Commit:
        txn = self.tree.begin(self.root)
        for key, value in ops.items():
            if value is None:
                txn.delete(key)
            else:
                txn.put(key, value)
        return self.finish(txn)

    def finish(self, txn: Txn) -> Commit:
        """Commit, flip the root, quarantine what the commit freed."""
        done = txn.commit()
        self.root = done.root
        self.quarantine.append((done.root.generation, done.freed))
        self.release()
        return done

    def release(self) -> None:
        """Free the pages no open snapshot can reach: those freed by a commit whose root is
        not newer than the oldest open snapshot's."""
        oldest = min((s.root.generation for s in self.open_snapshots if s.root is not None),
                     default=None)
        keep = []
        for generation, pages in self.quarantine:
            if oldest is None or generation <= oldest:
                for page_no in pages:
                    self.store.free(page_no)
            else:
                keep.append((generation, pages))
        self.quarantine = keep

    def quarantined(self) -> set[int]:
        return {p for _, pages in self.quarantine for p in pages}


def _bulk(n: int, seed: int = 0, dirs: int = 100, value_bytes: int = 40) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    items = {path_key(f"/d{rng.randrange(dirs):03d}/f{i:07d}"): rng.randbytes(value_bytes)
             for i in range(n)}
    return dict(sorted(items.items(), key=lambda _: rng.random()))


def _fill(writer: Writer, items: Mapping[bytes, bytes | None], per_txn: int) -> None:
    keys = list(items)
    for start in range(0, len(keys), per_txn):
        writer.commit({k: items[k] for k in keys[start : start + per_txn]})


# ---- keys and entries --------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"),
                              exclude_characters="/"), min_size=1, max_size=8)
paths = st.lists(names, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))


@given(st.lists(paths, min_size=1, max_size=40), paths)
def test_keys_put_children_and_subtrees_in_ranges(all_paths: list[str], directory: str) -> None:
    keys = {path_key(p): p for p in [*all_paths, directory + "/x", directory + "/x/y"]}
    assert all(key_path(k) == p for k, p in keys.items())
    lo, hi = children_range(directory)
    children = {p for k, p in keys.items() if lo <= k < hi}
    assert children == {p for p in keys.values() if p.rpartition("/")[0] == directory}
    below = {p for k, p in keys.items()
             if any(a <= k and (b is None or k < b) for a, b in subtree_ranges(directory))}
    assert below == {p for p in keys.values() if p.startswith(directory + "/")}
    # children list in the order v1 lists them (sorted by path text)
    assert sorted(children) == [keys[k] for k in sorted(path_key(p) for p in children)]


def test_root_key_and_root_subtree() -> None:
    assert path_key("/") == b"" and key_path(b"") == "/"
    assert path_key("/a") == b"/\x00a" and path_key("/a/b") == b"/a\x00b"
    lo, hi = subtree_ranges("/")[0]
    assert hi is None and lo <= path_key("/a") and lo <= path_key("/a/b") and lo > b""


@pytest.mark.parametrize("key", [b"a", b"/", b"/a", b"\x00a", b"/a\x00", b"/a\x00b\x00c",
                                 b"/a\x00b/c", b"/a\x00\xff"])
def test_keys_no_path_has_are_refused(key: bytes) -> None:
    with pytest.raises(CorruptMetadata):
        key_path(key)


entries = st.one_of(
    st.builds(lambda v, e, m: Node(Entry("/p", "dir", 0, v, e, m, None)),
              st.integers(0, 2**63), st.integers(0, 2**63), st.floats(0, 2e9)),
    st.builds(lambda data, m, crc: Node(Entry("/p", "file", len(data), 1, 2, m, crc),
                                        inline=data),
              st.binary(max_size=3072), st.floats(0, 2e9),
              st.one_of(st.none(), st.integers(0, 2**32 - 1))),
    st.integers(1, 40).flatmap(lambda n: st.builds(
        lambda sums, offs: Node(Entry("/p", "file", n * 4096, 3, 4, 1.5, 7),
                                tuple(Extent(o * 4096, 4096) for o in offs), tuple(sums), 4096),
        st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n),
        st.lists(st.integers(0, 2**40), min_size=n, max_size=n))),
)


@given(entries)
def test_entry_records_round_trip(node: Node) -> None:
    assert decode_entry("/p", encode_entry(node)) == node


@given(entries, st.data())
def test_damaged_entry_records_are_refused(node: Node, data: st.DataObject) -> None:
    raw = encode_entry(node)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(CorruptMetadata):
        decode_entry("/p", raw[:cut])
    kind = data.draw(st.sampled_from([0, 3, 255]))
    with pytest.raises(CorruptMetadata):
        decode_entry("/p", bytes([kind]) + raw[1:])


# ---- the model test ----------------------------------------------------------------------

DIRS = ["/" + "x" * 300, "/" + "x" * 300 + "/" + "y" * 200, "/b", "/b/c", "/" + "z" * 500]
VALUE_SIZES = st.sampled_from([0, 10, 200, 900, 1200, 5000, 9000])

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, len(DIRS) - 1), st.integers(0, 60), VALUE_SIZES),
    st.tuples(st.just("bulk"), st.integers(0, len(DIRS) - 1), st.integers(20, 150),
              VALUE_SIZES),
    st.tuples(st.just("append"), st.integers(0, len(DIRS) - 1), st.integers(1, 150),
              VALUE_SIZES),
    st.tuples(st.just("delete"), st.integers(0, len(DIRS) - 1), st.integers(0, 60),
              st.just(0)),
    st.tuples(st.just("delete_dir"), st.integers(0, len(DIRS) - 1), st.just(0), st.just(0)),
    st.tuples(st.just("rename"), st.integers(0, len(DIRS) - 1), st.integers(0, 3),
              st.just(0)),
    st.tuples(st.just("list"), st.integers(0, len(DIRS) - 1), st.integers(0, 60),
              st.integers(1, 30)),
    st.tuples(st.just("commit"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("snapshot"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("close"), st.just(0), st.integers(0, 10), st.just(0)),
), max_size=45)


def _keys_under(model: dict[bytes, bytes], directory: str) -> list[bytes]:
    return [k for k in model
            if any(a <= k and (b is None or k < b) for a, b in subtree_ranges(directory))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(0, 2**32))
def test_tree_matches_a_dict_across_transactions_and_snapshots(
        script: list[tuple[str, int, int, int]], seed: int) -> None:
    rng = random.Random(seed)
    writer = Writer(cache=PageCache(64))
    model: dict[bytes, bytes] = {}
    held: list[tuple[Snapshot, dict[bytes, bytes]]] = []
    # a reader agent's own cache: the writer's commits never update it, so an entry for a
    # page number that was freed and reused must not be served for the new page
    reader = Tree(writer.store, cache=PageCache(32))
    appended = 0
    txn = writer.tree.begin(None)
    for op, d, n, size in script:
        directory = DIRS[d]
        if op == "put":
            model[path_key(f"{directory}/f{n}")] = rng.randbytes(size)
            txn.put(path_key(f"{directory}/f{n}"), model[path_key(f"{directory}/f{n}")])
        elif op == "bulk":
            for _ in range(n):
                key = path_key(f"{directory}/g{rng.randrange(400)}")
                model[key] = rng.randbytes(rng.randrange(size + 1))
                txn.put(key, model[key])
        elif op == "append":  # names in increasing order: at the tree's end for the last dir
            for _ in range(n):
                appended += 1
                key = path_key(f"{directory}/h{appended:06d}")
                model[key] = rng.randbytes(rng.randrange(size + 1))
                txn.put(key, model[key])
        elif op == "delete":
            key = path_key(f"{directory}/f{n}")
            assert txn.delete(key) == (key in model)
            model.pop(key, None)
        elif op == "delete_dir":
            for key in _keys_under(model, directory):
                assert txn.delete(key)
                del model[key]
        elif op == "rename":
            # a directory rename as the volume does it: two range scans, delete + put
            new = f"{directory}.r{n}"
            moved = [kv for lo, hi in subtree_ranges(directory) for kv in txn.range(lo, hi)]
            assert sorted(k for k, _ in moved) == sorted(_keys_under(model, directory))
            for key, value in moved:
                path = new + key_path(key)[len(directory):]
                assert txn.delete(key)
                txn.put(path_key(path), value)
                model[path_key(path)] = model.pop(key)
        elif op == "list":
            after = f"f{n}"
            expect = sorted(k for k in model if k.startswith(directory.encode() + b"\x00")
                            and k > path_key(f"{directory}/{after}"))[:size]
            got = txn.list_children(directory, after, size)
            assert [path_key(p) for p, _ in got] == expect
            assert all(model[path_key(p)] == v for p, v in got)
        elif op == "commit":
            writer.finish(txn)
            txn = writer.tree.begin(writer.root)
        elif op == "snapshot":
            writer.finish(txn)
            snap = reader.snapshot(writer.root)
            writer.open_snapshots.append(snap)
            held.append((snap, dict(model)))
            txn = writer.tree.begin(writer.root)
        elif op == "close" and held:
            snap, _ = held.pop(n % len(held))
            writer.open_snapshots.remove(snap)
            writer.release()
        assert dict(txn.range()) == model
        for snap, state in held:
            assert dict(snap.range()) == state, "an old snapshot saw a later transaction"
    writer.finish(txn)
    final = reader.snapshot(writer.root)
    event(f"height {final.height()}")
    assert dict(final.range()) == model
    assert all(final.get(k) == v for k, v in model.items())
    reachable = writer.store.in_use() - writer.quarantined()
    assert check(writer.root, writer.store, allocated=reachable) == []
    for snap, state in held:
        assert check(snap.root, writer.store) == []
        assert dict(snap.range()) == state


def test_a_readers_cache_never_serves_a_reused_page_number() -> None:
    writer = Writer()
    items = _bulk(4000, seed=8, value_bytes=60)
    _fill(writer, items, 1000)
    reader = Tree(writer.store, cache=PageCache(4096))
    old = reader.snapshot(writer.root)
    writer.open_snapshots.append(old)
    assert dict(old.range()) == items  # every page of the old root is now cached
    keys = list(items)
    for round_ in range(4):
        changes = {k: bytes([round_]) * 61 for k in keys[round_ * 500 : (round_ + 1) * 500]}
        writer.commit(changes)
        items.update(changes)
        if round_ == 0:
            writer.open_snapshots.remove(old)  # the reader moves on: the old pages are reused
    assert reader.cache is not None
    reused = [r for r in reader.cache._pages
              if struct.unpack_from("<Q", writer.store.pages[r.page_no], 24)[0] != r.generation]
    assert reused, "the test must make the writer reuse pages the reader has cached"
    assert dict(reader.snapshot(writer.root).range()) == items


def test_freeing_without_quarantine_is_caught_not_misread() -> None:
    """The Merkle pointers turn a broken quarantine into ChecksumMismatch, never wrong data."""
    writer = Writer()
    items = _bulk(3000, value_bytes=60)
    _fill(writer, items, 1000)
    old = writer.tree.snapshot(writer.root)
    txn = writer.tree.begin(writer.root)
    for key in list(items)[:300]:
        txn.put(key, b"new")
    done = txn.commit()
    for page_no in done.freed:  # the caller forgets the old snapshot
        writer.store.free(page_no)
    writer.root = done.root
    writer.commit({k: b"newer" for k in list(items)[300:900]})  # reuses the freed pages
    with pytest.raises(ChecksumMismatch):
        dict(old.range())


# ---- pages written and read --------------------------------------------------------------


def test_a_commit_writes_each_dirty_page_once_and_nothing_else() -> None:
    writer = Writer()
    items = _bulk(20000)
    _fill(writer, items, 2000)
    height = writer.tree.snapshot(writer.root).height()
    assert height >= 3
    # every key of one leaf updated in one transaction (same sizes: no split, no merge):
    # the leaf and the path above it are written once each
    leaf = Snapshot(writer.root, writer.store)._leaf_for(next(iter(items)))
    done = writer.commit({k: bytes(40) for k in leaf.keys})
    assert len(done.written) == height
    assert len(done.freed) == height
    # no change, no page
    txn = writer.tree.begin(writer.root)
    assert not txn.delete(path_key("/nowhere/at-all"))
    assert txn.commit() == Commit(writer.root, [], [])


def test_a_failed_commit_gives_its_pages_back() -> None:
    writer = Writer(cache=PageCache(1024))
    items = _bulk(2000)
    _fill(writer, items, 1000)
    before = writer.store.in_use()
    txn = writer.tree.begin(writer.root)
    for key in list(items)[:50]:
        txn.put(key, b"lost")
    txn.put(path_key("/new/file"), b"x" * 5000)
    writer.store.fail_at = writer.store.writes + 30
    with pytest.raises(DeviceError):
        txn.commit()
    assert writer.store.in_use() == before
    with pytest.raises(TxnStateError):
        txn.put(b"/\x00a", b"")
    # the next transaction reuses those page numbers under the same generation
    writer.store.fail_at = None
    writer.commit({key: b"kept" for key in list(items)[:50]})
    items.update(dict.fromkeys(list(items)[:50], b"kept"))
    assert dict(writer.tree.snapshot(writer.root).range()) == items


def test_a_transaction_writes_the_generation_it_is_given() -> None:
    writer = Writer()
    writer.commit({b"/\x00a": b"1"})
    assert writer.root is not None
    with pytest.raises(ValueError):
        writer.tree.begin(writer.root, generation=writer.root.generation)
    txn = writer.tree.begin(writer.root, generation=100)
    txn.put(b"/\x00b", b"2")
    done = txn.commit()
    assert done.root.generation == 100
    assert writer.tree.begin(done.root).generation == 101


@pytest.mark.parametrize("tear", [False, True])
def test_a_commit_cut_at_any_page_leaves_the_old_root_whole(tear: bool) -> None:
    writer = Writer()
    items = _bulk(3000, seed=4, value_bytes=100)
    _fill(writer, items, 1000)
    changes: dict[bytes, bytes | None] = {k: None for k in list(items)[:200]}
    changes.update({path_key(f"/new/f{i}"): bytes(i * 7 % 3000) for i in range(150)})
    probe = writer.tree.begin(writer.root)
    for key, value in changes.items():
        probe.delete(key) if value is None else probe.put(key, value)
    needed = len(probe.commit().written)  # a dry run: nothing references those pages
    assert needed > 10
    for cut in range(0, needed, max(1, needed // 25)):
        store = MemoryPages()
        store.pages, store.next_page = dict(writer.store.pages), writer.store.next_page
        store.free_list = list(writer.store.free_list)
        txn = Tree(store).begin(writer.root)
        for key, value in changes.items():
            txn.delete(key) if value is None else txn.put(key, value)
        store.fail_at, store.tear = store.writes + cut, tear
        with pytest.raises(DeviceError):
            txn.commit()
        old = Tree(store).snapshot(writer.root)
        assert dict(old.range()) == items
        assert check(writer.root, store) == []


def test_scale_reads_per_lookup_and_pages_per_commit() -> None:
    writer = Writer(cache=PageCache(512))  # the writer's cache; lookups below use none
    items = _bulk(100_000, seed=9, dirs=1000)
    _fill(writer, items, 1000)
    store = writer.store
    snap = Tree(store).snapshot(writer.root)
    height = snap.height()
    assert 3 <= height <= 5
    rng = random.Random(1)
    for key in rng.sample(list(items), 300):
        before = store.reads
        assert snap.get(key) == items[key]
        assert store.reads - before <= height
    before = store.reads
    assert snap.get(path_key("/d500/absent")) is None
    assert store.reads - before <= height
    # listing a directory: the pages of its range and the path to them, not the tree
    before = store.reads
    listed = snap.list_children("/d123")
    assert len(listed) == sum(1 for k in items if k.startswith(b"/d123\x00"))
    assert store.reads - before <= height + len(listed) // 20 + 2
    # commit of k changed keys: O(k * height) pages, whatever the tree's size
    total_pages = len(store.in_use())
    for k in (1, 10, 100):
        done = writer.commit({key: b"changed" for key in rng.sample(list(items), k)})
        assert len(done.written) <= k * height + height < total_pages / 4, k


def test_a_directory_rename_touches_only_the_pages_of_its_subtree() -> None:
    writer = Writer()
    rng = random.Random(12)
    items = {path_key(f"/d{d:03d}/f{i:04d}"): rng.randbytes(40)
             for d in range(100) for i in range(200)}
    items.update({path_key(f"/d050/sub/g{i:03d}"): rng.randbytes(40) for i in range(100)})
    _fill(writer, dict(sorted(items.items(), key=lambda _: rng.random())), 2000)
    total = len(writer.store.in_use() - writer.quarantined())
    reads = writer.store.reads
    txn = writer.tree.begin(writer.root)  # no cache: every page the rename needs is read
    moved = [kv for lo, hi in subtree_ranges("/d050") for kv in txn.range(lo, hi)]
    assert len(moved) == 300
    for key, value in moved:
        txn.delete(key)
        txn.put(path_key("/e050" + key_path(key)[len("/d050"):]), value)
    done = writer.finish(txn)
    # the subtree fills ~8 of the ~420 pages, its destination range a few more: measured 35
    # reads and 17 writes; a rename that walked the namespace would read every page
    assert total > 400
    assert writer.store.reads - reads <= 50
    assert len(done.written) <= 25
    expect = {path_key("/e050" + key_path(k)[len("/d050"):]) if k in dict(moved) else k: v
              for k, v in items.items()}
    assert dict(writer.tree.snapshot(writer.root).range()) == expect


def test_keys_loaded_in_order_fill_their_pages() -> None:
    writer = Writer()
    items = {path_key(f"/d/f{i:06d}"): bytes(40) for i in range(20000)}
    _fill(writer, items, 1000)
    cells = sum(LEAF_CELL.size + len(k) + len(v) for k, v in items.items())
    live = writer.store.in_use() - writer.quarantined()
    leaves = sum(1 for p in live if writer.store.pages[p][5] == KIND_LEAF)
    body = PAGE - HEADER.size
    assert cells / body <= leaves <= cells / body * 1.03 + 1  # split halves: ~2x
    assert check(writer.root, writer.store, allocated=live) == []
    assert dict(writer.tree.snapshot(writer.root).range()) == items


def test_deletes_shrink_the_tree() -> None:
    writer = Writer()
    items = _bulk(20000, seed=2)
    _fill(writer, items, 2000)
    grown = len(writer.store.in_use() - writer.quarantined())
    keys = list(items)
    _fill(writer, dict.fromkeys(keys[:19800]), 2000)
    snap = writer.tree.snapshot(writer.root)
    assert dict(snap.range()) == {k: items[k] for k in keys[19800:]}
    live = writer.store.in_use() - writer.quarantined()
    assert snap.height() <= 2
    assert len(live) <= grown // 20
    assert check(writer.root, writer.store, allocated=live) == []
    writer.commit(dict.fromkeys(keys[19800:]))
    assert Tree(writer.store).snapshot(writer.root).height() == 1
    assert list(Tree(writer.store).snapshot(writer.root).range()) == []


def test_big_values_live_in_overflow_chains_that_are_freed_with_them() -> None:
    writer = Writer()
    big = random.Random(3).randbytes(200_000)
    writer.commit({b"/\x00big": big, b"/\x00small": b"s"})
    assert writer.tree.snapshot(writer.root).get(b"/\x00big") == big
    in_use = len(writer.store.in_use())
    assert in_use >= 200_000 // PAGE
    done = writer.commit({b"/\x00big": None})
    assert len(done.freed) >= 200_000 // PAGE
    with pytest.raises(TooLarge):
        writer.tree.begin(writer.root).put(b"/\x00k", bytes(MAX_VALUE + 1))
    with pytest.raises(TooLarge):
        writer.tree.begin(writer.root).put(b"/\x00" + b"k" * LAYOUT.max_key, b"")


def test_longest_keys_still_split_and_merge() -> None:
    writer = Writer()
    rng = random.Random(5)
    keys = [rng.randbytes(LAYOUT.max_key - 1) + bytes([i % 256]) for i in range(400)]
    items = {k: rng.randbytes(rng.randrange(2000)) for k in keys}
    _fill(writer, items, 50)
    snap = writer.tree.snapshot(writer.root)
    assert dict(snap.range()) == items
    _fill(writer, dict.fromkeys(keys[:390]), 50)
    assert dict(writer.tree.snapshot(writer.root).range()) == {k: items[k] for k in keys[390:]}
    live = writer.store.in_use() - writer.quarantined()
    assert check(writer.root, writer.store, allocated=live) == []


def test_cache_is_bounded_and_serves_repeated_lookups() -> None:
    writer = Writer()
    items = _bulk(20000, seed=6)
    _fill(writer, items, 5000)
    cache = PageCache(16)
    snap = Tree(writer.store, cache=cache).snapshot(writer.root)
    key = next(iter(items))
    reads = writer.store.reads
    for _ in range(50):
        assert snap.get(key) == items[key]
    assert writer.store.reads - reads == snap.height()
    for k in list(items)[:500]:
        snap.get(k)
    assert len(cache._pages) <= 16
    assert cache.hits > 0 and cache.misses > 0


def test_page_cache_evicts_the_least_recently_used() -> None:
    cache = PageCache(2)
    a, b, c = (PageRef(n, 1, n) for n in range(3))
    for ref in (a, b):
        cache.put(ref, Leaf([], [], HEADER.size))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, Leaf([], [], HEADER.size))
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    assert (cache.hits, cache.misses) == (3, 1)


def test_a_transaction_is_single_use_and_not_changed_under_a_scan() -> None:
    writer = Writer()
    _fill(writer, _bulk(500), 500)
    txn = writer.tree.begin(writer.root)
    scan = txn.range()
    next(scan)
    txn.put(b"/\x00late", b"x")
    with pytest.raises(TxnStateError):
        next(scan)
    txn.commit()
    with pytest.raises(TxnStateError):
        txn.commit()


# ---- hostile pages -----------------------------------------------------------------------


def _seal(kind: int, level: int, count: int, cells: bytes, page_no: int, generation: int,
          used: int | None = None) -> tuple[bytes, PageRef]:
    """A page with a correct CRC whatever its content says (a forger's page)."""
    body = bytearray(HEADER.pack(MAGIC, VERSION, kind, level, 0, count,
                                 HEADER.size + len(cells) if used is None else used, 0,
                                 page_no, generation)) + cells
    body = body[:PAGE] + bytes(max(0, PAGE - len(body)))
    crc = page_crc(body)
    struct.pack_into("<I", body, 12, crc)
    return bytes(body), PageRef(page_no, generation, crc)


def _leaf_cell(key: bytes, value: bytes) -> bytes:
    return LEAF_CELL.pack(len(key), len(value), 0) + key + value


def _branch(children: list[tuple[bytes, PageRef]]) -> bytes:
    return b"".join(BRANCH_CELL.pack(len(k), *ref) + k for k, ref in children)


def _expect_format_error(root: PageRef, store: MemoryPages) -> None:
    """A full scan raises the project's error, check() names the page; the other reads
    succeed or raise it too (a lookup may never reach the bad page); all in few reads."""
    snap = Snapshot(root, store)
    store.reads = 0
    with pytest.raises(FormatError):
        dict(snap.range())
    for action in (lambda: snap.get(b"/\x00a"), snap.height):
        with contextlib.suppress(FormatError):
            action()
    assert store.reads <= 20
    problems = check(root, store)
    assert problems and all(p.page is not None for p in problems)


def _store(*pages: tuple[bytes, PageRef]) -> MemoryPages:
    store = MemoryPages()
    for data, ref in pages:
        store.pages[ref.page_no] = data
    return store


def test_forged_leaves_are_refused() -> None:
    cell = _leaf_cell(b"/\x00a", b"v")
    cases = [
        _seal(KIND_LEAF, 0, 60000, cell, 1, 1),  # count far past the cells
        _seal(KIND_LEAF, 0, 2, cell + cell, 1, 1),  # same key twice
        _seal(KIND_LEAF, 0, 1, LEAF_CELL.pack(5000, 1, 0) + b"k", 1, 1),  # key past the page
        _seal(KIND_LEAF, 0, 1, LEAF_CELL.pack(1, 2**31, 0) + b"k", 1, 1),  # value past it
        _seal(KIND_LEAF, 0, 1, LEAF_CELL.pack(1, 1, 7) + b"kv", 1, 1),  # unknown flags
        _seal(KIND_LEAF, 0, 1, cell, 1, 1, used=PAGE + 10),  # used past the page
        _seal(KIND_LEAF, 3, 1, cell, 1, 1),  # a leaf above level 0
        _seal(9, 0, 1, cell, 1, 1),  # unknown kind
        _seal(KIND_LEAF, 0, 1, cell, 7, 1),  # says it is page 7
        _seal(KIND_LEAF, 0, 1, LEAF_CELL.pack(3, 2**25, 1) + b"/\x00a"  # 2^25 bytes in 1 page
              + OVERFLOW_REF.pack(2, 1, 0), 1, 1),
    ]
    for data, ref in cases:
        store = _store((data, ref))
        store.pages[1] = data
        _expect_format_error(PageRef(1, ref.generation, ref.crc), store)


def test_cycles_and_wrong_levels_end_in_errors() -> None:
    leaf = _seal(KIND_LEAF, 0, 1, _leaf_cell(b"/\x00a", b"v"), 3, 1)
    # a branch that names itself as its child
    data, _ = _seal(KIND_BRANCH, 1, 2, _branch([(b"", leaf[1]), (b"/\x00b", PageRef(1, 1, 0))]),
                    1, 1)
    _expect_format_error(PageRef(1, 1, page_crc(data)), _store((data, PageRef(1, 1, 0)), leaf))
    # a child one level too high: the level must fall by one at every step, so no walk loops
    mid, mid_ref = _seal(KIND_BRANCH, 1, 2, _branch([(b"", leaf[1]), (b"/\x00b", leaf[1])]),
                         2, 1)
    top, top_ref = _seal(KIND_BRANCH, 1, 2, _branch([(b"", mid_ref), (b"/\x00z", leaf[1])]),
                         1, 1)
    _expect_format_error(top_ref, _store((top, top_ref), (mid, mid_ref), leaf))
    # a pointer back to an ancestor cannot carry the ancestor's CRC (it covers the pointer)
    inner, inner_ref = _seal(KIND_BRANCH, 1, 2, _branch([(b"", leaf[1]),
                                                         (b"/\x00b", PageRef(1, 1, 0))]), 2, 1)
    outer, outer_ref = _seal(KIND_BRANCH, 2, 2, _branch([(b"", inner_ref),
                                                         (b"/\x00c", inner_ref)]), 1, 1)
    _expect_format_error(outer_ref, _store((outer, outer_ref), (inner, inner_ref), leaf))
    # one key-less page under many parents' ranges (a DAG that would make a scan exponential)
    empty, empty_ref = _seal(KIND_LEAF, 0, 0, b"", 4, 1)
    fan, fan_ref = _seal(KIND_BRANCH, 1, 3, _branch([(b"", empty_ref), (b"/\x00b", empty_ref),
                                                     (b"/\x00c", empty_ref)]), 1, 1)
    _expect_format_error(fan_ref, _store((fan, fan_ref), (empty, empty_ref)))
    # a child newer than its parent (each page self-consistent, the pointer right)
    newer = _seal(KIND_LEAF, 0, 1, _leaf_cell(b"/\x00a", b"v"), 3, 5)
    data, ref = _seal(KIND_BRANCH, 1, 1, _branch([(b"", newer[1])]), 1, 2)
    _expect_format_error(ref, _store((data, ref), newer))
    # a child whose keys lie outside the range its parent gives
    data, ref = _seal(KIND_BRANCH, 1, 2, _branch([(b"", leaf[1]), (b"/\x00", leaf[1])]), 1, 1)
    _expect_format_error(ref, _store((data, ref), leaf))
    # a child the parent names with another CRC (a stale page)
    data, ref = _seal(KIND_BRANCH, 1, 1, _branch([(b"", leaf[1]._replace(crc=1))]), 1, 1)
    _expect_format_error(ref, _store((data, ref), leaf))


def test_overflow_chains_that_loop_or_lie_are_refused() -> None:
    step = LAYOUT.overflow_payload
    value = bytes(range(256)) * (3 * step // 256 + 1)
    value = value[: 3 * step]

    def overflow(page_no: int, payload: bytes, nxt: int) -> tuple[bytes, PageRef]:
        return _seal(KIND_OVERFLOW, 0, 0, OVERFLOW_HEAD.pack(nxt, len(payload)) + payload,
                     page_no, 1)

    def leaf(first: int, length: int = len(value)) -> tuple[bytes, PageRef]:
        cell = LEAF_CELL.pack(3, length, 1) + b"/\x00a" + OVERFLOW_REF.pack(
            first, LAYOUT.overflow_pages(length), zlib.crc32(value[:length]))
        return _seal(KIND_LEAF, 0, 1, cell, 1, 1)

    loop = [overflow(2, value[:step], 3), overflow(3, value[step : 2 * step], 2)]
    root = leaf(2)
    _expect_format_error(root[1], _store(root, *loop))
    with pytest.raises(CorruptMetadata, match="loops"):
        Snapshot(root[1], _store(root, *loop)).get(b"/\x00a")
    short = [overflow(2, value[:step], NO_PAGE)]  # ends before its count
    _expect_format_error(root[1], _store(root, *short))
    into_leaf = [overflow(2, value[:step], 1)]  # continues into a leaf
    _expect_format_error(root[1], _store(root, *into_leaf))
    whole = [overflow(2, value[:step], 3), overflow(3, value[step : 2 * step], 4),
             overflow(4, value[2 * step :], NO_PAGE)]
    assert Snapshot(root[1], _store(root, *whole)).get(b"/\x00a") == value
    assert check(root[1], _store(root, *whole)) == []
    # two cells sharing one chain: readable, but freeing one would free the other's pages
    ref = OVERFLOW_REF.pack(2, 3, zlib.crc32(value))
    shared = _seal(KIND_LEAF, 0, 2, LEAF_CELL.pack(3, len(value), 1) + b"/\x00a" + ref
                   + LEAF_CELL.pack(3, len(value), 1) + b"/\x00b" + ref, 1, 1)
    assert [(p.page, p.kind) for p in check(shared[1], _store(shared, *whole))] == [
        (2, "double-referenced"), (3, "double-referenced"), (4, "double-referenced")]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64), st.integers(0, 3))
def test_random_pages_give_format_errors(seed: int, stamp: int) -> None:
    """Noise, and noise under a valid magic/version/self number/CRC (stamp bits)."""
    page = bytearray(random.Random(seed).randbytes(PAGE))
    if stamp & 1:
        page[:5] = MAGIC + bytes([VERSION])
        struct.pack_into("<Q", page, 16, 0)
    if stamp & 2:
        struct.pack_into("<I", page, 12, page_crc(page))
    ref = PageRef(0, struct.unpack_from("<Q", page, 24)[0], page_crc(page))
    store = _store((bytes(page), ref))
    snap = Snapshot(ref, store)
    with contextlib.suppress(FormatError):
        dict(snap.range())
        snap.get(b"/\x00x")
    check(ref, store)
    assert store.reads <= 10


def _forged_tree(rng: random.Random, pages: int) -> tuple[MemoryPages, PageRef]:
    """Random pages that decode (sealed, CRC-right), pointing at each other at random:
    children written before parents so a pointer's CRC may well be right."""
    store = MemoryPages()
    refs: list[PageRef] = []
    for page_no in range(pages):
        kind = rng.choice([KIND_LEAF, KIND_BRANCH, KIND_OVERFLOW])
        level = rng.choice([0, 0, 1, 2, 3])
        generation = rng.randrange(1, 5)
        if kind == KIND_LEAF:
            keys = sorted({rng.randbytes(rng.randrange(1, 6)) for _ in range(rng.randrange(6))})
            cells = b"".join(_leaf_cell(k, rng.randbytes(rng.randrange(20))) for k in keys)
            count = len(keys) if rng.random() < 0.8 else rng.randrange(1000)
        elif kind == KIND_BRANCH and refs:
            keys = [b"", *sorted({rng.randbytes(rng.randrange(1, 4))
                                  for _ in range(rng.randrange(4))})]
            pointed = [rng.choice(refs) if rng.random() < 0.8
                       else PageRef(rng.randrange(pages + 2), generation, rng.randrange(2**32))
                       for _ in keys]
            cells = _branch(list(zip(keys, pointed, strict=True)))
            count = len(keys)
        else:
            payload = rng.randbytes(rng.randrange(100))
            cells = OVERFLOW_HEAD.pack(rng.choice([NO_PAGE, rng.randrange(pages)]),
                                       len(payload)) + payload
            count = 0
        data, ref = _seal(kind, level, count, cells, page_no, generation)
        store.pages[page_no] = data
        refs.append(ref)
    return store, refs[-1]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 30))
def test_forged_trees_end_in_format_errors_after_bounded_reads(seed: int, pages: int) -> None:
    store, root = _forged_tree(random.Random(seed), pages)
    snap = Snapshot(root, store)
    for action in (lambda: list(snap.range(limit=1000)), lambda: snap.get(b"a"),
                   lambda: check(root, store)):
        store.reads = 0
        with contextlib.suppress(FormatError):
            action()
        # a page is read at most once per walk (the range scan's overflow chains aside)
        assert store.reads <= 2 * pages + 5


def test_check_names_leaked_and_unallocated_pages() -> None:
    writer = Writer()
    _fill(writer, _bulk(3000), 1000)
    live = writer.store.in_use() - writer.quarantined()
    assert check(writer.root, writer.store, allocated=live) == []
    leaked = {p.page: p.kind for p in check(writer.root, writer.store,
                                             allocated=live | {10**6})}
    assert leaked == {10**6: "leaked"}
    some = next(iter(live - {writer.root.page_no}))
    missing = {p.page: p.kind for p in check(writer.root, writer.store,
                                              allocated=live - {some})}
    assert missing == {some: "unallocated"}


def test_check_reports_a_bad_page_and_keeps_walking() -> None:
    writer = Writer()
    _fill(writer, _bulk(5000), 1000)
    snap = writer.tree.snapshot(writer.root)
    root = Snapshot(writer.root, writer.store)._root()
    assert isinstance(root, Branch)
    victim = root.children[1]
    assert isinstance(victim, PageRef)
    damaged = bytearray(writer.store.pages[victim.page_no])
    damaged[100] ^= 0xFF
    writer.store.pages[victim.page_no] = bytes(damaged)
    problems = check(writer.root, writer.store)
    assert [(p.page, p.kind) for p in problems] == [(victim.page_no, "page")]
    with pytest.raises(ChecksumMismatch):
        dict(snap.range())
