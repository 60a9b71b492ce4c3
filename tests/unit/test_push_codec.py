"""The binary record push: exact round trip, and a hostile body (cut short, lengths past the
end, flipped bytes, records out of order, too many records) is a 4xx, never a crash."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.core.protocol import MAX_PUSH_RECORDS, PushFrame, RecordPush
from agents.core.record import Record
from agents.errors import AgentError, DecodeError, TooLarge
from tests.unit.test_record import KEY

pytestmark = pytest.mark.unit


def _records(first: int, count: int, epoch: int = 1) -> list[Record]:
    return [Record(first + i, epoch, "mkdir", {"path": f"/d{first + i}", "parents": False,
                                               "mtime": 0.0}, commit_seq=first - 1)
            for i in range(count)]


def _push(*groups: list[Record], epoch: int = 1) -> RecordPush:
    frames = tuple(PushFrame(4096 * i, b"".join(r.encode(KEY) for r in group))
                   for i, group in enumerate(groups))
    return RecordPush(fleet="f", epoch=epoch, writer="w", commit_seq=groups[-1][-1].seq,
                      frames=frames)


def _outcome(body: bytes) -> object:
    """The records a body decodes to, or the AgentError it is refused with (4xx)."""
    try:
        push = RecordPush.decode(body, KEY)
        return [p.record for p in push.records]
    except AgentError as exc:
        assert 400 <= exc.status < 500, exc
        return exc


def test_round_trip_gives_each_record_and_where_it_lies() -> None:
    first, second = _records(5, 3), _records(8, 2)
    push = RecordPush.decode(_push(first, second).encode(), KEY)
    got = [(p.start, p.nbytes, p.record) for p in push.records]
    sizes = [r.encoded_length() for r in first]
    assert got == [(sum(sizes[:i]), sizes[i], r) for i, r in enumerate(first)] + [
        (4096 + sum(r.encoded_length() for r in second[:i]), r.encoded_length(), r)
        for i, r in enumerate(second)]


@settings(deadline=None)
@given(st.data())
def test_a_cut_body_is_refused(data: st.DataObject) -> None:
    body = _push(_records(1, 3), _records(4, 1)).encode()
    cut = data.draw(st.integers(0, len(body) - 1))
    assert isinstance(_outcome(body[:cut]), DecodeError)


@settings(deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused_or_harmless(data: st.DataObject) -> None:
    records = _records(1, 3)
    body = bytearray(_push(records).encode())
    at = data.draw(st.integers(0, len(body) - 1))
    body[at] ^= data.draw(st.integers(1, 255))
    outcome = _outcome(bytes(body))
    # a flipped name or commit seq still decodes; a flipped record never does
    assert isinstance(outcome, AgentError) or outcome == records


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_lengths_past_the_body_are_refused(frames: int, length: int) -> None:
    body = bytearray(_push(_records(1, 1)).encode())
    head = struct.calcsize("<4sHHH2xQQI")
    struct.pack_into("<I", body, head - 4, frames)
    frame_at = head + 2  # after the names "f" and "w"
    struct.pack_into("<I", body, frame_at + 8, length)
    outcome = _outcome(bytes(body))
    assert isinstance(outcome, DecodeError) or (frames, length) == (1, len(body) - frame_at - 12)


@pytest.mark.parametrize(("groups", "epoch"), [
    ([_records(1, 2), _records(4, 1)], 1),  # a seq missing between frames
    ([_records(3, 1), _records(2, 1)], 1),  # going back
    ([_records(1, 1, epoch=2), _records(2, 1, epoch=1)], 2),  # epoch going down
    ([_records(1, 2, epoch=3)], 2),  # a record of a later epoch than the push
])
def test_records_out_of_order_are_refused(groups: list[list[Record]], epoch: int) -> None:
    assert isinstance(_outcome(_push(*groups, epoch=epoch).encode()), DecodeError)


def test_more_records_than_a_push_carries_are_refused() -> None:
    outcome = _outcome(_push(_records(1, MAX_PUSH_RECORDS + 1)).encode())
    assert isinstance(outcome, TooLarge) and outcome.status == 413


def test_a_frame_of_padding_or_trailing_bytes_is_refused() -> None:
    record = _records(1, 1)[0].encode(KEY)
    for frame in (record + bytes(100), bytes(4096)):
        body = RecordPush("f", 1, "w", 1, (PushFrame(0, frame),)).encode()
        assert isinstance(_outcome(body), DecodeError)
    assert isinstance(_outcome(_push(_records(1, 1)).encode() + b"x"), DecodeError)
