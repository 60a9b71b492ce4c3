"""`rbdfleet-agent format --if-blank`: formats a blank head only, keeps its own fleet's volume,
refuses anything else (deploy runs it on the writer VM before the agents start)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agents.backends.file import FileDevice
from agents.daemon import main
from agents.volume import Volume

pytestmark = pytest.mark.unit


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "image.raw"
    with path.open("wb") as f:
        f.truncate(16 << 20)
    return path


def _fleet_of(path: Path) -> str:
    device = FileDevice(str(path), read_only=True)
    try:
        return Volume.open(device).fleet
    finally:
        device.close()


def test_blank_image_is_formatted_then_left_alone(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path)
    args = ["format", "--backend", f"file:{image}", "--fleet", "demo", "--if-blank"]
    assert main(args) == 0
    assert "formatted" in capsys.readouterr().out
    assert _fleet_of(image) == "demo"
    first = image.read_bytes()[:8192]
    assert main(args) == 0
    assert "already holds a volume of fleet demo" in capsys.readouterr().out
    assert image.read_bytes()[:8192] == first  # a second run writes nothing


def test_another_fleets_volume_is_refused(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path)
    assert main(["format", "--backend", f"file:{image}", "--fleet", "other"]) == 0
    capsys.readouterr()
    assert main(["format", "--backend", f"file:{image}", "--fleet", "demo", "--if-blank"]) == 2
    assert "fleet 'other'" in capsys.readouterr().err
    assert _fleet_of(image) == "other"


def test_foreign_data_is_never_overwritten(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path)
    junk = os.urandom(8192)
    with image.open("r+b") as f:
        f.write(junk)
    assert main(["format", "--backend", f"file:{image}", "--fleet", "demo", "--if-blank"]) == 2
    assert "refusing to format" in capsys.readouterr().err
    assert image.read_bytes()[:8192] == junk
