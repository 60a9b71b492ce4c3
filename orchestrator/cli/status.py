"""`rbdfleet status`: the fleet as the active coordinator sees it (table or --json)."""

from __future__ import annotations

import json

import typer

from orchestrator.cli.coordinator import open_client
from orchestrator.cli.provision import DEFAULT_CONFIG, ConfigOption, JsonOption


def status(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Writer, readers (in sync or catching up), spares, liveness, pending failover steps."""
    client, cfg = open_client(config)
    everything = client.coordinator.status()
    fleets = [f for f in everything.get("fleets", []) if f.get("fleet") == cfg.fleet.name]
    if as_json:
        typer.echo(json.dumps(fleets[0] if fleets else {}, indent=2))
        return
    for f in fleets:
        m = f.get("map") or {}
        typer.echo(
            f"fleet {f['fleet']}  coordinator {f.get('coordinator')}  "
            f"epoch {m.get('epoch')}  revision {m.get('revision')}  phase {m.get('phase')}"
        )
        typer.echo(f"{'NODE':<12} {'ROLE':<8} {'SYNC':<12} {'SEQ':>10} {'LIVENESS':<9} ADDRESS")
        for member in m.get("members", []):
            sync = (
                "in-sync"
                if member["in_sync"]
                else ("catching-up" if member["role"] == "reader" else "-")
            )
            live = f.get("liveness", {}).get(member["name"], "-")
            typer.echo(
                f"{member['name']:<12} {member['role']:<8} {sync:<12} "
                f"{member['applied_seq']:>10} {live:<9} {member['address']}"
            )
        if f.get("pending"):
            typer.echo("pending: " + ", ".join(f["pending"]))
        if f.get("last_error"):
            typer.echo(f"last error: {f['last_error']}")


def register(root: typer.Typer) -> None:
    """Add ``status`` to the root app."""
    root.command("status")(status)
