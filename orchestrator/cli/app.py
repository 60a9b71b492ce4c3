"""The `rbdfleet` command: one typer sub-app per concern, registered here."""

from __future__ import annotations

import typer

from orchestrator.cli import coordinator as coordinator_cli
from orchestrator.cli import deploy as deploy_cli
from orchestrator.cli import files as files_cli
from orchestrator.cli import provision as provision_cli
from orchestrator.cli import sandbox
from orchestrator.cli import status as status_cli
from orchestrator.cli import vm as vm_cli
from orchestrator.cli._exit import run_reporting_errors

app = typer.Typer(
    name="rbdfleet",
    help="Single-writer / multi-reader file store on one shared Ceph RBD image.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,  # no shell-specific options: the reference (docs/cli.md) is stable
)
app.add_typer(sandbox.app, name="sandbox")
app.command("provision")(provision_cli.provision)
app.command("deprovision")(provision_cli.deprovision)
app.add_typer(vm_cli.app, name="vm")
coordinator_cli.register(app)
files_cli.register(app)
status_cli.register(app)
deploy_cli.register(app)


def main() -> None:
    """Console-script entry point."""
    run_reporting_errors(app)


if __name__ == "__main__":
    main()
