"""Fixtures of the contract suites that need a real libvirtd.

``stopped_domains``: ``make(count, start=False) -> names`` of tiny QEMU domains defined on
``qemu:///system``. Never started, attach and detach act on the persistent config only, in
milliseconds. Started (``start=True``), the domain has no disk to boot: QEMU sits in the
firmware (32 MiB, TCG, well under a second to start), so hot-plug is real while no guest
ever runs, and no guest ever answers an unplug request. libvirtd is started by the sandbox
helper when it is not running, held for the test, and stopped afterwards only if this test
started it and nothing else uses it (:func:`orchestrator.sandbox.libvirtd.stop_daemon`).
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.sandbox.libvirtd import SYSTEM_URI, libvirtd_held, stop_daemon
from orchestrator.sandbox.state import StateFile

DomainMaker = Callable[..., list[str]]

_DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices/>
</domain>"""


@pytest.fixture
def stopped_domains(tmp_path: Path) -> Iterator[DomainMaker]:
    import libvirt

    state = StateFile(tmp_path / "libvirtd-state.json")
    with libvirtd_held(state):
        conn = libvirt.open(SYSTEM_URI)
        defined: list[object] = []

        def make(count: int, start: bool = False) -> list[str]:
            names = [f"rbdfleet-contract-{uuid.uuid4().hex[:8]}" for _ in range(count)]
            for name in names:
                dom = conn.defineXML(_DOMAIN_XML.format(name=name))
                defined.append(dom)
                if start:
                    dom.create()
            return names

        try:
            yield make
        finally:
            for dom in defined:
                try:
                    if dom.isActive():  # type: ignore[attr-defined]
                        dom.destroy()  # type: ignore[attr-defined]
                    dom.undefine()  # type: ignore[attr-defined]
                except libvirt.libvirtError as exc:
                    print(f"[contract] undefine failed: {exc}", file=sys.stderr)
            conn.close()
    for resource in reversed(state.resources):
        with contextlib.suppress(Exception):
            stop_daemon(resource)
