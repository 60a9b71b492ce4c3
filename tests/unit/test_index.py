"""Index: path validation table, op semantics, and replay of the journal == live state."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.allocator import Extent
from agents.core.index import Index, crc32_combine, file_crc, locate, normalize_path
from agents.core.record import Record
from agents.errors import AgentError, AlreadyExists, BadPath, NotEmpty, NotFound, WrongKind
from tests.unit.test_record import KEY

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/a", "/a"),
        ("/a/b/", "/a/b"),
        ("/é/ü", "/é/ü"),
        ("/" + "x" * 255, "/" + "x" * 255),
    ],
)
def test_good_paths(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a",
        "a/b",
        "//a",
        "/a//b",
        "/a/../b",
        "/..",
        "/.",
        "/a/./b",
        "/a\x00b",
        "/" + "x" * 256,
        "/" + "/".join(["y" * 200] * 21),
        "/\udcff",
    ],
)
def test_bad_paths(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


def test_locate_spans_extents() -> None:
    ext = [Extent(8192, 8192), Extent(40960, 4096)]
    assert locate(ext, 0, 12288) == [(8192, 8192), (40960, 4096)]
    assert locate(ext, 4096, 8192) == [(12288, 4096), (40960, 4096)]
    with pytest.raises(ValueError):
        locate(ext, 8192, 8192)


class Writer:
    """Applies ops the way the volume's writer does: refused ops consume no seq."""

    def __init__(self) -> None:
        self.index = Index()
        self.records: list[Record] = []
        self.next_extent = 1 << 20
        self.freed: list[Extent] = []
        self.written: list[Extent] = []

    def do(self, op: str, payload: dict[str, Any], epoch: int = 1) -> Record | AgentError:
        if op == "put" and "data" not in payload:
            ext = Extent(self.next_extent, 4096)
            self.next_extent += 4096
            payload = {**payload, "chunk": 4096, "extents": [[ext.offset, 4096]], "sums": [0]}
        record = Record(self.index.applied_seq + 1, epoch, op, payload)
        before = self.index.snapshot()
        try:
            freed = self.index.apply(record)
        except AgentError as exc:
            assert self.index.snapshot() == before, "a refused record changed the index"
            return exc
        if op == "put" and "data" not in payload:
            self.written.append(Extent(payload["extents"][0][0], 4096))
        self.freed += freed
        self.records.append(record)
        return record


def test_op_semantics() -> None:
    w = Writer()
    assert isinstance(w.do("put", {"path": "/a/b/c", "size": 1, "mtime": 1.0, "crc": 0}), Record)
    assert w.index.get("/a/b").entry.kind == "dir"
    assert isinstance(w.do("mkdir", {"path": "/a", "mtime": 0.0}), AlreadyExists)
    assert isinstance(w.do("mkdir", {"path": "/a", "parents": True, "mtime": 0.0}), Record)
    assert isinstance(w.do("mkdir", {"path": "/x/y", "mtime": 0.0}), NotFound)
    assert isinstance(w.do("put", {"path": "/a/b", "size": 1, "mtime": 0.0, "crc": 0}), WrongKind)
    assert isinstance(
        w.do("put", {"path": "/a/b/c/d", "size": 1, "mtime": 0.0, "crc": 0}), WrongKind
    )
    assert isinstance(w.do("delete", {"path": "/a"}), NotEmpty)
    assert isinstance(w.do("rename", {"src": "/a", "dst": "/a/b/z"}), BadPath)
    assert isinstance(w.do("rename", {"src": "/a", "dst": "/m"}), Record)
    assert [e.path for e in w.index.listdir("/m/b")] == ["/m/b/c"]
    assert w.index.get("/m/b/c").entry.version == 1
    # a file replaces a file (its extents are freed); a dir never replaces anything
    w.do("put", {"path": "/m/f", "size": 1, "mtime": 0.0, "crc": 0})
    old = w.index.get("/m/f").extents
    assert isinstance(w.do("rename", {"src": "/m/b/c", "dst": "/m/f"}), Record)
    assert w.freed == list(old)
    assert isinstance(w.do("rename", {"src": "/m/b", "dst": "/m/f"}), AlreadyExists)
    assert isinstance(w.do("delete", {"path": "/nope"}), NotFound)
    assert isinstance(
        w.do("put", {"path": "/i", "size": 2, "mtime": 0.0, "crc": 0, "data": b"hi"}), Record
    )
    assert w.index.get("/i").inline == b"hi"


paths = st.sampled_from(["/a", "/b", "/a/x", "/a/y", "/b/x", "/a/x/z", "/c"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), paths, st.booleans()),
        st.tuples(st.just("delete"), paths, st.booleans()),
        st.tuples(st.just("mkdir"), paths, st.booleans()),
        st.tuples(st.just("rename"), paths, paths),
        st.tuples(st.just("epoch"), st.integers(0, 3), st.booleans()),
    ),
    max_size=60,
)


def _run(script: list[tuple[Any, ...]]) -> Writer:
    w = Writer()
    epoch = 1
    for i, (op, a, b) in enumerate(script):
        if op == "put":
            payload: dict[str, Any] = {"path": a, "size": 3, "mtime": float(i), "crc": i}
            if b:
                payload["data"] = b"abc"
            w.do("put", payload, epoch)
        elif op == "delete":
            w.do("delete", {"path": a}, epoch)
        elif op == "mkdir":
            w.do("mkdir", {"path": a, "parents": b, "mtime": float(i)}, epoch)
        elif op == "rename":
            w.do("rename", {"src": a, "dst": b}, epoch)
        else:
            epoch += a
            w.do("epoch-start", {"epoch": epoch}, epoch)
    return w


def _consistent(index: Index) -> None:
    for path in index.nodes:
        if path != "/":
            parent = path.rsplit("/", 1)[0] or "/"
            assert index.nodes[parent].entry.kind == "dir"
            assert path in index.children[parent]
    for d, kids in index.children.items():
        assert index.nodes[d].entry.kind == "dir"
        assert all(k in index.nodes for k in kids)


@settings(max_examples=150)
@given(ops)
def test_replay_of_the_journal_is_the_live_state(script: list[tuple[Any, ...]]) -> None:
    w = _run(script)
    _consistent(w.index)
    replay = Index()
    for record in w.records:
        replay.apply(Record.decode(record.encode(KEY), KEY))
    assert replay.snapshot() == w.index.snapshot()
    assert (replay.applied_seq, replay.epoch) == (w.index.applied_seq, w.index.epoch)
    # every extent ever written is either still named by a file or was freed exactly once
    live = [x for node in w.index.nodes.values() for x in node.extents]
    assert sorted(live + w.freed) == sorted(w.written)


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@given(st.binary(max_size=20_000), st.sampled_from([4096, 8192, 12288]))
def test_file_crc_from_chunk_sums(data: bytes, chunk: int) -> None:
    sums = [zlib.crc32(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    assert file_crc(sums, len(data), chunk) == zlib.crc32(data)
