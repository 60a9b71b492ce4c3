"""AgentPackage: deterministic tarball of the agents package (.py + py.typed), version = hash."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from orchestrator.deploy import AgentLayout
from orchestrator.packaging import AgentPackage

pytestmark = pytest.mark.unit


def members(package: AgentPackage) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(package.tarball))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                if m.isfile()}


def test_same_tree_same_version_and_only_code_is_packed(tmp_path: Path) -> None:
    tree = tmp_path / "agents"
    (tree / "core" / "__pycache__").mkdir(parents=True)
    (tree / "__init__.py").write_text("")
    (tree / "py.typed").write_text("")
    (tree / "core" / "journal.py").write_text("X = 1\n")
    (tree / "core" / "__pycache__" / "journal.cpython-311.pyc").write_bytes(b"\0")
    (tree / "notes.txt").write_text("not shipped")
    first = AgentPackage.build(tree)
    (tree / "core" / "journal.py").touch()  # a new mtime must not change the version
    assert AgentPackage.build(tree) == first
    assert len(first.version) == 16
    assert set(members(first)) == {"agents/__init__.py", "agents/py.typed",
                                   "agents/core/journal.py"}
    (tree / "core" / "journal.py").write_text("X = 2\n")
    assert AgentPackage.build(tree).version != first.version


def test_the_real_package_ships_its_entry_points() -> None:
    names = set(members(AgentPackage.build()))
    assert {"agents/__init__.py", "agents/errors.py", "agents/py.typed"} <= names
    assert not [n for n in names if "__pycache__" in n or not n.startswith("agents/")]


def test_layout_under_a_prefix_and_on_a_vm() -> None:
    vm, host = AgentLayout("/"), AgentLayout("/srv/h1/root")
    assert vm.config_path == "/etc/rbdfleet/agent.json"
    assert vm.release("abc") == "/opt/rbdfleet/releases/abc"
    assert host.pidfile == "/srv/h1/root/run/rbdfleet/agent.pid"
    assert host.directories() == ["/srv/h1/root/opt/rbdfleet", "/srv/h1/root/etc/rbdfleet",
                                  "/srv/h1/root/run/rbdfleet", "/srv/h1/root/var/log/rbdfleet",
                                  "/srv/h1/root/var/lib/rbdfleet"]
