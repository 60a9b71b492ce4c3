"""TreeIndex (on-image tree + overlay) holds exactly what the in-memory Index holds, for any
sequence of records, checkpoints (commit + root switch) and readers following the
checkpoint records; listing pages merge the tree and the overlay."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.btree import PageCache, Tree
from agents.core.index import Index
from agents.core.record import Record
from agents.core.treeindex import TreeIndex
from agents.errors import AgentError
from tests.unit.test_btree import MemoryPages
from tests.unit.test_record import KEY

pytestmark = pytest.mark.unit

paths = st.sampled_from(["/a", "/b", "/a/x", "/a/y", "/b/x", "/a/x/z", "/c", "/é", "/a/é"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), paths, st.booleans()),
        st.tuples(st.just("delete"), paths, st.booleans()),
        st.tuples(st.just("mkdir"), paths, st.booleans()),
        st.tuples(st.just("rename"), paths, paths),
        st.tuples(st.just("epoch"), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("checkpoint"), st.booleans(), st.booleans()),
    ),
    max_size=60,
)


def _payload(op: str, a: Any, b: Any, i: int) -> tuple[str, dict[str, Any]]:
    if op == "put":
        payload: dict[str, Any] = {"path": a, "size": 3, "mtime": float(i), "crc": i}
        if b:
            payload["data"] = b"abc"
        else:
            payload.update(chunk=4096, extents=[[(i + 1) << 12, 4096]], sums=[0])
        return "put", payload
    if op == "delete":
        return "delete", {"path": a}
    if op == "mkdir":
        return "mkdir", {"path": a, "parents": b, "mtime": float(i)}
    return "rename", {"src": a, "dst": b}


def _same(tree: TreeIndex, model: Index) -> None:
    assert tree.snapshot() == model.snapshot()
    assert (tree.applied_seq, tree.epoch) == (model.applied_seq, model.epoch)
    for path in model.nodes:
        assert tree.lookup(path) == model.nodes[path]
        if model.nodes[path].entry.kind == "dir":
            whole = model.listdir(path)
            assert tree.listdir(path) == whole
            after = None
            paged = []
            while True:
                page, more = tree.listdir_page(path, after, 2)
                assert (page, more) == model.listdir_page(path, after, 2)
                paged += page
                if not more:
                    break
                after = page[-1].path.rsplit("/", 1)[1]
            assert paged == whole


@settings(max_examples=120, deadline=None)
@given(ops)
def test_tree_index_is_the_index_across_checkpoints_and_readers(
        script: list[tuple[Any, ...]]) -> None:
    pages = MemoryPages()
    tree = Tree(pages, cache=PageCache(64))
    model, writer = Index(), TreeIndex(tree, None, 0, 0)
    reader = TreeIndex(Tree(pages, cache=PageCache(8)), None, 0, 0)
    epoch = 1
    for i, (op, a, b) in enumerate(script):
        seq = model.applied_seq + 1
        if op == "checkpoint":
            commit = writer.commit(generation=seq)
            writer.switch(commit.root, model.applied_seq)
            root = None if commit.root is None else list(commit.root)
            record = Record(seq, epoch, "checkpoint", {"root": root, "seq": seq - 1})
        elif op == "epoch":
            epoch += a
            record = Record(seq, epoch, "epoch-start", {"epoch": epoch})
        else:
            name, payload = _payload(op, a, b, i)
            record = Record(seq, epoch, name, payload)
        try:
            want = model.apply(record)
        except AgentError as exc:
            before = writer.snapshot()
            with pytest.raises(type(exc)):
                writer.apply(record)
            assert writer.snapshot() == before, "a refused record changed the tree index"
            continue
        assert writer.apply(record) == want
        assert reader.apply(Record.decode(record.encode(KEY), KEY)) == want
        if op == "checkpoint":
            assert reader.root == writer.root and reader.overlay_size == 0
    _same(writer, model)
    _same(reader, model)
    # a reader opened from the last root replays only the tail and agrees too
    late = TreeIndex(Tree(pages), writer.root, writer.root_seq, model.epoch)
    assert late.overlay_size == 0


def test_overlay_shadows_the_tree_in_listings() -> None:
    pages = MemoryPages()
    tree = Tree(pages, cache=PageCache(16))
    index = TreeIndex(tree, None, 0, 0)
    for i in range(300):
        index.apply(Record(i + 1, 1, "put", {"path": f"/d/f{i:03}", "size": 1,
                                             "mtime": 0.0, "crc": 0, "data": b"x"}))
    commit = index.commit(generation=301)
    index.switch(commit.root, 300)
    assert index.overlay_size == 0
    index.apply(Record(301, 1, "delete", {"path": "/d/f000"}))
    index.apply(Record(302, 1, "put", {"path": "/d/f0005", "size": 1, "mtime": 0.0,
                                       "crc": 0, "data": b"y"}))
    index.apply(Record(303, 1, "rename", {"src": "/d/f299", "dst": "/d/zz"}))
    names = [e.path for e in index.listdir("/d")]
    assert names[:2] == ["/d/f0005", "/d/f001"] and names[-2:] == ["/d/f298", "/d/zz"]
    assert len(names) == 300
    assert index.overlay_size == 4  # only what changed since the root is in memory
