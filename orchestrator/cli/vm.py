"""`rbdfleet vm`: each VM's attachment, role switch, the VM's Ceph clients, and its fence."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from agents.errors import RbdfleetError
from orchestrator.cli._common import (
    DEFAULT_CONFIG,
    ConfigOption,
    DryRunOption,
    FleetArg,
    check_fleet,
    report,
    report_partial,
)
from orchestrator.cli._output import JsonOption, done, emit_json, print_table
from orchestrator.core.placement import vm_user
from orchestrator.services import open_services

app = typer.Typer(
    help="The fleet's VMs, straight through Ceph and libvirt (no coordinator needed): "
    "attachments, roles, Ceph clients, blocklist fencing.",
    no_args_is_help=True,
)


class Role(StrEnum):
    WRITER = "writer"
    READER = "reader"


VmArg = Annotated[str, typer.Argument(help="VM name from the config")]


@app.command("list")
def list_vms(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Each VM's domain, whether it runs, and how it holds the shared disk."""
    with open_services(config) as services:
        cfg, provisioner = services.config, services.provisioner
        rows = provisioner.attachments()
    if as_json:
        emit_json({"fleet": cfg.fleet.name, "serial": provisioner.serial, "vms": [
            {"vm": r.vm, "domain": r.domain, "uri": r.uri, "active": r.active,
             "mode": r.mode.value if r.mode else None, "user": r.user, "spare": r.spare}
            for r in rows]})
        return
    typer.echo(f"fleet {cfg.fleet.name}  image {cfg.ceph.pool}/{cfg.fleet.image}  "
               f"serial {provisioner.serial}")
    table = []
    for r in rows:
        state = {True: "running", False: "stopped", None: "missing"}[r.active]
        mode = {None: "-", "rw": "rw writer", "ro": "ro reader"}[r.mode.value if r.mode else None]
        name = (r.vm or "(not in fleet)") + (" spare" if r.spare else "")
        table.append((name, r.domain, state, mode, r.user or "-"))
    print_table(("VM", "DOMAIN", "STATE", "DISK", "USER"), table)


@app.command("set-role")
def set_role(
    fleet: FleetArg,
    vm: VmArg,
    role: Annotated[Role, typer.Argument(help="writer or reader")],
    config: ConfigOption = DEFAULT_CONFIG,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Re-attach so exactly one VM has the disk read-write: demote the old writer, then
    promote. Refuses anything that would leave two writers (or none)."""
    with open_services(config, progress=done) as services:
        cfg = services.config
        check_fleet(cfg, fleet)
        try:
            plan, applied = services.provisioner.set_role(vm, role.value, dry_run=dry_run)
        except RbdfleetError as exc:
            report_partial(exc, cfg.fleet.name)
            raise
        report(plan, applied, dry_run, as_json, f"nothing to do: {vm} is already {role.value}")


@app.command("clients")
def clients(fleet: FleetArg, vm: VmArg, config: ConfigOption = DEFAULT_CONFIG,
            as_json: JsonOption = False) -> None:
    """The VM's client addresses among the image's watchers (through its own cephx user)."""
    with open_services(config) as services:
        cfg = services.config
        check_fleet(cfg, fleet)
        cfg.vm(vm)
        addresses = services.fencer.clients(vm)
    if as_json:
        emit_json({"vm": vm, "user": vm_user(cfg.fleet.name, vm), "clients": addresses})
        return
    for addr in addresses:
        typer.echo(addr)


@app.command("fence")
def fence(fleet: FleetArg, vm: VmArg, config: ConfigOption = DEFAULT_CONFIG,
          as_json: JsonOption = False) -> None:
    """Blocklist the VM's Ceph clients directly, without the coordinator (disruptive).

    Exactly the VM's client addresses on the image are blocklisted and the osdmap awaited:
    its next I/O to the shared disk fails with EIO; the other VMs are untouched. The fleet
    map is NOT changed, so a coordinator still counts a fenced writer as the writer: use this
    only when no coordinator runs, then `rbdfleet fence` once one is back. With a coordinator,
    use `rbdfleet fence` (it fences and updates the map in law order).
    """
    with open_services(config) as services:
        cfg = services.config
        check_fleet(cfg, fleet)
        cfg.vm(vm)
        addresses = services.fencer.fence(vm)
    if as_json:
        emit_json({"vm": vm, "blocklisted": addresses})
        return
    if not addresses:
        typer.echo(f"{vm} has no client on the image: nothing to fence")
    for addr in addresses:
        typer.echo(f"blocklisted {addr}")

