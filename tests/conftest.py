"""Test-suite wiring: fixture plugins and the rule that every test names its tier."""

from __future__ import annotations

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
