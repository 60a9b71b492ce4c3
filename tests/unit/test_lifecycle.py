"""The sandbox composition: every kind of resource a part can record has exactly one undo."""

from __future__ import annotations

import pytest

from orchestrator.sandbox import ceph, hosts, libvirtd, lifecycle, processes, vms

pytestmark = pytest.mark.unit

PARTS = (ceph, hosts, libvirtd, vms, processes)


def test_every_probed_kind_can_be_undone() -> None:
    assert set(lifecycle.PROBES) <= set(lifecycle.TEARDOWN)


def test_a_kind_has_one_undo_whichever_part_lists_it() -> None:
    # vms lists libvirtd's kinds too (boot_vms records the daemons it starts): same function.
    for part in PARTS:
        for kind, undo in part.TEARDOWN.items():
            assert lifecycle.TEARDOWN[kind] is undo, kind
