"""Process identity from ``/proc``: the one place the sandbox decides "is this still our process?".

A pid alone names nothing durable: once a process ends and is reaped, the kernel may give its
pid to any newcomer. So every recorded process is ``(pid, start)``, where ``start`` is field 22
of ``/proc/PID/stat`` (start time in clock ticks since boot), and nothing is signalled unless
``/proc`` still shows that start time for that pid.

A process has *ended* once it is a zombie whose every thread is gone. A multi-threaded daemon
whose main thread has exited shows state ``Z`` while its other threads still shut down (a ceph
daemon still holds its pid-file lock then): it counts as running until no thread but the
zombie leader is left. A zombie awaiting a reaper that is not us (PID 1, lazily) has ended.

Waiting reaps: a process that has ended and is our own child is collected (``waitpid``
``WNOHANG``), only after checking its start time, so the exit status of another child that got
a reused pid is never taken.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KILL_WAIT_S",
    "ProcStat",
    "Termination",
    "command_line",
    "parse_stat",
    "read_stat",
    "reap",
    "running",
    "same_process",
    "send",
    "start_time",
    "terminate",
    "wait_gone",
]

KILL_WAIT_S = 10.0  # how long a SIGKILLed process may take to be gone (a big daemon's exit)
_POLL_S = 0.02


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/PID`` says of a process that the kernel still lists."""

    state: str  # field 3 of stat(5): R, S, D, Z, T, ...
    start: int  # field 22: start time in clock ticks since boot
    threads: int  # entries of /proc/PID/task

    @property
    def ended(self) -> bool:
        """A zombie with no thread left but its leader: nothing of it runs any more."""
        return self.state == "Z" and self.threads <= 1


@dataclass(frozen=True)
class Termination:
    """Outcome of :func:`terminate`: pids that needed SIGKILL, and pids still running after it."""

    killed: tuple[int, ...]
    survivors: tuple[int, ...]


def parse_stat(text: str) -> tuple[str, int]:
    """(state, start time) from the text of ``/proc/PID/stat``.

    The command name (field 2) may hold spaces and ``)``, so fields are counted after the last
    ``)``: the state is field 3, the start time field 22.
    """
    rest = text[text.rindex(")") + 2 :].split()
    return rest[0], int(rest[19])


def read_stat(pid: int) -> ProcStat | None:
    """The :class:`ProcStat` of ``pid``, or None once the kernel no longer lists it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None
    state, start = parse_stat(text)
    return ProcStat(state=state, start=start, threads=threads)


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` while the kernel lists it (an unreaped zombie included), else None.

    This is what to record right after spawning a child: it is still the child's identity
    even if the child has already exited, since our unreaped child keeps its pid.
    """
    found = read_stat(pid)
    return None if found is None else found.start


def running(pid: int) -> bool:
    """True while ``pid`` is a process that has not ended (see the module docstring)."""
    found = read_stat(pid)
    return found is not None and not found.ended


def same_process(pid: int, start: int) -> bool:
    """True while the process ``pid`` started at ``start`` still runs (never a reused pid)."""
    found = read_stat(pid)
    return found is not None and not found.ended and found.start == start


def command_line(pid: int) -> list[str]:
    """The argv of ``pid`` (empty once it is gone or a zombie, whose memory is released)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def reap(pid: int, start: int) -> None:
    """Collect ``pid`` if it is our own child that has ended and was started at ``start``.

    Not our child (another process started it): nothing to do, its parent or PID 1 reaps it.
    """
    found = read_stat(pid)
    if found is not None and found.ended and found.start == start:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def send(pid: int, start: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process started at ``start``.

    Returns whether the signal went out.
    """
    if not same_process(pid, start):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(processes: Mapping[int, int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s until none of ``{pid: start}`` runs, reaping our own children.

    Returns the pids still running (empty when all are gone).
    """
    deadline = time.monotonic() + timeout
    while True:
        pending = [pid for pid, start in processes.items() if same_process(pid, start)]
        # Reap after the check: a process that ends between a reap and the check would
        # otherwise be reported gone yet left a zombie.
        for pid, start in processes.items():
            if pid not in pending:
                reap(pid, start)
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(_POLL_S)


def terminate(
    processes: Mapping[int, int],
    grace: float,
    *,
    first: signal.Signals = signal.SIGTERM,
    kill_wait: float = KILL_WAIT_S,
) -> Termination:
    """Stop ``{pid: start}``: ``first`` to each one still ours, SIGKILL to those left after
    ``grace`` s, then wait up to ``kill_wait`` s more. Gone already is fine; a pid reused by
    another process is never signalled.
    """
    targets = {pid: start for pid, start in processes.items() if send(pid, start, first)}
    pending = wait_gone(targets, grace)
    killed: list[int] = []
    if first != signal.SIGKILL:
        killed = [pid for pid in pending if send(pid, targets[pid], signal.SIGKILL)]
    survivors = wait_gone({pid: targets[pid] for pid in pending}, kill_wait)
    return Termination(killed=tuple(killed), survivors=tuple(survivors))
