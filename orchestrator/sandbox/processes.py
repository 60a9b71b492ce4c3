"""Long-running processes the sandbox starts on the host (the demo's coordinator).

Each is recorded in the state file as ``{"kind": "process", "pid", "starttime", "marker"}``
*before* anything relies on it; ``down`` stops it by that pid only while ``/proc/PID`` still
shows the same start time and a command line holding ``marker`` (a reused pid is never
signalled). SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.sandbox.state import StateFile

__all__ = ["PROBES", "TEARDOWN", "running", "start_process", "stop_process"]

STOP_GRACE_S = 10.0


def _identity(pid: int) -> tuple[int, bytes] | None:
    """(start time, command line) of a live pid, None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19]), cmdline


def running(pid: int) -> bool:
    """True while ``pid`` is a live process; a zombie awaiting its (lazy) reaper has ended."""
    return _identity(pid) is not None


def _ours(resource: dict[str, Any]) -> bool:
    found = _identity(int(resource["pid"]))
    return (found is not None and found[0] == int(resource["starttime"])
            and str(resource["marker"]).encode() in found[1])


def start_process(state: StateFile, argv: Sequence[str], *, log: Path, marker: str,
                  env: dict[str, str] | None = None) -> int:
    """Start ``argv`` in its own session, output to ``log``; record it; return its pid.

    ``marker`` must appear in ``argv``: it is how ``down`` recognises the process later.
    """
    if not any(marker in arg for arg in argv):
        raise ValueError(f"marker {marker!r} is not in the command line")
    with log.open("ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=env)
    found = _identity(proc.pid)
    state.record("process", pid=proc.pid, starttime=found[0] if found else -1, marker=marker,
                 argv=list(argv))
    return proc.pid


def stop_process(resource: dict[str, Any], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the recorded process if it is still the one we started; SIGKILL after
    ``grace``. Gone already is fine."""
    if not _ours(resource):
        return
    pid = int(resource["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _ours(resource) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if _ours(resource):
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    _reap(pid)  # our own child (the demo, a test) is a zombie until reaped


def _reap(pid: int) -> None:
    # Not our child when another process started it: PID 1 reaps it then.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {"process": stop_process}
PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {"process": _ours}
