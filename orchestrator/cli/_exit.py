"""Errors → exit codes, in one table. The CLI catches RbdfleetError here and nowhere else."""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from agents import errors as agent_errors
from orchestrator import errors

# Most specific first: the first matching class decides the exit code.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (errors.ConfigError, 2),
    (agent_errors.BadRequest, 2),
    (agent_errors.BindingUnavailable, 3),
    (errors.SandboxError, 4),
    (errors.StorageError, 5),
    (errors.HypervisorError, 6),
    (errors.RemoteError, 7),
    (errors.DeployError, 7),
    (errors.AgentUnreachable, 8),
    (agent_errors.GrantRejected, 9),
    (agent_errors.NotFound, 10),
    (agent_errors.Conflict, 11),
    (errors.CoordinationError, 12),
    (agent_errors.RbdfleetError, 1),
]


def exit_code_for(exc: BaseException) -> int:
    """The exit code the CLI uses for ``exc`` (1 for any other rbdfleet error)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


class ReportingGroup(TyperGroup):
    """The root command: an RbdfleetError becomes one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except agent_errors.RbdfleetError as exc:
            typer.echo(f"rbdfleet: error: {exc}", err=True)
            raise typer.Exit(exit_code_for(exc)) from None
