"""docs/cli.md is exactly what the typer app and the exit-code table generate today."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import reference
from orchestrator.cli._exit import EXIT_CODES

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_cli_reference_is_up_to_date() -> None:
    assert DOC.read_text() == reference.render(), (
        "docs/cli.md is stale: .venv/bin/python -m orchestrator.cli.reference > docs/cli.md"
    )


def test_every_command_and_exit_code_is_documented() -> None:
    text = reference.render()
    for name in ("provision", "put", "get", "status", "deploy", "sandbox", "coordinator"):
        assert f"## `rbdfleet {name}`" in text
    for cls, code in EXIT_CODES:
        assert f"| {code} | `{cls.__module__}.{cls.__qualname__}` |" in text
    assert "`--install-completion`" in text and "`--show-completion`" in text
    assert "## Destructive and disruptive commands" in text
    for command, _, _ in reference.DESTRUCTIVE:
        assert command in text
