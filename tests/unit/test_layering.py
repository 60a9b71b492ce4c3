"""docs/architecture.md's dependency rule, checked mechanically: who may import what."""

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


def orchestrator_imports(path: Path) -> set[str]:
    """Every ``orchestrator.*`` module ``path`` imports, anywhere in the file (a function-local
    import is an arrow too), relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = rel(path).removesuffix(".py").replace("/", ".").rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # ``from orchestrator import cli`` imports a submodule, not a name.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names
                              if is_module(f"{base}.{alias.name}")]
        else:
            continue
        found |= {name for name in names if name.startswith("orchestrator.")}
    return found


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def arrows(paths: list[Path], forbidden: tuple[str, ...]) -> set[str]:
    return {f"{rel(path)} imports {module}"
            for path in paths for module in orchestrator_imports(path)
            if any(module == f or module.startswith(f + ".") for f in forbidden)}


# The composition root: the one module that builds adapters from a fleet's config.
COMPOSITION_ROOT = ROOT / "orchestrator/services.py"
USE_CASES = sorted(p for p in (ROOT / "orchestrator").glob("*.py")
                   if p.name != "__init__.py" and p != COMPOSITION_ROOT)
ADAPTERS_OR_CLI = ("orchestrator.adapters", "orchestrator.cli")
# Arrows that still point the wrong way, each with the change that removes it (issue 13). The
# tests below compare equal to these sets: a new wrong arrow fails, and so does removing one of
# these without deleting its line here.
KNOWN_ADAPTER_IMPORTS = {
    # the fakes and contracts reuse the Ceph adapter's pure parsers (caps, watchers to client
    # addresses), so a fake cannot parse differently; they go once those move to core/
    "orchestrator/testing/contracts.py imports orchestrator.adapters.ceph",
    "orchestrator/testing/fakes.py imports orchestrator.adapters.ceph",
    # issue_admin_client opens its own Ceph client store: Services(config).clients replaces it
    "orchestrator/sandbox/lifecycle.py imports orchestrator.adapters",
    "orchestrator/sandbox/lifecycle.py imports orchestrator.adapters.ceph",
    "orchestrator/sandbox/lifecycle.py imports orchestrator.adapters.rados_clients",
}


def test_use_cases_ports_and_core_never_import_adapters_nor_the_cli() -> None:
    core = python_files("orchestrator/core")
    assert arrows([*USE_CASES, *core], ADAPTERS_OR_CLI) == set()


def test_only_the_composition_root_imports_adapters() -> None:
    """Adapters are wired in orchestrator/services.py alone: the CLI, the coordinator, the
    sandbox and the use cases get them from there (adapters may import each other)."""
    others = [path for path in python_files("orchestrator")
              if path != COMPOSITION_ROOT and not rel(path).startswith("orchestrator/adapters/")]
    assert arrows(others, ("orchestrator.adapters",)) == KNOWN_ADAPTER_IMPORTS


def test_the_cli_never_imports_adapters() -> None:
    """No exception: a command gets its adapters from the composition root."""
    assert arrows(list(python_files("orchestrator/cli")), ("orchestrator.adapters",)) == set()


def test_adapters_never_import_use_cases_nor_the_cli() -> None:
    """Adapters implement ports: they may use ports, core, config and errors, nothing above."""
    above = ("orchestrator.provision", "orchestrator.rollout", "orchestrator.deploy",
             "orchestrator.client", "orchestrator.coordinator", "orchestrator.sandbox",
             "orchestrator.cli", "orchestrator.services")
    assert arrows(list(python_files("orchestrator/adapters")), above) == set()


def test_the_sandbox_never_imports_the_cli() -> None:
    """No exception: the demo gets its client and shell from the composition root."""
    assert arrows(list(python_files("orchestrator/sandbox")), ("orchestrator.cli",)) == set()


def test_the_client_never_imports_the_coordinators_server() -> None:
    found = arrows([ROOT / "orchestrator/client.py"], ("orchestrator.coordinator.api",))
    assert found == set()


def test_the_transport_stands_on_neutral_ground() -> None:
    """The client library and the agents' control adapter both ride orchestrator/transport.py,
    so it imports neither of them nor anything above: only the config and the error tree."""
    found = orchestrator_imports(ROOT / "orchestrator/transport.py")
    assert found <= {"orchestrator.config", "orchestrator.errors"}


# The CLI's shared modules: the root app, the generated reference and the helpers every
# command uses (_common, _output, _exit); every other module of orchestrator/cli/ is a command.
CLI_SHARED = {"__init__.py", "app.py", "reference.py"}


def test_no_cli_command_imports_another() -> None:
    """A command gets what it shares with others from orchestrator/cli/_*.py or the
    composition root, never from another command's module."""
    cli = ROOT / "orchestrator/cli"
    commands = [p for p in sorted(cli.glob("*.py"))
                if p.name not in CLI_SHARED and not p.name.startswith("_")]
    names = tuple(f"orchestrator.cli.{p.stem}" for p in commands)
    found = {f"{rel(path)} imports {module}" for path in commands
             for module in orchestrator_imports(path)
             if module in names and module != f"orchestrator.cli.{path.stem}"}
    assert found == set()


def agents_imports(path: Path) -> set[str]:
    """Every ``agents.*`` module ``path`` imports, anywhere in the file (``from agents import
    fsck`` counted as the submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("agents.")}
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] == "agents"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names
                                      if is_module(f"{node.module}.{alias.name}")}
    return found


def agents_graph() -> dict[str, set[str]]:
    modules = {rel(p).removesuffix(".py").removesuffix("/__init__").replace("/", "."): p
               for p in python_files("agents")}
    return {name: agents_imports(path) & modules.keys() for name, path in modules.items()}


def test_the_agents_import_graph_has_no_cycle() -> None:
    """No cycle among the agent's modules, function-local imports included (the volume and
    fsck once imported each other)."""
    graph = agents_graph()
    done: set[str] = set()

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            found = cycle_from(imported, [*path, module])
            if found:
                return found
        done.add(module)
        return None

    assert [c for m in sorted(graph) if (c := cycle_from(m, []))] == []


def test_the_follower_knows_nothing_of_the_writer() -> None:
    """Readers and fsck use agents.follower; the writer's additions (agents.committer) and the
    façade over both (agents.volume) build on it, never the other way round, and fsck checks
    an image through the follower alone."""
    graph = agents_graph()
    writer = {"agents.committer", "agents.volume"}
    assert graph["agents.follower"] & {*writer, "agents.fsck"} == set()
    assert graph["agents.fsck"] & writer == set()
    assert graph["agents.committer"] & {"agents.volume", "agents.fsck"} == set()


def test_the_orchestrator_never_imports_the_agents_server() -> None:
    """The coordinator's HTTP server shares the agent's wire vocabulary (agents.core.protocol,
    agents.errors, agents.httpbase), never the agent's server module."""
    found = set()
    for path in python_files("orchestrator"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found |= {f"{rel(path)} imports {n}" for n in names if n == "agents.server"}
    assert found == set()


def all_modules() -> list[str]:
    return [rel(p).removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            for package in ("agents", "orchestrator") for p in python_files(package)
            if p.name != "__main__.py"]


def test_every_error_derives_from_the_root() -> None:
    """Every public exception class of agents/ and orchestrator/ is an ``RbdfleetError``
    (orchestrator/errors.py and agents/errors.py are the two trees); a private carrier
    (``_Name``) is allowed only if its own module catches it, so it never leaves that module."""
    import importlib
    import inspect

    from agents.errors import RbdfleetError

    offenders = []
    for name in all_modules():
        module = importlib.import_module(name)
        source = inspect.getsource(module)
        for cls in vars(module).values():
            if not (isinstance(cls, type) and issubclass(cls, BaseException)
                    and cls.__module__ == name) or issubclass(cls, RbdfleetError):
                continue
            if cls.__name__.startswith("_") and f"except {cls.__name__}" in source:
                continue
            offenders.append(f"{name}.{cls.__name__}")
    assert offenders == []
