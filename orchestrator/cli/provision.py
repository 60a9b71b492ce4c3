"""`rbdfleet provision` / `rbdfleet deprovision`: the shared image, VM users, libvirt attach.

The provisioner comes from the fleet's services (:mod:`orchestrator.services`); the options
every command shares (``--config``, the FLEET argument) are in :mod:`orchestrator.cli._common`.
"""

from __future__ import annotations

import datetime
from typing import Annotated

import typer

from agents.errors import RbdfleetError
from orchestrator import config as fleet_config
from orchestrator.cli._common import (
    DEFAULT_CONFIG,
    ConfigOption,
    DryRunOption,
    coordinator_hosts,
    report,
    report_partial,
)
from orchestrator.cli._output import JsonOption, done, say
from orchestrator.config import FleetConfig
from orchestrator.provision import (
    provision_pki,
)
from orchestrator.services import open_services


def provision(
    config: ConfigOption = DEFAULT_CONFIG,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Create the pool (if allowed) and image, a cephx user + libvirt secret per VM, and
    attach the disk: writer read-write, readers read-only; make the fleet's TLS CA and
    certificates on this host ([tls] dir). Running it again changes nothing."""
    with open_services(config, progress=done) as services:
        cfg = services.config
        try:
            plan, applied = services.provisioner.provision(dry_run=dry_run)
        except RbdfleetError as exc:
            report_partial(exc, cfg.fleet.name)
            raise
        report(plan, applied, dry_run, as_json,
               f"nothing to do: fleet {cfg.fleet.name} is provisioned as configured")
        if not dry_run:
            for made in provision_pki(cfg, coordinator_hosts(config),
                                      datetime.datetime.now(datetime.UTC)):
                say(f"  made: {made}")


def confirm_destruction(config: FleetConfig, fleet_name: str | None, really: bool) -> None:
    """Refuse to destroy the fleet's image unless its name is given back or the flag is set."""
    if really or fleet_name == config.fleet.name:
        return
    what = f"the image {config.ceph.pool}/{config.fleet.image} of fleet {config.fleet.name!r}"
    if fleet_name is None:
        raise typer.BadParameter(
            f"--delete-image destroys {what} and every file in it: pass "
            f"--fleet-name {config.fleet.name} (or --yes-i-really-mean-it)",
            param_hint="--fleet-name",
        )
    raise typer.BadParameter(
        f"{fleet_name!r} is not the configured fleet: --delete-image would destroy {what}",
        param_hint="--fleet-name",
    )


def deprovision(
    config: ConfigOption = DEFAULT_CONFIG,
    delete_image: Annotated[bool, typer.Option(
        "--delete-image",
        help="also remove the image (every file in the fleet: destructive), the VMs' cephx "
             "users and secrets; needs --fleet-name or --yes-i-really-mean-it")] = False,
    fleet_name: Annotated[str | None, typer.Option(
        "--fleet-name", help="the configured fleet's name, to confirm --delete-image")] = None,
    really: Annotated[bool, typer.Option(
        "--yes-i-really-mean-it", help="confirm --delete-image without --fleet-name "
                                       "(scripts)")] = False,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Detach the fleet's disk from every domain (writer first).

    With --delete-image also delete the image and the VMs' Ceph users: every file in the fleet
    is lost. That needs --fleet-name NAME (the configured fleet.name) or
    --yes-i-really-mean-it; --dry-run needs neither.
    """
    if delete_image and not dry_run:
        confirm_destruction(fleet_config.load(config), fleet_name, really)
    with open_services(config, progress=done) as services:
        cfg = services.config
        try:
            plan, applied = services.provisioner.deprovision(delete_image=delete_image,
                                                             dry_run=dry_run)
        except RbdfleetError as exc:
            report_partial(exc, cfg.fleet.name)
            raise
        report(plan, applied, dry_run, as_json,
               f"nothing to do: fleet {cfg.fleet.name} is not attached anywhere")
