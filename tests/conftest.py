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


# How long the end of the session waits for threads a test left running before exiting anyway
LEFTOVER_THREADS_GRACE_S = 30.0
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


def _leftover_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t is not threading.current_thread() and not t.daemon]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """A test that failed before stopping its own threads (a client workload, a watcher)
    kept the interpreter from exiting after pytest's summary: CI ran into its time limit and
    reported "did not finish" instead of the failure. Such threads get a grace period, then
    are named, and the process exits with pytest's own status."""
    deadline = time.monotonic() + LEFTOVER_THREADS_GRACE_S
    while (leftovers := _leftover_threads()) and time.monotonic() < deadline:
        leftovers[0].join(0.5)
    if leftovers:
        print(f"\nthreads still running after the session, not waited for: "
              f"{[t.name for t in leftovers]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(config.stash.get(_EXIT_STATUS, 1))
