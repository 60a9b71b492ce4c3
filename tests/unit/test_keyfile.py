"""The one key-file reader (agents/keyfile.py): master keys and a node's own keys alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.errors import ConfigError
from agents.keyfile import read_key_lines

pytestmark = pytest.mark.unit


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_current_key_first_blank_lines_and_blanks_dropped(tmp_path: Path) -> None:
    path = write(tmp_path / "k", "\n  current  \n\nprevious\n")
    assert read_key_lines(path, "secret_file") == (b"current", b"previous")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_file_others_may_read_is_refused_without_showing_it(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "k", "5ec2e7aa\n", mode)
    with pytest.raises(ConfigError, match="0600") as info:
        read_key_lines(path, "fleet.secret_file")
    assert info.value.key == "fleet.secret_file"
    assert "5ec2e7aa" not in str(info.value)


def test_empty_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is empty"):
        read_key_lines(write(tmp_path / "k", " \n\n"), "k")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_key_lines(tmp_path / "absent", "k")
