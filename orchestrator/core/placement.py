"""Placement: desired fleet vs observed Ceph/libvirt state → an ordered Plan of actions. Pure.

Invariants every plan keeps (checked by :func:`writers_along`, property-tested):

* **Never two writers.** Every read-write attach comes after every detach of another
  read-write disk of the fleet, so at no prefix of the plan do two domains hold the disk RW.
  A role switch demotes the old writer before it promotes the new one.
* **Convergent and idempotent.** Applying a plan to the state it was made from yields a state
  whose plan is empty; an empty plan means nothing changes.
* **Minimal.** A VM whose disk already has the right mode and user is not touched; adding or
  removing one VM changes only that VM.
* **Errors before actions.** A missing pool (without ``create_pool``), an image of another
  size or an unknown domain raise before any action is planned, so nothing has changed.

A read-write holder in ``Observed.fenced`` (its Ceph clients verifiably blocklisted, e.g. a
paused old writer whose guest has not released the disk yet) cannot write: it does not count
as a writer, is never chosen as the writer, and is detached and re-attached read-only.

The disk is found in domains by its fleet serial; a domain holding it but no longer in the
fleet is detached and its VM user and secret removed, as is a user a fleet VM's disk held
that is no longer its user (a legacy ``rbdfleet-<fleet>-<vm>`` name) once it is re-attached.
Spares are not attached, but a spare that already holds the disk (the coordinator attached
it) keeps it. A created image gets every VM user granted again (caps name the image's id).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from orchestrator.core.disks import AttachedDisk, DiskMode, ImageInfo
from orchestrator.errors import ConfigError, CoordinationError, DomainNotFound

__all__ = [
    "LEGACY_USER_PREFIX",
    "USER_PREFIX",
    "Action",
    "Attach",
    "CreateImage",
    "CreatePool",
    "Desired",
    "DesiredVm",
    "Detach",
    "EnsureCredentials",
    "Observed",
    "Plan",
    "RemoveImage",
    "RemoveSecret",
    "RemoveUser",
    "check_single_writer",
    "fleet_user_prefix",
    "plan_deprovision",
    "plan_provision",
    "plan_set_role",
    "secret_usage",
    "vm_user",
    "writers_along",
]


USER_PREFIX = "rbdfleet."
# The users of the releases before collision-free names (``rbdfleet-<fleet>-<vm>``): still
# observed, so that provision replaces them and removes them.
LEGACY_USER_PREFIX = "rbdfleet-"


def _escape(name: str) -> str:
    # Names may hold ``.`` (the separator below) and ``_`` (the escape): after this, a component
    # has no ``.`` and each ``_`` starts a two-character escape, so the name splits and decodes
    # one way only.
    return name.replace("_", "__").replace(".", "_d")


def fleet_user_prefix(fleet: str) -> str:
    """The prefix of every VM user of ``fleet`` and of no other fleet's."""
    return f"{USER_PREFIX}{_escape(fleet)}."


def vm_user(fleet: str, vm: str) -> str:
    """The cephx id (without ``client.``) of a VM of a fleet: one user per VM, and no two
    (fleet, vm) pairs share one (``a-b``/``c`` and ``a``/``b-c`` do not; nor ``a.b``/``c`` and
    ``a``/``b.c``)."""
    return f"{fleet_user_prefix(fleet)}{_escape(vm)}"


def secret_usage(user: str) -> str:
    """The libvirt ceph secret usage name holding ``client.<user>``'s key."""
    return f"client.{user} secret"


DomainKey = tuple[str, str]  # (uri, domain)


@dataclass(frozen=True)
class DesiredVm:
    """A VM of the fleet as the config wants it."""

    name: str
    uri: str
    domain: str
    user: str
    spare: bool = False

    @property
    def key(self) -> DomainKey:
        return (self.uri, self.domain)


@dataclass(frozen=True)
class Desired:
    """What the config asks for."""

    fleet: str
    pool: str
    image: str
    size: int
    features: int
    create_pool: bool
    serial: str
    writer: str
    vms: tuple[DesiredVm, ...]

    def vm(self, name: str) -> DesiredVm:
        """The VM called ``name``."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise ConfigError("vm", f"fleet {self.fleet!r} has no VM named {name!r}")


@dataclass(frozen=True)
class Observed:
    """What Ceph and libvirt report now.

    ``domains`` maps every domain looked at (the fleet's, and every other domain on the
    fleet's URIs) to whether it is running; ``disks`` maps those holding the fleet's serial
    to that disk. ``users`` and ``secrets`` are the VM users and (uri, usage) secrets that
    exist among those the fleet uses or used.
    """

    pool_exists: bool
    image: ImageInfo | None
    domains: dict[DomainKey, bool]
    disks: dict[DomainKey, AttachedDisk]
    users: frozenset[str] = frozenset()
    secrets: frozenset[tuple[str, str]] = frozenset()
    fenced: frozenset[DomainKey] = frozenset()  # read-write holders proven fenced in Ceph
    # URIs that did not answer (only when the caller tolerates it): nothing is known of
    # their domains, which appear in neither ``domains`` nor ``disks``
    unreachable: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CreatePool:
    pool: str

    def __str__(self) -> str:
        return f"create pool {self.pool} (rbd application)"


@dataclass(frozen=True)
class CreateImage:
    pool: str
    image: str
    size: int
    features: int

    def __str__(self) -> str:
        return f"create image {self.pool}/{self.image} size {self.size} features {self.features:#x}"


@dataclass(frozen=True)
class EnsureCredentials:
    """Create the VM's cephx user (profile rbd on the pool) and its libvirt secret."""

    vm: str
    user: str
    uri: str
    usage: str

    def __str__(self) -> str:
        return f"ensure cephx user client.{self.user} and its secret on {self.uri} ({self.vm})"


@dataclass(frozen=True)
class Detach:
    uri: str
    domain: str
    vm: str | None  # None: a domain that is not (any more) in the fleet
    mode: DiskMode

    def __str__(self) -> str:
        who = self.vm or "not in the fleet"
        return f"detach {self.mode} disk from {self.domain} ({who})"


@dataclass(frozen=True)
class Attach:
    uri: str
    domain: str
    vm: str
    user: str
    usage: str
    mode: DiskMode
    live: bool

    def __str__(self) -> str:
        how = "live+config" if self.live else "config (domain stopped)"
        return f"attach {self.mode} disk to {self.domain} ({self.vm}) as client.{self.user}, {how}"


@dataclass(frozen=True)
class RemoveSecret:
    uri: str
    usage: str

    def __str__(self) -> str:
        return f"remove libvirt secret {self.usage!r} on {self.uri}"


@dataclass(frozen=True)
class RemoveUser:
    user: str

    def __str__(self) -> str:
        return f"remove cephx user client.{self.user}"


@dataclass(frozen=True)
class RemoveImage:
    pool: str
    image: str

    def __str__(self) -> str:
        return f"remove image {self.pool}/{self.image}"


Action = (CreatePool | CreateImage | EnsureCredentials | Detach | Attach | RemoveSecret
          | RemoveUser | RemoveImage)


@dataclass(frozen=True)
class Plan:
    """Actions in the order they must run, plus notes for the operator."""

    actions: tuple[Action, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.actions


def _current_writers(desired: Desired, observed: Observed) -> list[str]:
    """VMs holding the disk read-write whose Ceph clients are not fenced: the live writers."""
    return [vm.name for vm in desired.vms
            if (d := observed.disks.get(vm.key)) is not None and d.mode is DiskMode.RW
            and vm.key not in observed.fenced]


def _check_storage(desired: Desired, observed: Observed) -> list[Action]:
    actions: list[Action] = []
    if not observed.pool_exists:
        if not desired.create_pool:
            raise ConfigError("ceph.pool", f"pool {desired.pool!r} does not exist; create it "
                              "or set ceph.create_pool = true")
        actions.append(CreatePool(desired.pool))
    if observed.image is None:
        actions.append(CreateImage(desired.pool, desired.image, desired.size, desired.features))
    elif observed.image.size != desired.size:
        raise ConfigError("fleet.size", f"image {desired.pool}/{desired.image} exists with "
                          f"{observed.image.size} bytes, the config says {desired.size}; "
                          "rbdfleet never resizes (change fleet.size or fleet.image)")
    return actions


def _check_domains(vms: Iterable[DesiredVm], observed: Observed) -> None:
    for vm in vms:
        if vm.key not in observed.domains:
            raise DomainNotFound(f"vm {vm.name}: no domain {vm.domain!r} on {vm.uri}")


def plan_provision(desired: Desired, observed: Observed, writer: str | None = None, *,
                   read_only: bool = False) -> Plan:
    """The plan that makes ``observed`` what ``desired`` asks for.

    The writer is ``writer`` when given (a role switch), else the one VM of the fleet that
    already holds the disk read-write (so ``provision`` never undoes ``set-role``), else the
    configured writer; with ``read_only`` there is none (a reader's part of a plan). Raises
    ConfigError / DomainNotFound before planning any action.
    """
    actions = _check_storage(desired, observed)
    _check_domains(desired.vms, observed)
    notes: list[str] = []
    holders = _current_writers(desired, observed)
    if read_only:
        writer = None
    elif writer is None:
        if len(holders) == 1:
            writer = holders[0]
            if writer != desired.writer:
                notes.append(f"{writer} is the writer (the config names {desired.writer}; "
                             "use `rbdfleet vm set-role` to move it)")
        elif len(holders) > 1:
            writer = desired.writer if desired.writer in holders else sorted(holders)[0]
            notes.append(f"several writers found ({', '.join(holders)}): keeping {writer}")
        else:
            writer = desired.writer
    if writer is not None:
        desired.vm(writer)  # must be a VM of the fleet

    fleet_keys = {vm.key: vm for vm in desired.vms}
    wanted: dict[DomainKey, DiskMode] = {}
    for vm in desired.vms:
        current = observed.disks.get(vm.key)
        if vm.name == writer:
            wanted[vm.key] = DiskMode.RW
        elif not vm.spare or current is not None:
            wanted[vm.key] = DiskMode.RO

    credentials: list[Action] = []
    detach_rw: list[Action] = []
    detach_other: list[Action] = []
    attach_ro: list[Action] = []
    attach_rw: list[Action] = []
    # a VM user's caps name the image's id: a new image needs every user granted again
    new_image = observed.image is None
    for vm in desired.vms:
        mode = wanted.get(vm.key)
        if mode is None:
            continue
        usage = secret_usage(vm.user)
        current = observed.disks.get(vm.key)
        kept = current is not None and current.mode is mode and current.user == vm.user
        missing = vm.user not in observed.users or (vm.uri, usage) not in observed.secrets
        if new_image or (missing and not kept):
            credentials.append(EnsureCredentials(vm.name, vm.user, vm.uri, usage))
        if kept:
            continue
        if current is not None:
            detach = Detach(vm.uri, vm.domain, vm.name, current.mode)
            (detach_rw if current.mode is DiskMode.RW else detach_other).append(detach)
        attach = Attach(vm.uri, vm.domain, vm.name, vm.user, usage, mode,
                        live=observed.domains[vm.key])
        (attach_rw if mode is DiskMode.RW else attach_ro).append(attach)

    cleanup: list[Action] = []
    fleet_users = {vm.user for vm in desired.vms}
    for key, disk in sorted(observed.disks.items()):
        if key not in fleet_keys:
            detach = Detach(key[0], key[1], None, disk.mode)
            (detach_rw if disk.mode is DiskMode.RW else detach_other).append(detach)
        # a user no VM of the fleet has any more (a removed VM's, or a legacy name the VM's
        # disk was re-attached without): its secret and user go once the disks are moved
        if disk.user and disk.user not in fleet_users:
            if (key[0], secret_usage(disk.user)) in observed.secrets:
                cleanup.append(RemoveSecret(key[0], secret_usage(disk.user)))
            if disk.user in observed.users:
                cleanup.append(RemoveUser(disk.user))

    actions += credentials + detach_rw + detach_other + attach_ro + attach_rw
    actions += _unique(cleanup)
    return Plan(tuple(actions), tuple(notes))


def plan_set_role(desired: Desired, observed: Observed, vm: str, role: str) -> Plan:
    """Move the write ability: ``writer`` demotes the current writer(s), then promotes ``vm``;
    ``reader`` makes ``vm`` read-only and is refused for the writer (that would leave none).

    Only the VMs whose role changes are touched.
    """
    target = desired.vm(vm)
    _check_domains([target], observed)
    if observed.image is None:
        raise ConfigError("fleet.image", f"image {desired.pool}/{desired.image} does not exist; "
                          "run `rbdfleet provision` first")
    holders = _current_writers(desired, observed)
    if role == "writer":
        if holders == [vm]:
            return Plan((), (f"{vm} is already the writer",))
        touched = {vm, *holders}
        full = plan_provision(desired, observed, writer=vm)
    elif role == "reader":
        if vm in holders:
            raise CoordinationError(f"{vm} is the writer: make another VM the writer instead "
                                    f"(rbdfleet vm set-role {desired.fleet} OTHER writer)")
        current = observed.disks.get(target.key)
        if current is not None and current.mode is DiskMode.RO and current.user == target.user:
            return Plan((), (f"{vm} is already a reader",))
        touched = {vm}
        unspared = replace(desired, vms=tuple(replace(v, spare=False) if v.name == vm else v
                                              for v in desired.vms))
        # only ``vm``'s actions are kept: planned with no writer, it is never given the
        # read-write disk (the configured writer would be, when no holder is seen)
        full = plan_provision(unspared, observed, read_only=True)
    else:
        raise ConfigError("role", f"{role!r}: expected writer or reader")
    actions = tuple(a for a in full.actions
                    if isinstance(a, EnsureCredentials | Detach | Attach) and a.vm in touched)
    return Plan(actions, ())


def plan_deprovision(desired: Desired, observed: Observed, delete_image: bool) -> Plan:
    """Detach the disk everywhere (read-write first); with ``delete_image`` also remove the
    secrets, the VM users and the image."""
    fleet_names = {vm.key: vm.name for vm in desired.vms}
    ordered = sorted(observed.disks.items(), key=lambda kv: (kv[1].mode is not DiskMode.RW, kv[0]))
    actions: list[Action] = [Detach(key[0], key[1], fleet_names.get(key), disk.mode)
                             for key, disk in ordered]
    if delete_image:
        users = {vm.user: vm.uri for vm in desired.vms}
        for key, disk in ordered:
            if disk.user:
                users.setdefault(disk.user, key[0])
        cleanup: list[Action] = []
        for user, uri in sorted(users.items()):
            if (uri, secret_usage(user)) in observed.secrets:
                cleanup.append(RemoveSecret(uri, secret_usage(user)))
            if user in observed.users:
                cleanup.append(RemoveUser(user))
        actions += _unique(cleanup)
        if observed.image is not None:
            actions.append(RemoveImage(desired.pool, desired.image))
    return Plan(tuple(actions), ())


def _unique(actions: list[Action]) -> list[Action]:
    seen: set[Action] = set()
    result = []
    for action in actions:
        if action not in seen:
            seen.add(action)
            result.append(action)
    return result


def writers_along(observed: Observed, plan: Plan) -> list[int]:
    """How many domains hold the disk read-write, fenced holders aside, after each prefix of
    ``plan`` (index 0: before any action). Used to refuse any plan that would ever show two
    writers."""
    rw = {key for key, disk in observed.disks.items()
          if disk.mode is DiskMode.RW and key not in observed.fenced}
    counts = [len(rw)]
    for action in plan.actions:
        if isinstance(action, Detach):
            rw.discard((action.uri, action.domain))
        elif isinstance(action, Attach) and action.mode is DiskMode.RW:
            rw.add((action.uri, action.domain))
        counts.append(len(rw))
    return counts


def check_single_writer(observed: Observed, plan: Plan) -> None:
    """Raise CoordinationError when some step of ``plan`` adds a second writer."""
    counts = writers_along(observed, plan)
    for step, (before, after) in enumerate(itertools.pairwise(counts), start=1):
        if after > 1 and after > before:
            raise CoordinationError(f"refused: step {step} ({plan.actions[step - 1]}) would "
                                    "leave two VMs with the disk read-write")
