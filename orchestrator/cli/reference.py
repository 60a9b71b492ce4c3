"""The CLI reference, ``docs/cli.md``: generated from the typer app, so it cannot drift.

Regenerate after changing a command, option or help text (a unit test compares)::

    .venv/bin/python -m orchestrator.cli.reference > docs/cli.md

Every command of the click tree typer builds, with its whole help, usage, arguments and
options (help text, environment variable, default) as plain Markdown: nothing is parsed as
markup, so bracketed text stays. The exit codes come from
:data:`orchestrator.cli._exit.EXIT_CODES`, the one table the CLI uses.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator

import click
import typer

from orchestrator.cli._exit import EXIT_CODES
from orchestrator.cli.app import app

__all__ = ["commands", "destructive", "exit_codes", "render"]

PROGRAM = "rbdfleet"

# Commands that lose data or stop service: (command, what is lost or stopped, guard). Each
# command's own help says so too.
DESTRUCTIVE: tuple[tuple[str, str, str], ...] = (
    ("`deprovision --delete-image`",
     "the image and every file in the fleet, the VMs' cephx users and secrets",
     "`--fleet-name NAME` (the configured fleet) or `--yes-i-really-mean-it`; "
     "not needed with `--dry-run`"),
    ("`rm`", "one file or empty directory", "none"),
    ("`sandbox down`", "the sandbox's Ceph cluster, VMs and hosts, with their data",
     "removes only what the sandbox's state file records"),
    ("`deprovision`", "the VMs' access to the disk (detached)", "`--dry-run` shows the plan"),
    ("`undeploy`", "service: every agent stops (files stay)", "none"),
    ("`failover`, `fence`", "the writer is fenced; writes pause until a reader is promoted",
     "the FLEET argument must be the configured fleet"),
    ("`upgrade`", "each agent restarts in turn; at the handover the writer is fenced and "
     "writes pause until an upgraded reader is promoted",
     "`--dry-run` shows the plan; the FLEET argument must be the configured fleet"),
    ("`vm fence`, `vm set-role`", "a VM's access to the disk",
     "the FLEET argument must be the configured fleet"),
)

FENCES = """\
`fence` goes through the coordinator, which records the fence in the fleet map (a writer is
replaced first). `vm fence` blocklists the VM's Ceph clients directly, for when no coordinator
runs, and leaves the map alone: run `fence` once a coordinator is back.
"""


def destructive() -> str:
    """The section on commands that lose data or stop service."""
    rows = ["## Destructive and disruptive commands", "",
            "| command | what is lost or stopped | guard |", "| --- | --- | --- |"]
    rows += [f"| {command} | {lost} | {guard} |" for command, lost, guard in DESTRUCTIVE]
    return "\n".join([*rows, "", FENCES])


OUTPUT = """\
## Output

* `--json`: the command prints exactly one JSON object, on one line, on stdout; nothing else
  goes to stdout. Errors stay on stderr (below).
* Tables size their columns to their content.
* Progress bars and narration go to stderr, so stdout is only the result: `rbdfleet get
  /f - | sha256sum` and `tar c dir | rbdfleet put - /dir.tar` work as expected.
* `rbdfleet --version` prints the version.
* Shell completion: `rbdfleet --install-completion` installs it for the current shell (bash,
  zsh, fish, PowerShell); `rbdfleet --show-completion` prints the script instead.
"""


def _plain(text: str) -> str:
    # typer escapes "[" in the "[env var: …; default: …]" suffix for rich; Markdown needs no
    # escape there: "[x]" without "(url)" is literal text.
    return text.replace("\\[", "[")


def commands(
    command: click.Command, ctx: click.Context
) -> Iterator[tuple[click.Command, click.Context]]:
    """``command`` and every command below it, depth first, each with its context."""
    yield command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                yield from commands(sub, click.Context(sub, info_name=name, parent=ctx))


def _section(command: click.Command, ctx: click.Context) -> str:
    level = "#" if ctx.parent is None else "##"
    lines = [f"{level} `{ctx.command_path}`", ""]
    if command.help:
        lines += [inspect.cleandoc(command.help).partition("\f")[0], ""]
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    lines += ["**Usage**:", "", "```console", f"$ {usage}", "```", ""]
    arguments = [p for p in command.get_params(ctx) if isinstance(p, click.Argument)]
    options = [p for p in command.get_params(ctx) if not isinstance(p, click.Argument)]
    for title, params in (("Arguments", arguments), ("Options", options)):
        records = [r for r in (p.get_help_record(ctx) for p in params) if r is not None]
        if records:
            lines += [f"**{title}**:", ""]
            lines += [f"* `{name}`: {_plain(text)}".rstrip() for name, text in records]
            lines.append("")
    if isinstance(command, click.Group):
        lines += ["**Commands**:", ""]
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                lines.append(f"* `{name}`: {sub.get_short_help_str(limit=200)}")
        lines.append("")
    return "\n".join(lines)


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
        "A command line that does not parse (unknown option, missing argument, a refused",
        "value) also exits 2, with the usage on stderr.",
    ]
    return "\n".join(rows) + "\n"


def render() -> str:
    """The whole of ``docs/cli.md``: every command and option, output rules, exit codes."""
    root = typer.main.get_command(app)
    sections = [_section(c, x) for c, x in commands(root, click.Context(root, info_name=PROGRAM))]
    return "\n".join([sections[0], OUTPUT, destructive(), *sections[1:], exit_codes()])


if __name__ == "__main__":
    sys.stdout.write(render())
