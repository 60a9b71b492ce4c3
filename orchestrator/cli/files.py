"""`rbdfleet put|get|ls|rm|mv|mkdir|stat`: files through the fleet (the client library)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat as stat_mode
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption
from orchestrator.cli._output import JsonOption, emit_json, print_table, progress, say
from orchestrator.services import open_client

STDIO = "-"

RemoteArg = Annotated[str, typer.Argument(help="path in the fleet, e.g. /dir/file")]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", help="seconds to keep following the map on errors")
]


@contextlib.contextmanager
def _sized_source(local: str) -> Iterator[tuple[IO[bytes], int]]:
    """``(seekable file, size)`` for LOCAL, or for stdin when LOCAL is ``-``.

    A put announces its size first and rewinds on a retry, so stdin that is not a regular file
    (a pipe) is copied in chunks to an unnamed temporary file first (never held in memory).
    """
    if local != STDIO:
        with Path(local).open("rb") as source:
            yield source, os.fstat(source.fileno()).st_size
        return
    stdin = sys.stdin.buffer
    try:
        is_file = stat_mode.S_ISREG(os.fstat(stdin.fileno()).st_mode)
    except (OSError, ValueError):  # no descriptor (an in-memory stdin, as in tests)
        is_file = False
    if is_file:
        start = stdin.tell()
        yield stdin, os.fstat(stdin.fileno()).st_size - start
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(stdin, spool)
        size = spool.tell()
        spool.seek(0)
        yield spool, size


def put(
    local: Annotated[str, typer.Argument(help="local file, or '-' to read standard input")],
    remote: RemoteArg,
    config: ConfigOption = DEFAULT_CONFIG,
    timeout: TimeoutOption = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Store LOCAL as REMOTE: streamed to the writer, durable and on the in-sync readers."""
    if local != STDIO and not Path(local).is_file():
        raise typer.BadParameter(f"{local} is not a file", param_hint="LOCAL")
    client, _ = open_client(config, timeout)
    with _sized_source(local) as (source, size), progress(size, f"put {remote}") as update:
        ack = client.put(source, remote, size, progress=update)
    if as_json:
        emit_json({"path": remote, "size": size, "node": ack.node, **ack.body})
    else:
        typer.echo(f"{remote}: {size} bytes, seq {ack.seq}, epoch {ack.epoch} (writer {ack.node})")


def get(
    remote: RemoteArg,
    local: Annotated[
        str, typer.Argument(help="local file to write, or '-' to stream to standard output")
    ],
    config: ConfigOption = DEFAULT_CONFIG,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Read REMOTE from an in-sync reader (another one on error) into LOCAL.

    LOCAL appears only once the whole file has arrived (written aside, then renamed).
    """
    client, _ = open_client(config, timeout)
    if local == STDIO:
        sys.stdout.flush()
        try:
            client.get_stream(remote, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # whoever read stdout stopped (`| head`): stop quietly, as cat does (and keep the
            # interpreter's final flush from failing on the closed pipe again)
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        return
    target = Path(local)
    size = int(client.stat(remote).get("size", 0))
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        with tmp.open("wb") as sink, progress(size, f"get {remote}") as update:
            client.get(remote, sink, progress=update)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def ls(
    remote: Annotated[str, typer.Argument(help="directory in the fleet")] = "/",
    config: ConfigOption = DEFAULT_CONFIG,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="print one page of at most this many entries"),
    ] = None,
    after: Annotated[
        str | None,
        typer.Option("--after", help="start after this name (the previous page's next)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List a directory: kind (d or -), size in bytes, path.

    The whole directory, fetched page by page, unless --limit or --after is given: then one
    page, and the name to pass as --after for the next one (on stderr; ``next`` in --json,
    null on the last page)."""
    client, _ = open_client(config)
    paged = limit is not None or after is not None
    if paged:
        listing = client.ls(remote, limit=limit, after=after)
    else:
        pages = list(client.ls_pages(remote, limit=limit))
        listing = {**pages[-1], "entries": [e for p in pages for e in p.get("entries", [])]}
    if as_json:
        emit_json(listing)
        return
    rows = [
        ("d" if e.get("kind") == "dir" else "-", e.get("size", 0), e.get("path"))
        for e in listing.get("entries", [])
    ]
    print_table(("KIND", "SIZE", "PATH"), rows, right={1})
    if paged and listing.get("next") is not None:
        say(f"next: --after {listing['next']}")


STAT_KEYS = ("path", "kind", "size", "version", "epoch", "mtime", "crc")


def stat(
    remote: RemoteArg, config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False
) -> None:
    """Show one entry."""
    client, _ = open_client(config)
    entry: dict[str, Any] = client.stat(remote)
    if as_json:
        emit_json(entry)
        return
    width = max(map(len, STAT_KEYS))
    for key in STAT_KEYS:
        typer.echo(f"{key:<{width}}  {entry.get(key)}")


def rm(remote: RemoteArg, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Remove a file or an empty directory (destructive: the file's data is gone)."""
    client, _ = open_client(config)
    client.delete(remote)


def mv(
    src: Annotated[str, typer.Argument(help="path in the fleet to rename")],
    dst: Annotated[str, typer.Argument(help="its new path in the fleet")],
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Rename SRC to DST."""
    client, _ = open_client(config)
    client.rename(src, dst)


def mkdir(
    remote: Annotated[str, typer.Argument(help="directory to make in the fleet")],
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
