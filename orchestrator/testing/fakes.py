"""Shipped fakes, one per port of :mod:`orchestrator.ports`.

Each keeps the guarantees of its real adapter and declares the same ``CHARACTERISTICS``: they
pass the same checks (:mod:`orchestrator.testing.contracts`, run in ``tests/contract``).

* :class:`FakeClock` (Clock): time that moves only when told.
* :class:`MemoryStateStore` (StateStore): instances sharing one :class:`MemoryLeaseBoard`
  behave like coordinators sharing one RADOS pool, with exact lease durations on its clock.
* :class:`MemoryFencedReaderRecord` (FencedReaderRecord): the record alone, no lease, for a
  role switch tested without a coordinator.
* :class:`MemoryCeph`: one in-memory cluster behind :class:`MemoryImageStore` (ImageStore),
  :class:`MemoryCredentialStore` (CredentialStore) and :class:`MemoryFencer` (Fencer and
  FenceProof); :meth:`MemoryCeph.client` is a VM's client of an image, which fencing cuts.
* :class:`MemoryHypervisor` (Hypervisor): domains, private secrets, disks by serial.
* :class:`LocalShell` (RemoteShell): every host is this machine, commands run locally.
* :class:`MemoryAgents` (AgentControl): agents that check control grants like the real ones.
* :class:`MemoryRoles` (RoleSwitch, SpareProvisioner): how each node holds the shared disk.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agents.core import roles
from agents.core.grants import agent_key, verify
from agents.core.protocol import DemoteRequest, Health, PromoteRequest
from agents.errors import ForeignGrant
from orchestrator.adapters.ceph import client_addresses, granted_image, vm_user_caps
from orchestrator.core.fleetmap import FleetMap
from orchestrator.core.remote import (
    RemoteCommand,
    RemoteResult,
    SshHost,
    command_result,
    start_detached,
)
from orchestrator.errors import (
    AgentUnreachable,
    CoordinationError,
    DetachPending,
    DeviceAttachError,
    DomainNotFound,
    HostUnreachable,
    HypervisorUnreachable,
    ImageBusy,
    ImageExists,
    ImageNotFound,
    LeaseLost,
    RemoteCommandFailed,
    StaleMap,
    StorageError,
)
from orchestrator.ports import (
    AttachedDisk,
    Characteristics,
    ClientSession,
    DiskMode,
    DiskSpec,
    DomainEvent,
    DomainInfo,
    DomainState,
    ImageInfo,
    MonHost,
    SecretKey,
    Watcher,
)


class FakeClock:
    """Monotonic time that only moves when told; ``sleep`` moves it (kazoo's ``forward``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        """Current fake time."""
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` at once."""
        self.forward(seconds)

    def forward(self, seconds: float) -> None:
        """Advance by ``seconds`` (never backwards)."""
        if seconds < 0:
            raise ValueError("time does not go back")
        with self._lock:
            self._now += seconds


@dataclass
class _Record:
    map_bytes: bytes | None = None
    revision: int | None = None
    url: str | None = None
    holder: str | None = None
    expires: float = 0.0
    fenced_readers: frozenset[str] = frozenset()


class MemoryLeaseBoard:
    """The shared 'pool' of several MemoryStateStores: one record per fleet, one lock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self._records: dict[str, _Record] = {}

    def record(self, fleet: str) -> _Record:
        """The fleet's record (created empty); callers hold ``lock``."""
        return self._records.setdefault(fleet, _Record())


class MemoryStateStore:
    """StateStore in memory: lease with exact duration on a FakeClock, guarded writes."""

    def __init__(
        self, board: MemoryLeaseBoard, fleet: str, holder: str, lease_seconds: float = 2.0
    ) -> None:
        self.board = board
        self.fleet = fleet
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._held = False

    def _holds(self, rec: _Record) -> bool:
        return rec.holder == self.holder and self.board.clock.monotonic() < rec.expires

    def acquire(self) -> bool:
        """Take the lease when free or expired; renew it when held (LeaseLost if it ran out)."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            now = self.board.clock.monotonic()
            if self._held and not self._holds(rec):
                self._held = False
                raise LeaseLost(f"fleet {self.fleet}: lease lost")
            if rec.holder not in (None, self.holder) and now < rec.expires:
                return False
            rec.holder = self.holder
            rec.expires = now + self.lease_seconds
            self._held = True
            return True

    def release(self) -> None:
        """Drop the lease if we hold it."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            self._held = False
            if rec.holder == self.holder:
                rec.holder = None
                rec.expires = 0.0

    def load(self) -> FleetMap | None:
        """The stored map."""
        with self.board.lock:
            raw = self.board.record(self.fleet).map_bytes
        return None if raw is None else FleetMap.decode(raw)

    def save(self, new: FleetMap, expected_revision: int | None) -> None:
        """Guarded write: lease held and stored revision == expected, else nothing changes."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            if not self._holds(rec):
                self._held = False
                raise LeaseLost(f"fleet {self.fleet}: {self.holder} does not hold the lease")
            if rec.revision != expected_revision:
                raise StaleMap(
                    f"fleet {self.fleet}: stored revision {rec.revision}, "
                    f"expected {expected_revision}",
                    expected=expected_revision,
                    found=rec.revision,
                )
            rec.map_bytes = new.encode()
            rec.revision = new.revision

    def advertise(self, url: str) -> None:
        """Guarded write of the coordinator URL."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            if not self._holds(rec):
                raise LeaseLost(f"fleet {self.fleet}: {self.holder} does not hold the lease")
            rec.url = url

    def coordinator_url(self) -> str | None:
        """The advertised URL."""
        with self.board.lock:
            return self.board.record(self.fleet).url

    def fenced_readers(self) -> frozenset[str]:
        """The recorded fenced readers."""
        with self.board.lock:
            return self.board.record(self.fleet).fenced_readers

    def record_fenced_readers(self, names: frozenset[str]) -> None:
        """Guarded write of the fenced readers."""
        with self.board.lock:
            rec = self.board.record(self.fleet)
            if not self._holds(rec):
                raise LeaseLost(f"fleet {self.fleet}: {self.holder} does not hold the lease")
            rec.fenced_readers = frozenset(names)


# -- Ceph: images, users, sessions, the blocklist ---------------------------------------------


class MemoryFencedReaderRecord:
    """FencedReaderRecord in memory, without a lease (a MemoryStateStore keeps one behind
    its lease)."""

    def __init__(self) -> None:
        self.names: frozenset[str] = frozenset()

    def fenced_readers(self) -> frozenset[str]:
        """The recorded names."""
        return self.names

    def record_fenced_readers(self, names: frozenset[str]) -> None:
        """Replace the record."""
        self.names = frozenset(names)


@dataclass
class _User:
    key: SecretKey
    caps: dict[str, str]


class MemoryCeph:
    """One in-memory cluster: pools, images, cephx users, mon sessions and the blocklist.

    ``client.admin`` exists from the start. Every client gets a fresh global id and address,
    as librados does per connection.
    """

    def __init__(self, pools: Iterable[str] = ("rbd",),
                 mon_hosts: tuple[MonHost, ...] = (MonHost("127.0.0.1", 3300),)) -> None:
        self.lock = threading.RLock()
        self.pools = set(pools)
        self.images: dict[tuple[str, str], ImageInfo] = {}
        self.image_ids: dict[tuple[str, str], str] = {}
        self.watches: dict[tuple[str, str], list[Watcher]] = {}
        self.users: dict[str, _User] = {"admin": _User(SecretKey(secrets.token_bytes(16)), {})}
        self.sessions: list[ClientSession] = []
        self.blocklist: set[str] = set()
        self.mon_hosts = mon_hosts
        self._ids = itertools.count(4100)

    @contextlib.contextmanager
    def session(self, user: str, key: SecretKey | None = None) -> Iterator[ClientSession]:
        """A mon session as ``client.<user>`` (its key checked when given) while the block runs."""
        with self.lock:
            known = self.users.get(user)
            if known is None or (key is not None and key != known.key):
                raise StorageError(f"connect as client.{user}: permission denied")
            gid = next(self._ids)
            session = ClientSession(gid, f"client.{user}", f"127.0.0.1:0/{gid}")
            self.sessions.append(session)
        try:
            yield session
        finally:
            with self.lock:
                self.sessions.remove(session)

    @contextlib.contextmanager
    def client(self, user: str, pool: str, image: str) -> Iterator[MemoryImageClient]:
        """``client.<user>`` with ``pool/image`` open (a watcher) while the block runs."""
        with self.session(user) as session:
            with self.lock:
                if (pool, image) not in self.images:
                    raise ImageNotFound(f"open image {pool}/{image}: image not found")
                watch = Watcher(session.addr, session.global_id)
                self.watches.setdefault((pool, image), []).append(watch)
            try:
                yield MemoryImageClient(self, watch)
            finally:
                with self.lock:
                    self.watches[(pool, image)].remove(watch)


@dataclass
class MemoryImageClient:
    """A VM's open image: its writes are refused once its address is blocklisted."""

    ceph: MemoryCeph
    watch: Watcher

    def write(self) -> bool:
        """True unless the client is blocklisted (librbd then fails with ESHUTDOWN)."""
        with self.ceph.lock:
            return self.watch.addr not in self.ceph.blocklist


class MemoryImageStore:
    """ImageStore over a :class:`MemoryCeph`."""

    CHARACTERISTICS = Characteristics.NONE

    def __init__(self, ceph: MemoryCeph) -> None:
        self.ceph = ceph

    def pool_exists(self, pool: str) -> bool:
        """True when ``pool`` exists."""
        with self.ceph.lock:
            return pool in self.ceph.pools

    def create_pool(self, pool: str) -> None:
        """Create ``pool``."""
        with self.ceph.lock:
            self.ceph.pools.add(pool)

    def _pool(self, pool: str) -> None:
        if pool not in self.ceph.pools:
            raise StorageError(f"open pool {pool}: not found")

    def image_info(self, pool: str, name: str) -> ImageInfo | None:
        """The image, or None."""
        with self.ceph.lock:
            self._pool(pool)
            return self.ceph.images.get((pool, name))

    def create_image(self, pool: str, name: str, size: int, features: int) -> None:
        """Create the image; ImageExists when the name is taken."""
        with self.ceph.lock:
            self._pool(pool)
            if (pool, name) in self.ceph.images:
                raise ImageExists(f"create image {pool}/{name}: image exists")
            self.ceph.images[(pool, name)] = ImageInfo(pool, name, size, features)
            self.ceph.image_ids[(pool, name)] = secrets.token_hex(6)

    def remove_image(self, pool: str, name: str) -> None:
        """Remove the image; ImageBusy while watched, ImageNotFound when absent."""
        with self.ceph.lock:
            self._pool(pool)
            if (pool, name) not in self.ceph.images:
                raise ImageNotFound(f"remove image {pool}/{name}: image not found")
            if self.ceph.watches.get((pool, name)):
                raise ImageBusy(f"remove image {pool}/{name}: image busy")
            del self.ceph.images[(pool, name)]
            del self.ceph.image_ids[(pool, name)]

    def watchers(self, pool: str, name: str) -> list[Watcher]:
        """The image's watchers, one per open client."""
        with self.ceph.lock:
            if (pool, name) not in self.ceph.images:
                raise ImageNotFound(f"list watchers of {pool}/{name}: image not found")
            return list(self.ceph.watches.get((pool, name), []))


class MemoryCredentialStore:
    """CredentialStore over a :class:`MemoryCeph`: users with a random key and the VM caps."""

    def __init__(self, ceph: MemoryCeph) -> None:
        self.ceph = ceph

    def list_users(self, prefix: str) -> list[str]:
        """``client.<id>`` for ids starting with ``prefix``."""
        with self.ceph.lock:
            return sorted(f"client.{u}" for u in self.ceph.users if u.startswith(prefix))

    def ensure_user(self, user: str, pool: str, image: str) -> SecretKey:
        """Create the user with caps on ``pool/image`` (its key never changes); an existing
        user's caps are rewritten only when the image they name is gone, as in Ceph."""
        with self.ceph.lock:
            image_id = self.ceph.image_ids.get((pool, image))
            if image_id is None:
                raise ImageNotFound(f"grant {pool}/{image}: image not found")
            caps = vm_user_caps(pool, image, image_id)
            known = self.ceph.users.get(user)
            if known is None:
                known = self.ceph.users[user] = _User(SecretKey(secrets.token_bytes(16)), caps)
            elif known.caps != caps:
                granted = granted_image(known.caps)
                if granted is None:
                    raise StorageError(f"client.{user} exists with caps rbdfleet did not make")
                if granted[1] in {i for (p, _), i in self.ceph.image_ids.items()
                                  if p == granted[0]}:
                    raise StorageError(f"client.{user} holds image id {granted[1]} in pool "
                                       f"{granted[0]}, which exists: another fleet's")
                known.caps = caps
            return known.key

    def caps(self, user: str) -> dict[str, str]:
        """The user's caps (what ``ceph auth get`` would show)."""
        with self.ceph.lock:
            return dict(self.ceph.users[user].caps)

    def remove_user(self, user: str) -> None:
        """Delete the user; absent is fine."""
        with self.ceph.lock:
            self.ceph.users.pop(user, None)

    def sessions(self) -> list[ClientSession]:
        """Every client session."""
        with self.ceph.lock:
            return list(self.ceph.sessions)

    def mon_hosts(self) -> tuple[MonHost, ...]:
        """The configured monitors."""
        return self.ceph.mon_hosts


class MemoryFencer:
    """Fencer and FenceProof over a :class:`MemoryCeph`, as ``adapters.ceph.BlocklistFencer``:
    a VM's clients are the image's watchers with a session of the VM's own user."""

    CHARACTERISTICS = Characteristics.FENCES_BY_CLIENT_ADDRESS | Characteristics.WAITS_FOR_OSDMAP

    def __init__(self, ceph: MemoryCeph, pool: str, image: str, users: Mapping[str, str]) -> None:
        self.ceph = ceph
        self.pool = pool
        self.image = image
        self.users = dict(users)
        self.fenced: list[str] = []  # VM names, in order

    def _user(self, vm: str) -> str:
        try:
            return self.users[vm]
        except KeyError:
            raise StorageError(f"fence {vm}: not a VM of this fleet") from None

    def fence(self, vm: str) -> list[str]:
        """Blocklist the VM's client addresses (enforced at once: one 'OSD')."""
        user = self._user(vm)
        with self.ceph.lock:
            watchers = self.ceph.watches.get((self.pool, self.image), [])
            addresses = client_addresses(watchers, self.ceph.sessions, user)
            self.ceph.blocklist.update(addresses)
            self.fenced.append(vm)
        return addresses

    def is_fenced(self, vm: str) -> bool:
        """Every session of the VM's user is blocklisted (no session: nothing can write)."""
        entity = f"client.{self._user(vm)}"
        with self.ceph.lock:
            return all(s.addr in self.ceph.blocklist
                       for s in self.ceph.sessions if s.entity == entity)


# -- libvirt ------------------------------------------------------------------------------------


class MemoryHypervisor:
    """Hypervisor in memory: domains by (uri, name), private ceph secrets, disks by serial.

    Test hooks: ``failing_domain`` refuses attaches; a domain in ``paused`` cannot release a
    disk (DetachPending, the disk stays); ``calls``, ``timeouts`` and ``specs`` record what
    was asked. :meth:`suspend`, :meth:`resume`, :meth:`destroy` and :meth:`start` change a
    domain's run state as ``virsh`` would and tell the watchers (from the caller's thread).
    ``refuse_detach[domain] = n`` makes the next ``n`` detaches from that domain fail
    (HypervisorError, the disk stays) and ``detach_gate[domain]`` holds every detach from it
    until the event is set (a guest slow to release its disk). A URI in ``unreachable``
    answers nothing (HypervisorUnreachable), as a lost hypervisor host.
    """

    CHARACTERISTICS = Characteristics.HOT_PLUG | Characteristics.PRIVATE_SECRETS

    def __init__(self, failing_domain: str | None = None) -> None:
        self.active: dict[tuple[str, str], bool] = {}
        self.disks: dict[tuple[str, str], list[AttachedDisk]] = {}
        self.secrets: dict[tuple[str, str], tuple[str, SecretKey]] = {}
        self.failing_domain = failing_domain
        self.paused: set[str] = set()
        self.calls: list[str] = []
        self.timeouts: list[float | None] = []
        self.specs: list[DiskSpec] = []
        self.refuse_detach: dict[str, int] = {}
        self.detach_gate: dict[str, threading.Event] = {}
        self.unreachable: set[str] = set()
        self._lock = threading.Lock()
        self._watchers: dict[int, tuple[str, Callable[[DomainEvent], None]]] = {}
        self._watch_ids = itertools.count()

    def define(self, uri: str, name: str, active: bool = False) -> None:
        """Define a domain (running when ``active``)."""
        self.active[(uri, name)] = active
        self.disks[(uri, name)] = []

    def _reach(self, uri: str) -> None:
        if uri in self.unreachable:
            raise HypervisorUnreachable(uri, "no answer (the fake's lost host)")

    def _key(self, uri: str, name: str) -> tuple[str, str]:
        self._reach(uri)
        if (uri, name) not in self.active:
            raise DomainNotFound(f"look up domain {name} on {uri}: no domain named {name!r}")
        return (uri, name)

    def domain(self, uri: str, name: str) -> DomainInfo:
        """The domain and its disks."""
        key = self._key(uri, name)
        return DomainInfo(uri, name, self.active[key], tuple(self.disks[key]))

    def domains(self, uri: str) -> list[DomainInfo]:
        """Every domain on ``uri``."""
        self._reach(uri)
        return [self.domain(u, n) for u, n in sorted(self.active) if u == uri]

    def secret_uuid(self, uri: str, usage: str) -> str | None:
        """The secret's UUID, or None."""
        self._reach(uri)
        found = self.secrets.get((uri, usage))
        return None if found is None else found[0]

    def read_secret(self, uri: str, uuid_: str) -> bytes | None:
        """What reading a secret's value back gives: nothing, they are private."""
        return None

    def ensure_secret(self, uri: str, usage: str, key: SecretKey) -> str:
        """Define (or update) the secret; its UUID never changes."""
        uuid_ = self.secret_uuid(uri, usage) or str(uuid.uuid4())
        self.secrets[(uri, usage)] = (uuid_, key)
        return uuid_

    def remove_secret(self, uri: str, usage: str) -> None:
        """Undefine the secret; absent is fine."""
        self.secrets.pop((uri, usage), None)

    def attach_disk(self, uri: str, domain: str, disk: DiskSpec) -> None:
        """Attach (live and config alike here)."""
        key = self._key(uri, domain)
        if domain == self.failing_domain:
            raise DeviceAttachError(f"attach {disk.serial} to {domain}: refused")
        self.calls.append(f"attach {domain} {disk.mode}")
        self.specs.append(disk)
        used = {d.target for d in self.disks[key]}
        target = next(f"vd{c}" for c in "zyxwvutsrqponmlkjihgfedcb" if f"vd{c}" not in used)
        self.disks[key].append(AttachedDisk(disk.serial, disk.pool, disk.image, disk.user,
                                            disk.mode, target))

    def detach_disk(self, uri: str, domain: str, serial: str,
                    live_timeout: float | None = None) -> None:
        """Detach by serial (absent is fine); a paused domain: DetachPending."""
        key = self._key(uri, domain)
        self.calls.append(f"detach {domain}")
        self.timeouts.append(live_timeout)
        gate = self.detach_gate.get(domain)
        if gate is not None:
            gate.wait()
        held = any(d.serial == serial for d in self.disks[key])
        with self._lock:
            refused = self.refuse_detach.get(domain, 0)
            if held and refused:
                self.refuse_detach[domain] = refused - 1
        if held and refused:
            raise DeviceAttachError(f"detach {serial} from {domain}: refused by the fake")
        if held and domain in self.paused:
            raise DetachPending(f"detach {serial} from {domain}: the domain is paused", domain)
        self.disks[key] = [d for d in self.disks[key] if d.serial != serial]

    def watch_domains(self, uri: str, on_event: Callable[[DomainEvent], None], *,
                      keep_trying: bool = False) -> Callable[[], None]:
        """Deliver this fake's lifecycle changes on ``uri`` to ``on_event`` until the returned
        function is called (an unreachable URI's from when it answers, with ``keep_trying``:
        events are only told while it answers)."""
        if not keep_trying:
            self._reach(uri)
        with self._lock:
            watch = next(self._watch_ids)
            self._watchers[watch] = (uri, on_event)

        def stop() -> None:
            with self._lock:
                self._watchers.pop(watch, None)
        return stop

    def _lifecycle(self, uri: str, name: str, state: DomainState, detail: str) -> None:
        key = self._key(uri, name)
        self.active[key] = state in (DomainState.RUNNING, DomainState.PAUSED)
        if state is DomainState.PAUSED:
            self.paused.add(name)
        else:
            self.paused.discard(name)
        with self._lock:
            watchers = [cb for u, cb in self._watchers.values() if u == uri]
        for on_event in watchers:
            on_event(DomainEvent(uri, name, state, detail))

    def suspend(self, uri: str, name: str) -> None:
        """``virsh suspend``: paused (its guest then cannot release a disk)."""
        self._lifecycle(uri, name, DomainState.PAUSED, "paused")

    def resume(self, uri: str, name: str) -> None:
        """``virsh resume``."""
        self._lifecycle(uri, name, DomainState.RUNNING, "unpaused")

    def destroy(self, uri: str, name: str) -> None:
        """``virsh destroy``: shut off at once."""
        self._lifecycle(uri, name, DomainState.STOPPED, "destroyed")

    def start(self, uri: str, name: str) -> None:
        """``virsh start``."""
        self._lifecycle(uri, name, DomainState.RUNNING, "booted")


# -- remote shell -------------------------------------------------------------------------------


class LocalShell:
    """RemoteShell where every host is this machine: commands run as local processes (as the
    test runner's user), files are written to local paths, atomically, with their mode."""

    def run(self, host: SshHost, cmd: RemoteCommand, timeout: float = 30.0, *,
            check: bool = False, stdin: bytes | None = None) -> RemoteResult:
        """Run ``cmd`` with ``/bin/sh``; past ``timeout``: HostUnreachable, as over SSH."""
        try:
            proc = subprocess.run(["/bin/sh", "-c", cmd.render()], input=stdin or b"",
                                  capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise HostUnreachable(host.name, "timed out") from exc
        rc = proc.returncode if proc.returncode >= 0 else -1  # killed by a signal
        return command_result(host, cmd, rc, proc.stdout, proc.stderr, check=check)

    def put_file(self, host: SshHost, source: Path | bytes, remote_path: str,
                 mode: int = 0o644, timeout: float = 60.0) -> None:
        """Write atomically: a 0600 temporary, chmod, rename."""
        data = source.read_bytes() if isinstance(source, Path) else source
        tmp = f"{remote_path}.rbdfleet-tmp-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise RemoteCommandFailed(host.name, f"file operation failed: {exc.strerror}",
                                      rc=-(exc.errno or errno.EIO)) from exc
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, remote_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def start_background(self, host: SshHost, cmd: RemoteCommand, *, workdir: str,
                         log_path: str, env: Mapping[str, str] | None = None,
                         timeout: float = 30.0) -> int:
        """Start ``cmd`` detached (the same script as over SSH); its pid."""
        return start_detached(self, host, cmd, workdir=workdir, log_path=log_path, env=env,
                              timeout=timeout)


# -- agents -------------------------------------------------------------------------------------


@dataclass
class _Agent:
    node: str
    state: roles.RoleState


class MemoryAgents:
    """AgentControl over in-memory agents of one fleet: each checks a control grant with its
    own key (derived from the fleet's ``master``) as an agent does, and moves roles by the
    agents' own state machine (:mod:`agents.core.roles`)."""

    def __init__(self, fleet: str, master: bytes, wall: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.master = master
        self.wall = wall
        self.agents: dict[str, _Agent] = {}  # by address

    def add(self, node: str, address: str, role: str = "reader", epoch: int = 1) -> None:
        """An agent answering on ``address`` (role ``reader`` or ``writer``)."""
        self.agents[address] = _Agent(node, roles.RoleState(
            "writer" if role == "writer" else "reader", epoch))

    def _agent(self, address: str) -> _Agent:
        agent = self.agents.get(address)
        if agent is None:
            raise AgentUnreachable("?", address, "connection refused")
        return agent

    def health(self, address: str, timeout: float) -> Health:
        """The agent's role and epoch (self-test always ok)."""
        agent = self._agent(address)
        return Health(node=agent.node, fleet=self.fleet, role=agent.state.role,
                      epoch=agent.state.epoch, applied_seq=0, safe_seq=0, selftest="ok")

    def _control(self, agent: _Agent, token: str, purpose: str, fleet: str, node: str,
                 epoch: int) -> None:
        grant = verify(token, [agent_key(self.master, self.fleet, agent.node)], now=self.wall(),
                       fleet=self.fleet, audience=agent.node, purposes={purpose}, epoch=None)
        if fleet != self.fleet or node != agent.node or grant.epoch != epoch:
            raise ForeignGrant("control request does not match its grant", field="epoch")

    def promote(self, address: str, request: PromoteRequest, grant: str) -> None:
        """Writer of ``request.epoch`` (the promotion completes at once here)."""
        agent = self._agent(address)
        self._control(agent, grant, "promote", request.fleet, request.node, request.epoch)
        state, _ = roles.become_writer(agent.state, request.epoch)
        agent.state = roles.RoleState("writer", state.epoch)

    def demote(self, address: str, request: DemoteRequest, grant: str) -> None:
        """Reader of ``request.epoch``."""
        agent = self._agent(address)
        self._control(agent, grant, "demote", request.fleet, request.node, request.epoch)
        agent.state, _ = roles.become_reader(agent.state, request.epoch)


# -- role switch and spares ---------------------------------------------------------------------


class MemoryRoles:
    """RoleSwitch and SpareProvisioner over how each node holds the shared disk."""

    def __init__(self, writer: str, readers: Iterable[str], spares: Iterable[str] = ()) -> None:
        self.modes: dict[str, DiskMode | None] = {writer: DiskMode.RW}
        self.modes.update({r: DiskMode.RO for r in readers})
        self.modes.update({s: None for s in spares})

    def mode_of(self, node: str) -> DiskMode | None:
        """How ``node`` holds the disk (None: not attached)."""
        return self.modes[node]

    def make_writer(self, node: str) -> None:
        """``node`` read-write, every other holder read-only."""
        for other, mode in self.modes.items():
            if mode is DiskMode.RW and other != node:
                self.modes[other] = DiskMode.RO
        self.modes[node] = DiskMode.RW

    def make_reader(self, node: str) -> None:
        """``node`` read-only; refused for the writer (the fleet would have none)."""
        if self.modes[node] is DiskMode.RW:
            raise CoordinationError(f"{node} is the writer: make another node the writer")
        self.modes[node] = DiskMode.RO

    def attach_spare(self, node: str) -> None:
        """The spare's disk read-only."""
        if self.modes[node] is None:
            self.modes[node] = DiskMode.RO


class NeverCalled:
    """Fencer and AgentControl for a test in which nothing may fence or reach an agent: any
    call fails the test, naming what was called."""

    def fence(self, vm: str) -> list[str]:
        raise AssertionError(f"fence({vm!r}) called")

    def health(self, address: str, timeout: float) -> Health:
        raise AssertionError(f"health probe of {address} called")

    def promote(self, address: str, request: PromoteRequest, grant: str) -> None:
        raise AssertionError(f"promote of {address} called")

    def demote(self, address: str, request: DemoteRequest, grant: str) -> None:
        raise AssertionError(f"demote of {address} called")


__all__ = [
    "FakeClock",
    "LocalShell",
    "MemoryAgents",
    "MemoryCeph",
    "MemoryCredentialStore",
    "MemoryFencer",
    "MemoryHypervisor",
    "MemoryImageClient",
    "MemoryImageStore",
    "MemoryLeaseBoard",
    "MemoryRoles",
    "MemoryStateStore",
    "NeverCalled",
]
