"""libvirt lifecycle events -> the run state the coordinator acts on (the binding's constants)."""

from __future__ import annotations

import pytest

from orchestrator.adapters.libvirt import domain_state, libvirt_module
from orchestrator.ports import DomainState

pytestmark = pytest.mark.unit

R, P, S, C = DomainState.RUNNING, DomainState.PAUSED, DomainState.STOPPED, DomainState.CRASHED


@pytest.mark.parametrize(
    ("event", "detail", "expected"),
    [
        ("SUSPENDED", "PAUSED", (P, "paused")),  # virsh suspend
        ("SUSPENDED", "IOERROR", (P, "ioerror")),  # QEMU paused it on an I/O error
        ("SUSPENDED", "MIGRATED", None),  # the end of a live migration: not down
        ("RESUMED", "UNPAUSED", (R, "unpaused")),
        ("STARTED", "BOOTED", (R, "booted")),
        ("STOPPED", "DESTROYED", (S, "destroyed")),  # virsh destroy
        ("STOPPED", "SHUTDOWN", (S, "shutdown")),
        ("STOPPED", "CRASHED", (C, "crashed")),
        ("STOPPED", "MIGRATED", None),  # it runs on the destination
        ("CRASHED", "PANICKED", (C, "panicked")),
        ("PMSUSPENDED", "MEMORY", (P, "memory")),  # the guest went to sleep
        ("SHUTDOWN", "FINISHED", None),  # still running until STOPPED
        ("DEFINED", "ADDED", None),
        ("UNDEFINED", "REMOVED", None),
    ],
)
def test_lifecycle_event_table(event: str, detail: str,
                               expected: tuple[DomainState, str] | None) -> None:
    lv = libvirt_module()
    code = getattr(lv, f"VIR_DOMAIN_EVENT_{event}")
    sub = getattr(lv, f"VIR_DOMAIN_EVENT_{event}_{detail}")
    assert domain_state(lv, code, sub) == expected
