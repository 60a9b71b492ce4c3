"""Paginated listings: the index's sorted children, the volume's cursor (a name, so entries
added or removed between pages cause no duplicate and no skip of an entry that existed
throughout), and the agent's ``limit``/``after`` query."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core import btree
from agents.core.index import Index
from agents.core.protocol import LIST_LIMIT, MAX_LIST_LIMIT
from agents.core.record import Record
from agents.core.treeindex import TreeIndex
from agents.errors import BadPath, BadRequest, NotFound, WrongKind
from agents.server import _list_query
from agents.testing import MemoryDevice
from agents.volume import Volume
from tests.unit.test_btree import MemoryPages

pytestmark = pytest.mark.unit


class Tree:
    """An index driven by mkdir/delete records."""

    def __init__(self) -> None:
        self.index = Index()
        self.records: list[Record] = []

    def apply(self, op: str, path: str) -> None:
        payload = {"path": path, "parents": True, "mtime": 0.0} if op == "mkdir" else {
            "path": path}
        self.record(op, payload)

    def record(self, op: str, payload: dict[str, object]) -> None:
        self.records.append(Record(len(self.records) + 1, 1, op, payload))
        self.index.apply(self.records[-1])

    def names(self, directory: str = "/d") -> list[str]:
        return [posixpath.basename(e.path) for e in self.index.listdir(directory)]


def _page(tree: Tree, after: str | None, limit: int) -> tuple[list[str], bool]:
    entries, more = tree.index.listdir_page("/d", after, limit)
    return [posixpath.basename(e.path) for e in entries], more


def test_pages_cover_the_directory_in_order() -> None:
    tree = Tree()
    for name in ["b", "a", "c10", "c2", "é"]:
        tree.apply("mkdir", f"/d/{name}")
    tree.apply("mkdir", "/d/a/inner")  # grandchildren are not the directory's entries
    assert tree.names() == ["a", "b", "c10", "c2", "é"]
    assert _page(tree, None, 2) == (["a", "b"], True)
    assert _page(tree, "b", 2) == (["c10", "c2"], True)
    assert _page(tree, "c2", 2) == (["é"], False)
    assert _page(tree, "c2", 1) == (["é"], False)
    assert _page(tree, "\u00f6", 5) == ([], False)  # code point order: ö after é
    assert _page(tree, "absent-but-between", 1) == (["b"], True)  # a removed cursor works
    with pytest.raises(NotFound):
        tree.index.listdir_page("/nope", None, 1)
    tree.apply("delete", "/d/a/inner")
    tree.apply("delete", "/d/a")
    assert tree.names() == ["b", "c10", "c2", "é"]


names = st.text(alphabet="abcxyz", min_size=1, max_size=3)


@settings(max_examples=200)
@given(st.sets(names, max_size=20), st.integers(1, 5),
       st.lists(st.tuples(st.booleans(), names), max_size=30))
def test_changes_between_pages_cause_no_duplicate_and_no_skip(
    initial: set[str], limit: int, changes: list[tuple[bool, str]]
) -> None:
    tree = Tree()
    tree.apply("mkdir", "/d")
    for name in initial:
        tree.apply("mkdir", f"/d/{name}")
    present = set(initial)
    throughout = set(initial)
    seen: list[str] = []
    after: str | None = None
    pending = list(changes)
    while True:
        page, more = _page(tree, after, limit)
        seen += page
        if not more:
            break
        after = page[-1]
        for _ in range(2):  # the directory changes between pages
            if pending:
                add, name = pending.pop(0)
                if add and name not in present:
                    tree.apply("mkdir", f"/d/{name}")
                    present.add(name)
                elif not add and name in present:
                    tree.apply("delete", f"/d/{name}")
                    present.discard(name)
                    throughout.discard(name)
    assert len(seen) == len(set(seen)), "an entry came twice"
    assert seen == sorted(seen)
    assert throughout <= set(seen), "an entry that existed throughout was skipped"
    assert set(seen) <= set(initial) | {n for _, n in changes}


def test_children_stay_sorted_through_renames_and_checkpoints() -> None:
    tree = Tree()
    for name in ["m", "a", "z"]:
        tree.apply("mkdir", f"/d/{name}")
    tree.record("rename", {"src": "/d/z", "dst": "/d/b"})
    assert tree.names() == ["a", "b", "m"]
    # the same records through the on-image tree, checkpointed half-way: same listing
    again = TreeIndex(btree.Tree(MemoryPages(), cache=btree.PageCache(8)), None, 0, 0)
    for record in tree.records:
        again.apply(record)
        if record.seq == 2:
            again.switch(again.commit(generation=record.seq).root, record.seq)
    assert [e.path for e in again.listdir("/d")] == ["/d/a", "/d/b", "/d/m"]
    assert again.listdir_page("/d", "a", 1)[0][0].path == "/d/b"


@pytest.fixture
def volume() -> Volume:
    device = MemoryDevice(16 << 20)
    Volume.format(device, fleet="t")
    vol = Volume.open(device)
    vol.start_epoch(1)
    for name in ["a", "b", "c", "\u00e9"]:  # é, one code point (NFC)
        vol.put(f"/d/{name}", [b"x"], 1, epoch=1, mtime=0)
    vol.put("/file", [b"x"], 1, epoch=1, mtime=0)
    return vol


def test_volume_pages_and_cursor(volume: Volume) -> None:
    entries, cursor = volume.list_page("/d", limit=2)
    assert [e.path for e in entries] == ["/d/a", "/d/b"] and cursor == "b"
    entries, cursor = volume.list_page("/d", after=cursor, limit=2)
    assert [e.path for e in entries] == ["/d/c", "/d/\u00e9"] and cursor is None
    # a decomposed spelling of the cursor is the same name (NFC, as paths are)
    assert [e.path for e in volume.list_page("/d", after="c", limit=9)[0]] == ["/d/\u00e9"]
    assert volume.list_page("/d", after="e\u0301", limit=9) == ([], None)
    assert volume.list_page("/d/", limit=LIST_LIMIT)[1] is None


@pytest.mark.parametrize("after", ["", "a/b", "..", ".", "x\x00", "/a"])
def test_a_cursor_is_one_name(volume: Volume, after: str) -> None:
    with pytest.raises(BadPath):
        volume.list_page("/d", after=after, limit=1)


def test_volume_page_errors(volume: Volume) -> None:
    with pytest.raises(BadRequest):
        volume.list_page("/d", limit=0)
    with pytest.raises(WrongKind):
        volume.list_page("/file", limit=1)
    with pytest.raises(NotFound):
        volume.list_page("/none", limit=1)


@pytest.mark.parametrize(("target", "expected"), [
    ("/v1/list", (LIST_LIMIT, None)),
    ("/v1/list/d?limit=5", (5, None)),
    ("/v1/list/d?after=b&limit=2", (2, "b")),
    ("/v1/list?after=caf%C3%A9", (LIST_LIMIT, "café")),
    ("/v1/list?after=a%2Bb+c", (LIST_LIMIT, "a+b c")),
    (f"/v1/list?limit={MAX_LIST_LIMIT * 10}", (MAX_LIST_LIMIT, None)),
    ("/v1/list?limit=3#frag", (3, None)),
])
def test_list_query(target: str, expected: tuple[int, str | None]) -> None:
    assert _list_query(target) == expected


@pytest.mark.parametrize("target", [
    "/v1/list?limit=0", "/v1/list?limit=-1", "/v1/list?limit=x", "/v1/list?limit=",
    "/v1/list?limit=1&limit=2", "/v1/list?offset=3", "/v1/list?after=%FF",
    "/v1/list?limit=" + "9" * 30, "/v1/list?" + "&".join(f"a{i}=1" for i in range(10)),
    "/v1/list?limit=\u0663",
])
def test_bad_list_queries(target: str) -> None:
    with pytest.raises(BadRequest):
        _list_query(target)
