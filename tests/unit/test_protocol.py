"""Protocol: every message round-trips; bad versions and malformed bodies are refused by type."""

from __future__ import annotations

import json
import types
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core import boundedjson
from agents.core import protocol as p
from agents.errors import BadSignature, DecodeError, StaleEpoch, UnsupportedVersion
from tests.unit.test_record import KEY

pytestmark = pytest.mark.unit

MESSAGES = [
    p.ReaderAddress, p.PutRequest, p.MkdirRequest, p.RenameRequest, p.WriteAck, p.EntryInfo,
    p.ListResponse, p.RecordAck, p.Health, p.Heartbeat, p.SelfTestCheck,
    p.SelfTestReport, p.LaggingReaderReport, p.PromoteRequest, p.DemoteRequest, p.ReaderSet,
]
# the wire bounds integers to 20 digits (agents.core.boundedjson): every seq, epoch, size fits
WIRE_INTS = st.integers(-(10**20 - 1), 10**20 - 1)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), WIRE_INTS, st.text(max_size=10))


def strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the protocol field type ``tp``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*[strategy(a) for a in get_args(tp)])
    if tp is type(None):
        return st.none()
    if origin is tuple:
        return st.lists(strategy(get_args(tp)[0]), max_size=3).map(tuple)
    if origin is dict:
        (_, value) = get_args(tp)
        return st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("v", "error",
                               "message")), JSON_SCALARS if value is Any else strategy(value),
                               max_size=3)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is int:
        return WIRE_INTS
    if tp in (str, bool):
        return st.from_type(tp)
    hints = get_type_hints(tp)
    return st.builds(tp, **{f.name: strategy(hints[f.name]) for f in fields(tp)})


ALL = st.one_of(*[strategy(m) for m in [*MESSAGES, p.ErrorBody]])


@given(ALL)
def test_round_trip(message: p.Message) -> None:
    assert type(message).decode(message.encode()) == message
    assert json.loads(message.encode())["v"] == p.PROTOCOL_VERSION


@pytest.mark.parametrize("cls", MESSAGES)
def test_unknown_version(cls: type[p.Message]) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        cls.decode(b'{"v": 2}')
    assert info.value.fields == {"got": 2, "supported": [1]}
    assert info.value.status == 400


@pytest.mark.parametrize(
    "body", [b"", b"{", b"\xff", b"[]", b"3", b'{"v": "1"}', b'{"v": true}', b"{}",
             b'{"v": 1}', b'{"v": 1, "node": "n", "epoch": 1, "applied_seq": "7", "safe_seq": 1}',
             b'{"v": 1, "node": "n", "epoch": true, "applied_seq": 7, "safe_seq": 1}'],
)
def test_malformed(body: bytes) -> None:
    with pytest.raises(DecodeError):
        p.RecordAck.decode(body)


def test_nested_errors_name_the_field() -> None:
    body = {"v": 1, "path": "/", "applied_seq": 1,
            "entries": [{"path": "/a", "kind": "file", "size": "x", "version": 1, "epoch": 1,
                         "mtime": 0}]}
    with pytest.raises(DecodeError) as info:
        p.ListResponse.from_json(body)
    assert info.value.fields["field"] == "entries[0].size"


def test_unknown_fields_are_ignored_and_defaults_fill_in() -> None:
    ack = p.WriteAck.decode(b'{"v":1,"op":"put","path":"/a","seq":3,"epoch":1,"future":1}')
    assert ack == p.WriteAck(op="put", path="/a", seq=3, epoch=1)


def test_error_body_is_flat_and_rebuilds_the_error() -> None:
    err = StaleEpoch("old epoch", current=4, got=3)
    body = p.ErrorBody.from_error(err)
    wire = json.loads(body.encode())
    assert wire == {"v": 1, "error": "stale_epoch", "message": "old epoch", "current": 4, "got": 3}
    back = p.ErrorBody.decode(body.encode()).to_exception(409)
    assert isinstance(back, StaleEpoch) and back.fields == {"current": 4, "got": 3}


def test_put_headers_round_trip_and_checks() -> None:
    req = p.PutRequest(grant="tok", size=10,
                       readers=(p.ReaderAddress("r1", "10.0.0.2:7480"),
                                p.ReaderAddress("r2", "https://h:1")), mtime=12.5)
    assert p.PutRequest.from_headers(req.to_headers()) == req
    headers = req.to_headers()
    with pytest.raises(DecodeError):
        p.PutRequest.from_headers({**headers, p.SIZE_HEADER: "11"})
    with pytest.raises(DecodeError):
        p.PutRequest.from_headers({k: v for k, v in headers.items() if k != "Content-Length"})
    with pytest.raises(BadSignature):
        p.PutRequest.from_headers({k: v for k, v in headers.items() if k != p.AUTH_HEADER})
    with pytest.raises(DecodeError):
        p.PutRequest.from_headers({**headers, p.READERS_HEADER: "r1"})
    with pytest.raises(DecodeError):
        p.PutRequest.from_headers({**headers, "Content-Length": "-1"})
    with pytest.raises(UnsupportedVersion):
        p.PutRequest.from_headers({**headers, p.VERSION_HEADER: "9"})


def test_record_push_carries_exact_bytes() -> None:
    frames = (p.PushFrame(4096, bytes(range(256)) * 16), p.PushFrame(0, b"x"))
    push = p.RecordPush(fleet="f", epoch=2, writer="w", commit_seq=9, frames=frames)
    back = p.RecordPush.decode(push.encode(), KEY)
    assert (back.fleet, back.epoch, back.writer, back.commit_seq) == ("f", 2, "w", 9)
    assert [(f.start, bytes(f.data)) for f in back.frames] == [(4096, bytes(range(256)) * 16),
                                                               (0, b"x")]
    assert b"".join(push.parts()) == push.encode()  # the frames are sent as they are


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b'{"v": 1, "node": "n", "epoch": 1, "applied_seq": ' + b"7" * 5000
         + b', "safe_seq": 1}', "20 digits"),
        (b'{"v": 1, "node": "n", "epoch": 1, "applied_seq": NaN, "safe_seq": 1}', "NaN"),
        (b'{"v": 1, "node": "n", "epoch": 1, "applied_seq": 1e999, "safe_seq": 1}', "range"),
        (b'{"v": 1, "node": "\\ud800", "epoch": 1, "applied_seq": 1, "safe_seq": 1}',
         "Unicode"),
    ],
)
def test_hostile_json_is_refused_before_it_costs(body: bytes, says: str) -> None:
    """Depth is checked before json.loads recurses; long integers, NaN/Infinity and lone
    surrogates are a DecodeError (400), never RecursionError or ValueError (a 500)."""
    with pytest.raises(DecodeError) as info:
        p.RecordAck.decode(body)
    assert says in info.value.message


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    path = "/" + "[{" * 100
    body = json.dumps({"v": 1, "path": path, "parents": True}).encode()
    assert p.MkdirRequest.decode(body) == p.MkdirRequest(path=path, parents=True)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("Content-Length", "²", DecodeError),
        ("Content-Length", "٣", DecodeError),
        ("Content-Length", "9" * 5000, DecodeError),
        ("Content-Length", "1_0", DecodeError),
        (p.VERSION_HEADER, "²", DecodeError),
        (p.VERSION_HEADER, "1" * 5000, DecodeError),
        (p.MTIME_HEADER, "nan", DecodeError),
        (p.MTIME_HEADER, "inf", DecodeError),
        (p.MTIME_HEADER, "-Infinity", DecodeError),
        (p.MTIME_HEADER, "1e400", DecodeError),
        (p.MTIME_HEADER, "0x10", DecodeError),
        (p.MTIME_HEADER, "1_000", DecodeError),
    ],
)
def test_hostile_headers_are_decode_errors(name: str, value: str,
                                           error: type[Exception]) -> None:
    headers = {**p.PutRequest(grant="tok", size=4).to_headers(), name: value}
    with pytest.raises(error) as info:
        p.PutRequest.from_headers(headers)
    assert info.value.fields["field"] == name  # type: ignore[attr-defined]


def test_header_names_are_case_insensitive() -> None:
    req = p.PutRequest(grant="tok", size=4, mtime=3.5)
    lowered = p.HeaderMap((k.lower(), v) for k, v in req.to_headers().items())
    assert p.PutRequest.from_headers(lowered) == req
    assert "CONTENT-LENGTH" in lowered and len(lowered) == len(req.to_headers())
    first = p.HeaderMap([("Content-Length", "0"), ("content-length", "9")])
    assert first["Content-Length"] == "0"


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), WIRE_INTS, st.text(alphabet='[]{}"\\ab\n', max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner,
                                            max_size=3)),
    max_leaves=30,
)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(JSON_VALUES, st.integers(0, 6))
def test_depth_scan_counts_exactly_the_structure(value: object, limit: int) -> None:
    """Brackets, quotes and backslashes inside strings (and keys) never count; structure
    always does: a value parses iff it nests at most ``limit`` deep."""
    text = json.dumps(value)
    if _depth(value) <= limit:
        assert boundedjson.loads(text, max_depth=limit) == value
    else:
        with pytest.raises(boundedjson.JsonLimit):
            boundedjson.loads(text, max_depth=limit)
