"""The `rbdfleet` command: one typer sub-app per concern, registered here."""

from __future__ import annotations

import typer

from orchestrator.cli import sandbox
from orchestrator.cli._exit import run_reporting_errors

app = typer.Typer(
    name="rbdfleet",
    help="Single-writer / multi-reader file store on one shared Ceph RBD image.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(sandbox.app, name="sandbox")


def main() -> None:
    """Console-script entry point."""
    run_reporting_errors(app)


if __name__ == "__main__":
    main()
