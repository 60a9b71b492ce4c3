"""Journal record codec: exact round trip under the volume's key; a record cut short, with
any bit flipped, or read with any other key never decodes; bytes that are not sealed with
the key (format 2's CRC-32 records, which anyone could compute) never decode nor make the
agent refuse the journal; the key and the seal are what docs/format.md says."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import uuid
import zlib
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agents.core.record import HEADER, OPS, SEAL, VERSION, Record, RecordKey
from agents.core.superblock import layout
from agents.errors import ChecksumMismatch, TornRecord, UnsupportedFormat

pytestmark = pytest.mark.unit

KEY = RecordKey.for_volume(bytes(range(16)))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k != "data"), json_values, max_size=6
).flatmap(lambda d: st.one_of(st.just(d), st.binary(max_size=5000).map(lambda b: {**d, "data": b})))
records = st.builds(
    Record,
    seq=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 2**63 - 1),
    op=st.sampled_from(sorted(OPS)),
    payload=payloads,
    commit_seq=st.integers(0, 2**63 - 1),
)
uuids = st.binary(min_size=16, max_size=16)
keys = uuids.map(RecordKey.for_volume)


@st.composite
def other_keys(draw: st.DrawFn, key: RecordKey) -> RecordKey:
    """Another volume's key; half the time with the same tag (the tag is no secret: an
    attacker who learned it still lacks the rest of the uuid)."""
    rest = draw(st.binary(min_size=12, max_size=12))
    head = key.tag.to_bytes(4, "big") if draw(st.booleans()) else draw(
        st.binary(min_size=4, max_size=4))
    other = RecordKey.for_volume(head + rest)
    assume(other.secret != key.secret)
    return other


def _old_scheme(record: Record, tag: int, version: int) -> bytes:
    """``record`` as format 2 wrote it: the same header, then a CRC-32 of the bytes before
    it. Anyone can compute that: it is what a client could plant in a file's inline bytes."""
    body = dict(record.payload)
    blob = body.pop("data", None)
    js = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    length = HEADER.size + len(js) + len(blob or b"") + 4
    raw = HEADER.pack(b"RBFR", version, 0 if blob is None else 1, length, record.seq,
                      record.epoch, record.commit_seq, tag, OPS[record.op], len(js),
                      len(blob or b"")) + js + (blob or b"")
    return raw + struct.pack("<I", zlib.crc32(raw))


@settings(deadline=None)
@given(records, keys)
def test_round_trip_is_exact_unpadded_and_stamped_with_the_key(record: Record,
                                                              key: RecordKey) -> None:
    data = record.encode(key)
    assert len(data) == struct.unpack_from("<I", data, 8)[0] == record.encoded_length()
    back = Record.decode(data, key)
    assert back == record
    assert (back.commit_seq, back.volume_tag) == (record.commit_seq, key.tag)
    assert Record.peek_length(data) == len(data)
    assert Record.peek_numbers(data) == (record.seq, record.epoch, record.commit_seq, key.tag)
    assert Record.verify(data, key) == (back.seq, back.epoch, back.commit_seq, key.tag)


@settings(deadline=None)
@given(records, keys, st.data())
def test_any_other_key_never_decodes(record: Record, key: RecordKey,
                                     data: st.DataObject) -> None:
    other = data.draw(other_keys(key))
    raw = record.encode(key)
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.decode(raw, other)
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.verify(raw, other)


@settings(deadline=None)
@given(records, st.data())
def test_a_flipped_bit_never_decodes(record: Record, data: st.DataObject) -> None:
    """Whichever bit: the version and the op too fail the seal before they are read."""
    raw = bytearray(record.encode(KEY))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.verify(bytes(raw), KEY)
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.decode(bytes(raw), KEY)


@settings(deadline=None)
@given(records, st.data())
def test_a_record_cut_short_never_decodes(record: Record, data: st.DataObject) -> None:
    raw = record.encode(KEY)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.decode(raw[:cut], KEY)
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.verify(raw[:cut], KEY)  # the end-of-journal witness check: same verdict


@settings(deadline=None)
@given(records, st.binary(min_size=1, max_size=64))
def test_bytes_past_the_record_never_decode(record: Record, extra: bytes) -> None:
    """Only a record's own bytes decode: a length taken from another read of the ring (an
    older header at the same place) must not pass for the record's."""
    raw = record.encode(KEY) + extra
    with pytest.raises(TornRecord, match="longer"):
        Record.decode(raw, KEY)
    with pytest.raises(TornRecord, match="longer"):
        Record.verify(raw, KEY)


@settings(deadline=None)
@given(records, st.sampled_from([1, 2, VERSION]))
def test_crc_sealed_records_are_not_records(record: Record, version: int) -> None:
    """A record with this volume's tag, the magic and a right CRC-32 (what anyone can
    write, in the current version or an older one) is not a record, and never an
    UnsupportedFormat either: bytes a client chose must not make an agent refuse the
    journal."""
    raw = _old_scheme(record, KEY.tag, version)
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.decode(raw, KEY)
    with pytest.raises((TornRecord, ChecksumMismatch)):
        Record.verify(raw, KEY)


@pytest.mark.parametrize("version", [2, 4, 99])
def test_sealed_records_of_another_format_are_refused_by_name(version: int) -> None:
    """Sealed with the key, so an agent of this volume wrote it: refused loudly."""
    raw = bytearray(Record(1, 1, "mkdir", {"path": "/a"}).encode(KEY))
    struct.pack_into("<H", raw, 4, version)
    raw[-SEAL:] = KEY.seal(bytes(raw[:-SEAL]))
    with pytest.raises(UnsupportedFormat, match=f"format {version}"):
        Record.decode(bytes(raw), KEY)
    with pytest.raises(UnsupportedFormat):
        Record.verify(bytes(raw), KEY)


def test_garbage_and_zeros_are_not_records() -> None:
    assert Record.peek_length(bytes(4096)) is None
    assert Record.peek_numbers(bytes(4096)) is None
    with pytest.raises(TornRecord):
        Record.decode(bytes(4096), KEY)


def _read_as_documented(data: bytes, volume_uuid: bytes) -> tuple[int, int, str, dict[str, Any]]:
    """A reader written from docs/format.md alone ("Journal records"): (seq, epoch, op,
    payload), or AssertionError."""
    secret = hashlib.blake2b(b"rbdfleet-record" + volume_uuid, digest_size=32).digest()
    magic, version, flags, length, seq, epoch, _, tag, op, js_len, blob_len = struct.unpack_from(
        "<4sHHIQQQIB3xII", data)
    assert (magic, version, tag) == (b"RBFR", 3, int.from_bytes(volume_uuid[:4], "big"))
    assert length == 52 + js_len + blob_len + 8 == len(data)
    seal = hashlib.blake2b(data[: length - 8], key=secret, digest_size=8).digest()
    assert seal == data[length - 8 :]
    payload = json.loads(data[52 : 52 + js_len])
    if flags & 1:
        payload["data"] = data[52 + js_len : 52 + js_len + blob_len]
    names = {1: "put", 2: "delete", 3: "mkdir", 4: "rename", 5: "epoch-start", 6: "checkpoint"}
    return seq, epoch, names[op], payload


@settings(deadline=None)
@given(records.map(lambda r: dataclasses.replace(r, op="put")), uuids)
def test_the_layout_and_the_key_are_what_the_docs_say(record: Record,
                                                      volume_uuid: bytes) -> None:
    data = record.encode(RecordKey.for_volume(volume_uuid))
    assert _read_as_documented(data, volume_uuid) == (record.seq, record.epoch, "put",
                                                      record.payload)


def test_the_superblock_gives_the_key_of_its_uuid() -> None:
    volume_id = uuid.uuid4()
    sb = layout(64 << 20, fleet="f", volume_id=str(volume_id))
    assert sb.record_key == RecordKey.for_volume(volume_id.bytes)
    assert sb.record_key.tag == sb.volume_tag
    assert str(volume_id) not in repr(sb.record_key) and sb.record_key.secret.hex() not in repr(
        sb.record_key)
    with pytest.raises(ValueError):
        RecordKey.for_volume(volume_id.bytes[:15])
