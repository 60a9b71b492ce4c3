"""What is deployed: the agent package and the command that launches it.

Shared by both deployers (:mod:`orchestrator.deploy` over SSH, :mod:`orchestrator.adapters.ansible`)
and the CLI, so the Ansible adapter does not import the SSH deployer's use case.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

import agents

__all__ = ["DEFAULT_LAUNCH", "AgentPackage"]

# ``python3 <DEFAULT_LAUNCH> --config FILE`` runs the agent daemon.
DEFAULT_LAUNCH: tuple[str, ...] = ("-m", "agents", "serve")


@dataclass(frozen=True)
class AgentPackage:
    """The ``agents`` package as a deterministic tar.gz; ``version`` is its sha256 (16 hex)."""

    tarball: bytes
    version: str

    @classmethod
    def build(cls, package_dir: Path | None = None) -> AgentPackage:
        """Pack ``package_dir`` (default: the imported ``agents``): ``.py`` files and py.typed."""
        root = package_dir or Path(agents.__file__).parent
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and (p.suffix == ".py" or p.name == "py.typed")
                       and "__pycache__" not in p.parts)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in files:
                data = path.read_bytes()
                info = tarfile.TarInfo(posixpath.join("agents", *path.relative_to(root).parts))
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        tarball = gzip.compress(raw.getvalue(), mtime=0)
        return cls(tarball, hashlib.sha256(tarball).hexdigest()[:16])
