"""`rbdfleet provision` / `rbdfleet deprovision`: the shared image, VM users, libvirt attach.

Also the composition root the `vm` commands reuse: :func:`open_provisioner` wires the Ceph
and libvirt adapters into a :class:`~orchestrator.provision.Provisioner`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from agents.errors import RbdfleetError
from orchestrator import config as fleet_config
from orchestrator.adapters import ceph
from orchestrator.adapters.libvirt import LibvirtHypervisor
from orchestrator.config import FleetConfig
from orchestrator.core.placement import Plan, vm_user
from orchestrator.errors import ConfigError
from orchestrator.provision import Applied, Provisioner, check_partial, undo_hint

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="RBDFLEET_CONFIG",
                 help="fleet config (docs/config.md) [env RBDFLEET_CONFIG]"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]
DEFAULT_CONFIG = Path("rbdfleet.toml")


@contextlib.contextmanager
def open_provisioner(config_path: Path) -> Iterator[tuple[Provisioner, Any, FleetConfig]]:
    """``(provisioner, rados handle, config)`` for the fleet in ``config_path``; closes both."""
    config = fleet_config.load(config_path)
    with ceph.cluster(config.ceph) as handle, LibvirtHypervisor() as hypervisor:
        # the proof that lets a role switch go on past a paused, fenced writer's disk
        proof = ceph.BlocklistFencer(handle, config.ceph.pool, config.fleet.image,
                                     {vm.name: vm_user(config.fleet.name, vm.name)
                                      for vm in config.vms})
        yield (Provisioner(config, ceph.RbdImageStore(handle), ceph.CephxCredentialStore(handle),
                           hypervisor, progress=lambda msg: typer.echo(f"  done: {msg}",
                                                                       err=True),
                           fence_proof=proof),
               handle, config)


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
        typer.echo(json.dumps(plan_json(plan, applied, dry_run), indent=2))
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
        typer.echo("done before the failure:", err=True)
        for a in done:
            typer.echo(f"  {a.action}", err=True)
    typer.echo(undo_hint(done, fleet), err=True)


def provision(
    config: ConfigOption = DEFAULT_CONFIG,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
    as_json: JsonOption = False,
) -> None:
    """Create the pool (if allowed) and image, a cephx user + libvirt secret per VM, and
    attach the disk: writer read-write, readers read-only. Running it again changes nothing."""
    with open_provisioner(config) as (provisioner, _, cfg):
        try:
            plan, applied = provisioner.provision(dry_run=dry_run)
        except RbdfleetError as exc:
            report_partial(exc, cfg.fleet.name)
            raise
        report(plan, applied, dry_run, as_json,
               f"nothing to do: fleet {cfg.fleet.name} is provisioned as configured")


def deprovision(
    config: ConfigOption = DEFAULT_CONFIG,
    delete_image: Annotated[bool, typer.Option(
        "--delete-image", help="also remove the image, the VMs' cephx users and secrets")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
    as_json: JsonOption = False,
) -> None:
    """Detach the fleet's disk from every domain (writer first)."""
    with open_provisioner(config) as (provisioner, _, cfg):
        try:
            plan, applied = provisioner.deprovision(delete_image=delete_image, dry_run=dry_run)
        except RbdfleetError as exc:
            report_partial(exc, cfg.fleet.name)
            raise
        report(plan, applied, dry_run, as_json,
               f"nothing to do: fleet {cfg.fleet.name} is not attached anywhere")
