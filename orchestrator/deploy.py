"""Deploy the agent to hosts and VMs over SSH: copy, configure, start, stop, status.

On each host, under its install prefix ``P`` (``/`` on a VM, the host root on a test host)::

    P/opt/rbdfleet/releases/<version>/agents/...   the package, one directory per version
    P/opt/rbdfleet/current -> releases/<version>    switched atomically (symlink + rename)
    P/etc/rbdfleet/agent.json                       the agent's config (0600)
    P/run/rbdfleet/agent.pid                        pid of the running agent (host-local pid)
    P/var/log/rbdfleet/agent.log                    its stdout and stderr
    P/var/lib/rbdfleet/                             its working directory
    P/etc/systemd/system/rbdfleet-agent.service     only where the Ansible role runs it

The agent runs as ``/usr/bin/python3 -m agents serve --config P/etc/rbdfleet/agent.json``
with ``PYTHONPATH`` set to the release it was started from: the VM needs nothing but python3.

Idempotent: the package's version is the sha256 of its (deterministic) tarball and the
config is compared by sha256, so a second deploy copies nothing and leaves a running agent
alone; a changed package or config restarts it. Hosts are handled in parallel and each
gets its own :class:`HostResult`; one failed host never hides the others, and any failure
raises :class:`~orchestrator.errors.DeployError` carrying every host's result.

A process counts as "the agent" only if the pidfile's pid is alive *and* its command line
holds this host's config path, so a reused pid is never signalled.

One host, one agent, one manager: the Ansible role (``ansible/``) keeps the same layout and
pidfile, starting the agent with start-stop-daemon where there is no systemd (then either
deployer sees, restarts or leaves alone the other's agent), and under its systemd unit where
systemd is PID 1. That unit writes the pidfile too, so ``status`` and an unchanged ``deploy``
see its agent; but systemd restarts what it runs, so on a host with the unit this deployer
refuses to install, start or stop anything (RemoteCommandFailed), and the role refuses
to put systemd next to an agent this deployer started.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import posixpath
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import agents
from agents.errors import RbdfleetError
from orchestrator.adapters.ssh import Executable, RemoteCommand, SshHost
from orchestrator.config import FleetConfig
from orchestrator.errors import DeployError, RemoteCommandFailed
from orchestrator.ports import RemoteShell

LOG = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LAUNCH",
    "AgentDeployer",
    "AgentLayout",
    "AgentPackage",
    "DeployTarget",
    "HostResult",
]

# ``python3 <DEFAULT_LAUNCH> --config FILE`` runs the agent daemon.
DEFAULT_LAUNCH: tuple[str, ...] = ("-m", "agents", "serve")

# Shared by the remote scripts: the pid in the pidfile, if that process is our agent.
_RUNNING = r'''
import hashlib, json, os, signal, sys, time
def running(config, pidfile):
    try:
        pid = int(open(pidfile).read().split()[0])
        argv = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if config.encode() in argv else None
'''

_PROBE = _RUNNING + r'''
install, config, pidfile, log, unit = sys.argv[1:6]
current = os.path.join(install, "current")
version = None
if os.path.isfile(os.path.join(current, "agents", "__init__.py")):
    version = os.path.basename(os.readlink(current))
try:
    config_sha = hashlib.sha256(open(config, "rb").read()).hexdigest()
except OSError:
    config_sha = None
try:
    with open(log, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 600))
        tail = f.read().decode(errors="replace")
except OSError:
    tail = ""
print(json.dumps({"version": version, "config_sha256": config_sha,
                  "pid": running(config, pidfile), "log_tail": tail,
                  "systemd_unit": os.path.exists(unit)}))
'''

_INSTALL = r'''
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
    if name not in (version, previous):  # keep the one a running agent may still use
        shutil.rmtree(os.path.join(releases, name), ignore_errors=True)
'''

_STOP = _RUNNING + r'''
config, pidfile, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
pid = running(config, pidfile)
if pid is not None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running(config, pidfile) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if running(config, pidfile) is not None:
        os.kill(pid, signal.SIGKILL)
try:
    os.unlink(pidfile)
except FileNotFoundError:
    pass
print(json.dumps({"stopped": pid}))
'''


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


@dataclass(frozen=True)
class AgentLayout:
    """Where the agent's files live under an install prefix (see the module docstring)."""

    prefix: str = "/"

    def _at(self, *parts: str) -> str:
        return posixpath.join(self.prefix, *parts)

    @property
    def install_dir(self) -> str:
        return self._at("opt", "rbdfleet")

    @property
    def current(self) -> str:
        return self._at("opt", "rbdfleet", "current")

    def release(self, version: str) -> str:
        """One version's directory; a running agent imports from here, never via ``current``,
        so a later install cannot mix two versions in one process."""
        return self._at("opt", "rbdfleet", "releases", version)

    @property
    def config_path(self) -> str:
        return self._at("etc", "rbdfleet", "agent.json")

    @property
    def pidfile(self) -> str:
        return self._at("run", "rbdfleet", "agent.pid")

    @property
    def log_path(self) -> str:
        return self._at("var", "log", "rbdfleet", "agent.log")

    @property
    def workdir(self) -> str:
        return self._at("var", "lib", "rbdfleet")

    @property
    def unit_path(self) -> str:
        """The Ansible role's systemd unit: where it exists, systemd owns the agent."""
        return self._at("etc", "systemd", "system", "rbdfleet-agent.service")

    def directories(self) -> list[str]:
        """Every directory the agent needs."""
        return [self.install_dir, posixpath.dirname(self.config_path),
                posixpath.dirname(self.pidfile), posixpath.dirname(self.log_path), self.workdir]


@dataclass(frozen=True)
class DeployTarget:
    """One host to deploy to: where it is, its install prefix, its agent's config."""

    host: SshHost
    prefix: str = "/"
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> AgentLayout:
        return AgentLayout(self.prefix)

    @staticmethod
    def from_fleet(config: FleetConfig,
                   agent_config: Callable[[str], Mapping[str, Any]]) -> list[DeployTarget]:
        """The fleet's VMs (prefix ``/``) and sandbox hosts (prefix = their root);
        ``agent_config(name)`` gives each agent's config."""
        vms = [DeployTarget(vm, "/", agent_config(vm.name)) for vm in config.vms]
        hosts = [DeployTarget(h, str(h.root), agent_config(h.name)) for h in config.hosts]
        return vms + hosts

    def config_bytes(self) -> bytes:
        return (json.dumps(dict(self.config), indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class HostResult:
    """What happened on one host. ``error`` is set iff ``ok`` is False."""

    host: str
    ok: bool
    changed: bool = False
    actions: tuple[str, ...] = ()
    pid: int | None = None
    version: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class _Probe:
    version: str | None
    config_sha256: str | None
    pid: int | None
    log_tail: str
    systemd_unit: bool


class AgentDeployer:
    """Installs, configures, starts and stops the agent on many hosts over a RemoteShell."""

    def __init__(self, shell: RemoteShell, package: AgentPackage, *,
                 launch: Sequence[str] = DEFAULT_LAUNCH, max_parallel: int = 8,
                 stop_grace: float = 5.0, settle: float = 0.5,
                 command_timeout: float = 60.0) -> None:
        """``launch``: python3 arguments before ``--config FILE``; ``settle``: how long a
        freshly started agent must stay alive to count as started."""
        self.shell = shell
        self.package = package
        self.launch = tuple(launch)
        self.max_parallel = max_parallel
        self.stop_grace = stop_grace
        self.settle = settle
        self.command_timeout = command_timeout

    # public: each returns {host name: HostResult} and raises DeployError if any host failed

    def deploy(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        """Install package and config, then make the agent run (restart it if either changed)."""
        return self._each(targets, self._deploy_one)

    def install(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        """Install package and config only; a running agent is left as it is."""
        return self._each(targets, self._install_one)

    def start(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        """Start the installed agent where it is not running."""
        return self._each(targets, self._start_one)

    def stop(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        """SIGTERM the agent, SIGKILL after ``stop_grace``; no agent running is fine."""
        return self._each(targets, self._stop_one)

    def status(self, targets: Sequence[DeployTarget]) -> dict[str, HostResult]:
        """Installed version and running pid per host (``pid`` None: not running)."""
        return self._each(targets, self._status_one)

    # per host ------------------------------------------------------------------------------

    def _deploy_one(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        actions, probe = self._install(target, self._probe(target))
        if probe.pid is not None and actions:
            self._stop(target)
            actions.append("stopped")
            probe = replace(probe, pid=None)
        started, probe = self._start(target, probe)
        return actions + started, probe

    def _install_one(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        return self._install(target, self._probe(target))

    def _start_one(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        return self._start(target, self._probe(target))

    def _install(self, target: DeployTarget, probe: _Probe) -> tuple[list[str], _Probe]:
        """Bring package and config up to date, given what ``probe`` found."""
        layout, actions = target.layout, []
        config = target.config_bytes()
        config_sha = hashlib.sha256(config).hexdigest()
        stale_package = probe.version != self.package.version
        stale_config = probe.config_sha256 != config_sha
        if stale_package or stale_config:
            _refuse_if_systemd(target, probe, "install")
            self._run(target, RemoteCommand(Executable.MKDIR, ["-p", *layout.directories()]))
        if stale_package:
            tarball = posixpath.join(layout.install_dir,
                                     f".incoming-{self.package.version}.tar.gz")
            self.shell.put_file(target.host, self.package.tarball, tarball, 0o600,
                                self.command_timeout)
            self._python(target, _INSTALL, layout.install_dir, self.package.version, tarball)
            actions.append(f"installed {self.package.version}")
        if stale_config:
            self.shell.put_file(target.host, config, layout.config_path, 0o600,
                                self.command_timeout)
            actions.append("configured")
        return actions, replace(probe, version=self.package.version, config_sha256=config_sha)

    def _start(self, target: DeployTarget, probe: _Probe) -> tuple[list[str], _Probe]:
        """Start the agent unless ``probe`` found it running; check it stays up."""
        layout = target.layout
        if probe.pid is not None:
            return [], probe
        if probe.version is None:
            raise RemoteCommandFailed(target.host.name, "agent not installed", rc=-1)
        _refuse_if_systemd(target, probe, "start")
        cmd = RemoteCommand(Executable.PYTHON3,
                            [*self.launch, "--config", layout.config_path])
        pid = self.shell.start_background(target.host, cmd, workdir=layout.workdir,
                                          log_path=layout.log_path,
                                          env={"PYTHONPATH": layout.release(probe.version)},
                                          timeout=self.command_timeout)
        self.shell.put_file(target.host, f"{pid}\n".encode(), layout.pidfile, 0o644,
                            self.command_timeout)
        time.sleep(self.settle)  # an agent that dies on a bad config does so at once
        probe = self._probe(target)
        if probe.pid != pid:
            raise RemoteCommandFailed(target.host.name, "agent exited right after start: "
                                      f"{probe.log_tail.strip()[-400:]}", rc=-1)
        return [f"started pid {pid}"], probe

    def _stop_one(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        _refuse_if_systemd(target, self._probe(target), "stop")
        stopped = self._stop(target)
        return ([f"stopped pid {stopped}"] if stopped is not None else []), self._probe(target)

    def _status_one(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        return [], self._probe(target)

    # remote helpers ------------------------------------------------------------------------

    def _stop(self, target: DeployTarget) -> int | None:
        layout = target.layout
        out = self._python(target, _STOP, layout.config_path, layout.pidfile,
                           str(self.stop_grace))
        stopped = json.loads(out)["stopped"]
        return int(stopped) if stopped is not None else None

    def _probe(self, target: DeployTarget) -> _Probe:
        layout = target.layout
        out = json.loads(self._python(target, _PROBE, layout.install_dir, layout.config_path,
                                      layout.pidfile, layout.log_path, layout.unit_path))
        return _Probe(out["version"], out["config_sha256"], out["pid"], out["log_tail"],
                      out["systemd_unit"])

    def _python(self, target: DeployTarget, script: str, *args: str) -> str:
        return self._run(target, RemoteCommand(Executable.PYTHON3, ["-c", script, *args]))

    def _run(self, target: DeployTarget, cmd: RemoteCommand) -> str:
        return self.shell.run(target.host, cmd, self.command_timeout, check=True).stdout

    def _each(self, targets: Sequence[DeployTarget],
              step: Callable[[DeployTarget], tuple[list[str], _Probe]]) -> dict[str, HostResult]:
        def one(target: DeployTarget) -> HostResult:
            started = time.monotonic()
            name = target.host.name
            try:
                actions, probe = step(target)
            except RbdfleetError as exc:
                LOG.warning("deploy %s on %s failed: %s", step.__name__, name, exc)
                return HostResult(name, ok=False, error=str(exc),
                                  seconds=round(time.monotonic() - started, 3))
            return HostResult(name, ok=True, changed=bool(actions), actions=tuple(actions),
                              pid=probe.pid, version=probe.version,
                              seconds=round(time.monotonic() - started, 3))

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_parallel, len(targets)))) as pool:
            results = {r.host: r for r in pool.map(one, targets)}
        failed = sorted(name for name, r in results.items() if not r.ok)
        if failed:
            raise DeployError(f"agent {_verb(step)} failed on {', '.join(failed)}", results)
        return results


def _refuse_if_systemd(target: DeployTarget, probe: _Probe, action: str) -> None:
    """The Ansible role's systemd unit runs (and restarts) this host's agent: keep off it."""
    if probe.systemd_unit:
        raise RemoteCommandFailed(target.host.name, f"refusing to {action} the agent: systemd runs "
                             f"it from {target.layout.unit_path} (Ansible role rbdfleet_agent); "
                             "deploy with ansible-playbook, or `systemctl disable --now "
                             "rbdfleet-agent` and remove the unit first", rc=-1)


def _verb(step: Callable[..., Any]) -> str:
    return getattr(step, "__name__", "step").strip("_").removesuffix("_one")
