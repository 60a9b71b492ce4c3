"""`rbdfleet deploy` / `rbdfleet undeploy`: the fleet's agents on its VMs over SSH.

A :class:`~orchestrator.rollout.FleetRollout` from the composition root
(:func:`orchestrator.services.open_rollout`): SSH with the ``[ssh]`` table's key and pinned
known_hosts (in a sandbox config only to addresses on a local bridge), the fleet secret and
TLS material (``[tls] dir``), and the first ``[coordinator]`` URL the agents report to.
"""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption
from orchestrator.cli._output import JsonOption, emit_json, print_table, say_step
from orchestrator.deploy import HostResult
from orchestrator.services import open_rollout

FormatOption = Annotated[
    bool,
    typer.Option(
        "--format-if-blank/--no-format",
        help="on the writer VM, format the shared image when it is blank",
    ),
]


def deploy(
    config: ConfigOption = DEFAULT_CONFIG,
    format_if_blank: FormatOption = True,
    as_json: JsonOption = False,
) -> None:
    """Install the agent on every VM, format a blank image on the writer, start the readers
    and then the writer. Agents already running are left alone (running it again changes
    nothing); after a failover a stopped old writer comes back as a reader."""
    with open_rollout(config, progress=say_step) as rollout:
        report = rollout.deploy(format_if_blank=format_if_blank)
    if as_json:
        emit_json(report.to_json())
        return
    _print_hosts(report.hosts)
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items())
    typer.echo(f"deploy {'changed' if report.changed else 'changed nothing'} ({steps})")


def undeploy(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Stop every VM's agent (SIGTERM, then SIGKILL after a grace period): the fleet serves
    nothing until `rbdfleet deploy` (disruptive; the image and its files stay)."""
    with open_rollout(config, progress=say_step) as rollout:
        results = rollout.stop()
    if as_json:
        emit_json({n: {"actions": list(r.actions)} for n, r in results.items()})
        return
    _print_hosts(results)


def _print_hosts(results: dict[str, HostResult]) -> None:
    rows = [
        (name, r.pid if r.pid is not None else "-", r.version or "-",
         ", ".join(r.actions) or "unchanged")
        for name, r in sorted(results.items())
    ]
    print_table(("VM", "PID", "VERSION", "ACTIONS"), rows, right={1})


def register(root: typer.Typer) -> None:
    """Add ``deploy`` and ``undeploy`` to the root app."""
    root.command("deploy")(deploy)
    root.command("undeploy")(undeploy)
