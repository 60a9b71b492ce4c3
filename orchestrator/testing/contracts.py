"""The ports' guarantees as executable checks, run against each real adapter and its fake.

One ``check_<port>(subject)`` per port of :mod:`orchestrator.ports` (after trio's
``check_one_way_stream``): the subject bundles the port with the few hooks a check needs to
set a situation up or look behind the port (a client that holds the image, a user's caps as
the backend stores them...). ``tests/contract`` runs every check against the adapter on real
parts (sandbox Ceph, libvirtd, sshd hosts, agent processes) and against the fake in
:mod:`orchestrator.testing.fakes`, so a fake cannot drift from what it stands for.

A guarantee an adapter declares in ``CHARACTERISTICS`` is checked when it is declared (a fake
declares what its adapter declares: :func:`check_same_characteristics`). The checks raise
AssertionError (or the port's unexpected error) and need no test framework.
"""

from __future__ import annotations

import functools
import itertools
import queue
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from agents.core.protocol import DemoteRequest, PromoteRequest
from agents.errors import GrantRejected, StaleEpoch
from orchestrator.adapters.ceph import granted_image
from orchestrator.core.clients import SCOPES, ClientCredential
from orchestrator.core.fleetmap import FleetMap, initial_map
from orchestrator.core.remote import Executable, RemoteCommand, RemoteResult, SshHost, shell_script
from orchestrator.errors import (
    AgentUnreachable,
    DetachPending,
    DomainNotFound,
    HostUnreachable,
    ImageBusy,
    ImageExists,
    ImageNotFound,
    LeaseLost,
    OrchestratorError,
    RemoteCommandFailed,
    RemoteError,
    StaleMap,
    StorageError,
)
from orchestrator.ports import (
    AttachedDisk,
    Characteristics,
    DiskMode,
    DiskSpec,
    DomainEvent,
    DomainState,
    ImageInfo,
    MonHost,
    SecretKey,
)
from orchestrator.provision import IMAGE_FEATURES

if TYPE_CHECKING:
    from orchestrator.ports import (
        AgentControl,
        ClientStore,
        Clock,
        CredentialStore,
        FenceProof,
        Fencer,
        Hypervisor,
        ImageStore,
        RemoteShell,
        RoleSwitch,
        SpareProvisioner,
        StateStore,
    )

__all__ = [
    "STATE_STORE_CHECKS",
    "AgentControlSubject",
    "CredentialStoreSubject",
    "FencerSubject",
    "HypervisorSubject",
    "ImageClient",
    "ImageStoreSubject",
    "LifecycleTarget",
    "LiveTarget",
    "RemoteShellSubject",
    "RoleSwitchSubject",
    "StateStoreSubject",
    "characteristics_of",
    "check_agent_control",
    "check_client_store",
    "check_clock",
    "check_credential_store",
    "check_fencer",
    "check_hypervisor",
    "check_hypervisor_events",
    "check_image_store",
    "check_remote_shell",
    "check_role_switch",
    "check_same_characteristics",
    "check_spare_provisioner",
]

E = TypeVar("E", bound=BaseException)

CONTRACT_FEATURES = IMAGE_FEATURES  # as provisioning creates the fleet's image
CONTRACT_SIZE = 8 << 20


def _raises(kind: type[E], call: Callable[[], object], what: str) -> E:
    """The ``kind`` error ``call`` raised; AssertionError when it raised nothing."""
    try:
        call()
    except kind as exc:
        return exc
    raise AssertionError(f"{what}: expected {kind.__name__}, nothing was raised")


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def characteristics_of(adapter: object) -> Characteristics:
    """What ``adapter`` declares (``Characteristics.NONE`` when it declares nothing)."""
    declared = getattr(adapter, "CHARACTERISTICS", Characteristics.NONE)
    if not isinstance(declared, Characteristics):
        raise AssertionError(f"{type(adapter).__name__}.CHARACTERISTICS is not a Characteristics")
    return declared


def check_same_characteristics(adapter: type, fake: type) -> None:
    """A fake promises what its adapter promises: no more (tests would trust a guarantee the
    real part lacks), no less (a use case that requires it would refuse the fake)."""
    real, faked = characteristics_of(adapter), characteristics_of(fake)
    assert real == faked, f"{fake.__name__} declares {faked!r}, {adapter.__name__} {real!r}"


# -- Clock --------------------------------------------------------------------------------------


def check_clock(clock: Clock) -> None:
    """``monotonic`` never goes back; ``sleep(s)`` lets at least ``s`` pass; ``sleep(0)``
    is fine."""
    readings = [clock.monotonic() for _ in range(200)]
    assert all(b >= a for a, b in itertools.pairwise(readings)), "time went back"
    before = clock.monotonic()
    clock.sleep(0.05)
    after = clock.monotonic()
    assert after >= before + 0.05, f"sleep(0.05) advanced {after - before:.4f} s"
    clock.sleep(0)
    assert clock.monotonic() >= after


# -- ImageStore ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageStoreSubject:
    """An ImageStore, a pool it may create images in, ``watch(pool, image)``: a client that
    watches the image header while the block runs (an attached VM), and ``drop_pool(pool)``
    to remove a pool the check created (the port has no such call: only tests drop pools)."""

    store: ImageStore
    pool: str
    watch: Callable[[str, str], AbstractContextManager[object]]
    drop_pool: Callable[[str], None]


def check_image_store(subject: ImageStoreSubject) -> None:
    """Images are created with exactly the size and features asked; a taken name, a removal
    of a watched or absent image are refused with the project's errors; watchers are listed
    one per client; a created pool takes images at once."""
    store, pool = subject.store, subject.pool
    assert store.pool_exists(pool)
    assert not store.pool_exists(_unique("no-such-pool"))
    name = _unique("contract")
    assert store.image_info(pool, name) is None
    store.create_image(pool, name, CONTRACT_SIZE, CONTRACT_FEATURES)
    try:
        assert store.image_info(pool, name) == ImageInfo(pool, name, CONTRACT_SIZE,
                                                         CONTRACT_FEATURES)
        _raises(ImageExists, lambda: store.create_image(pool, name, CONTRACT_SIZE,
                                                        CONTRACT_FEATURES), "create twice")
        assert store.image_info(pool, name) == ImageInfo(pool, name, CONTRACT_SIZE,
                                                         CONTRACT_FEATURES)
        assert store.watchers(pool, name) == []
        with subject.watch(pool, name):
            watchers = store.watchers(pool, name)
            assert len(watchers) == 1, watchers
            assert watchers[0].addr and watchers[0].global_id > 0, watchers
            _raises(ImageBusy, lambda: store.remove_image(pool, name), "remove while watched")
            assert store.image_info(pool, name) is not None
    finally:
        _remove_when_unwatched(store, pool, name)
    assert store.image_info(pool, name) is None
    _raises(ImageNotFound, lambda: store.remove_image(pool, name), "remove an absent image")
    _check_create_pool(subject)


def _check_create_pool(subject: ImageStoreSubject) -> None:
    """A created pool exists and is ready for images at once."""
    store, pool, name = subject.store, _unique("rbdfleet-contract-pool"), _unique("contract")
    store.create_pool(pool)
    try:
        assert store.pool_exists(pool)
        store.create_image(pool, name, CONTRACT_SIZE, CONTRACT_FEATURES)
        assert store.image_info(pool, name) == ImageInfo(pool, name, CONTRACT_SIZE,
                                                         CONTRACT_FEATURES)
        store.remove_image(pool, name)
    finally:
        subject.drop_pool(pool)
    assert not store.pool_exists(pool)


def _remove_when_unwatched(store: ImageStore, pool: str, name: str) -> None:
    # librbd drops its watch asynchronously after close: a moment of ImageBusy is allowed.
    deadline = time.monotonic() + 10.0
    while True:
        try:
            store.remove_image(pool, name)
            return
        except ImageBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- CredentialStore ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CredentialStoreSubject:
    """A CredentialStore, an ImageStore of the same cluster and a pool the check may create
    images in, a user-name prefix it may use, the caps of a user as the backend keeps them,
    and ``connect(user, key)``: a client session as that user while the block runs."""

    store: CredentialStore
    images: ImageStore
    pool: str
    prefix: str
    caps_of: Callable[[str], dict[str, str]]
    connect: Callable[[str, SecretKey], AbstractContextManager[object]]


def check_credential_store(subject: CredentialStoreSubject) -> None:
    """``ensure_user`` gives the user caps on exactly one image and is idempotent (same key);
    it refuses (StorageError) to move a user whose image still exists (another fleet's) and
    moves it, keeping the key, once that image is gone; ``remove_user`` deletes and tolerates
    absence; a connected user has a mon session under its entity; mon hosts are listed."""
    store, images, pool = subject.store, subject.images, subject.pool
    first, second = _unique("contract"), _unique("contract")
    for name in (first, second):
        images.create_image(pool, name, CONTRACT_SIZE, CONTRACT_FEATURES)
    user = _unique(subject.prefix)
    entity = f"client.{user}"
    assert entity not in store.list_users(subject.prefix)
    try:
        key = store.ensure_user(user, pool, first)
        assert isinstance(key, SecretKey) and key.reveal(), "an empty key"
        assert key.reveal() not in repr(key).encode()
        assert store.list_users(user) == [entity]
        assert entity in store.list_users(subject.prefix)
        caps = subject.caps_of(user)
        granted = granted_image(caps)
        assert caps["mon"] == "profile rbd" and granted is not None and granted[0] == pool, caps
        assert store.ensure_user(user, pool, first) == key, "ensure_user is not idempotent"
        assert subject.caps_of(user) == caps
        _raises(StorageError, lambda: store.ensure_user(user, pool, second),
                "taking over the user of an image that exists")
        assert subject.caps_of(user) == caps, "a refused move changed the caps"
        images.remove_image(pool, first)
        assert store.ensure_user(user, pool, second) == key, "a move must keep the key"
        moved = granted_image(subject.caps_of(user))
        assert moved is not None and moved != granted, "the caps still name the gone image"
        with subject.connect(user, key):
            mine = [s for s in store.sessions() if s.entity == entity]
            assert mine, f"no mon session of {entity}"
            assert all(s.global_id > 0 and s.addr for s in mine), mine
    finally:
        store.remove_user(user)
        for name in (first, second):
            if images.image_info(pool, name) is not None:
                images.remove_image(pool, name)
    assert entity not in store.list_users(subject.prefix)
    store.remove_user(user)  # absent is fine
    mons = store.mon_hosts()
    assert isinstance(mons, tuple) and mons, "no monitor"
    assert all(isinstance(m, MonHost) and m.host and m.port > 0 for m in mons), mons


# -- StateStore ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateStoreSubject:
    """``make(holder)``: a store of one fleet (the same for every call) for a distinct holder,
    all with a lease of ``lease`` seconds; ``wait(seconds)`` lets that much of the store's
    time pass."""

    make: Callable[[str], StateStore]
    wait: Callable[[float], None]
    lease: float


def _fleet_map(store: StateStore, revision: int, epoch: int = 1) -> FleetMap:
    m = initial_map(store.fleet, "a", {"a": ("a:1", "writer"), "b": ("b:1", "reader")})
    return FleetMap(m.fleet, epoch, revision, m.writer, m.members)


def check_state_store_empty(subject: StateStoreSubject) -> None:
    """A fleet never stored reads as None; a write needs the lease."""
    a = subject.make("a")
    assert a.load() is None and a.coordinator_url() is None
    _raises(LeaseLost, lambda: a.save(_fleet_map(a, 1), None), "save without the lease")
    assert a.load() is None


def check_state_store_guarded_writes(subject: StateStoreSubject) -> None:
    """One holder at a time; a write succeeds only on the expected revision (StaleMap, nothing
    written) and only for the holder (LeaseLost); the advertised URL is read by others."""
    a, b = subject.make("a"), subject.make("b")
    assert a.acquire()
    assert not b.acquire()
    a.save(_fleet_map(a, 1), None)
    assert b.load() == _fleet_map(a, 1)
    _raises(StaleMap, lambda: a.save(_fleet_map(a, 2), None), "create an existing fleet")
    a.save(_fleet_map(a, 2, epoch=2), 1)
    stale = _raises(StaleMap, lambda: a.save(_fleet_map(a, 3), 1), "save on a stale revision")
    assert stale.found == 2
    assert b.load() == _fleet_map(a, 2, epoch=2)
    _raises(LeaseLost, lambda: b.save(_fleet_map(a, 3), 2), "save by a non-holder")
    assert a.acquire()  # renew
    a.advertise("http://127.0.0.1:1/")
    assert b.coordinator_url() == "http://127.0.0.1:1/"


def check_state_store_lease_duration(subject: StateStoreSubject) -> None:
    """The lease runs out after its exact duration (at most 0.3 s late); the old holder then
    changes nothing and never silently takes it again."""
    a, b, lease = subject.make("a"), subject.make("b"), subject.lease
    assert a.acquire()
    a.save(_fleet_map(a, 1), None)
    subject.wait(lease * 0.5)
    assert not b.acquire()  # still held
    subject.wait(lease * 0.5 + 0.3)
    assert b.acquire()
    _raises(LeaseLost, lambda: a.save(_fleet_map(a, 2), 1), "save by the paused ex-holder")
    _raises(LeaseLost, lambda: a.advertise("http://stale/"), "advertise by the ex-holder")
    assert not a.acquire()
    assert b.load() == _fleet_map(a, 1)
    b.save(_fleet_map(a, 2, epoch=2), 1)
    assert a.load() == _fleet_map(a, 2, epoch=2)


def check_state_store_step_down(subject: StateStoreSubject) -> None:
    """A holder whose lease ran out gets LeaseLost on renewal (even with nobody else there)
    before it may take the lease afresh."""
    a = subject.make("a")
    assert a.acquire()
    subject.wait(subject.lease + 0.3)
    _raises(LeaseLost, a.acquire, "renewal after expiry")
    assert a.acquire()


def check_state_store_release(subject: StateStoreSubject) -> None:
    """``release`` hands the lease over at once."""
    a, b = subject.make("a"), subject.make("b")
    assert a.acquire()
    a.release()
    assert b.acquire()
    assert not a.acquire()


def check_state_store_fenced_readers(subject: StateStoreSubject) -> None:
    """The fenced-reader record starts empty, is written only by the holder, and is what a
    successor reads after the lease passes to it (a takeover keeps it)."""
    a, b = subject.make("a"), subject.make("b")
    assert a.fenced_readers() == frozenset()
    _raises(LeaseLost, lambda: a.record_fenced_readers(frozenset({"x"})), "record unheld")
    assert a.acquire()
    a.record_fenced_readers(frozenset({"vm3", "vm2"}))
    _raises(LeaseLost, lambda: b.record_fenced_readers(frozenset()), "record by a non-holder")
    a.release()
    assert b.acquire()
    assert b.fenced_readers() == frozenset({"vm2", "vm3"})
    b.record_fenced_readers(frozenset())
    assert a.fenced_readers() == frozenset()


STATE_STORE_CHECKS = (check_state_store_empty, check_state_store_guarded_writes,
                      check_state_store_lease_duration, check_state_store_step_down,
                      check_state_store_release, check_state_store_fenced_readers)


# -- ClientStore -------------------------------------------------------------------------------


def check_client_store(make: Callable[[str], ClientStore]) -> None:
    """``make(fleet)``: a store of that fleet (every call for a fleet reaches the same data).

    Credentials are found by name by every store of the fleet and by no other fleet's; ``put``
    creates or replaces; ``list`` is by name; ``remove`` says whether there was one."""
    fleet = _unique("contract")
    a, b, other = make(fleet), make(fleet), make(_unique("contract"))
    assert a.fleet == fleet
    assert a.get("alice") is None and a.list() == []
    alice = ClientCredential("alice", SCOPES[0], b"a" * 16, 1.0)
    bob = ClientCredential("bob", SCOPES[-1], b"b" * 32, 2.0)
    b.put(bob)
    a.put(alice)
    assert b.get("alice") == alice and other.get("alice") is None and other.list() == []
    assert [c.name for c in b.list()] == ["alice", "bob"] and b.list() == [alice, bob]
    promoted = ClientCredential("alice", SCOPES[1], b"c" * 16, 3.0)
    a.put(promoted)
    assert b.get("alice") == promoted
    assert a.remove("alice") and not a.remove("alice")
    assert b.get("alice") is None and b.list() == [bob]
    assert b.remove("bob") and a.list() == []


# -- Fencer (and FenceProof) --------------------------------------------------------------------


class ImageClient(Protocol):
    """A VM's client of the shared image."""

    def write(self) -> bool:
        """True when a write reached the image, False when it was refused."""
        ...


@dataclass(frozen=True)
class FencerSubject:
    """A Fencer of one fleet's image, two of its VMs, and ``attach(vm)``: that VM's client
    of the image while the block runs. ``proof`` is the same adapter as a FenceProof (or None
    when it is not one)."""

    fencer: Fencer
    vms: tuple[str, str]
    attach: Callable[[str], AbstractContextManager[ImageClient]]
    proof: FenceProof | None = None
    refused_within: float = 10.0  # without WAITS_FOR_OSDMAP: how long a write may still pass


def check_fencer(subject: FencerSubject) -> None:
    """Fencing an attached VM makes its writes fail (at once with WAITS_FOR_OSDMAP) and,
    with FENCES_BY_CLIENT_ADDRESS, no other VM's; fencing is idempotent; a VM without a
    client is fenced with no address; a VM the fleet does not have is an OrchestratorError."""
    fencer, (a, b) = subject.fencer, subject.vms
    declared = characteristics_of(fencer)
    _raises(OrchestratorError, lambda: fencer.fence(_unique("no-such-vm")), "fence unknown vm")
    assert fencer.fence(b) == [], "a VM without a client has no address to fence"
    with subject.attach(a) as client_a, subject.attach(b) as client_b:
        assert client_a.write() and client_b.write(), "an unfenced client could not write"
        if subject.proof is not None:
            assert not subject.proof.is_fenced(a)
        addresses = fencer.fence(a)
        assert addresses and all(isinstance(x, str) and x for x in addresses), addresses
        if Characteristics.WAITS_FOR_OSDMAP in declared:
            assert not client_a.write(), "a write passed after fence() returned"
        else:
            _eventually(lambda: not client_a.write(), subject.refused_within, "fenced writes")
        if Characteristics.FENCES_BY_CLIENT_ADDRESS in declared:
            assert client_b.write(), "fencing one VM cut another"
        if subject.proof is not None:
            assert subject.proof.is_fenced(a)
            if Characteristics.FENCES_BY_CLIENT_ADDRESS in declared:
                assert not subject.proof.is_fenced(b)
        fencer.fence(a)  # again: no error, still fenced
        assert not client_a.write(), "a second fence let writes through"


def _eventually(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.05)


# -- Hypervisor ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveTarget:
    """A running domain whose guest never releases a disk (no OS booted, or paused), and a
    disk it can really open: ``disk(secret_uuid)`` with ``key`` as the user's key."""

    domain: str
    key: SecretKey
    disk: Callable[[str], DiskSpec]


@dataclass(frozen=True)
class HypervisorSubject:
    """A Hypervisor, a URI and a defined, stopped domain on it the check may attach to.

    ``secret_readable(uri, uuid)`` tells whether a secret's value can be read back through the
    hypervisor (checked against PRIVATE_SECRETS); ``live`` is where HOT_PLUG is checked."""

    hypervisor: Hypervisor
    uri: str
    domain: str
    secret_readable: Callable[[str, str], bool]
    live: LiveTarget | None = None


@dataclass(frozen=True)
class LifecycleTarget:
    """A running domain the check may drive as ``virsh`` would: ``act(verb)`` with verb one
    of ``suspend``, ``resume``, ``destroy``, ``start``."""

    domain: str
    act: Callable[[str], None]


EVENT_WAIT_S = 10.0
# verb -> the state its event must report
_LIFECYCLE = (("suspend", DomainState.PAUSED), ("resume", DomainState.RUNNING),
              ("destroy", DomainState.STOPPED), ("start", DomainState.RUNNING))


def check_hypervisor_events(hv: Hypervisor, uri: str, target: LifecycleTarget) -> None:
    """``watch_domains`` reports each lifecycle change of a domain, in order, with its state:
    paused, running again, shut off, started (libvirt tells a start twice: resumed, then
    booted); once the watch ended, nothing more."""
    events: queue.Queue[DomainEvent] = queue.Queue()
    stop = hv.watch_domains(uri, events.put)
    try:
        for verb, state in _LIFECYCLE:
            target.act(verb)
            event = _next_event(events, target.domain, EVENT_WAIT_S)
            assert event is not None, f"no lifecycle event within {EVENT_WAIT_S} s of {verb}"
            assert (event.uri, event.domain, event.state) == (uri, target.domain, state), \
                (verb, event)
            while (more := _next_event(events, target.domain, 0.3)) is not None:
                assert more.state is state, (verb, event, more)
    finally:
        stop()
    target.act("suspend")
    late = _next_event(events, target.domain, 1.0)
    assert late is None, f"an event after the watch ended: {late}"
    stop()  # ending it twice is fine


def _next_event(events: queue.Queue[DomainEvent], domain: str,
                within: float) -> DomainEvent | None:
    """The next event about ``domain`` (others' events are skipped: a shared hypervisor)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            return None
        if event.domain == domain:
            return event
    return None


def _contract_disk(secret_uuid: str, mode: DiskMode) -> DiskSpec:
    return DiskSpec("rbd", "contract-image", "rbdfleet-contract01", "rbdfleet-contract-u",
                    secret_uuid, (MonHost("127.0.0.1", 3300),), mode)


def check_hypervisor(subject: HypervisorSubject) -> None:
    """Domains are found by name (DomainNotFound otherwise) with their RBD disks; ceph secrets
    are defined idempotently under one UUID and removed (absence is fine); a disk attached to
    a stopped domain shows in its config with its serial, user and mode, and detach removes it
    (absence is fine)."""
    hv, uri, name = subject.hypervisor, subject.uri, subject.domain
    missing = _unique("rbdfleet-no-such-domain")
    _raises(DomainNotFound, lambda: hv.domain(uri, missing), "look up an unknown domain")
    info = hv.domain(uri, name)
    assert (info.uri, info.name, info.active) == (uri, name, False), info
    assert name in [d.name for d in hv.domains(uri)]

    usage = _unique("rbdfleet-contract")
    assert hv.secret_uuid(uri, usage) is None
    secret = hv.ensure_secret(uri, usage, SecretKey(b"first-key-0123456"))
    try:
        assert hv.secret_uuid(uri, usage) == secret
        assert hv.ensure_secret(uri, usage, SecretKey(b"second-key-012345")) == secret
        if Characteristics.PRIVATE_SECRETS in characteristics_of(hv):
            assert not subject.secret_readable(uri, secret), "a private secret was read back"
        _check_attach_detach(hv, uri, name, missing, secret)
    finally:
        hv.remove_secret(uri, usage)
    assert hv.secret_uuid(uri, usage) is None
    hv.remove_secret(uri, usage)  # absent is fine
    if Characteristics.HOT_PLUG in characteristics_of(hv):
        assert subject.live is not None, "HOT_PLUG is declared: give a running domain"
        _check_hot_plug(hv, uri, subject.live)


def _check_hot_plug(hv: Hypervisor, uri: str, live: LiveTarget) -> None:
    """A disk attaches to a running domain at once; a detach the guest does not complete is
    DetachPending naming the domain, and the running domain still has the disk."""
    usage = _unique("rbdfleet-contract-live")
    spec = live.disk(hv.ensure_secret(uri, usage, live.key))
    try:
        hv.attach_disk(uri, live.domain, spec)
        info = hv.domain(uri, live.domain)
        held = [d.mode for d in info.disks if d.serial == spec.serial]
        assert info.active and held == [spec.mode], info
        pending = _raises(DetachPending,
                          lambda: hv.detach_disk(uri, live.domain, spec.serial, 0.5),
                          "detach from a guest that cannot release the disk")
        assert pending.domain == live.domain, pending
        assert [d.serial for d in hv.domain(uri, live.domain).disks] == [spec.serial]
    finally:
        hv.remove_secret(uri, usage)


def _check_attach_detach(hv: Hypervisor, uri: str, name: str, missing: str,
                         secret: str) -> None:
    ro, rw = _contract_disk(secret, DiskMode.RO), _contract_disk(secret, DiskMode.RW)
    _raises(DomainNotFound, lambda: hv.attach_disk(uri, missing, ro), "attach to no domain")
    try:
        hv.attach_disk(uri, name, ro)
        assert _ours(hv, uri, name) == [AttachedDisk(ro.serial, ro.pool, ro.image, ro.user,
                                                     DiskMode.RO, _ours(hv, uri, name)[0].target)]
        assert _ours(hv, uri, name)[0].target, "a disk without a target"
        hv.detach_disk(uri, name, ro.serial)
        assert _ours(hv, uri, name) == []
        hv.detach_disk(uri, name, ro.serial)  # absent is fine
        hv.attach_disk(uri, name, rw)
        assert [d.mode for d in _ours(hv, uri, name)] == [DiskMode.RW]
    finally:
        hv.detach_disk(uri, name, ro.serial)
    assert _ours(hv, uri, name) == []


def _ours(hv: Hypervisor, uri: str, name: str) -> list[AttachedDisk]:
    return [d for d in hv.domain(uri, name).disks if d.serial == "rbdfleet-contract01"]


# -- RemoteShell --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteShellSubject:
    """A RemoteShell, a host and an existing, empty, writable directory on it."""

    shell: RemoteShell
    host: SshHost
    workdir: str


def _sh(script: str) -> RemoteCommand:
    return shell_script(script)


def check_remote_shell(subject: RemoteShellSubject) -> None:
    """``run`` returns rc, stdout and stderr (a failure raises RemoteCommandFailed with the rc
    only with ``check``), feeds ``stdin`` and gives up at its deadline (HostUnreachable);
    ``put_file`` replaces a file atomically with the mode asked, leaving no temporary behind,
    and refuses a missing parent with a RemoteError; ``start_background`` returns the pid of a
    detached process whose log is appended to."""
    shell, host, work = subject.shell, subject.host, subject.workdir
    failing = _sh("printf out; printf err >&2; exit 3")
    assert shell.run(host, failing) == RemoteResult(3, "out", "err")
    failed = _raises(RemoteCommandFailed, lambda: shell.run(host, failing, check=True),
                     "check=True on exit 3")
    assert failed.rc == 3 and failed.host == host.name, failed
    assert shell.run(host, _sh("cat"), stdin=b"fed\n", check=True).stdout == "fed\n"
    started = time.monotonic()
    _raises(HostUnreachable, lambda: shell.run(host, _sh("sleep 3"), timeout=0.5),
            "a command past its deadline")
    assert time.monotonic() - started < 2.5, "run() waited past its deadline"

    target = f"{work}/file.conf"
    shell.put_file(host, b"one\n", target, mode=0o640)
    assert _remote(shell, host, f"stat -c %a {target}; cat {target}") == "640\none\n"
    shell.put_file(host, b"two\n", target, mode=0o600)
    assert _remote(shell, host, f"stat -c %a {target}; cat {target}") == "600\ntwo\n"
    assert _remote(shell, host, f"ls -A {work}") == "file.conf\n", "a temporary was left"
    _raises(RemoteError, lambda: shell.put_file(host, b"x", f"{work}/no/such/dir/f"),
            "put_file into a missing directory")

    log = f"{work}/bg.log"
    shell.put_file(host, b"earlier\n", log)
    pid = shell.start_background(host, _sh("echo started; exec sleep 60"), workdir=work,
                                 log_path=log, env={"RBDFLEET_CONTRACT": "1"})
    try:
        assert pid > 1
        _eventually(lambda: _remote(shell, host, f"cat {log}") == "earlier\nstarted\n", 10.0,
                    "the background command's log")
        assert shell.run(host, RemoteCommand(Executable.KILL, ("-0", str(pid)))).rc == 0
    finally:
        shell.run(host, RemoteCommand(Executable.KILL, (str(pid),)))


def _remote(shell: RemoteShell, host: SshHost, script: str) -> str:
    return shell.run(host, _sh(script), check=True).stdout


# -- AgentControl -------------------------------------------------------------------------------


Grants = Callable[[str, str, int], str]


@dataclass(frozen=True)
class AgentControlSubject:
    """An AgentControl, two agents of ``fleet`` at epoch 1: ``writer`` and ``reader`` as
    ``(node, address)``; ``grant(node, purpose, epoch)`` makes the control grant the
    coordinator would send, ``forge`` the same signed with a key the agent does not trust.
    ``unreachable`` is an address nothing answers on."""

    control: AgentControl
    fleet: str
    writer: tuple[str, str]
    reader: tuple[str, str]
    grant: Grants
    forge: Grants
    unreachable: str = "127.0.0.1:1"


def check_agent_control(subject: AgentControlSubject) -> None:
    """``health`` reports node, fleet, role and epoch, AgentUnreachable when nobody answers;
    ``demote``/``promote`` move roles under a grant for exactly that node, purpose and epoch
    (others: GrantRejected, nothing changes); a promotion is idempotent at its epoch and
    refused at an older one (StaleEpoch); ``promote`` returns once the agent accepts writes."""
    ctl, fleet, grant = subject.control, subject.fleet, subject.grant
    (w, w_addr), (r, r_addr) = subject.writer, subject.reader

    def role(address: str) -> tuple[str, int]:
        h = ctl.health(address, 10.0)
        return h.role, h.epoch

    health = ctl.health(w_addr, 10.0)
    assert (health.node, health.fleet, health.role, health.epoch) == (w, fleet, "writer", 1)
    assert role(r_addr) == ("reader", 1)
    _raises(AgentUnreachable, lambda: ctl.health(subject.unreachable, 2.0), "health of nobody")

    demote = DemoteRequest(fleet, w, 2, writer=r, writer_address=r_addr)
    for bad, what in ((subject.forge(w, "demote", 2), "a forged grant"),
                      (grant(r, "demote", 2), "a grant for another node"),
                      (grant(w, "promote", 2), "a grant for another purpose"),
                      (grant(w, "demote", 3), "a grant for another epoch")):
        _raises(GrantRejected, functools.partial(ctl.demote, w_addr, demote, bad), what)
    assert role(w_addr) == ("writer", 1), "a refused demotion changed the agent"
    ctl.demote(w_addr, demote, grant(w, "demote", 2))
    assert role(w_addr) == ("reader", 2)

    promote = PromoteRequest(fleet, r, 2)
    ctl.promote(r_addr, promote, grant(r, "promote", 2))
    assert role(r_addr) == ("writer", 2)
    ctl.promote(r_addr, promote, grant(r, "promote", 2))  # a retried promotion: no-op
    assert role(r_addr) == ("writer", 2)
    _raises(StaleEpoch, lambda: ctl.promote(w_addr, PromoteRequest(fleet, w, 1),
                                            grant(w, "promote", 1)),
            "a promotion to an older epoch")
    assert role(w_addr) == ("reader", 2)


# -- RoleSwitch and SpareProvisioner ------------------------------------------------------------


@dataclass(frozen=True)
class RoleSwitchSubject:
    """A RoleSwitch (and SpareProvisioner) over a fleet whose ``writer`` holds the disk
    read-write and ``readers`` read-only, with ``spare`` not attached; ``mode_of(node)`` is
    how the node holds the disk (None: not attached)."""

    roles: RoleSwitch
    spares: SpareProvisioner
    writer: str
    readers: tuple[str, ...]
    spare: str
    mode_of: Callable[[str], DiskMode | None]


def _modes(subject: RoleSwitchSubject) -> dict[str, DiskMode | None]:
    return {n: subject.mode_of(n) for n in (subject.writer, *subject.readers, subject.spare)}


def check_role_switch(subject: RoleSwitchSubject) -> None:
    """``make_writer(n)`` leaves exactly ``n`` read-write (the old writer read-only) and is
    idempotent; ``make_reader`` of a reader keeps it read-only; ``make_reader`` of the only
    writer is refused (the fleet would have none)."""
    roles, old = subject.roles, subject.writer
    new = subject.readers[0]
    before = _modes(subject)
    assert before[old] is DiskMode.RW and before[new] is DiskMode.RO, before
    _raises(OrchestratorError, lambda: roles.make_reader(old), "make_reader of the writer")
    assert _modes(subject) == before
    roles.make_writer(new)
    after = _modes(subject)
    assert after == {**before, old: DiskMode.RO, new: DiskMode.RW}, after
    roles.make_writer(new)
    roles.make_reader(old)  # the demoted old writer: already read-only
    assert _modes(subject) == after
    roles.make_writer(old)
    assert _modes(subject) == before


def check_spare_provisioner(subject: RoleSwitchSubject) -> None:
    """``attach_spare`` attaches the spare read-only (idempotently) and touches nobody else."""
    before = _modes(subject)
    assert before[subject.spare] is None, before
    subject.spares.attach_spare(subject.spare)
    subject.spares.attach_spare(subject.spare)
    assert _modes(subject) == {**before, subject.spare: DiskMode.RO}
