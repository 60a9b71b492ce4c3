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

A hypervisor that does not answer (its host lost, or cut off from the coordinator) must not
hold a failover up, nor may what it hides become a second writer: the coordinator cannot see
which disks its VMs hold, so each of them is passed over only once proven fenced, and fenced
then and there when it is not (losing a host fences every VM on it, as a cluster manager
fences a host it lost). Those VMs' disks are released when their hypervisor answers again:
the old writer's by its release as always, a fenced reader's by a fresh read-only attach (a
blocklisted client never reads again). Until then the release is not done (DetachPending),
so the election retries it with its backoff. Which readers were fenced that way is kept in
the coordinator's state store (:class:`~orchestrator.ports.FencedReaderRecord`), written
before the fence, so a coordinator that takes over still re-attaches them.
"""

from __future__ import annotations

import dataclasses
import logging

from orchestrator.config import display_uri
from orchestrator.core import placement
from orchestrator.core.placement import Detach, Observed, Plan
from orchestrator.errors import DetachPending, HypervisorUnreachable
from orchestrator.ports import DiskMode, FencedReaderRecord, Fencer
from orchestrator.provision import Provisioner

__all__ = ["FencedWriterRoles"]

LOG = logging.getLogger(__name__)


class FencedWriterRoles:
    """RoleSwitch and SpareProvisioner over a :class:`Provisioner` (module docstring);
    ``fencer`` fences the VMs of a hypervisor that does not answer a role switch (without
    one, such a VM must already be proven fenced); ``record`` keeps which readers it fenced
    that way, to be re-attached once their hypervisor answers."""

    def __init__(self, provisioner: Provisioner, record: FencedReaderRecord,
                 fencer: Fencer | None = None) -> None:
        self.provisioner = provisioner
        self.record = record
        self.fencer = fencer

    def make_writer(self, node: str) -> None:
        """``node`` read-write; an other read-write holder proven fenced keeps its disk until
        :meth:`make_reader`, an unproven one is detached first (the provisioner's plan); the
        VMs of a hypervisor that does not answer are fenced (module docstring)."""
        p = self.provisioner
        observed = p.observe(tolerate_unreachable=True)
        desired = p.reachable(observed, node)
        self._fence_unseen(observed)
        others = {key for key, disk in observed.disks.items()
                  if disk.mode is DiskMode.RW and key != desired.vm(node).key
                  and key not in observed.fenced}
        observed = dataclasses.replace(
            observed, fenced=observed.fenced | p.proven_fenced(observed.disks, others))
        p.apply(placement.plan_set_role(desired, observed, node, "writer"), observed)

    def _fence_unseen(self, observed: Observed) -> None:
        p = self.provisioner
        unseen = [vm for vm in p.desired.vms if vm.uri in observed.unreachable]
        if not unseen:
            return
        recorded = self.record.fenced_readers()
        for vm in unseen:
            if vm.name in recorded:
                continue
            if p.fence_proof is not None and p.fence_proof.is_fenced(vm.name):
                continue  # the old writer, fenced by the failover; or no client at all
            if self.fencer is None:
                raise HypervisorUnreachable(
                    display_uri(vm.uri), f"{vm.name} may hold the disk read-write there and "
                    "is not proven fenced")
            # recorded first: a successor that finds it recorded but not fenced only
            # re-attaches a healthy reader; fenced but not recorded, it would stay unreadable
            recorded = recorded | {vm.name}
            self.record.record_fenced_readers(recorded)
            addresses = self.fencer.fence(vm.name)
            LOG.warning("event=unseen_vm_fenced vm=%s uri=%s addresses=%s: its hypervisor "
                        "does not answer, what it holds is unknown", vm.name,
                        display_uri(vm.uri), ",".join(addresses))

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
        p = self.provisioner
        p.set_role(node, "reader")
        if node in p.pending_detach:
            domain = p.desired.vm(node).domain
            raise DetachPending(f"{node} still holds its fenced read-write disk: its read-only "
                                "attach waits until the guest lets it go", domain)
        self._reattach_cut_off()

    def _reattach_cut_off(self) -> None:
        """A fresh read-only attach for each fenced reader whose hypervisor answers again;
        DetachPending while one does not. A name the config no longer has is forgotten."""
        p = self.provisioner
        recorded = self.record.fenced_readers()
        if not recorded:
            return
        configured = {vm.name for vm in p.desired.vms}
        if recorded - configured:
            recorded = recorded & configured
            self.record.record_fenced_readers(recorded)
        observed = p.observe(tolerate_unreachable=True)  # once: each VM's domain is its own
        for name in sorted(recorded):
            vm = p.desired.vm(name)
            if vm.uri in observed.unreachable:
                raise DetachPending(f"{name} was fenced when its hypervisor stopped answering: "
                                    "its disk is re-attached once it answers", vm.domain)
            disk = observed.disks.get(vm.key)
            if disk is not None:  # its client is blocklisted: only a new attach reads again
                p.apply(Plan((Detach(vm.uri, vm.domain, vm.name, disk.mode),)), observed)
            p.set_role(name, "reader")
            recorded = recorded - {name}
            self.record.record_fenced_readers(recorded)
            LOG.info("event=cut_off_vm_reattached vm=%s", name)

    def attach_spare(self, node: str) -> None:
        """The spare's disk read-only (its agent, deployed with the fleet, then catches up)."""
        self.provisioner.set_role(node, "reader")
