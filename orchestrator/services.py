"""The composition root: the one module that turns a fleet's config into adapters.

Everything that runs against real parts gets its adapters here: the CLI's commands, the
sandbox demo, the benches and the test harness. So a binding is chosen, and its connection
opened and closed, in one place, and the use cases, ports and core only ever see ports.
tests/unit/test_layering.py holds it: besides the adapters themselves (and the shipped test
kit, whose fakes reuse their parsers) only this module imports ``orchestrator.adapters``.

:func:`open_services` yields the :class:`Services` of one config file. Each adapter is built
on first use (``rbdfleet put`` opens no Ceph connection, ``rbdfleet vm list`` asks no
coordinator) and whatever was opened is closed, newest first, on exit. The module functions
build what a command needs from the config besides adapters (client credential, coordinator
TLS, the bootstrap map), and the pieces the test harness wires without a config file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from agents.tlsreload import ContextSource
from orchestrator import config as fleet_config
from orchestrator.adapters import ceph
from orchestrator.adapters.agent_control import HttpAgentControl
from orchestrator.adapters.ansible import (
    CoordinatorInventoryHost,
    Inventory,
    InventoryHost,
    TlsFiles,
    ssh_vars,
    write_package,
)
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.adapters.rados_clients import RadosClientStore
from orchestrator.adapters.rados_state import RadosStateStore
from orchestrator.adapters.ssh import (
    Opener,
    ParamikoShell,
    RemoteForwards,
    allow_any_target,
    require_local_target,
)
from orchestrator.client import CoordinatorClient, FleetClient, RetryPolicy
from orchestrator.config import FleetConfig, SshConfig
from orchestrator.coordinator.config import CoordinatorConfig, coordinator_config
from orchestrator.coordinator.keys import read_master_keys
from orchestrator.coordinator.service import FleetService, ServiceSettings
from orchestrator.coordinator.write_path import FencedWriterRoles
from orchestrator.coordinator_hosts import CoordinatorHost, coordinator_targets, role_variables
from orchestrator.core.election import ElectionConfig
from orchestrator.core.fleetmap import FleetMap, Role, initial_map
from orchestrator.core.placement import vm_user
from orchestrator.deploy import AgentDeployer
from orchestrator.errors import AgentUnreachable, ConfigError, PkiError
from orchestrator.packaging import AgentPackage, CoordinatorPackage
from orchestrator.pki import COORDINATOR as PKI_COORDINATOR
from orchestrator.pki import FleetPki, reloading_server_context
from orchestrator.ports import (
    ClientStore,
    Clock,
    CoordinatorPorts,
    CredentialStore,
    Hypervisor,
    ImageStore,
    RemoteShell,
)
from orchestrator.provision import Provisioner, SystemClock
from orchestrator.rollout import FleetRollout, agent_config
from orchestrator.transport import Transport

LOG = logging.getLogger(__name__)

__all__ = [
    "Services",
    "bootstrap_map",
    "client_credential",
    "coordinator_client",
    "fleet_inventory",
    "open_client",
    "open_rollout",
    "open_services",
    "read_client_secret",
    "read_secret",
    "remote_forwards",
    "server_tls",
    "ssh_shell",
    "state_store",
]


class Services:
    """The adapters of the fleet in one config file, built on first use, closed by
    :meth:`close` (or on leaving :func:`open_services`)."""

    def __init__(self, config_path: Path, *,
                 progress: Callable[[str], None] | None = None) -> None:
        """``progress``: told each step the provisioner has done (the CLI prints them)."""
        self.config_path = config_path
        self.config: FleetConfig = fleet_config.load(config_path)
        self.progress = progress
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        """Close everything opened, newest first (stores before the Ceph connection)."""
        self._stack.close()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the config beyond rbdfleet.toml's fleet tables -------------------------------------

    @functools.cached_property
    def coordinator(self) -> CoordinatorConfig:
        """The ``[coordinator]`` table (with its environment overrides)."""
        return coordinator_config(self.config_path)

    @functools.cached_property
    def master_keys(self) -> tuple[bytes, ...]:
        """The fleet's master key(s), current first (:func:`read_secret`)."""
        return read_secret(self.config)

    # -- Ceph ------------------------------------------------------------------------------

    @functools.cached_property
    def _rados(self) -> Any:
        return self._stack.enter_context(ceph.cluster(self.config.ceph))

    @functools.cached_property
    def images(self) -> ImageStore:
        """RBD images of the fleet's cluster."""
        return ceph.RbdImageStore(self._rados)

    @functools.cached_property
    def credentials(self) -> CredentialStore:
        """Cephx users of the fleet's cluster."""
        return ceph.CephxCredentialStore(self._rados)

    @functools.cached_property
    def fencer(self) -> ceph.BlocklistFencer:
        """Fencer and FenceProof by OSD blocklist of each VM's own cephx user; also lists a
        VM's client addresses (``rbdfleet vm clients``)."""
        cfg = self.config
        return ceph.BlocklistFencer(self._rados, cfg.ceph.pool, cfg.fleet.image,
                                    {vm.name: vm_user(cfg.fleet.name, vm.name)
                                     for vm in cfg.vms})

    @functools.cached_property
    def clients(self) -> ClientStore:
        """The fleet's client credentials, in RADOS next to its coordinator state."""
        store = RadosClientStore(self._rados, self.config.ceph.pool, self.config.fleet.name)
        self._stack.callback(store.close)
        return store

    @functools.cached_property
    def holder(self) -> str:
        """This process's name on the coordinator lease (host, pid, a random suffix)."""
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    @functools.cached_property
    def state(self) -> RadosStateStore:
        """The fleet's coordinator state and lease (``[coordinator] lease_seconds``), held
        under :attr:`holder`."""
        store = state_store(self._rados, self.config.ceph.pool, self.config.fleet.name,
                            self.coordinator.lease_seconds, self.holder)
        self._stack.callback(store.close)
        return store

    # -- libvirt ---------------------------------------------------------------------------

    @functools.cached_property
    def hypervisor(self) -> Hypervisor:
        """Domains, secrets and disks over the VMs' libvirt URIs."""
        return self._stack.enter_context(LibvirtHypervisor())

    @functools.cached_property
    def domain_events(self) -> Hypervisor:
        """A second hypervisor with its own connections, for the coordinator's lifecycle
        event watches (their callbacks never wait behind a re-attach)."""
        return self._stack.enter_context(LibvirtHypervisor())

    @functools.cached_property
    def provisioner(self) -> Provisioner:
        """The fleet's provisioner over Ceph and libvirt; its fence proof (the blocklist)
        lets a role switch go on past a paused, fenced writer's disk."""
        return Provisioner(self.config, self.images, self.credentials, self.hypervisor,
                           progress=self.progress, fence_proof=self.fencer)

    # -- the rest --------------------------------------------------------------------------

    @functools.cached_property
    def clock(self) -> Clock:
        """The real clock."""
        return SystemClock()

    @functools.cached_property
    def shell(self) -> RemoteShell:
        """SSH to the fleet's VMs (``[ssh]``: key, pinned known_hosts); a sandbox config
        (``[sandbox]`` present) only reaches addresses on a local bridge."""
        guard = require_local_target if self.config.sandbox is not None else allow_any_target
        return self._stack.enter_context(ssh_shell(self.config.ssh, target_guard=guard))

    def transport(self) -> Transport:
        """HTTP to the fleet's coordinators and agents, verified against the fleet CA
        (``Transport.for_fleet``)."""
        return Transport.for_fleet(self.config)

    def agent_control(self, transport: Transport) -> HttpAgentControl:
        """The agents' control API (health, promote, demote, reader set) over ``transport``."""
        return HttpAgentControl(transport)

    def map_reader(self, transport: Transport) -> CoordinatorClient:
        """A client of the fleet's coordinators without a credential: the map only."""
        return CoordinatorClient(list(self.coordinator.urls), self.config.fleet.name, None,
                                 transport=transport)

    def fleet_client(self, timeout: float = 30.0) -> FleetClient:
        """The fleet's client library with this CLI's credential (:func:`open_client`)."""
        return FleetClient(coordinator_client(self.config, list(self.coordinator.urls)),
                           retry=RetryPolicy(timeout=timeout))

    def inventory(self, fleet_map: Mapping[str, Any] | None, package_dir: Path,
                  key_dir: Path, coordinator_hosts: Sequence[CoordinatorHost] = (),
                  coordinator_port: int = 7470, libvirt_uri: str | None = None) -> Inventory:
        """The fleet as an Ansible inventory (:func:`fleet_inventory`) with the agents
        tarball written to ``package_dir`` (once per version) and the VMs' keys in
        ``key_dir``; with ``coordinator_hosts``, the group ``rbdfleet_coordinators`` too, its
        package beside the agents' and each host's files (what ``rbdfleet coordinator
        install`` would install) staged under ``package_dir/coordinators/<fleet>/``."""
        package = AgentPackage.build()
        found = fleet_inventory(self.config, coordinators=self.coordinator.urls,
                                fleet_map=fleet_map,
                                package=(write_package(package, package_dir), package.version),
                                key_dir=key_dir)
        if not coordinator_hosts:
            return found
        targets = coordinator_targets(self.config, self.coordinator, coordinator_hosts,
                                      coordinator_port, libvirt_uri)
        coordinator = CoordinatorPackage.build()
        tarball = write_package(coordinator, package_dir)
        staged = package_dir / "coordinators" / self.config.fleet.name
        python = "{}.{}".format(*sys.version_info[:2])
        hosts = [CoordinatorInventoryHost(t.host.name, t.host.address, role_variables(
                     t, coordinator, tarball, staged, python)) for t in targets]
        return dataclasses.replace(found, coordinators=hosts)

    def fleet_service(self, url: str, agents: Transport) -> FleetService:
        """The fleet's coordinator loop, advertised as ``url``: state and lease in RADOS,
        fence by blocklist, role switch and spares through the provisioner, the domains'
        lifecycle events as death evidence, agents controlled over ``agents``."""
        ccfg, cfg = self.coordinator, self.config
        control = self.agent_control(agents)
        roles = FencedWriterRoles(self.provisioner, self.state, self.fencer)
        ports = CoordinatorPorts(store=self.state, fencer=self.fencer, agents=control,
                                 clock=self.clock, wall=time.time, role_switch=roles,
                                 spares=roles, send_reader_set=control.send_reader_set,
                                 hypervisor=self.domain_events)
        settings = ServiceSettings(url=url, liveness=ccfg.liveness(),
                                   election=ElectionConfig(retry_delay=ccfg.retry_delay),
                                   grant_ttl=ccfg.grant_ttl)
        return FleetService(ports, settings, secret=self.master_keys,
                            bootstrap=bootstrap_map(cfg),
                            domains={vm.name: (vm.uri, vm.domain) for vm in cfg.vms})


@contextlib.contextmanager
def open_services(config_path: Path, *,
                  progress: Callable[[str], None] | None = None) -> Iterator[Services]:
    """``with open_services(path) as services:`` the fleet's adapters, closed on exit."""
    with Services(config_path, progress=progress) as services:
        yield services


def open_client(config_path: Path, timeout: float = 30.0) -> tuple[FleetClient, FleetConfig]:
    """A FleetClient for the config's fleet through its coordinators (it holds no adapter:
    nothing to close), and the config."""
    services = Services(config_path)
    return services.fleet_client(timeout), services.config


@contextlib.contextmanager
def open_rollout(config_path: Path, *,
                 progress: Callable[[str], None] = LOG.info) -> Iterator[FleetRollout]:
    """``with open_rollout(path) as rollout:`` a FleetRollout for the fleet in
    ``config_path`` (told each step through ``progress``); its SSH connections close on exit.

    Roles come from the active coordinator's map when one answers, else from the config.
    """
    with open_services(config_path) as services:
        cfg, urls = services.config, services.coordinator.urls
        secret = services.master_keys
        transport = services.transport()  # the fleet CA verifies coordinators and agents
        try:
            fleet_map: dict[str, Any] | None = services.map_reader(transport).map()
        except AgentUnreachable:
            fleet_map = None  # no coordinator yet: the bootstrap roles of the config
        shell = services.shell
        deployer = AgentDeployer(shell, AgentPackage.build())
        yield FleetRollout(
            cfg,
            shell,
            deployer,
            secret,
            coordinators=urls,
            health=services.agent_control(transport).health,
            fleet_map=fleet_map,
            progress=progress,
        )


# -- what commands need from the config besides adapters -----------------------------------


def read_secret(cfg: FleetConfig) -> tuple[bytes, ...]:
    """The fleet's master key(s) (current first); refused when group/other may read them."""
    return read_master_keys(cfg.fleet.secret_file)


def read_client_secret(path: Path, what: str = "fleet.client_secret_file") -> bytes:
    """A client secret file (hex, as ``rbdfleet client add`` writes it; mode 0600)."""
    (line, *_) = read_master_keys(path, what)
    try:
        return bytes.fromhex(line.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(what, f"{path} does not hold a hex client secret") from exc


def client_credential(cfg: FleetConfig) -> tuple[str, bytes]:
    """This CLI's client name and secret (``[fleet] client``, ``client_secret_file``)."""
    path = cfg.fleet.client_secret_file
    if path is None:
        raise ConfigError("fleet.client_secret_file", "needed to talk to the coordinator: "
                          "`rbdfleet client add NAME --scope admin --out FILE` makes one")
    return cfg.fleet.client, read_client_secret(path)


def coordinator_client(cfg: FleetConfig, urls: list[str]) -> CoordinatorClient:
    """A CoordinatorClient of the config's fleet with this CLI's client credential, verifying
    coordinators and agents against the fleet CA."""
    name, secret = client_credential(cfg)
    return CoordinatorClient(urls, cfg.fleet.name, secret, client=name,
                             transport=Transport.for_fleet(cfg))


def server_tls(cfg: FleetConfig, ccfg: CoordinatorConfig) -> tuple[ContextSource | None,
                                                                   Transport]:
    """The coordinator's TLS server context (None: plaintext) and its transport to the agents
    (presenting its certificate: mutual TLS). TLS unless ``insecure_plaintext`` (in
    ``[coordinator]`` or ``[tls]``), logged as a warning."""
    if ccfg.insecure_plaintext or cfg.tls.insecure_plaintext:
        LOG.warning("event=insecure_plaintext fleet=%s tls=off reason=\"the coordinator serves "
                    "and controls agents in the clear\"", cfg.fleet.name)
        return None, Transport()
    pki = FleetPki(cfg.pki_dir, cfg.fleet.name)
    if ccfg.tls_cert and ccfg.tls_key:
        cert, key = Path(ccfg.tls_cert), Path(ccfg.tls_key)
    else:
        try:
            cert, key = pki.identity(PKI_COORDINATOR)
        except PkiError as exc:
            raise ConfigError("coordinator.tls_cert", f"{exc}; or set [coordinator] "
                              "insecure_plaintext = true") from exc
    # rebuilt when the certificate, CA or CRL (crl.pem beside the CA) change: no restart
    return (reloading_server_context(cert, key, pki.ca_file),
            Transport(tls=True, ca_file=str(pki.ca_file), identity=(str(cert), str(key))))


def bootstrap_map(cfg: FleetConfig) -> FleetMap:
    """Epoch 1 from the config: the configured writer, readers, spares."""
    members: dict[str, tuple[str, Role]] = {}
    for vm in cfg.vms:
        role: Role = (
            "spare" if vm.spare else ("writer" if vm.name == cfg.fleet.writer else "reader")
        )
        members[vm.name] = (f"{vm.address}:{cfg.fleet.agent_port}", role)
    return initial_map(cfg.fleet.name, cfg.fleet.writer, members)


def fleet_inventory(cfg: FleetConfig, *, coordinators: Sequence[str],
                    fleet_map: Mapping[str, Any] | None,
                    package: tuple[Path, str] | None, key_dir: Path) -> Inventory:
    """The fleet's VMs as an :class:`Inventory` (pure: the map and package are inputs).

    ``fleet_map``: the coordinator's map (None: the config's writer at epoch 1);
    ``package``: the agents tarball on this machine and its version; ``key_dir``: where the
    VMs' own keys are on this machine (:func:`write_agent_keys`).
    """
    if cfg.ssh.key is None or cfg.ssh.known_hosts is None:
        raise ConfigError("ssh.key", "ssh.key and ssh.known_hosts are needed for an inventory")
    writer, epoch = cfg.fleet.writer, 1
    if fleet_map is not None:
        writer, epoch = fleet_map.get("writer") or "", int(fleet_map["epoch"])
    hosts = [InventoryHost(vm.name, vm.address, "/", agent_config(
                 cfg, vm.name, coordinators=coordinators, writer=writer, epoch=epoch),
                 spare=vm.spare)
             for vm in cfg.vms]
    variables = ssh_vars(cfg.ssh.user, cfg.ssh.key, cfg.ssh.known_hosts)
    variables["rbdfleet_agent_secret_src"] = str(key_dir / "{{ inventory_hostname }}.key")
    if not cfg.tls.insecure_plaintext:  # each VM's certificate and key from the fleet's PKI
        variables.update(TlsFiles(cfg.pki_dir / "{{ inventory_hostname }}.pem",
                                  cfg.pki_dir / "{{ inventory_hostname }}.key",
                                  cfg.pki_dir / "ca.pem").role_vars())
    if package is not None:
        variables["rbdfleet_agent_package"] = str(package[0])
        variables["rbdfleet_agent_version"] = package[1]
    return Inventory(hosts, variables)


# -- pieces without a config file (the test harness's fleets of local agent processes) -----


def state_store(handle: Any, pool: str, fleet: str, lease_seconds: float,
                holder: str) -> RadosStateStore:
    """A fleet's coordinator state and lease in ``pool`` over a connected rados handle;
    the caller closes it."""
    return RadosStateStore(handle, pool, fleet, holder, lease_seconds)


def remote_forwards(address: str, user: str, key: Path, known_hosts: Path,
                    forwards: Callable[[], Mapping[int, Opener]]) -> RemoteForwards:
    """Ports on a local-bridge host's loopback carried to sockets of this machine over SSH,
    kept across its reboots (the sandbox's uplink into its guests); not started."""
    return RemoteForwards(address, user, key, known_hosts, forwards)


def ssh_shell(ssh: SshConfig, **options: Any) -> ParamikoShell:
    """SSH with the ``[ssh]`` table's user, key and pinned known_hosts (``options``: the
    shell's own, e.g. ``target_guard``, ``connect_timeout``); the caller closes it."""
    return ParamikoShell.from_config(ssh, **options)
