"""What a command prints, in one place.

* ``--json``: exactly one JSON object on stdout, on one line, and nothing else on stdout.
* text: tables whose columns are as wide as their widest cell (header included).
* progress bars and narration go to stderr, so stdout stays the result (pipes, ``get REMOTE -``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import typer

JsonOption = Annotated[
    bool, typer.Option("--json", help="print one JSON object on stdout instead of text")
]

PROGRESS_MIN = 8 << 20  # transfers from this size on get a progress bar (on stderr)


def emit_json(obj: Mapping[str, Any]) -> None:
    """Print ``obj`` as the command's one JSON object (one line on stdout)."""
    typer.echo(json.dumps(obj, default=str))


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = ()
) -> list[str]:
    """Lines of a table: each column as wide as its widest cell, two spaces between columns;
    columns whose index is in ``right`` are right-aligned (numbers). The last column is not
    padded, so lines carry no trailing blanks."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = ()
) -> None:
    """Print :func:`table` on stdout."""
    for line in table(headers, rows, right):
        typer.echo(line)


def say(message: str) -> None:
    """Narration (what is being done): stderr, never mixed into the result."""
    typer.echo(message, err=True)


def say_step(message: str) -> None:
    """Narrate one step of a rollout or an upgrade (stderr): their ``progress``."""
    say(f"  {message}")


def done(step: str) -> None:
    """Narrate one step a use case has done (stderr): the provisioner's ``progress``."""
    say(f"  done: {step}")


@contextmanager
def progress(length: int, label: str) -> Iterator[Any]:
    """A progress bar on stderr for a transfer of ``length`` bytes; ``None`` when small.

    Yields the bar's ``update`` function (or ``None``), ready for the client's ``progress=``.
    """
    if length < PROGRESS_MIN:
        yield None
        return
    with typer.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar.update
