"""Long-running processes the sandbox starts on the host (the demo's coordinator).

Each is recorded in the state file as ``{"kind": "process", "pid", "starttime", "marker"}``
*before* anything relies on it; ``down`` stops it by that pid only while ``/proc/PID`` still
shows the same start time and a command line holding ``marker`` (a reused pid is never
signalled). SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import SandboxError
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
    resource = {"pid": proc.pid, "starttime": -1 if start is None else start, "marker": marker}
    state.record("process", **resource, argv=list(argv))
    _wait_recognisable(proc, resource, log)
    return proc.pid


def _wait_recognisable(proc: subprocess.Popen[bytes], resource: dict[str, Any], log: Path,
                       timeout: float = 10.0) -> None:
    """Return once ``down`` would recognise the process; raise if it died first.

    Under load the kernel may show the child's new command line a moment after ``Popen``
    returns; a child that exits at once (bad argv) is reported with its log.
    """
    deadline = time.monotonic() + timeout
    while not _ours(resource):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SandboxError(f"{resource['marker']}: exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise SandboxError(f"{resource['marker']}: not recognisable after {timeout} s "
                               f"(pid {proc.pid})")
        time.sleep(0.01)


def stop_process(resource: dict[str, Any], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the recorded process if it is still the one we started; SIGKILL after
    ``grace``. Gone already is fine; our own child (the demo, a test) is reaped."""
    if _ours(resource):
        identity.terminate({int(resource["pid"]): int(resource["starttime"])}, grace)


TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {"process": stop_process}
PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {"process": _ours}
