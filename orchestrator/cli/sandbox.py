"""`rbdfleet sandbox`: a throwaway Ceph cluster, namespace SSH hosts and VMs on one machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli._output import JsonOption, emit_json, print_table, say
from orchestrator.errors import SandboxError
from orchestrator.sandbox import lifecycle

app = typer.Typer(help="Run a complete rbdfleet world on this machine (root).",
                  no_args_is_help=True)

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", envvar="RBDFLEET_SANDBOX_DIR",
                 show_default="/var/tmp/rbdfleet-UID/sandbox",
                 help="sandbox directory"),
]


def _dir(value: Path | None) -> Path:
    return (value or lifecycle.default_dir()).absolute()


def _progress_printer() -> Any:
    started = time.monotonic()

    def show(message: str) -> None:
        say(f"[{time.monotonic() - started:6.1f}s] {message}")

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
    as_json: JsonOption = False,
) -> None:
    """Start Ceph (+ hosts + VMs) and write DIR/rbdfleet.toml."""
    request = lifecycle.SandboxRequest(vms=vms, hosts=hosts, osds=osds, objectstore=objectstore)
    summary = lifecycle.up(_dir(directory), request, progress=_progress_printer())
    if as_json:
        emit_json(summary.to_json())
        return
    typer.echo(f"sandbox up in {summary.dir} ({summary.timings.get('total')} s)")
    typer.echo(f"  config     {summary.config}")
    typer.echo(f"  ceph       {summary.ceph_conf}  mon {summary.mon}")
    typer.echo(f"  use it     export CEPH_CONF={summary.ceph_conf}; "
               f"rbdfleet --config {summary.config} ...")
    typer.echo(f"  stop it    rbdfleet sandbox down --dir {summary.dir}")
    rows = [("vm", vm["name"], vm["address"], f"domain {vm['domain']}") for vm in summary.vms]
    rows += [("host", h["name"], h["address"], f"root {h['root']}") for h in summary.hosts]
    if rows:
        print_table(("KIND", "NAME", "ADDRESS", "WHERE"), rows)


@app.command()
def status(
    directory: DirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show what the sandbox recorded and whether it is alive."""
    report = lifecycle.status(_dir(directory))
    if as_json:
        emit_json(report)
        return
    if not report["resources"]:
        typer.echo(f"no sandbox in {report['dir']}")
        return
    typer.echo(f"sandbox {report['dir']}: {'running' if report['running'] else 'stopped'}")
    rows = [
        (res["kind"], res.get("name") or res.get("path") or res.get("pid") or "",
         {True: "alive", False: "gone", None: "-"}[res["alive"]])
        for res in report["resources"]
    ]
    if report.get("health"):
        rows.append(("ceph health", report["health"], ""))
    print_table(("KIND", "WHAT", "STATE"), rows)


@app.command()
def down(directory: DirOption = None) -> None:
    """Stop and remove exactly what the sandbox's state file records (destructive: the
    sandbox's Ceph cluster, VMs and every file stored in them are gone)."""
    errors = lifecycle.down(_dir(directory), progress=_progress_printer())
    if errors:
        raise SandboxError("down left resources behind:\n  " + "\n  ".join(errors))
