"""`rbdfleet provision` / `rbdfleet deprovision`: the shared image, VM users, libvirt attach.

The provisioner comes from the fleet's services (:mod:`orchestrator.services`); this module
also holds the options every command shares (``--config``, the FLEET argument).
"""

from __future__ import annotations

import datetime
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer

from agents.errors import RbdfleetError
from orchestrator import config as fleet_config
from orchestrator.cli._output import JsonOption, done, emit_json, say
from orchestrator.config import FleetConfig
from orchestrator.coordinator.config import coordinator_config
from orchestrator.core.placement import Plan
from orchestrator.errors import ConfigError
from orchestrator.provision import (
    Applied,
    check_partial,
    provision_pki,
    undo_hint,
)
from orchestrator.services import open_services

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="RBDFLEET_CONFIG", help="fleet config (docs/config.md)"),
]
DEFAULT_CONFIG = Path("rbdfleet.toml")
FleetArg = Annotated[
    str,
    typer.Argument(help="the fleet's name, as in the config's fleet.name: a check that the "
                   "command acts on the fleet you mean"),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="print the plan only")]


def check_fleet(config: FleetConfig, fleet: str) -> None:
    """Refuse a FLEET argument that is not the config's fleet."""
    if fleet != config.fleet.name:
        raise ConfigError(
            "fleet.name", f"the config describes fleet {config.fleet.name!r}, not {fleet!r}")


def plan_json(plan: Plan, applied: list[Applied], dry_run: bool) -> dict[str, Any]:
    """The JSON form of a plan and of what ran."""
    return {
        "dry_run": dry_run,
        "changed": bool(applied),
        "plan": [str(a) for a in plan.actions],
        "notes": list(plan.notes),
        "applied": [{"action": str(a.action), "seconds": round(a.seconds, 3)} for a in applied],
    }


def report(plan: Plan, applied: list[Applied], dry_run: bool, as_json: bool,
           nothing: str) -> None:
    """Print the plan (dry run), what ran, or that nothing had to change."""
    if as_json:
        emit_json(plan_json(plan, applied, dry_run))
        return
    for note in plan.notes:
        typer.echo(f"note: {note}")
    if plan.empty:
        typer.echo(nothing)
        return
    if dry_run:
        typer.echo("plan (dry run, nothing changed):")
        for n, action in enumerate(plan.actions, start=1):
            typer.echo(f"  {n}. {action}")
        return
    total = sum(a.seconds for a in applied)
    typer.echo(f"applied {len(applied)} step(s) in {total:.2f} s:")
    for a in applied:
        typer.echo(f"  {a.action}  [{a.seconds:.2f} s]")


def report_partial(exc: RbdfleetError, fleet: str) -> None:
    """On failure: what was done before it, and how to undo it (stderr)."""
    done = check_partial(exc)
    if done:
        say("done before the failure:")
        for a in done:
            say(f"  {a.action}")
    say(undo_hint(done, fleet))


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


def coordinator_hosts(config_path: Path) -> list[str]:
    """The hosts the coordinators serve on (``[coordinator] urls`` and ``listen``): the SANs
    of their certificate."""
    ccfg = coordinator_config(config_path)
    hosts = [urllib.parse.urlsplit(u).hostname for u in ccfg.urls]
    listen = ccfg.listen.rpartition(":")[0].strip("[]")
    return sorted({h for h in (*hosts, listen) if h and h != "0.0.0.0"})


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
