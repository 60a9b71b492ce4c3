"""Test-suite wiring: fixture plugins and the rule that every test names its tier."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from hypothesis import settings

# A property test's examples are judged by what they assert, never by how long one took: on
# a shared 2-core machine one example can take 10x its usual time, and hypothesis's default
# 200 ms deadline turned that into failures that said nothing about the code.
settings.register_profile("rbdfleet", deadline=None)
settings.load_profile("rbdfleet")

pytest_plugins = [
    "tests.fixtures.ceph",
    "tests.fixtures.hosts",
    "tests.fixtures.vms",
    "tests.fixtures.agents",
    "tests.fixtures.sshd",
]

TIERS = {"unit", "contract", "integration", "fault"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without a tier marker is an error, not a silent member of no tier."""
    untiered = [i.nodeid for i in items if not TIERS & {m.name for m in i.iter_markers()}]
    if untiered:
        raise pytest.UsageError(
            "tests without a tier marker (unit/contract/integration/fault): " + ", ".join(untiered)
        )


# How long the interpreter may take to exit after the session before it is made to
LEFTOVER_THREADS_GRACE_S = 60.0
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """A test that failed before stopping its own threads (a client workload, a watcher)
    kept the interpreter from exiting after pytest's summary: CI ran into its time limit and
    reported "did not finish" instead of the failure. A watchdog (a daemon thread: it dies
    with a process that exits normally, thread pools joined at exit included) names the
    threads still holding the exit after a grace period and exits with pytest's status."""
    status = config.stash.get(_EXIT_STATUS, 1)

    def watchdog() -> None:
        time.sleep(LEFTOVER_THREADS_GRACE_S)
        holding = [t.name for t in threading.enumerate()
                   if not t.daemon and t is not threading.main_thread()]
        print(f"\nthe interpreter did not exit within {LEFTOVER_THREADS_GRACE_S:.0f} s of the "
              f"session's end; threads still running: {holding}", file=sys.stderr, flush=True)
        os._exit(status)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()
