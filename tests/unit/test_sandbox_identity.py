"""orchestrator.sandbox.identity, pure part: the stat parser and when a process has ended."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.sandbox import identity
from orchestrator.sandbox.identity import ProcStat, parse_stat

pytestmark = pytest.mark.unit

# the kernel's comm: up to 15 bytes, spaces and ')' included
comm = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), max_size=15)


@given(comm=comm, state=st.sampled_from("RSDZT"), start=st.integers(0, 2**63))
def test_stat_parse_survives_any_command_name(comm: str, state: str, start: int) -> None:
    # fields 4..21 are numbers; field 22 is the start time (proc(5))
    fields = [state] + [str(i) for i in range(4, 22)] + [str(start), "7", "8"]
    text = f"4242 ({comm}) " + " ".join(fields) + "\n"
    assert parse_stat(text) == (state, start)


@pytest.mark.parametrize(
    ("state", "threads", "ended"),
    [
        ("S", 1, False),
        ("R", 4, False),
        ("Z", 3, False),  # main thread gone, the others still shutting down: still running
        ("Z", 1, True),  # only the zombie leader left
        ("Z", 0, True),
    ],
)
def test_a_process_ends_with_its_last_thread(state: str, threads: int, ended: bool) -> None:
    assert ProcStat(state=state, start=1, threads=threads).ended is ended


def test_public_names_are_pinned() -> None:
    assert set(identity.__all__) == {
        "KILL_WAIT_S", "ProcStat", "Termination", "command_line", "parse_stat", "read_stat",
        "reap", "running", "same_process", "send", "start_time", "terminate", "wait_gone",
    }


def test_a_child_that_ends_during_the_wait_is_reaped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child still runs at the first look and has ended at the next: whichever look sees
    it gone, the same pass must collect it, or it is reported gone yet left a zombie."""
    running = ProcStat(state="S", start=7, threads=1)
    ended = ProcStat(state="Z", start=7, threads=1)
    looks = iter([running])
    reaped: list[int] = []
    monkeypatch.setattr(identity, "read_stat", lambda pid: next(looks, ended))

    def waitpid(pid: int, flags: int) -> tuple[int, int]:
        reaped.append(pid)
        return pid, 0

    monkeypatch.setattr("os.waitpid", waitpid)
    assert identity.wait_gone({42: 7}, timeout=1.0) == []
    assert reaped == [42]
