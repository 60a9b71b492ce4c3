"""`rbdfleet coordinator run`, `failover`, `fence`, and the `[coordinator]` config table.

The `[coordinator]` table of rbdfleet.toml (docs/config.md, docs/coordinator.md) is read here,
with ``RBDFLEET_COORDINATOR_<KEY>`` overrides; the rest of the file is the shared fleet config.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import threading
import time
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator import config as fleet_config
from orchestrator.adapters.ceph import BlocklistFencer
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.adapters.rados_clients import RadosClientStore
from orchestrator.adapters.rados_state import RadosStateStore
from orchestrator.cli._output import JsonOption, emit_json, say
from orchestrator.cli.provision import (
    DEFAULT_CONFIG,
    ConfigOption,
    FleetArg,
    check_fleet,
    open_provisioner,
)
from orchestrator.client import (
    CoordinatorClient,
    FleetClient,
    RetryPolicy,
    Transport,
)
from orchestrator.config import FleetConfig
from orchestrator.coordinator.agent_control import HttpAgentControl
from orchestrator.coordinator.api import CoordinatorAPI
from orchestrator.coordinator.keys import read_master_keys
from orchestrator.coordinator.service import FleetService, ServiceSettings
from orchestrator.coordinator.write_path import FencedWriterRoles
from orchestrator.core.election import ElectionConfig
from orchestrator.core.fleetmap import FleetMap, Role, initial_map
from orchestrator.core.liveness import LivenessConfig
from orchestrator.core.placement import vm_user
from orchestrator.errors import ConfigError, PkiError
from orchestrator.pki import COORDINATOR as PKI_COORDINATOR
from orchestrator.pki import FleetPki, server_context
from orchestrator.ports import CoordinatorPorts
from orchestrator.provision import SystemClock

LOG = logging.getLogger(__name__)

app = typer.Typer(
    help="The coordinator (name node): grants, failure detection, failover.", no_args_is_help=True
)

ENV_PREFIX = "RBDFLEET_COORDINATOR_"


@dataclass(frozen=True)
class CoordinatorConfig:
    """The ``[coordinator]`` table (every key optional)."""

    urls: tuple[str, ...] = ("https://127.0.0.1:7470",)
    listen: str = "127.0.0.1:7470"
    lease_seconds: float = 2.0
    probe_interval: float = 0.2
    probe_timeout: float = 0.3
    suspect_after: float = 0.5
    dead_after: float = 1.2
    confirm_failures: int = 3
    retry_delay: float = 0.3
    grant_ttl: float = 60.0
    tls_cert: str | None = None  # default: coordinator.pem in the fleet's PKI directory
    tls_key: str | None = None
    insecure_plaintext: bool = False

    def liveness(self) -> LivenessConfig:
        """The failure detector's timings."""
        return LivenessConfig(
            probe_interval=self.probe_interval,
            probe_timeout=self.probe_timeout,
            suspect_after=self.suspect_after,
            dead_after=self.dead_after,
            confirm_failures=self.confirm_failures,
        )


_FLOATS = (
    "lease_seconds",
    "probe_interval",
    "probe_timeout",
    "suspect_after",
    "dead_after",
    "retry_delay",
    "grant_ttl",
)


def coordinator_config(path: Path, env: Mapping[str, str] = os.environ) -> CoordinatorConfig:
    """Read ``[coordinator]`` from ``path`` plus ``RBDFLEET_COORDINATOR_*`` overrides."""
    try:
        table = dict(tomllib.loads(path.read_text()).get("coordinator") or {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("path", f"{path}: {exc}") from exc
    fleet_config.check_names({"coordinator": table}, env)  # typos: refused, with a suggestion
    for var, value in env.items():
        if var.startswith(ENV_PREFIX):
            table[var[len(ENV_PREFIX) :].lower()] = value
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        where = f"coordinator.{key}"
        if key == "urls":
            urls = value.split(",") if isinstance(value, str) else value
            if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
                raise ConfigError(where, "must be a list of URLs")
            kwargs["urls"] = tuple(u.strip() for u in urls)
        elif key in _FLOATS:
            try:
                kwargs[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(where, "must be a number") from None
        elif key == "insecure_plaintext":
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                raise ConfigError(where, "must be true or false")
            kwargs[key] = value if isinstance(value, bool) else str(value).lower() == "true"
        elif key == "confirm_failures":
            try:
                kwargs[key] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(where, "must be an integer") from None
        else:  # listen, tls_cert, tls_key: check_names refused any other key
            kwargs[key] = str(value)
    result = CoordinatorConfig(**kwargs)
    result.liveness()  # validates the timings
    return result


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


def server_tls(cfg: FleetConfig, ccfg: CoordinatorConfig) -> tuple[ssl.SSLContext | None,
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
    return (server_context(cert, key, pki.ca_file),
            Transport(tls=True, ca_file=str(pki.ca_file), identity=(str(cert), str(key))))


def open_client(config_path: Path, timeout: float = 30.0) -> tuple[FleetClient, FleetConfig]:
    """A FleetClient for the config's fleet through its coordinators."""
    cfg = fleet_config.load(config_path)
    ccfg = coordinator_config(config_path)
    return FleetClient(coordinator_client(cfg, list(ccfg.urls)),
                       retry=RetryPolicy(timeout=timeout)), cfg


def bootstrap_map(cfg: FleetConfig) -> FleetMap:
    """Epoch 1 from the config: the configured writer, readers, spares."""
    members: dict[str, tuple[str, Role]] = {}
    for vm in cfg.vms:
        role: Role = (
            "spare" if vm.spare else ("writer" if vm.name == cfg.fleet.writer else "reader")
        )
        members[vm.name] = (f"{vm.address}:{cfg.fleet.agent_port}", role)
    return initial_map(cfg.fleet.name, cfg.fleet.writer, members)


ListenOption = Annotated[str | None, typer.Option("--listen", help="HOST:PORT to serve on")]
AdvertiseOption = Annotated[
    str | None, typer.Option("--advertise", help="URL clients and standbys use for this one")
]


@app.command("run")
def run(
    config: ConfigOption = DEFAULT_CONFIG,
    listen: ListenOption = None,
    advertise: AdvertiseOption = None,
) -> None:
    """Serve the fleet's client API; active under the RADOS lease, standby otherwise."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ccfg = coordinator_config(config)
    host, _, port = (listen or ccfg.listen).rpartition(":")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with open_provisioner(config) as (provisioner, handle, cfg), \
            LibvirtHypervisor() as lifecycle:  # its own connections: event watches
        masters = read_secret(cfg)
        clients = RadosClientStore(handle, cfg.ceph.pool, cfg.fleet.name)
        api = CoordinatorAPI({}, {cfg.fleet.name: clients}, time.time)
        tls, transport = server_tls(cfg, ccfg)
        bound_host, bound_port = api.serve(host or "127.0.0.1", int(port), tls)
        scheme = "https" if tls is not None else "http"
        url = advertise or f"{scheme}://{bound_host}:{bound_port}"
        holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        store = RadosStateStore(handle, cfg.ceph.pool, cfg.fleet.name, holder, ccfg.lease_seconds)
        fencer = BlocklistFencer(
            handle,
            cfg.ceph.pool,
            cfg.fleet.image,
            {v.name: vm_user(cfg.fleet.name, v.name) for v in cfg.vms},
        )
        agents = HttpAgentControl(transport)
        roles = FencedWriterRoles(provisioner)
        service = FleetService(
            CoordinatorPorts(store=store, fencer=fencer, agents=agents, clock=SystemClock(),
                             wall=time.time, role_switch=roles, spares=roles,
                             send_reader_set=agents.send_reader_set, hypervisor=lifecycle),
            ServiceSettings(
                url=url,
                liveness=ccfg.liveness(),
                election=ElectionConfig(retry_delay=ccfg.retry_delay),
                grant_ttl=ccfg.grant_ttl,
            ),
            secret=masters,
            bootstrap=bootstrap_map(cfg),
            domains={vm.name: (vm.uri, vm.domain) for vm in cfg.vms},
        )
        api.services[cfg.fleet.name] = service
        service.start()
        LOG.info("event=coordinator_serving fleet=%s url=%s holder=%s", cfg.fleet.name, url, holder)
        say(f"coordinator for fleet {cfg.fleet.name} serving on {url}")
        try:
            while not stop.wait(0.5):
                pass
        finally:
            service.stop()
            api.shutdown()
            store.close()
            clients.close()


def failover(
    fleet: FleetArg,
    to: Annotated[str | None, typer.Option("--to", help="the in-sync reader to promote")] = None,
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: JsonOption = False,
) -> None:
    """Move the write grant through the coordinator (disruptive): persist epoch+1, fence the
    writer, promote an in-sync reader, publish the map."""
    client, cfg = open_client(config)
    check_fleet(cfg, fleet)
    new = client.coordinator.failover(to)
    _print_map(new, as_json)


def fence(
    fleet: FleetArg,
    vm: Annotated[str, typer.Argument(help="the VM to fence (a name from the config)")],
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: JsonOption = False,
) -> None:
    """Fence a VM through the coordinator and update the fleet map (disruptive).

    The coordinator blocklists the VM's Ceph clients and takes it out of the map: a writer is
    replaced first, in law order (persist epoch, fence, promote, announce); a reader leaves the
    map at once (a spare comes in, if configured). This is the normal way to fence.
    `rbdfleet vm fence` only blocklists, without a coordinator and without changing the map:
    for when no coordinator runs.
    """
    client, cfg = open_client(config)
    check_fleet(cfg, fleet)
    new = client.coordinator.fence(vm)
    _print_map(new, as_json)


def _print_map(m: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(m)
        return
    typer.echo(f"fleet {m['fleet']}: epoch {m['epoch']} writer {m['writer']} ({m['phase']})")


def register(root: typer.Typer) -> None:
    """Add ``coordinator run``, ``failover`` and ``fence`` to the root app."""
    root.add_typer(app, name="coordinator")
    root.command("failover")(failover)
    root.command("fence")(fence)
