"""The sandbox composition: every kind of resource a part can record has exactly one undo."""

from __future__ import annotations

import pytest

from orchestrator.sandbox import ceph, hosts, libvirtd, lifecycle, processes, vms

pytestmark = pytest.mark.unit

PARTS = (ceph, hosts, libvirtd, vms, processes)


def test_every_probed_kind_can_be_undone() -> None:
    assert set(lifecycle.PROBES) <= set(lifecycle.TEARDOWN)


def test_no_two_parts_claim_the_same_kind() -> None:
    kinds = [kind for part in PARTS for kind in part.TEARDOWN]
    assert len(kinds) == len(set(kinds)) == len(lifecycle.TEARDOWN)
