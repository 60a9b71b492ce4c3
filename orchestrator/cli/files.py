"""`rbdfleet put|get|ls|rm|mv|mkdir|stat`: files through the fleet (the client library)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.coordinator import open_client
from orchestrator.cli.provision import DEFAULT_CONFIG, ConfigOption, JsonOption

PROGRESS_MIN = 8 << 20  # files from this size on get a progress bar

RemoteArg = Annotated[str, typer.Argument(help="path in the fleet, e.g. /dir/file")]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", help="seconds to keep following the map on errors")
]


def put(
    local: Annotated[Path, typer.Argument(help="local file", exists=True, dir_okay=False)],
    remote: RemoteArg,
    config: ConfigOption = DEFAULT_CONFIG,
    timeout: TimeoutOption = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Store LOCAL as REMOTE: streamed to the writer, durable and on the in-sync readers."""
    client, _ = open_client(config, timeout)
    size = local.stat().st_size
    with local.open("rb") as source:
        if size >= PROGRESS_MIN and not as_json:
            with typer.progressbar(length=size, label=f"put {remote}") as bar:
                ack = client.put(source, remote, size, progress=bar.update)
        else:
            ack = client.put(source, remote, size)
    if as_json:
        typer.echo(json.dumps({"path": remote, "size": size, "node": ack.node, **ack.body}))
    else:
        typer.echo(f"{remote}: {size} bytes, seq {ack.seq}, epoch {ack.epoch} (writer {ack.node})")


def get(
    remote: RemoteArg,
    local: Annotated[Path, typer.Argument(help="local file to write ('-' for stdout)")],
    config: ConfigOption = DEFAULT_CONFIG,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Read REMOTE from an in-sync reader (another one on error) into LOCAL."""
    client, _ = open_client(config, timeout)
    if str(local) == "-":
        import io
        import sys

        buf = io.BytesIO()
        client.get(remote, buf)
        sys.stdout.buffer.write(buf.getvalue())
        return
    size = int(client.stat(remote).get("size", 0))
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    try:
        with tmp.open("wb") as sink:
            if size >= PROGRESS_MIN:
                with typer.progressbar(length=size, label=f"get {remote}") as bar:
                    client.get(remote, sink, progress=bar.update)
            else:
                client.get(remote, sink)
        tmp.replace(local)
    finally:
        tmp.unlink(missing_ok=True)


def ls(
    remote: Annotated[str, typer.Argument(help="directory")] = "/",
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: JsonOption = False,
) -> None:
    """List a directory."""
    client, _ = open_client(config)
    listing = client.ls(remote)
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    for e in listing.get("entries", []):
        kind = "d" if e.get("kind") == "dir" else "-"
        typer.echo(f"{kind} {e.get('size', 0):>12} {e.get('path')}")


def stat(
    remote: RemoteArg, config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False
) -> None:
    """Show one entry."""
    client, _ = open_client(config)
    entry: dict[str, Any] = client.stat(remote)
    if as_json:
        typer.echo(json.dumps(entry, indent=2))
        return
    for key in ("path", "kind", "size", "version", "epoch", "mtime", "crc"):
        typer.echo(f"{key:<8} {entry.get(key)}")


def rm(remote: RemoteArg, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Remove a file or an empty directory."""
    client, _ = open_client(config)
    client.delete(remote)


def mv(src: RemoteArg, dst: RemoteArg, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Rename SRC to DST."""
    client, _ = open_client(config)
    client.rename(src, dst)


def mkdir(
    remote: RemoteArg,
    parents: Annotated[bool, typer.Option("--parents", "-p", help="make parents too")] = False,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Make a directory."""
    client, _ = open_client(config)
    client.mkdir(remote, parents=parents)


COMMANDS: dict[str, Callable[..., None]] = {
    "put": put,
    "get": get,
    "ls": ls,
    "stat": stat,
    "rm": rm,
    "mv": mv,
    "mkdir": mkdir,
}


def register(root: typer.Typer) -> None:
    """Add the file commands to the root app."""
    for name, command in COMMANDS.items():
        root.command(name)(command)
