"""The CLI reference, ``docs/cli.md``: generated from the typer app, so it cannot drift.

Regenerate after changing a command, option or help text (a unit test compares)::

    .venv/bin/python -m orchestrator.cli.reference > docs/cli.md

The commands are what ``typer orchestrator.cli.app utils docs --name rbdfleet`` prints; the
exit codes come from :data:`orchestrator.cli._exit.EXIT_CODES`, the one table the CLI uses.
"""

from __future__ import annotations

import sys

import typer
from typer.cli import get_docs_for_click

from orchestrator.cli._exit import EXIT_CODES
from orchestrator.cli.app import app

__all__ = ["exit_codes", "render"]

PROGRAM = "rbdfleet"


def exit_codes() -> str:
    """The exit-code section: one row per entry of ``EXIT_CODES``, first match wins."""
    rows = [
        "## Exit codes",
        "",
        "An rbdfleet error prints one line, `rbdfleet: error: <message>`, on stderr and exits",
        "with the code of the first row whose error class it is (or a subclass of), in this",
        "order. Any other exception is a bug: it keeps its traceback and exits 1.",
        "",
        "| code | error (with its subclasses) |",
        "| ---: | --- |",
        "| 0 | none: success |",
    ]
    rows += [f"| {code} | `{cls.__module__}.{cls.__qualname__}` |" for cls, code in EXIT_CODES]
    rows += [
        "",
        "A command line that does not parse (unknown option, missing argument) also exits 2,",
        "with the usage on stderr.",
    ]
    return "\n".join(rows) + "\n"


def render() -> str:
    """The whole of ``docs/cli.md``: every command and option, then the exit codes."""
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name=PROGRAM)
    commands = get_docs_for_click(obj=command, ctx=ctx, name=PROGRAM)
    return f"{commands.strip()}\n\n{exit_codes()}"


if __name__ == "__main__":
    sys.stdout.write(render())
