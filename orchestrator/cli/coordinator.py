"""`rbdfleet coordinator run`, `install`, `uninstall`, `failover` and `fence`.

``coordinator run`` serves the API over the fleet's services (:mod:`orchestrator.services`);
its settings are the ``[coordinator]`` table (:mod:`orchestrator.coordinator.config`).
``coordinator install`` makes it a systemd service on hosts (:mod:`orchestrator.coordinator_hosts`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Annotated, Any

import typer

from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption, FleetArg, check_fleet
from orchestrator.cli._output import JsonOption, emit_json, print_table, say
from orchestrator.coordinator.api import CoordinatorAPI
from orchestrator.coordinator_hosts import (
    CoordinatorHost,
    CoordinatorInstaller,
    CoordinatorResult,
    CoordinatorTarget,
    coordinator_targets,
)
from orchestrator.packaging import CoordinatorPackage
from orchestrator.services import Services, open_client, open_services, server_tls

LOG = logging.getLogger(__name__)

app = typer.Typer(
    help="The coordinator (name node): grants, failure detection, failover.", no_args_is_help=True
)

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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with open_services(config, progress=lambda msg: say(f"  done: {msg}")) as services:
        cfg, ccfg = services.config, services.coordinator
        host, _, port = (listen or ccfg.listen).rpartition(":")
        services.master_keys  # noqa: B018  (a bad key file is refused before serving)
        api = CoordinatorAPI({}, {cfg.fleet.name: services.clients}, time.time)
        tls, transport = server_tls(cfg, ccfg)
        bound_host, bound_port = api.serve(host or "127.0.0.1", int(port), tls)
        scheme = "https" if tls is not None else "http"
        url = advertise or f"{scheme}://{bound_host}:{bound_port}"
        service = services.fleet_service(url, transport)
        api.services[cfg.fleet.name] = service
        service.start()
        LOG.info("event=coordinator_serving fleet=%s url=%s holder=%s", cfg.fleet.name, url,
                 services.holder)
        say(f"coordinator for fleet {cfg.fleet.name} serving on {url}")
        try:
            while not stop.wait(0.5):
                pass
        finally:
            service.stop()
            api.shutdown()


HostsArg = Annotated[list[str], typer.Argument(
    help="hosts: VM names of the config or addresses, reached over SSH as [ssh] says")]
PortOption = Annotated[int, typer.Option("--port", help="the port each coordinator serves on")]
LibvirtUriOption = Annotated[str | None, typer.Option(
    "--libvirt-uri", help="how the hosts reach the hypervisor that this machine reaches "
    "locally (every VM whose URI has no host gets this one), e.g. qemu+ssh://root@hv1/system")]


@app.command("install")
def install(
    hosts: HostsArg,
    config: ConfigOption = DEFAULT_CONFIG,
    port: PortOption = 7470,
    libvirt_uri: LibvirtUriOption = None,
    as_json: JsonOption = False,
) -> None:
    """Install the coordinator as a systemd service on HOSTS, one after another: the first
    to start takes the fleet's lease (active), the others stand by and take over when it
    dies. Each URL https://HOST:PORT must be one of [coordinator] urls. Idempotent."""
    with open_services(config) as services:
        installer, targets = _installer(services, hosts, port, libvirt_uri)
        _report(installer.install(targets), as_json)


@app.command("uninstall")
def uninstall(
    hosts: HostsArg,
    config: ConfigOption = DEFAULT_CONFIG,
    port: PortOption = 7470,
    as_json: JsonOption = False,
) -> None:
    """Stop the coordinator service on HOSTS and remove its unit and files."""
    with open_services(config) as services:
        installer, targets = _installer(services, hosts, port, None)
        _report(installer.uninstall(targets), as_json)


def _installer(services: Services, hosts: list[str], port: int, libvirt_uri: str | None
               ) -> tuple[CoordinatorInstaller, list[CoordinatorTarget]]:
    cfg, ccfg = services.config, services.coordinator
    transport = services.transport()

    def health(url: str) -> str:
        answer = transport.request("coordinator", url, "GET", "/v1/health", timeout=5.0).body
        return "active" if answer["fleets"].get(cfg.fleet.name) else "standby"

    targets = coordinator_targets(cfg, ccfg, [CoordinatorHost.named(cfg, h) for h in hosts],
                                  port, libvirt_uri)
    return CoordinatorInstaller(services.shell, CoordinatorPackage.build, health,
                                fleet_urls=ccfg.urls), targets


def _report(results: dict[str, CoordinatorResult], as_json: bool) -> None:
    if as_json:
        emit_json({name: {"url": r.url, "role": r.role, "version": r.version,
                          "actions": list(r.actions), "seconds": r.seconds}
                   for name, r in results.items()})
        return
    print_table(("HOST", "URL", "ROLE", "ACTIONS"),
                [(name, r.url, r.role or "-", ", ".join(r.actions) or "unchanged")
                 for name, r in results.items()])


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
    """Add ``coordinator run``, ``install``, ``uninstall``, ``failover`` and ``fence``."""
    root.add_typer(app, name="coordinator")
    root.command("failover")(failover)
    root.command("fence")(fence)
