"""What the commands share: the ``--config`` option, the FLEET argument and its check,
``--dry-run`` and the report of a plan, the coordinators' hosts. Not a command: the command
modules (orchestrator/cli/<command>.py) import this and ``_output``, never each other
(tests/unit/test_layering.py).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer

from agents.errors import RbdfleetError
from orchestrator.cli._output import emit_json, say
from orchestrator.config import FleetConfig
from orchestrator.coordinator.config import coordinator_config
from orchestrator.core.placement import Plan
from orchestrator.errors import ConfigError
from orchestrator.provision import Applied, check_partial, undo_hint

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


def coordinator_hosts(config_path: Path) -> list[str]:
    """The hosts the coordinators serve on (``[coordinator] urls`` and ``listen``): the SANs
    of their certificate."""
    ccfg = coordinator_config(config_path)
    hosts = [urllib.parse.urlsplit(u).hostname for u in ccfg.urls]
    listen = ccfg.listen.rpartition(":")[0].strip("[]")
    return sorted({h for h in (*hosts, listen) if h and h != "0.0.0.0"})
