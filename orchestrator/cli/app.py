"""The `rbdfleet` command: one typer sub-app per concern, registered here."""

from __future__ import annotations

from importlib.metadata import version
from typing import Annotated

import typer

from orchestrator.cli import certs as certs_cli
from orchestrator.cli import clients as clients_cli
from orchestrator.cli import coordinator as coordinator_cli
from orchestrator.cli import deploy as deploy_cli
from orchestrator.cli import files as files_cli
from orchestrator.cli import inventory as inventory_cli
from orchestrator.cli import provision as provision_cli
from orchestrator.cli import sandbox
from orchestrator.cli import status as status_cli
from orchestrator.cli import upgrade as upgrade_cli
from orchestrator.cli import vm as vm_cli
from orchestrator.cli._exit import ReportingGroup

app = typer.Typer(
    name="rbdfleet",
    cls=ReportingGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Markdown, not rich markup: rich markup takes "[env var: X]" or "[default: ...]" in a help
    # text for a style tag and drops it.
    rich_markup_mode="markdown",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rbdfleet {version('rbdfleet')}")
        raise typer.Exit()


@app.callback()
def rbdfleet(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Single-writer / multi-reader file store on one shared Ceph RBD image.

    Every command reads the fleet config (docs/config.md) from --config, $RBDFLEET_CONFIG or
    ./rbdfleet.toml. With --json a command prints one JSON object on stdout; progress and
    narration always go to stderr.
    """


app.add_typer(sandbox.app, name="sandbox")
app.command("provision")(provision_cli.provision)
app.command("deprovision")(provision_cli.deprovision)
app.add_typer(vm_cli.app, name="vm")
coordinator_cli.register(app)
files_cli.register(app)
status_cli.register(app)
deploy_cli.register(app)
upgrade_cli.register(app)
inventory_cli.register(app)
clients_cli.register(app)
certs_cli.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
