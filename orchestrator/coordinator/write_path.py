"""The coordinator's role switch: a write path for the candidate, without waiting for the old
writer's guest.

:class:`FencedWriterRoles` is the RoleSwitch and SpareProvisioner the coordinator runs on
VMs, over the provisioner (libvirt re-attach). It differs from ``provision.ProvisionerRoles``
in one place, ``make_writer``: a VM that still holds the disk read-write but whose Ceph
clients the fence proof shows blocklisted (and enforced by every OSD) is counted as what it
is, fenced, so the plan touches the candidate alone (its ``<readonly/>`` disk goes, a
read-write one comes) instead of first detaching the old writer's disk and re-attaching it
read-only (a guest round trip each, 0.35-0.56 s and ~0.1 s on TCG, and a bounded wait for a
paused or hung guest). The election releases that fenced disk after the new map is published
(``ReleaseWritePath`` -> :meth:`make_reader`). Without the proof the plan is the
provisioner's own: the old writer is detached first, never two unfenced read-write holders.

:meth:`prepare_writer` takes the candidate's ``<readonly/>`` disk away while the old writer is
being fenced (the executor runs it beside ``FenceNode``): that unplug is the guest round trip
of the switch (0.5-1.5 s on TCG), and it gives nobody a write path, so it need not wait for
the fence; the read-write attach still does (:meth:`make_writer`, after the fence proof).
"""

from __future__ import annotations

import dataclasses

from orchestrator.core import placement
from orchestrator.core.placement import Detach, Plan
from orchestrator.errors import DetachPending
from orchestrator.ports import DiskMode
from orchestrator.provision import Provisioner

__all__ = ["FencedWriterRoles"]


class FencedWriterRoles:
    """RoleSwitch and SpareProvisioner over a :class:`Provisioner` (module docstring)."""

    def __init__(self, provisioner: Provisioner) -> None:
        self.provisioner = provisioner

    def make_writer(self, node: str) -> None:
        """``node`` read-write; an other read-write holder proven fenced keeps its disk until
        :meth:`make_reader`, an unproven one is detached first (the provisioner's plan)."""
        p = self.provisioner
        observed = p.observe()
        fenced = set(observed.fenced)
        for vm in p.desired.vms:
            disk = observed.disks.get(vm.key)
            if (vm.name != node and disk is not None and disk.mode is DiskMode.RW
                    and vm.key not in fenced and p.fence_proof is not None
                    and p.fence_proof.is_fenced(vm.name)):
                fenced.add(vm.key)
        observed = dataclasses.replace(observed, fenced=frozenset(fenced))
        p.apply(placement.plan_set_role(p.desired, observed, node, "writer"), observed)

    def prepare_writer(self, node: str) -> None:
        """Detach ``node``'s ``<readonly/>`` disk ahead of :meth:`make_writer` (module
        docstring); a node holding none, or a read-write one, is left as it is."""
        p = self.provisioner
        observed = p.observe()
        vm = p.desired.vm(node)
        disk = observed.disks.get(vm.key)
        if disk is None or disk.mode is not DiskMode.RO:
            return
        p.apply(Plan((Detach(vm.uri, vm.domain, vm.name, DiskMode.RO),)), observed)

    def make_reader(self, node: str) -> None:
        """``node`` ``<readonly/>``: a fenced old writer's read-write disk goes (a paused
        guest's live detach is completed by the next call once it runs). While the guest
        still holds the fenced disk (paused, or rebooting when it was asked: a reset loses
        the unplug request) the release is not done: DetachPending, retried with the release
        backoff, so a rebooted old writer gets its read-only disk without anyone running
        `rbdfleet provision`."""
        self.provisioner.set_role(node, "reader")
        if node in self.provisioner.pending_detach:
            domain = next(v.domain for v in self.provisioner.desired.vms if v.name == node)
            raise DetachPending(f"{node} still holds its fenced read-write disk: its read-only "
                                "attach waits until the guest lets it go", domain)

    def attach_spare(self, node: str) -> None:
        """The spare's disk read-only (its agent, deployed with the fleet, then catches up)."""
        self.provisioner.set_role(node, "reader")
