"""`rbdfleet … --help` as a user sees it: every argument explained, bracketed text kept."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import click
import pytest
import typer
from typer.testing import CliRunner

from orchestrator.cli import reference
from orchestrator.cli.app import app

pytestmark = pytest.mark.unit

RUNNER = CliRunner()
ROOT = typer.main.get_command(app)
COMMANDS = [
    (ctx.command_path.split()[1:], command)
    for command, ctx in reference.commands(ROOT, click.Context(ROOT, info_name="rbdfleet"))
]
ARGUMENTS = [
    (path, param)
    for path, command in COMMANDS
    for param in command.params
    if isinstance(param, click.Argument)
]


def flat(text: str) -> str:
    """Rendered help without the panels' box drawing, whitespace collapsed (rich wraps)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def rendered_help(path: list[str]) -> str:
    result = RUNNER.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return flat(result.output)


def test_the_app_has_arguments_to_check() -> None:
    # the commands below take positional arguments; an empty list would check nothing
    assert {"put", "get", "fence", "set-role"} <= {path[-1] for path, _ in ARGUMENTS}


@pytest.mark.parametrize(
    ("path", "param"), ARGUMENTS, ids=[f"{' '.join(p)}:{a.name}" for p, a in ARGUMENTS]
)
def test_every_argument_has_help_in_help_and_docs(path: list[str], param: click.Argument) -> None:
    # click 8.5 resets typer's argument help to None: pyproject pins click below it
    help_text = getattr(param, "help", None)
    assert help_text, f"rbdfleet {' '.join(path)}: argument {param.name} has no help"
    assert flat(help_text) in rendered_help(path)
    assert flat(help_text) in flat(reference.render())


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_no_word_of_a_help_text_is_lost(path: list[str], command: click.Command) -> None:
    # Markdown renders `code` without its backticks; any other loss (a "[...]" or "<...>"
    # taken for markup) is a word missing from what the user reads.
    shown = set(rendered_help(path).split())
    texts = [inspect.cleandoc(command.help or "")]
    texts += [getattr(p, "help", None) or "" for p in command.params]
    lost = [w for t in texts for w in t.replace("`", "").split() if w not in shown]
    assert lost == []


def test_environment_variables_and_defaults_show_in_help() -> None:
    for path, command in COMMANDS:
        shown = rendered_help(path)
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.envvar, str):
                assert f"[env var: {param.envvar}]" in shown, (path, param.name)
    sandbox_up = rendered_help(["sandbox", "up"])
    assert "[env var: RBDFLEET_SANDBOX_DIR]" in sandbox_up
    assert "/var/tmp/rbdfleet-UID/sandbox" in sandbox_up
    assert "[default: 3]" in sandbox_up


def test_bracketed_text_in_a_help_text_is_kept() -> None:
    probe = typer.Typer(rich_markup_mode=app.rich_markup_mode)

    @probe.command()
    def cmd(
        arg: str = typer.Argument(help="see [env var: X_Y] and [bold]"),
    ) -> None:
        """Docstring with [brackets] too."""

    out = flat(RUNNER.invoke(probe, ["--help"]).output)
    assert "see [env var: X_Y] and [bold]" in out
    assert "Docstring with [brackets] too." in out


def test_version_and_completion() -> None:
    result = RUNNER.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"rbdfleet {version('rbdfleet')}\n"
    root = rendered_help([])
    assert "--install-completion" in root and "--show-completion" in root
