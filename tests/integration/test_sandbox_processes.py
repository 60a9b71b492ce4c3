"""orchestrator.sandbox.processes: host processes recorded before use, stopped by identity."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from orchestrator.sandbox import identity, processes
from orchestrator.sandbox.state import StateFile

pytestmark = pytest.mark.integration


def _sleeper(tmp_path: Path, marker: str) -> list[str]:
    return [sys.executable, "-c", "import time, sys; time.sleep(300)", marker]


def test_recorded_then_stopped_by_pid(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    marker = str(tmp_path / "marker")
    pid = processes.start_process(state, _sleeper(tmp_path, marker), log=tmp_path / "p.log",
                                  marker=marker)
    [res] = state.resources
    assert res["kind"] == "process" and res["pid"] == pid
    assert processes.PROBES["process"](res)
    processes.TEARDOWN["process"](res)
    assert not processes.PROBES["process"](res)
    assert not identity.running(pid)


def test_a_process_that_is_not_ours_is_never_signalled(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    marker = str(tmp_path / "marker")
    pid = processes.start_process(state, _sleeper(tmp_path, marker), log=tmp_path / "p.log",
                                  marker=marker)
    [res] = state.resources
    try:
        for forged in ({**res, "marker": "someone-else"}, {**res, "starttime": 1}):
            processes.stop_process(forged)  # same pid, another identity: left alone
            time.sleep(0.1)
            assert processes.PROBES["process"](res)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_the_marker_must_be_on_the_command_line(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    with pytest.raises(ValueError, match="marker"):
        processes.start_process(state, [sys.executable, "-c", "pass"], log=tmp_path / "p.log",
                                marker="absent")
    assert state.resources == []
