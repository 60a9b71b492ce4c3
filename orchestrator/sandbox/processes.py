"""Long-running processes the sandbox starts on the host (the demo's coordinator).

Each is recorded in the state file as ``{"kind": "process", "pid", "starttime", "marker"}``
*before* anything relies on it; ``down`` stops it by that pid only while ``/proc/PID`` still
shows the same start time and a command line holding ``marker`` (a reused pid is never
signalled). SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.sandbox import identity
from orchestrator.sandbox.state import StateFile

__all__ = ["PROBES", "TEARDOWN", "start_process", "stop_process"]

STOP_GRACE_S = 10.0


def _ours(resource: dict[str, Any]) -> bool:
    pid = int(resource["pid"])
    return (identity.same_process(pid, int(resource["starttime"]))
            and any(str(resource["marker"]) in arg for arg in identity.command_line(pid)))


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
    start = identity.start_time(proc.pid)
    state.record("process", pid=proc.pid, starttime=-1 if start is None else start, marker=marker,
                 argv=list(argv))
    return proc.pid


def stop_process(resource: dict[str, Any], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the recorded process if it is still the one we started; SIGKILL after
    ``grace``. Gone already is fine; our own child (the demo, a test) is reaped."""
    if _ours(resource):
        identity.terminate({int(resource["pid"]): int(resource["starttime"])}, grace)


TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {"process": stop_process}
PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {"process": _ours}
