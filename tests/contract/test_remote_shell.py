"""RemoteShell contract: ``ParamikoShell`` against a real sshd namespace host (``hosts3``) and
``LocalShell``, the fake that runs everything on this machine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.testing.contracts import RemoteShellSubject, check_remote_shell
from orchestrator.testing.fakes import LocalShell
from tests.fixtures.hosts import shell_for

pytestmark = pytest.mark.contract


@dataclass(frozen=True)
class Local:
    name: str = "local"
    address: str = "127.0.0.1"


@pytest.fixture(params=["ssh", "local"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RemoteShellSubject]:
    if request.param == "local":
        work = tmp_path / "work"
        work.mkdir()
        yield RemoteShellSubject(LocalShell(), Local(), str(work))
        return
    hosts = request.getfixturevalue("hosts3")
    host = hosts.host("h1")
    work = host.root / "contract"
    work.mkdir(parents=True)
    with shell_for(hosts) as shell:
        yield RemoteShellSubject(shell, host, str(work))


def test_remote_shell_contract(subject: RemoteShellSubject) -> None:
    check_remote_shell(subject)
