"""Real coordinators (in-process threads) over real agent processes, for integration/fault tests.

Fencers for agents that run as local processes instead of VMs:

* :class:`PidFencer` — STONITH: SIGKILL the node's agent process (works on a stopped one too).
  The right fence for a file image, where no storage-side fence exists.
* :class:`LockOwnerFencer` — for an RBD image: blocklist the addresses that own the image's
  exclusive lock (the writer's librbd handle), then ``wait_for_latest_osdmap``. The VM path
  uses the orchestrator's per-VM BlocklistFencer instead.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.core.protocol import ReaderSet
from orchestrator.adapters.agent_control import HttpAgentControl
from orchestrator.adapters.rados_state import RadosStateStore
from orchestrator.client import (
    CoordinatorClient,
    FleetClient,
    RetryPolicy,
)
from orchestrator.coordinator.api import CoordinatorAPI
from orchestrator.coordinator.service import FleetService, ServiceSettings
from orchestrator.core.clients import ADMIN_SCOPE, ClientCredential
from orchestrator.core.election import ElectionConfig
from orchestrator.core.fleetmap import FleetMap, Role, initial_map
from orchestrator.core.liveness import LivenessConfig
from orchestrator.core.reports import TAKEOVER_SKEW
from orchestrator.errors import FencingFailed, NotActive
from orchestrator.pki import server_context
from orchestrator.ports import (
    ClientStore,
    CoordinatorPorts,
    Hypervisor,
    RoleSwitch,
    SpareProvisioner,
    StateStore,
)
from orchestrator.services import state_store
from orchestrator.testing.clients import MemoryClientStore
from orchestrator.transport import Transport
from tests.fixtures.agents import (
    TEST_CLIENT,
    TEST_CLIENT_SECRET,
    TEST_SECRET,
    AgentFleet,
    FleetFactory,
    coordinator_tls,
)

IMAGE_SIZE = 64 << 20


class MonotonicClock:
    """The real clock behind the Clock port."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class PidFencer:
    """Fence = SIGKILL of the node's agent process (recorded: node, time)."""

    fleet: AgentFleet
    fenced: list[tuple[str, float]] = field(default_factory=list)

    def fence(self, vm: str) -> list[str]:
        agent = self.fleet.agents[vm]
        if agent.alive:
            agent.kill()
        self.fenced.append((vm, time.monotonic()))
        return []


@dataclass
class LockOwnerFencer:
    """Fence = blocklist the RBD image's exclusive-lock owners, then wait for the osdmap."""

    client: Any
    pool: str
    image: str
    fenced: list[tuple[str, list[str], float]] = field(default_factory=list)

    def fence(self, vm: str) -> list[str]:
        import rados
        import rbd

        try:
            with (
                self.client.open_ioctx(self.pool) as ioctx,
                rbd.Image(ioctx, self.image, read_only=True) as img,
            ):
                lockers = img.list_lockers()
            owners = [addr for _, _, addr in (lockers or {}).get("lockers", [])]
            for addr in owners:
                command = {
                    "prefix": "osd blocklist",
                    "blocklistop": "add",
                    "addr": addr,
                    "expire": 600.0,
                }
                ret, _, status = self.client.mon_command(json.dumps(command), b"", timeout=30)
                if ret != 0:
                    raise FencingFailed(f"blocklist {addr} of {vm}: {status}")
            self.client.wait_for_latest_osdmap()
        except (rbd.Error, rados.Error) as exc:
            raise FencingFailed(f"fence {vm}: {exc}") from exc
        self.fenced.append((vm, owners, time.monotonic()))
        return owners


def bootstrap_map(fleet: AgentFleet, writer: str = "w", spares: tuple[str, ...] = ()) -> FleetMap:
    """Epoch-1 map of the running agents (+ spares not started yet)."""
    members: dict[str, tuple[str, Role]] = {}
    for name, agent in fleet.agents.items():
        role: Role = "writer" if name == writer else "reader"
        members[name] = (agent.address, role)
    for name in spares:
        members[name] = (fleet.agents[name].address if name in fleet.agents else "", "spare")
    return initial_map(fleet.name, writer, members)


@dataclass
class Coordinator:
    """One coordinator process-equivalent: API server + the fleet's service."""

    api: CoordinatorAPI
    url: str
    service: FleetService | None = None
    siblings: list[CoordinatorAPI] = field(default_factory=list)  # see tls_sibling

    def tls_sibling(self, host: str = "127.0.0.1") -> str:
        """The URL of another server of this coordinator's fleets and clients, over TLS
        (stopped with it): where agents report when ``url`` is plain HTTP, since an agent
        with TLS on refuses an ``http://`` coordinator."""
        api = CoordinatorAPI(self.api.services, self.api.clients, time.time, self.api.limits)
        self.siblings.append(api)
        bound, port = api.serve(host, 0, server_context(*coordinator_tls(host)))
        return f"https://{bound}:{port}"

    def stop(self, release: bool = True) -> None:
        if self.service is not None:
            self.service.stop(release=release)
        self.api.shutdown()
        for sibling in self.siblings:
            sibling.shutdown()


def start_api(host: str = "127.0.0.1", *, plaintext: bool = False) -> Coordinator:
    """An API server on a free port of ``host`` (default: loopback) with no fleet yet: HTTPS
    with a certificate of the test CA (agents' certificates checked by the CA), unless
    ``plaintext``."""
    api = CoordinatorAPI({}, {}, time.time)
    tls = None if plaintext else server_context(*coordinator_tls(host))
    host, port = api.serve(host, 0, tls)
    return Coordinator(api, f"{'http' if plaintext else 'https'}://{host}:{port}")


def transport(*, plaintext: bool = False, identity: bool = False) -> Transport:
    """How the harness reaches agents and coordinators: TLS against the test CA (presenting
    the coordinator's certificate when ``identity``: its control of the agents)."""
    if plaintext:
        return Transport()
    cert, key, ca = coordinator_tls()
    return Transport(tls=True, ca_file=ca, identity=(cert, key) if identity else None)


def start_service(
    coordinator: Coordinator,
    store: StateStore,
    fencer: Any,
    bootstrap: FleetMap | None,
    liveness: LivenessConfig | None = None,
    election: ElectionConfig | None = None,
    role_switch: RoleSwitch | None = None,
    reader_set_delay: float = 0.0,
    clients: ClientStore | None = None,
    agents_plaintext: bool = False,
    hypervisor: Hypervisor | None = None,
    domains: dict[str, tuple[str, str]] | None = None,
    spares: SpareProvisioner | None = None,
) -> FleetService:
    """Attach and start the fleet's service on ``coordinator``.

    ``clients``: the fleet's client credentials (default: only :data:`TEST_CLIENT`, admin).
    ``agents_plaintext``: the fleet's agents run ``insecure_plaintext`` (else the coordinator
    reaches them over TLS, presenting its certificate).
    ``hypervisor``/``domains`` (node -> (uri, domain)): lifecycle events as death evidence.
    ``spares``: brings spares in (default: none is).

    ``reader_set_delay``: the writer learns a new reader set that many seconds late (a TCG
    guest answering slowly), the window in which a map may promise more than the writer knows.
    """
    agents = HttpAgentControl(transport(plaintext=agents_plaintext, identity=True),
                              control_timeout=30.0)

    def send_reader_set(address: str, request: ReaderSet, grant: str) -> None:
        time.sleep(reader_set_delay)
        agents.send_reader_set(address, request, grant)
    service = FleetService(
        CoordinatorPorts(store=store, fencer=fencer, agents=agents, clock=MonotonicClock(),
                         wall=time.time, role_switch=role_switch, spares=spares,
                         send_reader_set=send_reader_set, hypervisor=hypervisor),
        ServiceSettings(url=coordinator.url, liveness=liveness or LivenessConfig(),
                        election=election or ElectionConfig()),
        secret=TEST_SECRET,
        bootstrap=bootstrap,
        domains=domains,
    )
    coordinator.api.services[store.fleet] = service
    coordinator.api.clients[store.fleet] = clients or MemoryClientStore(
        store.fleet, ClientCredential(TEST_CLIENT, ADMIN_SCOPE, TEST_CLIENT_SECRET))
    coordinator.service = service
    service.start()
    return service


def rados_store(client: Any, pool: str, fleet: str, lease: float = 2.0) -> RadosStateStore:
    """The fleet's state store in RADOS (as the composition root builds it), with a unique
    holder."""
    return state_store(client, pool, fleet, lease, f"coord-{uuid.uuid4().hex[:8]}")


def fleet_client(urls: list[str], fleet: str, timeout: float = 30.0,
                 client: str = TEST_CLIENT, secret: bytes = TEST_CLIENT_SECRET) -> FleetClient:
    """A client of ``fleet`` through the coordinators ``urls`` (default: the admin one),
    verifying agents and coordinators against the test CA (an ``http://`` URL is plaintext)."""
    coordinator = CoordinatorClient(urls, fleet, secret, client=client, timeout=5.0,
                                    transport=transport())
    return FleetClient(coordinator, retry=RetryPolicy(timeout=timeout), io_timeout=10.0)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll every 20 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def file_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    """A sparse raw image of ``size`` bytes at ``path``: the shared disk of a file fleet."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def wait_in_sync(service: FleetService, timeout: float, readers: int = 2) -> None:
    """Wait until ``service`` is active, its map has ``readers`` in-sync readers and it takes
    reports signed now (past its term's skew margin: orchestrator.core.reports)."""

    def ready() -> bool:
        try:  # active, then its map: a lease lost (or not announced yet) in between is a no
            in_sync = len(service.require_active().in_sync_readers())
        except NotActive:
            return False
        return in_sync == readers and time.time() > (service.active_since or 0.0) + TAKEOVER_SKEW

    wait_until(ready, timeout, f"coordinator active with {readers} in-sync readers")


@contextmanager
def coordinated_file_fleet(
    fleet_factory: FleetFactory, directory: Path, admin: Any, pool: str, prefix: str,
    reader_set_delay: float = 0.0, plaintext_coordinator: bool = False,
) -> Iterator[tuple[AgentFleet, Coordinator, PidFencer]]:
    """A writer and two readers on a file image, one coordinator (state in RADOS ``pool``,
    fence = SIGKILL), ready with both readers in sync; the coordinator stops on exit.
    ``plaintext_coordinator``: it serves plain HTTP (tests of its HTTP parser); the agents
    still run TLS and report to its :meth:`Coordinator.tls_sibling`."""
    coordinator = start_api(plaintext=plaintext_coordinator)
    fleet = fleet_factory(
        f"file:{file_image(directory / 'image.raw')}",
        name=f"{prefix}-{uuid.uuid4().hex[:8]}",
        coordinator=coordinator.tls_sibling() if plaintext_coordinator else coordinator.url,
    )
    fencer = PidFencer(fleet)
    store = rados_store(admin, pool, fleet.name)
    try:
        wait_in_sync(start_service(coordinator, store, fencer, bootstrap_map(fleet),
                                   reader_set_delay=reader_set_delay), 20)
        yield fleet, coordinator, fencer
    finally:
        coordinator.stop()
        store.close()
