"""orchestrator.sandbox.identity against real processes: start times, the last-thread rule,
signals only to the recorded process, SIGKILL after the grace period, reaping our children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from orchestrator.sandbox import identity

pytestmark = pytest.mark.integration

# Main thread exits (pthread_exit via threading: the interpreter waits on it) while a
# non-daemon thread keeps running; the main thread is then a zombie leader.
MAIN_EXITS_THREAD_RUNS = """
import ctypes, sys, threading, time
def linger():
    print("lingering", flush=True)
    sys.stdin.readline()
threading.Thread(target=linger).start()
time.sleep(0.2)
ctypes.CDLL(None).pthread_exit(None)
"""
IGNORES_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for popen in started:
        if popen.poll() is None:
            popen.kill()
        popen.wait(timeout=10)


def _spawn(started: list[subprocess.Popen[bytes]], code: str,
           stdin: int | None = subprocess.DEVNULL) -> tuple[int, int]:
    popen = subprocess.Popen([sys.executable, "-c", code], stdin=stdin, stdout=subprocess.PIPE)
    started.append(popen)
    assert popen.stdout is not None
    popen.stdout.readline()  # ready
    start = identity.start_time(popen.pid)
    assert start is not None
    return popen.pid, start


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_own_process_is_itself_and_not_another_start() -> None:
    start = identity.start_time(os.getpid())
    assert start is not None
    assert identity.same_process(os.getpid(), start)
    assert not identity.same_process(os.getpid(), start + 1)
    assert identity.running(os.getpid())
    assert identity.command_line(os.getpid()) == sys.orig_argv


def test_a_process_runs_until_its_last_thread_is_gone(
        child: list[subprocess.Popen[bytes]]) -> None:
    pid, start = _spawn(child, MAIN_EXITS_THREAD_RUNS, stdin=subprocess.PIPE)
    # the leader turns zombie while the other thread lives on
    assert _wait_until(lambda: (s := identity.read_stat(pid)) is not None and s.state == "Z")
    assert identity.same_process(pid, start) and identity.running(pid)
    popen = child[0]
    assert popen.stdin is not None
    popen.stdin.write(b"\n")
    popen.stdin.flush()  # the last thread returns: the process ends
    assert identity.wait_gone({pid: start}, timeout=10.0) == []
    assert identity.read_stat(pid) is None, "wait_gone reaps our own ended child"


def test_terminate_escalates_to_sigkill_and_reaps(child: list[subprocess.Popen[bytes]]) -> None:
    pid, start = _spawn(child, IGNORES_SIGTERM)
    outcome = identity.terminate({pid: start}, grace=0.3)
    assert outcome == identity.Termination(killed=(pid,), survivors=())
    assert identity.read_stat(pid) is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already collected


def test_another_start_time_is_never_signalled(child: list[subprocess.Popen[bytes]]) -> None:
    pid, start = _spawn(child, IGNORES_SIGTERM)
    assert not identity.send(pid, start + 1, signal.SIGKILL)
    outcome = identity.terminate({pid: start - 1}, grace=0.1)
    assert outcome == identity.Termination(killed=(), survivors=())
    time.sleep(0.1)
    assert child[0].poll() is None and identity.same_process(pid, start)


def test_a_gone_process_is_fine(child: list[subprocess.Popen[bytes]]) -> None:
    pid, start = _spawn(child, "print('ready', flush=True)")
    child[0].wait(timeout=10)
    assert not identity.running(pid) and not identity.same_process(pid, start)
    assert identity.terminate({pid: start}, grace=0.1) == identity.Termination((), ())
