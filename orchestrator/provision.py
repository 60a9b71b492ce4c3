"""Provisioning use case over ports: shared image, one cephx user per VM, libvirt attach.

``Provisioner`` observes Ceph and libvirt through the ports, asks the pure planner
(:mod:`orchestrator.core.placement`) for a plan, refuses any plan that would ever show two
writers, and runs the actions in order, stopping at the first failure. A failed run re-raises
the original error with the actions already done attached (:func:`check_partial` reads
them) so the caller can report them and how to undo them (:func:`undo_hint`).

The rule for a writer that cannot let go (paused or hung guest): its read-write disk leaves
the persistent config at once, and the live unplug is attempted for a short bound. When it
does not complete, the role switch goes on only if the :class:`~orchestrator.ports.FenceProof`
proves the VM's Ceph clients blocklisted (a fenced librbd cannot write a byte again): the new
writer is attached read-write next to that fenced, useless attachment, logged as such, and the
VM's read-only re-attach is left for later (``pending_detach``). The next ``provision``, or
``set_role(vm, "reader")`` (the coordinator's demotion), completes it once the guest runs.
Without that proof the detach failure stops the plan: never two live writers.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agents.errors import RbdfleetError
from orchestrator.config import FleetConfig, display_uri
from orchestrator.core import placement
from orchestrator.core.disks import fleet_serial
from orchestrator.core.placement import (
    Action,
    Attach,
    CreateImage,
    CreatePool,
    Desired,
    DesiredVm,
    Detach,
    EnsureCredentials,
    Observed,
    Plan,
    RemoveImage,
    RemoveSecret,
    RemoveUser,
)
from orchestrator.errors import (
    ConfigError,
    CoordinationError,
    DetachPending,
    HypervisorError,
    HypervisorUnreachable,
    ImageBusy,
)
from orchestrator.pki import FleetPki, node_names
from orchestrator.ports import (
    AttachedDisk,
    Characteristics,
    Clock,
    CredentialStore,
    DiskMode,
    DiskSpec,
    FenceProof,
    Hypervisor,
    ImageStore,
    MonHost,
    require,
)

LOG = logging.getLogger(__name__)

__all__ = [
    "IMAGE_FEATURES",
    "Applied",
    "Provisioner",
    "ProvisionerRoles",
    "SystemClock",
    "VmAttachment",
    "check_partial",
    "desired_from_config",
    "parse_mon_host",
    "undo_hint",
]

# layering | exclusive-lock (rbd.RBD_FEATURE_*), see docs/provisioning.md: the writer's QEMU
# takes the lock on its first write and names itself in `rbd lock ls`; a new writer's librbd
# breaks (and blocklists) a dead owner's lock. object-map / fast-diff / journaling are left
# out, as OpenStack Cinder does for multi-attach volumes: they are per-lock-owner state.
RBD_FEATURE_LAYERING = 1
RBD_FEATURE_EXCLUSIVE_LOCK = 4
IMAGE_FEATURES = RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK

# How long a fenced writer's guest gets to release its disk before the role switch goes on
# without it (a healthy TCG guest takes ~0.25 s; a paused one never does).
FENCED_DETACH_WAIT_S = 2.0

# A killed client's watch lasts osd_client_watch_timeout (30 s): removal waits that long.
REMOVE_IMAGE_TIMEOUT_S = 40.0


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """``time.sleep()``."""
        time.sleep(seconds)


def desired_from_config(config: FleetConfig) -> Desired:
    """What the config asks for, in the planner's terms."""
    fleet = config.fleet
    return Desired(
        fleet=fleet.name,
        pool=config.ceph.pool,
        image=fleet.image,
        size=fleet.size,
        features=IMAGE_FEATURES,
        create_pool=config.ceph.create_pool,
        serial=fleet_serial(fleet.name, config.ceph.pool, fleet.image),
        writer=fleet.writer,
        vms=tuple(DesiredVm(vm.name, vm.uri, vm.domain, placement.vm_user(fleet.name, vm.name),
                            vm.spare) for vm in config.vms),
    )


def parse_mon_host(value: str) -> tuple[MonHost, ...]:
    """``"127.0.0.1:13300"``, ``"a:1,b:2"`` or ``"[v2:127.0.0.1:13300,v1:...]"`` → monitors
    (msgr2 entries preferred, as QEMU should use them)."""
    entries: list[tuple[str, str]] = []
    for group in value.replace(" ", ",").split(","):
        item = group.strip().strip("[]")
        if not item:
            continue
        proto, _, rest = item.partition(":") if item.startswith(("v1:", "v2:")) else ("", "", item)
        host, _, port = rest.rstrip("]").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("ceph.mon_host", f"{value!r}: expected host:port entries")
        entries.append((proto, f"{host.strip('[]')}:{port}"))
    if any(proto == "v2" for proto, _ in entries):
        entries = [e for e in entries if e[0] == "v2"]
    hosts = []
    for _, hostport in entries:
        host, _, port = hostport.rpartition(":")
        hosts.append(MonHost(host, int(port)))
    if not hosts:
        raise ConfigError("ceph.mon_host", f"{value!r}: no monitor address")
    return tuple(hosts)


@dataclass(frozen=True)
class Applied:
    """One action that ran, and how long it took (seconds)."""

    action: Action
    seconds: float


@dataclass(frozen=True)
class VmAttachment:
    """A row of ``rbdfleet vm list``."""

    vm: str | None  # None: a domain holding the disk that is not in the fleet
    domain: str
    uri: str
    active: bool | None  # None: the domain does not exist
    mode: DiskMode | None  # None: not attached
    user: str | None
    spare: bool


class Provisioner:
    """Provision, role switch and deprovision of one fleet, over injected ports."""

    def __init__(self, config: FleetConfig, images: ImageStore, credentials: CredentialStore,
                 hypervisor: Hypervisor, clock: Clock | None = None,
                 progress: Callable[[str], None] | None = None,
                 fence_proof: FenceProof | None = None) -> None:
        if fence_proof is not None:
            # A proof answered before the OSDs enforce the blocklist would let a new writer
            # attach next to an old one that can still write.
            require(fence_proof, Characteristics.WAITS_FOR_OSDMAP, "the provisioner's fence proof")
        self.config = config
        self.fence_proof = fence_proof
        # domains whose fenced read-write disk is still live (guest paused): VM names
        self.pending_detach: set[str] = set()
        self.desired = desired_from_config(config)
        self._images = images
        self._credentials = credentials
        self._hypervisor = hypervisor
        self._clock = clock or SystemClock()
        self._progress = progress or (lambda _msg: None)

    @property
    def serial(self) -> str:
        """The disk serial of this fleet (what the guests look for)."""
        return self.desired.serial

    def observe(self, tolerate_unreachable: bool = False) -> Observed:
        """Ceph and libvirt as they are: pool, image, domains on the fleet's URIs, users,
        secrets. A hypervisor that does not answer is HypervisorUnreachable, or, with
        ``tolerate_unreachable``, listed in ``Observed.unreachable`` (its domains unknown)."""
        desired = self.desired
        pool_exists = self._images.pool_exists(desired.pool)
        image = self._images.image_info(desired.pool, desired.image) if pool_exists else None
        domains: dict[tuple[str, str], bool] = {}
        disks: dict[tuple[str, str], AttachedDisk] = {}
        unreachable: set[str] = set()
        for uri in sorted({vm.uri for vm in desired.vms}):
            try:
                infos = self._hypervisor.domains(uri)
            except HypervisorUnreachable as exc:
                if not tolerate_unreachable:
                    raise
                LOG.warning("provision observe hypervisor unreachable uri=%s error=%s",
                            exc.uri, exc)
                unreachable.add(uri)
                continue
            for info in infos:
                domains[(uri, info.name)] = info.active
                ours = [d for d in info.disks if d.serial == desired.serial]
                if ours:
                    disks[(uri, info.name)] = ours[0]
        wanted_users = {vm.user: vm.uri for vm in desired.vms}
        for (uri, _), disk in disks.items():
            if disk.user:
                wanted_users.setdefault(disk.user, uri)
        # both prefixes: a VM still attached under its legacy name gets its user removed
        existing = {e.removeprefix("client.")
                    for prefix in (placement.USER_PREFIX, placement.LEGACY_USER_PREFIX)
                    for e in self._credentials.list_users(prefix)}
        secrets = set()
        pairs = {(vm.uri, vm.user) for vm in desired.vms if vm.uri not in unreachable}
        pairs |= {(uri, d.user) for (uri, _), d in disks.items() if d.user}
        for uri, user in sorted(pairs):
            usage = placement.secret_usage(user)
            if self._hypervisor.secret_uuid(uri, usage) is not None:
                secrets.add((uri, usage))
        return Observed(pool_exists, image, domains, disks,
                        frozenset(u for u in existing if u in wanted_users), frozenset(secrets),
                        self._fenced_holders(disks), frozenset(unreachable))

    def _fenced_holders(self, disks: dict[tuple[str, str], AttachedDisk]
                        ) -> frozenset[tuple[str, str]]:
        """Among several read-write holders, those proven fenced (the proof costs a few mon
        commands: asked only when there is more than one holder)."""
        rw = {key for key, d in disks.items() if d.mode is DiskMode.RW}
        return self.proven_fenced(disks, rw) if len(rw) >= 2 else frozenset()

    def proven_fenced(self, disks: dict[tuple[str, str], AttachedDisk],
                      keys: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
        """Those of the domains ``keys`` the fence proof shows cut off: a fleet VM's own, or
        any domain whose disk uses a fleet VM's cephx user (the proof is of every client of
        that user)."""
        if self.fence_proof is None:
            return frozenset()
        by_key = {vm.key: vm.name for vm in self.desired.vms}
        by_user = {vm.user: vm.name for vm in self.desired.vms}
        proofs: dict[str, bool] = {}
        fenced = set()
        for key in keys:
            disk = disks.get(key)
            name = by_key.get(key) or (by_user.get(disk.user) if disk and disk.user else None)
            if name is None:
                continue
            if name not in proofs:
                proofs[name] = self.fence_proof.is_fenced(name)
            if proofs[name]:
                fenced.add(key)
        return frozenset(fenced)

    def plan(self, observed: Observed | None = None) -> Plan:
        """The provisioning plan from the current (or given) state."""
        return placement.plan_provision(self.desired, observed or self.observe())

    def provision(self, dry_run: bool = False) -> tuple[Plan, list[Applied]]:
        """Converge Ceph and libvirt to the config; with ``dry_run`` only plan."""
        observed = self.observe()
        plan = placement.plan_provision(self.desired, observed)
        return plan, ([] if dry_run else self.apply(plan, observed))

    def set_role(self, vm: str, role: str, dry_run: bool = False) -> tuple[Plan, list[Applied]]:
        """Make ``vm`` the writer (demoting the old one first) or a reader.

        A reader's disk is read-only whatever the rest of the fleet holds, so making one
        passes over the VMs of hypervisors that do not answer (``vm``'s own must); making a
        writer needs every hypervisor (the coordinator's role switch has its own rule,
        :class:`~orchestrator.coordinator.write_path.FencedWriterRoles`)."""
        observed = self.observe(tolerate_unreachable=role == "reader")
        plan = placement.plan_set_role(self.reachable(observed, vm), observed, vm, role)
        return plan, ([] if dry_run else self.apply(plan, observed))

    def reachable(self, observed: Observed, vm: str) -> Desired:
        """The fleet without the VMs whose hypervisor did not answer ``observed``'s look;
        HypervisorUnreachable when ``vm``'s own is one of them."""
        target = self.desired.vm(vm)
        if target.uri in observed.unreachable:
            raise HypervisorUnreachable(display_uri(target.uri),
                                        f"{vm}'s hypervisor did not answer")
        if not observed.unreachable:
            return self.desired
        return dataclasses.replace(self.desired, vms=tuple(
            v for v in self.desired.vms if v.uri not in observed.unreachable))

    def deprovision(self, delete_image: bool = False,
                    dry_run: bool = False) -> tuple[Plan, list[Applied]]:
        """Detach everywhere; with ``delete_image`` remove secrets, users and the image."""
        observed = self.observe()
        plan = placement.plan_deprovision(self.desired, observed, delete_image)
        return plan, ([] if dry_run else self.apply(plan, observed))

    def attachments(self) -> list[VmAttachment]:
        """Each VM's attachment and mode, plus domains outside the fleet holding the disk."""
        observed = self.observe()
        rows = []
        for vm in self.desired.vms:
            disk = observed.disks.get(vm.key)
            rows.append(VmAttachment(vm.name, vm.domain, vm.uri, observed.domains.get(vm.key),
                                     disk.mode if disk else None, disk.user if disk else None,
                                     vm.spare))
        fleet_keys = {vm.key for vm in self.desired.vms}
        for key, disk in sorted(observed.disks.items()):
            if key not in fleet_keys:
                rows.append(VmAttachment(None, key[1], key[0], observed.domains.get(key),
                                         disk.mode, disk.user, False))
        return rows

    def apply(self, plan: Plan, observed: Observed) -> list[Applied]:
        """Run ``plan`` in order; stop at the first failure, which is re-raised with
        ``exc.done`` listing the actions that completed.

        A read-write detach that the guest does not complete is passed over only for a VM
        proven fenced (see the module docstring); that VM's later attach is then skipped and
        its name kept in ``pending_detach``.
        """
        placement.check_single_writer(observed, plan)
        done: list[Applied] = []
        mon_hosts: tuple[MonHost, ...] | None = None
        fenced_live: set[tuple[str, str]] = set()
        fenced = set(observed.fenced)
        live_rw = {key for key, disk in observed.disks.items() if disk.mode is DiskMode.RW}
        for action in plan.actions:
            started = self._clock.monotonic()
            if isinstance(action, Attach) and (action.uri, action.domain) in fenced_live:
                LOG.warning("provision step deferred action=%r reason=live detach pending",
                            str(action))
                self._progress(f"{action}: deferred until {action.domain} releases its "
                               "fenced read-write disk (run `rbdfleet provision` once it runs)")
                continue
            try:
                if isinstance(action, Attach) and mon_hosts is None:
                    mon_hosts = self._mon_hosts()
                if isinstance(action, Attach) and action.mode is DiskMode.RW:
                    self._check_no_live_writer(action, live_rw, fenced)
                if isinstance(action, Detach):
                    key = (action.uri, action.domain)
                    if self._detach(action):
                        fenced_live.add(key)
                        fenced.add(key)
                    else:
                        live_rw.discard(key)
                else:
                    self._run(action, mon_hosts or ())
                    if isinstance(action, Attach) and action.mode is DiskMode.RW:
                        live_rw.add((action.uri, action.domain))
            except RbdfleetError as exc:
                exc.done = done  # type: ignore[attr-defined]
                LOG.error("provision step failed action=%r error=%s", str(action), exc)
                raise
            elapsed = self._clock.monotonic() - started
            done.append(Applied(action, elapsed))
            LOG.info("provision step done action=%r seconds=%.3f", str(action), elapsed)
            self._progress(f"{action} ({elapsed:.2f} s)")
        return done

    def _detach(self, action: Detach) -> bool:
        """Detach; True when the guest kept a read-write disk whose VM is proven fenced (the
        caller goes on), DetachPending re-raised when it is not proven fenced."""
        fenced_vm = (action.vm is not None and action.mode is DiskMode.RW
                     and self.fence_proof is not None and self.fence_proof.is_fenced(action.vm))
        try:
            self._hypervisor.detach_disk(action.uri, action.domain, self.desired.serial,
                                         FENCED_DETACH_WAIT_S if fenced_vm else None)
        except DetachPending as exc:
            if not fenced_vm or action.vm is None or self.fence_proof is None \
                    or not self.fence_proof.is_fenced(action.vm):  # proven again, right now
                raise
            LOG.warning("provision detach pending vm=%s domain=%s reason=%s: its Ceph clients "
                        "are blocklisted, going on without it", action.vm, action.domain, exc)
            self.pending_detach.add(action.vm)
            return True
        if action.vm is not None:
            self.pending_detach.discard(action.vm)
        return False

    def _check_no_live_writer(self, action: Attach, live_rw: set[tuple[str, str]],
                              fenced: set[tuple[str, str]]) -> None:
        """The two-writer guard at run time: every other domain still holding the disk
        read-write must be proven fenced, and that is logged, never silent."""
        target = (action.uri, action.domain)
        for key in sorted(live_rw - {target}):
            if key not in fenced:
                raise CoordinationError(f"refused: {action} while {key[1]} still holds the "
                                        "disk read-write and is not proven fenced")
            LOG.warning("provision attach rw domain=%s while domain=%s still holds a fenced "
                        "read-write disk (its Ceph clients are blocklisted)", action.domain,
                        key[1])

    def _mon_hosts(self) -> tuple[MonHost, ...]:
        if self.config.ceph.mon_host:
            return parse_mon_host(self.config.ceph.mon_host)
        return self._credentials.mon_hosts()

    def _run(self, action: Action, mon_hosts: tuple[MonHost, ...]) -> None:
        desired = self.desired
        if isinstance(action, CreatePool):
            self._images.create_pool(action.pool)
        elif isinstance(action, CreateImage):
            self._images.create_image(action.pool, action.image, action.size, action.features)
        elif isinstance(action, EnsureCredentials):
            key = self._credentials.ensure_user(action.user, desired.pool, desired.image)
            self._hypervisor.ensure_secret(action.uri, action.usage, key)
        elif isinstance(action, Attach):
            uuid = self._hypervisor.secret_uuid(action.uri, action.usage)
            if uuid is None:
                raise HypervisorError(f"attach to {action.domain}: secret {action.usage!r} "
                                      f"is missing on {action.uri}")
            self._hypervisor.attach_disk(action.uri, action.domain, DiskSpec(
                desired.pool, desired.image, desired.serial, action.user, uuid, mon_hosts,
                action.mode))
        elif isinstance(action, RemoveSecret):
            self._hypervisor.remove_secret(action.uri, action.usage)
        elif isinstance(action, RemoveUser):
            self._credentials.remove_user(action.user)
        elif isinstance(action, RemoveImage):
            self._remove_image(action)
        else:  # pragma: no cover - the Action union is closed
            raise TypeError(f"unknown action {action!r}")

    def _remove_image(self, action: RemoveImage) -> None:
        deadline = self._clock.monotonic() + REMOVE_IMAGE_TIMEOUT_S
        while True:
            try:
                self._images.remove_image(action.pool, action.image)
                return
            except ImageBusy:
                # QEMU closes librbd asynchronously after a detach; a killed client's watch
                # lingers until the OSD times it out.
                if self._clock.monotonic() > deadline:
                    raise
                self._clock.sleep(0.5)


class ProvisionerRoles:
    """RoleSwitch and SpareProvisioner over :class:`Provisioner` (libvirt re-attach)."""

    def __init__(self, provisioner: Provisioner) -> None:
        self.provisioner = provisioner

    def make_writer(self, node: str) -> None:
        """``node`` read-write; the planner demotes the old writer first."""
        self.provisioner.set_role(node, "writer")

    def make_reader(self, node: str) -> None:
        """``node`` ``<readonly/>``; completes a fenced old writer's pending live detach."""
        self.provisioner.set_role(node, "reader")

    def attach_spare(self, node: str) -> None:
        """The spare's disk read-only (its agent, deployed with the fleet, then catches up)."""
        self.provisioner.set_role(node, "reader")


def undo_hint(done: list[Applied], fleet: str) -> str:
    """What to run to undo a partial apply."""
    if not done:
        return "nothing was changed"
    return (f"to undo: rbdfleet deprovision (add --delete-image --fleet-name {fleet} to also "
            f"remove the image, users and secrets of fleet {fleet})")


def check_partial(exc: BaseException) -> list[Applied]:
    """The actions that completed before ``exc`` ended an apply (empty if none)."""
    done = getattr(exc, "done", None)
    return list(done) if isinstance(done, list) else []



def provision_pki(config: FleetConfig, coordinator_hosts: Sequence[str],
                  now: datetime.datetime) -> list[str]:
    """Make the fleet's CA and certificates in its PKI directory (``[tls] dir``) on this
    admin host: one per VM and sandbox host (SANs: its address and name) and one for the
    coordinators (SANs: ``coordinator_hosts``). Idempotent: a certificate is reissued only
    when its SANs changed or it nears expiry. What was made, in words (empty: nothing)."""
    if config.tls.insecure_plaintext:
        return []
    pki = FleetPki(config.pki_dir, config.fleet.name)
    made = [f"fleet CA {pki.ca_file}"] if pki.ensure_ca(now) else []
    for name, sans in node_names(config, coordinator_hosts).items():
        if pki.ensure(name, sans, now):
            made.append(f"certificate {pki.cert_file(name)}")
    return made
