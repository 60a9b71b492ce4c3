"""DESIGN §6, checked mechanically: who may import what."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BINDINGS = {"rados", "rbd", "libvirt", "paramiko", "ansible"}
# The one module per binding allowed to import it.
BINDING_HOMES = {
    "rados": {"agents/backends/librbd.py", "orchestrator/adapters/ceph.py"},
    "rbd": {"agents/backends/librbd.py", "orchestrator/adapters/ceph.py"},
    "libvirt": {"orchestrator/adapters/libvirt.py"},
    "paramiko": {"orchestrator/adapters/ssh.py"},
    "ansible": set(),  # run as a program, never imported
}
IO_MODULES = {"socket", "subprocess", "threading", "http", "urllib", "select", "asyncio"}


def python_files(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_agents_never_import_orchestrator_nor_third_party() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    offenders = []
    for path in python_files("agents"):
        for module in imported_modules(path):
            if module == "agents" or module in stdlib:
                continue
            if module in BINDINGS and rel(path) in BINDING_HOMES[module]:
                continue
            offenders.append(f"{rel(path)} imports {module}")
    assert offenders == []


def test_bindings_are_imported_in_their_adapter_only() -> None:
    offenders = []
    for package in ("agents", "orchestrator"):
        for path in python_files(package):
            for module in imported_modules(path) & BINDINGS:
                if rel(path) not in BINDING_HOMES[module]:
                    offenders.append(f"{rel(path)} imports {module}")
    assert offenders == []


@pytest.mark.parametrize("package", ["agents/core", "orchestrator/core"])
def test_core_modules_do_no_io(package: str) -> None:
    offenders = []
    for path in python_files(package):
        tree = ast.parse(path.read_text())
        for module in imported_modules(path) & IO_MODULES:
            offenders.append(f"{rel(path)} imports {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else (
                    f"{getattr(func.value, 'id', '?')}.{func.attr}"
                    if isinstance(func, ast.Attribute) else "")
                if name in {"open", "time.sleep", "time.time", "time.monotonic"}:
                    offenders.append(f"{rel(path)}:{node.lineno} calls {name}")
    assert offenders == []
