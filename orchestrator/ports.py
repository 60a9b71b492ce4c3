"""The orchestrator's ports: what the use cases need from Ceph, libvirt, the clock...

Ports are :class:`typing.Protocol` classes injected by constructor; adapters live in
``orchestrator/adapters`` (one binding per module) and fakes in ``orchestrator/testing/fakes.py``;
``orchestrator/testing/contracts.py`` states each port's guarantees as checks that
``tests/contract`` runs against both (docs/architecture.md, "Ports and their contracts").
Values crossing a port are frozen dataclasses of plain types, never binding objects.
Others add their ports here additively (StateStore, RemoteShell, AgentClient...).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from orchestrator.core.disks import AttachedDisk, DiskMode, ImageInfo
from orchestrator.errors import AdapterChosenPoorly

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from agents.core.protocol import DemoteRequest, Health, PromoteRequest, ReaderSet
    from orchestrator.core.clients import ClientCredential
    from orchestrator.core.fleetmap import FleetMap
    from orchestrator.core.remote import RemoteCommand, RemoteResult, SshHost

__all__ = [
    "AgentControl",
    "AttachedDisk",
    "Characteristics",
    "ClientSession",
    "ClientStore",
    "Clock",
    "CoordinatorPorts",
    "CredentialStore",
    "DiskMode",
    "DiskSpec",
    "DomainEvent",
    "DomainInfo",
    "DomainState",
    "FenceProof",
    "FencedReaderRecord",
    "Fencer",
    "Hypervisor",
    "ImageInfo",
    "ImageStore",
    "MonHost",
    "RemoteShell",
    "RoleSwitch",
    "SecretKey",
    "SpareProvisioner",
    "StateStore",
    "Watcher",
    "require",
]


class Characteristics(enum.Flag):
    """Guarantees beyond the Protocol an adapter declares as its class's ``CHARACTERISTICS``.

    Each declared flag is checked against the adapter by its contract suite
    (``orchestrator.testing.contracts``), and a fake declares exactly what its adapter does.
    A use case that relies on one refuses an adapter lacking it with :func:`require` when it
    is given one (``Provisioner`` for its FenceProof).
    """

    NONE = 0
    FENCES_BY_CLIENT_ADDRESS = enum.auto()  # fence() cuts exactly one VM's librados clients
    WAITS_FOR_OSDMAP = enum.auto()  # fence()/is_fenced() answer only once OSDs enforce it
    HOT_PLUG = enum.auto()  # disks attach to / detach from running domains
    PRIVATE_SECRETS = enum.auto()  # secret values cannot be read back from the hypervisor


def require(adapter: object, needed: Characteristics, role: str) -> None:
    """Refuse ``adapter`` for ``role`` unless it declares every flag of ``needed``
    (AdapterChosenPoorly naming the missing ones), as tooz refuses a poorly chosen driver."""
    declared = getattr(adapter, "CHARACTERISTICS", Characteristics.NONE)
    missing = needed & ~declared if isinstance(declared, Characteristics) else needed
    if missing:
        names = ", ".join(flag.name or "?" for flag in missing)
        raise AdapterChosenPoorly(f"{type(adapter).__name__} cannot serve as {role}: it does "
                                  f"not declare {names}")


class SecretKey:
    """A cephx key (raw bytes). Its repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        """The raw key, for the one call that must hand it over (libvirt secret value)."""
        return self._value

    def __repr__(self) -> str:
        return "SecretKey(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Watcher:
    """A client watching the image header: one per open librbd handle (one per attach)."""

    addr: str  # "ip:port/nonce", the unit the OSD blocklist takes
    global_id: int  # the N of client.N


@dataclass(frozen=True)
class ClientSession:
    """A mon session: maps a client's global id to its cephx entity."""

    global_id: int
    entity: str  # e.g. "client.rbdfleet-demo-vm1"
    addr: str


@dataclass(frozen=True)
class MonHost:
    """A monitor address QEMU connects to."""

    host: str
    port: int


@dataclass(frozen=True)
class DiskSpec:
    """The shared RBD disk as one VM should see it."""

    pool: str
    image: str
    serial: str  # unique to the fleet; the guest finds the disk by it
    user: str  # cephx id without "client.", the VM's own user
    secret_uuid: str  # libvirt secret holding that user's key
    mon_hosts: tuple[MonHost, ...]
    mode: DiskMode
    target: str = "vdz"  # only a hint: the guest names disks by probe order


@dataclass(frozen=True)
class DomainInfo:
    """A libvirt domain as the provisioner needs it."""

    uri: str
    name: str
    active: bool
    disks: tuple[AttachedDisk, ...]


class DomainState(enum.StrEnum):
    """A domain's run state as a lifecycle event reports it (what the coordinator needs)."""

    RUNNING = "running"  # started or resumed
    PAUSED = "paused"  # suspended: its guest runs no code, its agent answers nobody
    STOPPED = "stopped"  # shut off (destroyed, shut down, saved, failed to start)
    CRASHED = "crashed"  # the guest panicked or QEMU died


@dataclass(frozen=True)
class DomainEvent:
    """A lifecycle change of domain ``domain`` on ``uri``; ``detail``: the hypervisor's own
    word for it (for logs, e.g. ``destroyed``)."""

    uri: str
    domain: str
    state: DomainState
    detail: str = ""


class ImageStore(Protocol):
    """RBD pools and images."""

    def pool_exists(self, pool: str) -> bool:
        """True when ``pool`` exists."""
        ...

    def create_pool(self, pool: str) -> None:
        """Create ``pool`` with the rbd application enabled and initialised."""
        ...

    def image_info(self, pool: str, name: str) -> ImageInfo | None:
        """The image, or None when it does not exist."""
        ...

    def create_image(self, pool: str, name: str, size: int, features: int) -> None:
        """Create the image; ImageExists when the name is taken."""
        ...

    def remove_image(self, pool: str, name: str) -> None:
        """Remove the image; ImageBusy while it has watchers, ImageNotFound when absent."""
        ...

    def watchers(self, pool: str, name: str) -> list[Watcher]:
        """Every client watching the image header."""
        ...


class CredentialStore(Protocol):
    """Cephx users, one per VM, and the mon sessions that tie clients to them."""

    def list_users(self, prefix: str) -> list[str]:
        """Entity names (``client.<id>``) whose id starts with ``prefix``."""
        ...

    def ensure_user(self, user: str, pool: str, image: str) -> SecretKey:
        """Create ``client.<user>`` with caps on the one image ``pool/image`` (or fix its caps
        when they name an image that is gone); StorageError when the user holds another
        existing image (another fleet's user) or caps rbdfleet did not make."""
        ...

    def remove_user(self, user: str) -> None:
        """Delete ``client.<user>``; absent is fine."""
        ...

    def sessions(self) -> list[ClientSession]:
        """Client sessions of every monitor."""
        ...

    def mon_hosts(self) -> tuple[MonHost, ...]:
        """The monitors' msgr2 addresses, as QEMU should be told."""
        ...


class Fencer(Protocol):
    """Cuts a VM off the shared image."""

    def fence(self, vm: str) -> list[str]:
        """Blocklist exactly ``vm``'s client addresses on the image and wait until the OSDs
        enforce it; returns the addresses (empty when the VM has no client on the image)."""
        ...


class FenceProof(Protocol):
    """Tells whether a VM is verifiably cut off the shared image (its clients blocklisted)."""

    def is_fenced(self, vm: str) -> bool:
        """True only when every Ceph client of ``vm`` on the image is on the OSD blocklist and
        the OSDs enforce it (latest osdmap waited for)."""
        ...


class Hypervisor(Protocol):
    """Domains, ceph secrets and hot-plugged disks, across libvirt connections (by URI)."""

    def domain(self, uri: str, name: str) -> DomainInfo:
        """The domain and its RBD disks; DomainNotFound when it is not defined."""
        ...

    def domains(self, uri: str) -> list[DomainInfo]:
        """Every domain defined on ``uri``, with its RBD disks."""
        ...

    def secret_uuid(self, uri: str, usage: str) -> str | None:
        """UUID of the ceph secret with this usage name, or None."""
        ...

    def ensure_secret(self, uri: str, usage: str, key: SecretKey) -> str:
        """Define (or update) a private ceph secret; returns its UUID."""
        ...

    def remove_secret(self, uri: str, usage: str) -> None:
        """Undefine the ceph secret; absent is fine."""
        ...

    def attach_disk(self, uri: str, domain: str, disk: DiskSpec) -> None:
        """Attach: LIVE|CONFIG on a running domain, CONFIG on a stopped one."""
        ...

    def detach_disk(self, uri: str, domain: str, serial: str,
                    live_timeout: float | None = None) -> None:
        """Detach the disk with ``serial``: from the persistent config at once, then from the
        running domain, waiting until it is gone (at most ``live_timeout`` seconds, None: the
        adapter's default). DetachPending when the guest has not released it by then (or is
        paused, so cannot): the config no longer has it, the live domain still does."""
        ...

    def watch_domains(self, uri: str, on_event: Callable[[DomainEvent], None], *,
                      keep_trying: bool = False) -> Callable[[], None]:
        """Call ``on_event`` for every lifecycle change of any domain on ``uri`` from now on
        (paused, resumed, started, shut off, crashed), possibly from another thread, in the
        order the hypervisor reports them; returns the function that ends the watch. Events
        that map to no :class:`DomainState` (defined, undefined...) are not delivered. A
        hypervisor that does not answer is HypervisorUnreachable, or, with ``keep_trying``,
        watched from when it first answers."""
        ...


class Clock(Protocol):
    """Time as an input: real in the shell, fake in tests."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going back."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


# -- coordinator ports (engineer G) -------------------------------------------------------


class FencedReaderRecord(Protocol):
    """The readers the coordinator fenced because their hypervisor stopped answering, kept
    across coordinator takeovers (they need a fresh read-only attach once it answers)."""

    def fenced_readers(self) -> frozenset[str]:
        """The recorded VM names (empty when none)."""
        ...

    def record_fenced_readers(self, names: frozenset[str]) -> None:
        """Replace the record (guarded like every state write: LeaseLost when not held)."""
        ...


class StateStore(FencedReaderRecord, Protocol):
    """One fleet's coordinator state, kept behind a lease: one active coordinator per fleet.

    Every write is guarded: it succeeds only while the caller holds the lease AND the stored
    revision is the one the caller expects; otherwise nothing is written (LeaseLost /
    StaleMap). ``acquire`` takes or renews the lease for ``lease_seconds`` (exact).
    """

    fleet: str
    lease_seconds: float

    def acquire(self) -> bool:
        """Take or renew the lease; False when another holder has it. Never blocks."""
        ...

    def release(self) -> None:
        """Give the lease up (a no-op when not held)."""
        ...

    def load(self) -> FleetMap | None:
        """The stored map, or None for a fleet never stored."""
        ...

    def save(self, new: FleetMap, expected_revision: int | None) -> None:
        """Guarded write of ``new`` (``expected_revision`` None: the fleet must not exist yet)."""
        ...

    def advertise(self, url: str) -> None:
        """Guarded write of the active coordinator's URL (clients and standbys read it)."""
        ...

    def coordinator_url(self) -> str | None:
        """The URL last advertised by an active coordinator, or None."""
        ...


class ClientStore(Protocol):
    """One fleet's client credentials, kept next to its coordinator state. Written by the
    operator's ``rbdfleet client`` commands, read by the coordinator on client requests."""

    fleet: str

    def get(self, name: str) -> ClientCredential | None:
        """The credential named ``name``, or None."""
        ...

    def list(self) -> list[ClientCredential]:
        """Every credential, by name."""
        ...

    def put(self, credential: ClientCredential) -> None:
        """Create or replace the credential of ``credential.name``."""
        ...

    def remove(self, name: str) -> bool:
        """Delete ``name``; False when there was none."""
        ...


class AgentControl(Protocol):
    """The coordinator's calls to an agent (HTTP /v1 in production)."""

    def health(self, address: str, timeout: float) -> Health:
        """The agent's role, epoch, applied seq and self-test; AgentUnreachable on failure."""
        ...

    def promote(self, address: str, request: PromoteRequest, grant: str) -> None:
        """Make the agent the writer at ``request.epoch`` (it replays, then accepts writes)."""
        ...

    def demote(self, address: str, request: DemoteRequest, grant: str) -> None:
        """Make the agent stop writing at once."""
        ...


class RoleSwitch(Protocol):
    """The hypervisor side of a promotion: the new writer's disk becomes read-write."""

    def make_writer(self, node: str) -> None:
        """Re-attach ``node``'s shared disk read-write (readers keep ``<readonly/>``)."""
        ...

    def make_reader(self, node: str) -> None:
        """Re-attach ``node``'s shared disk ``<readonly/>`` (a demoted, fenced old writer)."""
        ...


class SpareProvisioner(Protocol):
    """Brings a spare VM into the fleet as a reader."""

    def attach_spare(self, node: str) -> None:
        """Attach the image read-only to ``node`` and start its agent; returns once started."""
        ...


@dataclass(frozen=True)
class CoordinatorPorts:
    """Everything one fleet's coordinator acts through, given to ``FleetService`` and
    ``Executor`` as one value (``orchestrator.services`` builds the production one).

    ``wall`` is the wall clock grants are dated by (``time.time``); ``send_reader_set``
    tells the writer its new reader set (``HttpAgentControl.send_reader_set``; None: the
    writer is never told). Without ``role_switch`` a promotion touches no disk (file and
    loop-device fleets); without ``spares`` no spare is brought in; without ``hypervisor``
    deaths are detected by probes and silence only.
    """

    store: StateStore
    fencer: Fencer
    agents: AgentControl
    clock: Clock
    wall: Callable[[], float]
    role_switch: RoleSwitch | None = None
    spares: SpareProvisioner | None = None
    send_reader_set: Callable[[str, ReaderSet, str], None] | None = None
    hypervisor: Hypervisor | None = None


# -- remote hosts (engineer C) ---------------------------------------------------------------


class RemoteShell(Protocol):
    """Commands and files on a host (SSH in production: ``adapters.ssh.ParamikoShell``).

    Errors: HostUnreachable (incl. a command past its deadline), HostKeyMismatch,
    UnsafeTarget, RemoteCommandFailed(rc) — all RemoteError(host).
    """

    def run(self, host: SshHost, cmd: RemoteCommand, timeout: float = 30.0, *,
            check: bool = False, stdin: bytes | None = None) -> RemoteResult:
        """Run ``cmd``; ``check``: a non-zero exit raises RemoteCommandFailed."""
        ...

    def put_file(self, host: SshHost, source: Path | bytes, remote_path: str,
                 mode: int = 0o644, timeout: float = 60.0) -> None:
        """Write a file atomically (temp name, chmod, rename); the parent must exist."""
        ...

    def start_background(self, host: SshHost, cmd: RemoteCommand, *, workdir: str,
                         log_path: str, env: Mapping[str, str] | None = None,
                         timeout: float = 30.0) -> int:
        """Start ``cmd`` detached from the session; return its (host-local) pid."""
        ...
