"""Every /v1 message between clients, agents and the coordinator, as versioned frozen dataclasses.

Wire form: a JSON object with a version field ``v`` (:data:`PROTOCOL_VERSION`) next to the
message's fields. Nested messages are plain objects without ``v``; tuples travel as arrays.

Invariants:
- ``decode(encode(m)) == m`` for every message ``m``.
- :meth:`Message.decode` raises ``UnsupportedVersion`` (400) for a ``v`` it does not speak and
  ``DecodeError`` (400) for anything malformed (bad JSON, missing field, wrong type), naming the
  field. Unknown extra fields are ignored, so a v1 peer may add optional fields.
- Pure: no I/O, no clock. Headers of a streamed PUT are handled by :class:`PutRequest`.
- Hostile input is bounded before it costs anything: JSON is parsed by
  :func:`agents.core.boundedjson.loads` (nesting depth checked before parsing, integers of at
  most 20 digits, finite numbers), header integers are ASCII digits of bounded length, strings
  are valid Unicode (no lone surrogates); every refusal is a ``DecodeError`` naming the field.

Who sends what (routes in docs/agent-api.md):

=====================  ==========================================  ========================
message                 from → to                                   route
=====================  ==========================================  ========================
PutRequest (headers)    client → writer                             PUT /v1/files/<path>
MkdirRequest            client → writer                             POST /v1/mkdir
RenameRequest           client → writer                             POST /v1/rename
WriteAck                writer → client                             answer to the three above
                                                                    and DELETE /v1/files/<path>
EntryInfo, ListResponse agent → client                              GET /v1/stat, /v1/list
RecordPush / RecordAck  writer → reader / reader → writer           POST /v1/records
                        (the push is binary, not JSON: RecordPush)
Health                  agent → anyone                              GET /v1/health
PromoteRequest          coordinator → agent (promote grant)         POST /v1/promote
DemoteRequest           coordinator → agent (demote grant)          POST /v1/demote
ReaderSet               coordinator → writer (readers grant)        POST /v1/readers
Heartbeat               agent → coordinator                         POST <coordinator>/v1/heartbeat
SelfTestReport          agent → coordinator                         POST <coordinator>/v1/selftest
LaggingReaderReport     writer → coordinator                        POST <coordinator>/v1/lagging
ErrorBody               anyone → caller, with an HTTP status        any failed request
=====================  ==========================================  ========================
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import struct
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Final, Self, Union, get_args, get_origin, get_type_hints

from agents.core import boundedjson, journal
from agents.core.record import Record, RecordKey
from agents.errors import (
    AgentError,
    BadSignature,
    DecodeError,
    FormatError,
    TooLarge,
    UnsupportedVersion,
    error_from_wire,
)

__all__ = [
    "AUTH_HEADER",
    "BEARER",
    "CRC_HEADER",
    "EPOCH_HEADER",
    "INSECURE_HEADER",
    "MAX_PUSH_RECORDS",
    "MTIME_HEADER",
    "PROTOCOL_VERSION",
    "PUSH_CONTENT_TYPE",
    "READERS_HEADER",
    "SEQ_HEADER",
    "SIZE_HEADER",
    "SUPPORTED_VERSIONS",
    "VERSION_HEADER",
    "DemoteRequest",
    "EntryInfo",
    "ErrorBody",
    "HeaderMap",
    "Health",
    "Heartbeat",
    "LaggingReaderReport",
    "ListResponse",
    "Message",
    "MkdirRequest",
    "PromoteRequest",
    "PushFrame",
    "PushedRecord",
    "PutRequest",
    "ReaderAddress",
    "ReaderSet",
    "RecordAck",
    "RecordPush",
    "RenameRequest",
    "SelfTestCheck",
    "SelfTestReport",
    "WriteAck",
    "bearer_token",
    "format_readers",
    "header_int",
    "parse_readers",
]

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)

AUTH_HEADER: Final = "Authorization"
BEARER: Final = "Bearer "
VERSION_HEADER: Final = "X-Rbdfleet-Version"
SIZE_HEADER: Final = "X-Rbdfleet-Size"
READERS_HEADER: Final = "X-Rbdfleet-Readers"
MTIME_HEADER: Final = "X-Rbdfleet-Mtime"
# On answers: the epoch the agent knows; a served file's version (seq) and crc; plaintext mode.
EPOCH_HEADER: Final = "X-Rbdfleet-Epoch"
SEQ_HEADER: Final = "X-Rbdfleet-Seq"
CRC_HEADER: Final = "X-Rbdfleet-Crc"
INSECURE_HEADER: Final = "X-Rbdfleet-Insecure"  # on every answer of an agent without TLS


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as the Python type ``tp``; DecodeError naming ``where`` if not."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise DecodeError(f"{where} must be an array", field=where)
        (item,) = [a for a in get_args(tp) if a is not Ellipsis]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise DecodeError(f"{where} must be an object", field=where)
        item = get_args(tp)[1] if get_args(tp) else Any
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise DecodeError(f"{where} must be a boolean", field=where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"{where} must be an integer", field=where)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise DecodeError(f"{where} must be a finite number", field=where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DecodeError(f"{where} must be a string", field=where)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (\ud800): no UTF-8 for it
            raise DecodeError(f"{where} is not valid Unicode", field=where) from exc
        return value
    if isinstance(tp, type) and issubclass(tp, Message):
        return tp._from_fields(value, where)
    raise TypeError(f"protocol field type {tp!r} is not supported")  # a bug in this module


def _to_json(value: Any) -> Any:
    if isinstance(value, Message):
        return value._fields_json()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


class Message:
    """Base of every /v1 message: versioned JSON encode/decode driven by the dataclass fields."""

    def _fields_json(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """The JSON object (with ``v``) for this message."""
        return {"v": PROTOCOL_VERSION, **self._fields_json()}

    def encode(self) -> bytes:
        """UTF-8 JSON bytes of :meth:`to_json`."""
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def _from_fields(cls, obj: Any, where: str) -> Self:
        if not isinstance(obj, dict):
            raise DecodeError(f"{where} must be a JSON object", field=where)
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            name = f"{where}.{f.name}" if where else f.name
            if f.name in obj:
                kwargs[f.name] = _convert(hints[f.name], obj[f.name], name)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise DecodeError(f"missing field {name!r}", field=name)
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise DecodeError(f"invalid {cls.__name__}: {exc}") from exc

    @classmethod
    def from_json(cls, obj: Any) -> Self:
        """Build from a parsed JSON object, checking its version."""
        if not isinstance(obj, dict):
            raise DecodeError(f"{cls.__name__} must be a JSON object")
        version = obj.get("v")
        if isinstance(version, bool) or not isinstance(version, int):
            raise DecodeError(f"{cls.__name__} needs an integer version field 'v'", field="v")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersion(
                f"protocol version {version} is not supported",
                got=version, supported=list(SUPPORTED_VERSIONS),
            )
        return cls._from_fields(obj, "")

    @classmethod
    def decode(cls, data: bytes | str, *, max_depth: int = boundedjson.MAX_DEPTH) -> Self:
        """Parse JSON bytes (bounded: :mod:`agents.core.boundedjson`, nesting at most
        ``max_depth``); DecodeError / UnsupportedVersion on bad input."""
        try:
            obj = boundedjson.loads(data, max_depth=max_depth)
        except boundedjson.JsonLimit as exc:
            raise DecodeError(f"{cls.__name__}: {exc}") from exc
        return cls.from_json(obj)


# ---------------------------------------------------------------------------------------------
# Client → writer


@dataclass(frozen=True)
class ReaderAddress(Message):
    """A reader as the client names it: node name and ``host:port`` (or URL) address."""

    node: str
    address: str


def parse_readers(text: str) -> tuple[ReaderAddress, ...]:
    """``"r1=10.0.0.2:7480,r2=10.0.0.3:7480"`` → reader addresses; DecodeError if malformed."""
    readers = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        node, sep, address = part.partition("=")
        if not sep or not node.strip() or not address.strip():
            raise DecodeError(f"{READERS_HEADER} entry {part!r} is not node=address",
                              field=READERS_HEADER)
        readers.append(ReaderAddress(node.strip(), address.strip()))
    return tuple(readers)


def format_readers(readers: tuple[ReaderAddress, ...]) -> str:
    """The :data:`READERS_HEADER` value for ``readers`` (inverse of :func:`parse_readers`)."""
    for r in readers:
        if any(c in r.node + r.address for c in ",= \r\n"):
            raise ValueError(f"reader {r.node!r}/{r.address!r} cannot go in a header")
    return ",".join(f"{r.node}={r.address}" for r in readers)


class HeaderMap(Mapping[str, str]):
    """Request headers looked up case-insensitively (``content-length`` is
    ``Content-Length``); a repeated header keeps its first value (the server refuses repeated
    framing headers before this is built)."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._values: dict[str, str] = {}
        for name, value in items:
            self._values.setdefault(name.lower(), value)

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values


MAX_HEADER_DIGITS: Final = 19  # below 2**63: every size, seq or version fits


def header_int(name: str, value: str) -> int:
    """A header's non-negative integer: ASCII digits only (``str.isdigit`` also accepts
    ``²``), at most :data:`MAX_HEADER_DIGITS` of them; DecodeError naming the header."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_HEADER_DIGITS:
        raise DecodeError(
            f"header {name} must be a non-negative integer of at most {MAX_HEADER_DIGITS} "
            f"ASCII digits", field=name)
    return int(text)


def _header_number(name: str, value: str) -> float:
    """A header's finite decimal number (``nan``, ``inf``, hex and ``1_0`` refused)."""
    text = value.strip()
    if not text.isascii() or len(text) > 32 or "_" in text:
        raise DecodeError(f"header {name} must be a finite number", field=name)
    try:
        number = float(text)
    except ValueError as exc:
        raise DecodeError(f"header {name} must be a finite number", field=name) from exc
    if not math.isfinite(number):
        raise DecodeError(f"header {name} must be a finite number", field=name)
    return number


def bearer_token(headers: Mapping[str, str]) -> str:
    """The grant token from ``Authorization: Bearer <token>``; BadSignature (401) when absent."""
    value = headers.get(AUTH_HEADER) or ""
    if not value.startswith(BEARER) or not value[len(BEARER):].strip():
        raise BadSignature("request carries no grant (Authorization: Bearer <token>)",
                           field=AUTH_HEADER)
    return value[len(BEARER):].strip()


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    return None if value is None else header_int(name, value)


@dataclass(frozen=True)
class PutRequest(Message):
    """The headers of ``PUT /v1/files/<path>``; the body (``size`` bytes) is streamed.

    ``readers`` are the reader addresses the client was given with its grants (patent S302);
    the writer pushes to them when they match the fleet's, else to the configured ones.
    """

    grant: str
    size: int
    readers: tuple[ReaderAddress, ...] = ()
    mtime: float | None = None

    def to_headers(self) -> dict[str, str]:
        """HTTP headers for this request (Content-Length is ``size``)."""
        headers = {
            AUTH_HEADER: BEARER + self.grant,
            VERSION_HEADER: str(PROTOCOL_VERSION),
            "Content-Length": str(self.size),
            SIZE_HEADER: str(self.size),
        }
        if self.readers:
            headers[READERS_HEADER] = format_readers(self.readers)
        if self.mtime is not None:
            headers[MTIME_HEADER] = repr(self.mtime)
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> PutRequest:
        """Parse request headers (a case-insensitive mapping such as ``http.client`` gives).

        The size comes from Content-Length; ``X-Rbdfleet-Size``, when present, must agree.
        """
        version = _header_int(headers, VERSION_HEADER)
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersion(f"protocol version {version} is not supported",
                                     got=version, supported=list(SUPPORTED_VERSIONS))
        length = _header_int(headers, "Content-Length")
        expected = _header_int(headers, SIZE_HEADER)
        if length is None:
            raise DecodeError("PUT needs a Content-Length (chunked bodies are not accepted)",
                              field="Content-Length")
        if expected is not None and expected != length:
            raise DecodeError(f"{SIZE_HEADER} {expected} != Content-Length {length}",
                              field=SIZE_HEADER)
        mtime_text = headers.get(MTIME_HEADER)
        mtime = None if mtime_text is None else _header_number(MTIME_HEADER, mtime_text)
        return cls(grant=bearer_token(headers), size=length,
                   readers=parse_readers(headers.get(READERS_HEADER) or ""), mtime=mtime)


@dataclass(frozen=True)
class MkdirRequest(Message):
    """Body of ``POST /v1/mkdir``."""

    path: str
    parents: bool = False


@dataclass(frozen=True)
class RenameRequest(Message):
    """Body of ``POST /v1/rename``."""

    src: str
    dst: str


@dataclass(frozen=True)
class WriteAck(Message):
    """The writer's answer to a put/delete/mkdir/rename, sent once the record is durable and
    every in-sync reader acked (``acked``) or was reported lagging (``lagging``)."""

    op: str
    path: str
    seq: int
    epoch: int
    size: int = 0
    crc: int | None = None
    dst: str | None = None
    acked: tuple[str, ...] = ()
    lagging: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Agent → client (reads)


@dataclass(frozen=True)
class EntryInfo(Message):
    """One file or directory as ``stat`` and ``list`` show it (``version`` = seq that wrote it)."""

    path: str
    kind: str
    size: int
    version: int
    epoch: int
    mtime: float
    crc: int | None = None


LIST_LIMIT = 1000  # entries per list page when the request names no limit
MAX_LIST_LIMIT = 10_000  # a larger limit asked for is lowered to this


@dataclass(frozen=True)
class ListResponse(Message):
    """Answer of ``GET /v1/list/<dir>[?limit=N&after=NAME]``: one page of the directory's
    entries (sorted, names after ``after``) at ``applied_seq``; ``next`` is the name to pass
    as ``after`` for the following page, None on the last one."""

    path: str
    entries: tuple[EntryInfo, ...]
    applied_seq: int
    next: str | None = None


# ---------------------------------------------------------------------------------------------
# Writer ↔ reader


PUSH_CONTENT_TYPE: Final = "application/x-rbdfleet-records"
# records in one push; the writer sends a bigger backlog as its commit seq alone (the reader
# reads the journal)
MAX_PUSH_RECORDS: Final = 256
PUSH_MAGIC: Final = b"RBFP"
PUSH_VERSION: Final = 1
# magic, version, fleet length, writer length, 2 pad, epoch, commit_seq, frame count
_PUSH_HEAD: Final = struct.Struct("<4sHHH2xQQI")
_FRAME_HEAD: Final = struct.Struct("<QI")  # ring offset of the frame's first record, bytes


@dataclass(frozen=True)
class PushFrame:
    """One group commit as it travels: the records' bytes exactly as they lie in the journal
    ring from offset ``start`` (packed back to back, without the batch's padding). The
    writer makes one per commit and every reader's push sends the same bytes."""

    start: int
    data: bytes | memoryview
    head: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _FRAME_HEAD.pack(self.start, len(self.data)))


@dataclass(frozen=True)
class PushedRecord:
    """A record of a push, decoded (seal checked), and where it lies in the journal ring."""

    start: int
    nbytes: int
    record: Record


@dataclass(frozen=True)
class RecordPush:
    """Journal records the writer sends to a reader (patent S305), oldest first: a binary
    body (content type :data:`PUSH_CONTENT_TYPE`, no JSON, no base64), little endian::

        0  4s  magic b"RBFP"       10 2x  pad              28 u32 frame count
        4  u16 version (1)         12 u64 epoch            32 fleet, writer (UTF-8)
        6  u16 fleet length        20 u64 commit_seq
        8  u16 writer length
        then per frame: u64 ring offset, u32 length (> 0), the packed records

    The records are the exact journal bytes, so the reader verifies their seals with its
    volume's key as it would on disk (``key``: given to :meth:`decode`, needed by
    :attr:`records`), and knows where each one lies in the ring. ``commit_seq`` is the
    writer's last durable seq (a push without frames makes a lagging reader catch up from it)."""

    fleet: str
    epoch: int
    writer: str
    commit_seq: int
    frames: tuple[PushFrame, ...] = ()
    key: RecordKey | None = field(default=None, compare=False, repr=False)

    def parts(self) -> list[bytes | memoryview]:
        """The body as buffers to send one after the other (the frames' bytes not copied)."""
        fleet, writer = self.fleet.encode(), self.writer.encode()
        out: list[bytes | memoryview] = [
            _PUSH_HEAD.pack(PUSH_MAGIC, PUSH_VERSION, len(fleet), len(writer), self.epoch,
                            self.commit_seq, len(self.frames)) + fleet + writer]
        for frame in self.frames:
            out += (frame.head, frame.data)
        return out

    def encode(self) -> bytes:
        """The whole body in one piece."""
        return b"".join(self.parts())

    @classmethod
    def decode(cls, body: bytes | memoryview, key: RecordKey) -> RecordPush:
        """Parse a push body whose records are sealed with ``key`` (the receiving volume's);
        DecodeError (400) for anything that is not exactly one (the records themselves are
        checked by :attr:`records`)."""
        view = memoryview(body)
        if len(view) < _PUSH_HEAD.size:
            raise DecodeError("record push shorter than its header", field="body")
        magic, version, fleet_len, writer_len, epoch, commit, count = _PUSH_HEAD.unpack_from(
            view)
        if magic != PUSH_MAGIC:
            raise DecodeError("not a record push (bad magic)", field="body")
        if version != PUSH_VERSION:
            raise UnsupportedVersion(f"record push version {version}", got=version)
        at = _PUSH_HEAD.size
        if at + fleet_len + writer_len > len(view):
            raise DecodeError("record push names run past its body", field="body")
        try:
            fleet = str(view[at : at + fleet_len], "utf-8")
            writer = str(view[at + fleet_len : at + fleet_len + writer_len], "utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("record push names are not UTF-8", field="fleet") from exc
        at += fleet_len + writer_len
        if count > (len(view) - at) // _FRAME_HEAD.size:
            raise DecodeError(f"record push announces {count} frames", field="frames")
        frames = []
        for _ in range(count):
            if at + _FRAME_HEAD.size > len(view):
                raise DecodeError("record push frame header cut short", field="frames")
            start, length = _FRAME_HEAD.unpack_from(view, at)
            at += _FRAME_HEAD.size
            if length == 0 or at + length > len(view):
                raise DecodeError(f"record push frame of {length} bytes", field="frames")
            frames.append(PushFrame(start, view[at : at + length]))
            at += length
        if at != len(view):
            raise DecodeError("bytes after the last frame of a record push", field="body")
        return cls(fleet, epoch, writer, commit, tuple(frames), key)

    @functools.cached_property
    def records(self) -> tuple[PushedRecord, ...]:
        """Every record of the push, decoded once: DecodeError (400) unless each frame is
        whole records sealed with :attr:`key`, their seqs follow one another and their epochs
        never go down nor above the push's; TooLarge (413) past :data:`MAX_PUSH_RECORDS`."""
        if self.key is None:
            raise ValueError("a push's records are read with the receiving volume's key")
        out: list[PushedRecord] = []
        try:
            for frame in self.frames:
                for offset, nbytes in journal.split(frame.data):
                    if len(out) == MAX_PUSH_RECORDS:
                        raise TooLarge("record push of too many records",
                                       limit=MAX_PUSH_RECORDS)
                    record = Record.decode(frame.data[offset : offset + nbytes], self.key)
                    out.append(PushedRecord(frame.start + offset, nbytes, record))
        except FormatError as exc:
            raise DecodeError(f"record push: {exc.message}", field="records") from exc
        for before, after in itertools.pairwise(out):
            if after.record.seq != before.record.seq + 1 or (
                    after.record.epoch < before.record.epoch):
                raise DecodeError("record push: records out of seq or epoch order",
                                  field="records", seq=after.record.seq)
        if out and out[-1].record.epoch > self.epoch:
            raise DecodeError("record push: a record of a later epoch than the push",
                              field="records", seq=out[-1].record.seq)
        return tuple(out)


@dataclass(frozen=True)
class RecordAck(Message):
    """A reader's answer to a push: what it applied, and the oldest seq it still reads from."""

    node: str
    epoch: int
    applied_seq: int
    safe_seq: int


# ---------------------------------------------------------------------------------------------
# Operations


@dataclass(frozen=True)
class Health(Message):
    """``GET /v1/health``: role, epoch, applied seq and the last self-test result.

    ``selftest`` is ``"ok"``, ``"failed"`` or ``"pending"`` (not run yet); ``catching_up`` is
    true while a reader is behind the journal it knows of. On the writer, ``in_sync`` names the
    readers whose acks every write waits for, ``lagging`` the others it pushes to, and
    ``sync_revision`` counts changes of ``in_sync`` (the coordinator orders the writer's words
    on its reader set by it). ``version``: the deployed package version the process runs (its
    release directory's name), ``""`` when it runs from elsewhere (a source tree).
    ``settled``: false while the writer still has something to write at rest (an idle
    checkpoint, journal space to give back); an image whose writer is settled changes only
    with the next write. Always true on a reader. ``unsettled`` names what is left
    (``checkpoint``, ``readers``: a checkpoint some in-sync reader has not acknowledged,
    ``ring``, ``discards``).
    """

    node: str
    fleet: str
    role: str
    epoch: int
    applied_seq: int
    safe_seq: int
    selftest: str
    catching_up: bool = False
    in_sync: tuple[str, ...] = ()
    lagging: tuple[str, ...] = ()
    sync_revision: int = 0
    version: str = ""
    settled: bool = True
    unsettled: tuple[str, ...] = ()


@dataclass(frozen=True)
class Heartbeat(Message):
    """Sent by every agent to the coordinator every heartbeat interval."""

    node: str
    fleet: str
    role: str
    epoch: int
    applied_seq: int
    safe_seq: int
    selftest: str
    address: str
    sent_at: float
    in_sync: tuple[str, ...] = ()
    sync_revision: int = 0


@dataclass(frozen=True)
class SelfTestCheck(Message):
    """One check of a self-test (e.g. ``device-read``, ``journal-readable``)."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class SelfTestReport(Message):
    """The VM's own failure detection (patent): sent to the coordinator after each self-test."""

    node: str
    fleet: str
    role: str
    epoch: int
    ok: bool
    checks: tuple[SelfTestCheck, ...]
    at: float


@dataclass(frozen=True)
class LaggingReaderReport(Message):
    """The writer could not get ``reader``'s ack for ``target_seq`` in time: the coordinator
    stops handing that reader to clients until it reports it caught up."""

    fleet: str
    writer: str
    epoch: int
    reader: str
    address: str
    applied_seq: int
    target_seq: int
    reason: str
    sync_revision: int = 0


@dataclass(frozen=True)
class PromoteRequest(Message):
    """Coordinator → agent (promote grant for ``node``): become the writer of ``epoch``,
    pushing to ``readers`` and waiting from the first write for those named in ``in_sync``
    (the map's in-sync readers: they acked every write acknowledged so far); ``push_grants``:
    one push grant per reader (made with that reader's key, for this writer and epoch)."""

    fleet: str
    node: str
    epoch: int
    readers: tuple[ReaderAddress, ...] = ()
    in_sync: tuple[str, ...] = ()
    push_grants: dict[str, str] = field(default_factory=dict)  # reader -> push grant


@dataclass(frozen=True)
class DemoteRequest(Message):
    """Coordinator → agent (demote grant for ``node``): stop writing at once, become a reader
    of ``epoch``; ``writer``/``writer_address`` name the new writer when known."""

    fleet: str
    node: str
    epoch: int
    writer: str | None = None
    writer_address: str | None = None


@dataclass(frozen=True)
class ReaderSet(Message):
    """Coordinator → writer (readers grant): the fleet's readers the writer pushes to, e.g.
    after a spare was added or a reader replaced, with a push grant for each. Replaces the
    configured set."""

    fleet: str
    epoch: int
    readers: tuple[ReaderAddress, ...]
    push_grants: dict[str, str] = field(default_factory=dict)  # reader -> push grant


@dataclass(frozen=True)
class ErrorBody(Message):
    """A failed request's body: ``{"v", "error", "message", **fields}`` (flat on the wire)."""

    error: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    KEYS: ClassVar[frozenset[str]] = frozenset({"v", "error", "message"})

    @classmethod
    def from_error(cls, err: AgentError) -> ErrorBody:
        """The body for ``err`` (its ``to_wire()``)."""
        wire = err.to_wire()
        return cls(error=str(wire["error"]), message=str(wire["message"]),
                   fields={k: v for k, v in wire.items() if k not in cls.KEYS})

    def to_json(self) -> dict[str, Any]:
        """Flat: the error's fields sit next to ``error`` and ``message``."""
        return {**self.fields, "v": PROTOCOL_VERSION, "error": self.error, "message": self.message}

    @classmethod
    def _from_fields(cls, obj: Any, where: str) -> ErrorBody:
        if not isinstance(obj, dict):
            raise DecodeError("error body must be a JSON object")
        error, message = obj.get("error"), obj.get("message")
        if not isinstance(error, str) or not isinstance(message, str):
            raise DecodeError("error body needs string 'error' and 'message'")
        return cls(error=error, message=message,
                   fields={k: v for k, v in obj.items() if k not in cls.KEYS})

    def to_exception(self, status: int) -> AgentError:
        """The AgentError subclass registered for ``error`` (AgentError when unknown)."""
        return error_from_wire({"error": self.error, "message": self.message, **self.fields},
                               status)
