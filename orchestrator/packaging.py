"""What is deployed: the agent package, the coordinator package and the command that launches
the agent; and the remote script that installs a release of either.

Shared by both deployers (:mod:`orchestrator.deploy` over SSH,
:mod:`orchestrator.adapters.ansible`), the coordinator's installer
(:mod:`orchestrator.coordinator_hosts`) and the CLI, so the Ansible adapter does not import the
SSH deployer's use case.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import agents
import orchestrator

__all__ = ["DEFAULT_LAUNCH", "INSTALL_RELEASE", "AgentPackage", "CoordinatorPackage"]

# ``python3 <DEFAULT_LAUNCH> --config FILE`` runs the agent daemon.
DEFAULT_LAUNCH: tuple[str, ...] = ("-m", "agents", "serve")

# Run on the host as ``python3 -c INSTALL_RELEASE INSTALL_DIR VERSION TARBALL``: unpacks the
# tarball into INSTALL_DIR/releases/VERSION (once: a release is never rewritten), points
# INSTALL_DIR/current at it (symlink + rename: atomic) and keeps only it and the release a
# running process may still use.
INSTALL_RELEASE = r'''
import os, shutil, sys, tarfile
install, version, tarball = sys.argv[1:4]
releases = os.path.join(install, "releases")
final = os.path.join(releases, version)
if not os.path.isdir(final):
    tmp = "%s.tmp-%d" % (final, os.getpid())
    os.makedirs(tmp)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    os.rename(tmp, final)
current = os.path.join(install, "current")
previous = os.path.basename(os.readlink(current)) if os.path.islink(current) else None
link = "%s.tmp-%d" % (current, os.getpid())
os.symlink(os.path.join("releases", version), link)
os.replace(link, current)
os.unlink(tarball)
for name in os.listdir(releases):
    if name not in (version, previous):  # keep the one a running process may still use
        shutil.rmtree(os.path.join(releases, name), ignore_errors=True)
'''

# The libraries a coordinator host brings itself (Debian's python3-rados, python3-rbd,
# python3-libvirt: compiled against its own librados and libvirt, never shipped).
HOST_BINDINGS = ("rados", "rbd", "libvirt")


def _tarball(entries: Iterable[tuple[str, Path]]) -> tuple[bytes, str]:
    """A deterministic tar.gz of ``(name in the archive, file)`` pairs (sorted, mtime 0, mode
    0644 or 0755) and its version: the sha256 of its bytes, 16 hex."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(set(entries)):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            tar.addfile(info, io.BytesIO(data))
    tarball = gzip.compress(raw.getvalue(), mtime=0)
    return tarball, hashlib.sha256(tarball).hexdigest()[:16]


def _package_files(root: Path, *, data: bool = False) -> Iterator[tuple[str, Path]]:
    """The ``.py`` files and ``py.typed`` of the package at ``root`` (and, with ``data``, every
    other file but caches), named under the package's directory name."""
    for path in root.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        if data or path.suffix == ".py" or path.name == "py.typed":
            yield posixpath.join(root.name, *path.relative_to(root).parts), path


@dataclass(frozen=True)
class AgentPackage:
    """The ``agents`` package as a deterministic tar.gz; ``version`` is its sha256 (16 hex)."""

    tarball: bytes
    version: str

    @classmethod
    def build(cls, package_dir: Path | None = None) -> AgentPackage:
        """Pack ``package_dir`` (default: the imported ``agents``): ``.py`` files and py.typed."""
        root = package_dir or Path(agents.__file__).parent
        named = ((posixpath.join("agents", name.partition("/")[2]), path)
                 for name, path in _package_files(root))
        return cls(*_tarball(named))


@dataclass(frozen=True)
class CoordinatorPackage:
    """What runs ``rbdfleet coordinator run`` on a host with nothing but Debian's python3 and
    its Ceph and libvirt bindings: ``agents`` and ``orchestrator`` and every library the CLI
    needs (typer, paramiko, cryptography... and theirs), exactly as installed beside this
    process, as one deterministic tar.gz meant for ``PYTHONPATH``. ``version``: its sha256.

    Compiled libraries (cryptography's, cffi's...) are this Python's: the hosts must run the
    same Python minor version on the same architecture (checked by the installer)."""

    tarball: bytes
    version: str

    @classmethod
    def build(cls, distribution: str = "rbdfleet") -> CoordinatorPackage:
        """Pack the installed ``distribution``'s packages and its requirements' closure."""
        entries = [*_package_files(Path(agents.__file__).parent),
                   *_package_files(Path(orchestrator.__file__).parent, data=True)]
        for dist in _requirement_closure(distribution):
            entries.extend(_distribution_files(dist))
        return cls(*_tarball(entries))


_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _requirement_closure(distribution: str) -> list[metadata.Distribution]:
    """The installed distributions ``distribution`` needs, itself excluded, extras' left out."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [distribution]
    while todo:
        dist = metadata.distribution(todo.pop())
        for requirement in dist.requires or []:
            _, _, marker = requirement.partition(";")
            match = _REQUIREMENT_NAME.match(requirement)
            if match is None or "extra" in marker:
                continue
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            if name not in seen:
                try:
                    seen[name] = metadata.distribution(name)
                except metadata.PackageNotFoundError:
                    continue  # a marker this Python does not meet left it uninstalled
                todo.append(name)
    return [seen[name] for name in sorted(seen)]


def _distribution_files(dist: metadata.Distribution) -> Iterator[tuple[str, Path]]:
    """The files ``dist`` installed into its site directory: from its RECORD, or (a Debian
    package keeps none) from its ``top_level.txt``."""
    site = Path(str(dist.locate_file("")))
    if dist.files:
        for record in dist.files:
            path = Path(str(dist.locate_file(record)))
            if record.parts[0] != ".." and "__pycache__" not in record.parts and path.is_file():
                yield record.as_posix(), path
        return
    for top in (dist.read_text("top_level.txt") or "").split():
        root = site / top
        if root.is_dir():
            yield from _package_files(root, data=True)
        for module in site.glob(f"{top}.*"):
            if module.is_file():
                yield module.name, module
