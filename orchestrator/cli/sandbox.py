"""`rbdfleet sandbox`: a throwaway Ceph cluster, namespace SSH hosts and VMs on one machine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.errors import SandboxError
from orchestrator.sandbox import lifecycle

app = typer.Typer(help="Run a complete rbdfleet world on this machine (root).",
                  no_args_is_help=True)

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="Sandbox directory [default: $RBDFLEET_SANDBOX_DIR or "
                 "/var/tmp/rbdfleet-UID/sandbox]"),
]


def _dir(value: Path | None) -> Path:
    return (value or lifecycle.default_dir()).absolute()


def _progress_printer() -> Any:
    started = time.monotonic()

    def show(message: str) -> None:
        typer.echo(f"[{time.monotonic() - started:6.1f}s] {message}", err=True)

    return show


@app.command()
def up(
    directory: DirOption = None,
    vms: Annotated[int, typer.Option("--vms", help="libvirt guests to boot")] = 3,
    hosts: Annotated[int, typer.Option("--hosts", help="network-namespace SSH hosts")] = 0,
    osds: Annotated[int, typer.Option("--osds", help="Ceph OSDs")] = 1,
    objectstore: Annotated[str, typer.Option("--objectstore",
                                             help="memstore (fast) or bluestore (survives "
                                                  "restarts)")] = "memstore",
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Start Ceph (+ hosts + VMs) and write DIR/rbdfleet.toml."""
    request = lifecycle.SandboxRequest(vms=vms, hosts=hosts, osds=osds, objectstore=objectstore)
    summary = lifecycle.up(_dir(directory), request, progress=_progress_printer())
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
        return
    typer.echo(f"sandbox up in {summary.dir} ({summary.timings.get('total')} s)")
    typer.echo(f"  config     {summary.config}")
    typer.echo(f"  ceph       {summary.ceph_conf}  mon {summary.mon}")
    for vm in summary.vms:
        typer.echo(f"  vm         {vm['name']:<6} {vm['address']:<15} domain {vm['domain']}")
    for host in summary.hosts:
        typer.echo(f"  host       {host['name']:<6} {host['address']:<15} root {host['root']}")
    typer.echo(f"  use it     export CEPH_CONF={summary.ceph_conf}; "
               f"rbdfleet --config {summary.config} ...")
    typer.echo(f"  stop it    rbdfleet sandbox down --dir {summary.dir}")


@app.command()
def status(
    directory: DirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show what the sandbox recorded and whether it is alive."""
    report = lifecycle.status(_dir(directory))
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    if not report["resources"]:
        typer.echo(f"no sandbox in {report['dir']}")
        return
    typer.echo(f"sandbox {report['dir']}: {'running' if report['running'] else 'stopped'}")
    for res in report["resources"]:
        alive = {True: "alive", False: "gone", None: "-"}[res["alive"]]
        label = res.get("name") or res.get("path") or res.get("pid") or ""
        typer.echo(f"  {res['kind']:<18} {label!s:<40} {alive}")
    if report.get("health"):
        typer.echo(f"  ceph health        {report['health']}")


@app.command()
def down(directory: DirOption = None) -> None:
    """Stop and remove exactly what the sandbox's state file records."""
    errors = lifecycle.down(_dir(directory), progress=_progress_printer())
    if errors:
        raise SandboxError("down left resources behind:\n  " + "\n  ".join(errors))
