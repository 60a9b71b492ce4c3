"""RemoteCommand: allowlisted executables, quoting in one place, equality by value."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.core.remote import Executable, RemoteCommand, shell_script

pytestmark = pytest.mark.unit

plain_text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]))


@given(st.sampled_from(list(Executable)), st.lists(plain_text, max_size=6))
def test_render_round_trips_through_a_posix_shell_lexer(exe: Executable, args: list[str]) -> None:
    assert shlex.split(RemoteCommand(exe, args).render()) == [exe.value, *args]


def test_render_survives_a_real_shell() -> None:
    nasty = ["a b", "$(touch /tmp/rbdfleet-pwned)", "'; rm -rf /; '", "`id`", "\n", "*", ""]
    cmd = RemoteCommand(Executable.PYTHON3, ["-c", "import sys; print(sys.argv[1:])", *nasty])
    out = subprocess.run(["sh", "-c", cmd.render()], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(nasty)


def test_commands_compare_by_value() -> None:
    assert RemoteCommand(Executable.MKDIR, ["-p", "/x"]) == RemoteCommand(Executable.MKDIR,
                                                                         ("-p", "/x"))
    assert RemoteCommand(Executable.MKDIR, ["-p", "/x"]) != RemoteCommand(Executable.MKDIR,
                                                                         ["/x"])
    assert len({RemoteCommand(Executable.TRUE), RemoteCommand(Executable.TRUE)}) == 1


def test_an_executable_outside_the_allowlist_cannot_be_expressed() -> None:
    with pytest.raises(ValueError, match="allowlist"):
        RemoteCommand("rm", ["-rf", "/"])  # type: ignore[arg-type]


def test_nul_in_an_argument_is_refused() -> None:
    with pytest.raises(ValueError, match="plain string"):
        RemoteCommand(Executable.CAT, ["a\0b"])


def test_shell_script_is_sh_dash_c() -> None:
    assert shell_script("echo hi") == RemoteCommand(Executable.SH, ["-c", "echo hi"])
    assert str(shell_script("echo hi")) == "/bin/sh -c 'echo hi'"
