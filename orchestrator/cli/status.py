"""`rbdfleet status`: the fleet as the active coordinator sees it (table or --json)."""

from __future__ import annotations

from typing import Any

import typer

from agents.errors import NotFound
from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption
from orchestrator.cli._output import JsonOption, emit_json, print_table
from orchestrator.services import open_client


def fleet_status(everything: dict[str, Any], fleet: str) -> dict[str, Any]:
    """The coordinator's status of ``fleet``; NotFound when it does not serve that fleet."""
    for entry in everything.get("fleets", []):
        if entry.get("fleet") == fleet:
            return dict(entry)
    served = ", ".join(str(f.get("fleet")) for f in everything.get("fleets", [])) or "none"
    raise NotFound(f"the coordinator does not serve fleet {fleet!r} (it serves: {served})")


def status(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Writer, readers (in sync or catching up), spares, liveness, pending failover steps.

    The fleet is the config's fleet.name; a coordinator that does not serve it is an error
    (exit code 10), not an empty answer.
    """
    client, cfg = open_client(config)
    f = fleet_status(client.coordinator.status(), cfg.fleet.name)
    if as_json:
        emit_json(f)
        return
    m = f.get("map") or {}
    typer.echo(
        f"fleet {f['fleet']}  coordinator {f.get('coordinator')}  "
        f"epoch {m.get('epoch')}  revision {m.get('revision')}  phase {m.get('phase')}"
    )
    rows = []
    for member in m.get("members", []):
        if member["in_sync"]:
            sync = "in-sync"
        else:
            sync = "catching-up" if member["role"] == "reader" else "-"
        live = f.get("liveness", {}).get(member["name"], "-")
        seq = f.get("applied_seq", {}).get(member["name"], member["applied_seq"])
        rows.append((member["name"], member["role"], sync, seq, live, member["address"]))
    print_table(("NODE", "ROLE", "SYNC", "SEQ", "LIVENESS", "ADDRESS"), rows, right={3})
    if f.get("pending"):
        typer.echo("pending: " + ", ".join(f["pending"]))
    if f.get("held_out"):
        typer.echo("kept out (failing again and again): " + ", ".join(
            f"{node} for {left} s" for node, left in sorted(f["held_out"].items())))
    if f.get("last_error"):
        typer.echo(f"last error: {f['last_error']}")


def register(root: typer.Typer) -> None:
    """Add ``status`` to the root app."""
    root.command("status")(status)
