"""Deploy the agent to hosts and VMs over SSH: copy, configure, start, stop, status.

On each host, under its install prefix ``P`` (``/`` on a VM, the host root on a test host)::

    P/opt/rbdfleet/releases/<version>/agents/...   the package, one directory per version
    P/opt/rbdfleet/current -> releases/<version>    switched atomically (symlink + rename)
    P/etc/rbdfleet/agent.json                       the agent's config (0600)
    P/run/rbdfleet/agent.pid                        pid of the running agent (host-local pid)
    P/var/log/rbdfleet/agent.log                    its stdout and stderr (without systemd)
    P/var/lib/rbdfleet/                             its working directory
    /etc/systemd/system/rbdfleet-agent.service      its unit, where systemd runs it

**Who owns what.** Where systemd runs the agent it runs as its own system account
(:data:`agents.service.AGENT_USER`, made here with ``useradd --system`` when missing, no shell,
no home, member of ``disk``): ``etc/rbdfleet`` is root's, mode 0750, group the agent's (it may
read, not add or replace); the agent's private files there (config, its key, its TLS key: every
file installed without group or other bits) are the agent's, 0600 (its key file reader refuses
any group bit, and ``/etc`` is read-only in its sandbox); certificates are root's, 0644; the
working directory is the agent's, 0750 (systemd's ``StateDirectory``: the launcher's state).
Elsewhere the SSH user who starts the agent owns everything, as the files are written.

The agent runs as ``/usr/bin/python3 -m agents serve --config P/etc/rbdfleet/agent.json``
with ``PYTHONPATH`` set to the release it was started from: the VM needs nothing but python3.

**Where systemd is PID 1** (``/run/systemd/system`` exists; prefix ``/``) the agent is a
service: the unit of :mod:`agents.service` (``Restart=always``, journald, hardened) is
installed and ``systemctl enable --now``-ed, so systemd restarts a crashed agent and starts it
at boot; a restarted agent comes back as a reader (see :mod:`agents.service`). **Elsewhere**
(the namespace test hosts, any host without systemd) the fallback: a detached background
process whose pid goes to the pidfile; nothing restarts it.

Idempotent: the package's version is the sha256 of its (deterministic) tarball and the
config is compared by sha256, so a second deploy copies nothing and leaves a running agent
alone; a changed package or config restarts it. Hosts are handled in parallel and each
gets its own :class:`HostResult`; one failed host never hides the others, and any failure
raises :class:`~orchestrator.errors.DeployError` carrying every host's result.

A process counts as "the agent" only if the pidfile's pid is alive *and* its command line
holds this host's config path, so a reused pid is never signalled.

One host, one agent, one manager: the Ansible role (``ansible/``) keeps the same layout,
pidfile and unit (both render :data:`agents.service.UNIT`), so either deployer sees, restarts
or leaves alone the other's agent: with start-stop-daemon where there is no systemd, with
systemctl where there is. The unit writes the pidfile too, so ``status`` reads one file on
every host. A unit file on a host this deployer does not drive through systemd (no systemd
running, or a prefix other than ``/``) is not ours to bypass: there it refuses to install,
start or stop anything (RemoteCommandFailed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from agents.errors import RbdfleetError
from agents.service import AGENT_USER, DEVICE_GROUP, UNIT_NAME, UnitParams, render_unit
from orchestrator.config import FleetConfig
from orchestrator.core.remote import Executable, RemoteCommand, SshHost
from orchestrator.errors import DeployError, RemoteCommandFailed
from orchestrator.packaging import DEFAULT_LAUNCH, INSTALL_RELEASE, AgentPackage
from orchestrator.ports import RemoteShell

LOG = logging.getLogger(__name__)

__all__ = [
    "AgentDeployer",
    "AgentLayout",
    "DeployTarget",
    "HostResult",
    "Ownership",
]

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
import subprocess
install, config, pidfile, log, unit, may_use_systemd = sys.argv[1:7]
systemd = may_use_systemd == "1" and os.path.isdir("/run/systemd/system")
current = os.path.join(install, "current")
version = None
if os.path.isfile(os.path.join(current, "agents", "__init__.py")):
    version = os.path.basename(os.readlink(current))
try:
    config_sha = hashlib.sha256(open(config, "rb").read()).hexdigest()
except OSError:
    config_sha = None
try:
    unit_sha = hashlib.sha256(open(unit, "rb").read()).hexdigest()
except OSError:
    unit_sha = None
tail = ""
if systemd:
    tail = subprocess.run(["journalctl", "-u", os.path.basename(unit), "-n", "20", "--no-pager",
                           "-o", "cat"], capture_output=True, text=True).stdout[-600:]
else:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 600))
            tail = f.read().decode(errors="replace")
    except OSError:
        pass
print(json.dumps({"version": version, "config_sha256": config_sha,
                  "pid": running(config, pidfile), "log_tail": tail,
                  "unit_sha256": unit_sha, "systemd": systemd}))
'''

# Make the agent's account unless it exists (in the device group), then give each path its
# owner and mode. argv: user device_group home, then (path, "user:group", octal mode)
# triples. Absolute paths: PATH over SSH is the login's.
_ACCOUNT = r'''
import grp, os, pwd, subprocess, sys
user, group, home = sys.argv[1:4]
try:
    pwd.getpwnam(user)
except KeyError:
    try:  # a group left without its user (userdel keeps a group with other members)
        own = ["--gid", str(grp.getgrnam(user).gr_gid)]
    except KeyError:
        own = ["--user-group"]
    subprocess.run(["/usr/sbin/useradd", "--system", *own, "--no-create-home",
                    "--home-dir", home, "--shell", "/usr/sbin/nologin",
                    "--comment", "rbdfleet agent", user], check=True)
if user not in grp.getgrnam(group).gr_mem:
    subprocess.run(["/usr/sbin/usermod", "--append", "--groups", group, user], check=True)
spec = sys.argv[4:]
for i in range(0, len(spec), 3):
    path, owner, mode = spec[i:i + 3]
    name, _, group_name = owner.partition(":")
    os.lchown(path, pwd.getpwnam(name).pw_uid, grp.getgrnam(group_name).gr_gid)
    os.chmod(path, int(mode, 8))
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


_AGENT_OWNER = f"{AGENT_USER}:{AGENT_USER}"


@dataclass(frozen=True)
class Ownership:
    """One path's owner (``user:group``) and mode."""

    path: str
    owner: str
    mode: int

    @staticmethod
    def of_file(path: str, mode: int) -> Ownership:
        """An installed file's: the agent's when no group or other may read it (a secret),
        else root's."""
        return Ownership(path, _AGENT_OWNER if not mode & 0o077 else "root:root", mode)

    def args(self) -> list[str]:
        return [self.path, self.owner, f"{self.mode:o}"]


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
        """The agent's systemd unit (both deployers install it where systemd runs)."""
        return self._at("etc", "systemd", "system", UNIT_NAME)

    def directories(self) -> list[str]:
        """Every directory the agent needs."""
        return [self.install_dir, posixpath.dirname(self.config_path),
                posixpath.dirname(self.pidfile), posixpath.dirname(self.log_path), self.workdir]

    def owned_by_agent(self) -> list[Ownership]:
        """Where systemd runs the agent as its account: the owners and modes that differ from
        a root-written file's (see the module docstring); the rest stays root's. Not the
        working directory: the unit's ``StateDirectory`` gives it to the agent at each start,
        with its contents whenever the top was not the agent's (a state file that a root
        agent of an earlier release left)."""
        return [Ownership(posixpath.dirname(self.config_path), f"root:{AGENT_USER}", 0o750),
                Ownership(self.config_path, _AGENT_OWNER, 0o600)]



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
    log_tail: str  # the journal's under systemd, else the log file's
    unit_sha256: str | None  # the unit file's, None: no unit
    systemd: bool  # systemd runs the agent here (PID 1 is systemd, prefix "/")


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
            self._stop(target, probe)
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
        unit = self._unit(target).encode() if probe.systemd else None
        unit_sha = hashlib.sha256(unit).hexdigest() if unit is not None else None
        stale_package = probe.version != self.package.version
        stale_config = probe.config_sha256 != config_sha
        stale_unit = unit is not None and probe.unit_sha256 != unit_sha
        if stale_package or stale_config or stale_unit:
            _refuse_unit_we_do_not_drive(target, probe, "install")
            self._run(target, RemoteCommand(Executable.MKDIR, ["-p", *layout.directories()]))
        if stale_package:
            tarball = posixpath.join(layout.install_dir,
                                     f".incoming-{self.package.version}.tar.gz")
            self.shell.put_file(target.host, self.package.tarball, tarball, 0o600,
                                self.command_timeout)
            self._python(target, INSTALL_RELEASE, layout.install_dir, self.package.version, tarball)
            actions.append(f"installed {self.package.version}")
        if stale_config:
            self.shell.put_file(target.host, config, layout.config_path, 0o600,
                                self.command_timeout)
            actions.append("configured")
        if unit is not None and stale_unit:
            self.shell.put_file(target.host, unit, layout.unit_path, 0o644,
                                self.command_timeout)
            actions.append(f"unit {UNIT_NAME} installed")
        if probe.systemd and (stale_package or stale_config or stale_unit):
            self._own(target, layout.owned_by_agent())
        return actions, replace(probe, version=self.package.version, config_sha256=config_sha,
                                unit_sha256=unit_sha if unit is not None else probe.unit_sha256)

    def put_files(self, target: DeployTarget, files: Sequence[tuple[bytes, str, int]]) -> None:
        """Install files the agent reads beside its config (its key, its TLS material) after
        :meth:`install`: ``(content, path, mode)``, each written atomically with its mode; where
        systemd runs the agent, owned as the module docstring says (a private one by the agent's
        account). RemoteError when one cannot be written."""
        for content, path, mode in files:
            self.shell.put_file(target.host, content, path, mode, self.command_timeout)
        if self._probe(target).systemd:
            self._own(target, [Ownership.of_file(path, mode) for _, path, mode in files])

    def _own(self, target: DeployTarget, paths: Sequence[Ownership]) -> None:
        """The agent's account made if missing, then ``paths`` given their owners and modes."""
        self._python(target, _ACCOUNT, AGENT_USER, DEVICE_GROUP, target.layout.workdir,
                     *(arg for owned in paths for arg in owned.args()))

    def _unit(self, target: DeployTarget) -> str:
        layout = target.layout
        return render_unit(UnitParams(
            release=layout.release(self.package.version), workdir=layout.workdir,
            config_path=layout.config_path, pidfile=layout.pidfile, config=target.config,
            launch=self.launch, python=str(Executable.PYTHON3), stop_timeout=self.stop_grace))

    def _start(self, target: DeployTarget, probe: _Probe) -> tuple[list[str], _Probe]:
        """Start the agent unless ``probe`` found it running; check it stays up."""
        layout = target.layout
        if probe.pid is not None:
            return [], probe
        if probe.version is None:
            raise RemoteCommandFailed(target.host.name, "agent not installed", rc=-1)
        if probe.systemd:
            return self._start_service(target)
        _refuse_unit_we_do_not_drive(target, probe, "start")
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

    def _start_service(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        """``systemctl enable --now`` the unit; the process it started must still run after
        ``settle`` (systemd would restart an agent that dies on a bad config, forever)."""
        # a reload costs seconds of a TCG guest: only when the file changed since systemd read it
        if self._show(target, "NeedDaemonReload").get("NeedDaemonReload") == "yes":
            self._systemctl(target, "daemon-reload")
        self._systemctl(target, "enable", "--now", UNIT_NAME)
        started = self._show(target, "MainPID").get("MainPID")
        time.sleep(self.settle)  # shorter than RestartSec: a crash shows as not active
        shown = self._show(target, "ActiveState", "MainPID")
        probe = self._probe(target)
        if shown.get("ActiveState") != "active" or shown.get("MainPID") != started \
                or probe.pid is None or str(probe.pid) != started:
            raise RemoteCommandFailed(target.host.name, f"agent exited right after start "
                                      f"({shown}): {probe.log_tail.strip()[-400:]}", rc=-1)
        return [f"started {UNIT_NAME} pid {probe.pid}"], probe

    def _stop_one(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        probe = self._probe(target)
        _refuse_unit_we_do_not_drive(target, probe, "stop")
        stopped = self._stop(target, probe, disable=True)  # undeploy: not at boot either
        return ([f"stopped pid {stopped}"] if stopped is not None else []), self._probe(target)

    def _status_one(self, target: DeployTarget) -> tuple[list[str], _Probe]:
        return [], self._probe(target)

    # remote helpers ------------------------------------------------------------------------

    def _stop(self, target: DeployTarget, probe: _Probe, *, disable: bool = False) -> int | None:
        """Stop the agent (systemd's, then any other the pidfile names); the pid stopped."""
        if probe.systemd and probe.unit_sha256 is not None:
            self._systemctl(target, *(("disable", "--now") if disable else ("stop",)), UNIT_NAME)
        # an agent systemd does not run (started before its unit existed) stops here
        layout = target.layout
        out = self._python(target, _STOP, layout.config_path, layout.pidfile,
                           str(self.stop_grace))
        stopped = json.loads(out)["stopped"]
        return probe.pid if probe.pid is not None else (
            int(stopped) if stopped is not None else None)

    def _probe(self, target: DeployTarget) -> _Probe:
        layout = target.layout
        out = json.loads(self._python(target, _PROBE, layout.install_dir, layout.config_path,
                                      layout.pidfile, layout.log_path, layout.unit_path,
                                      "1" if posixpath.normpath(target.prefix) == "/" else "0"))
        return _Probe(out["version"], out["config_sha256"], out["pid"], out["log_tail"],
                      out["unit_sha256"], out["systemd"])

    def _systemctl(self, target: DeployTarget, *args: str) -> str:
        return self._run(target, RemoteCommand(Executable.SYSTEMCTL, list(args)))

    def _show(self, target: DeployTarget, *properties: str) -> dict[str, str]:
        """``systemctl show`` of the agent's unit: property -> value."""
        out = self._systemctl(target, "show", *(f"--property={p}" for p in properties),
                              UNIT_NAME)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

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


def _refuse_unit_we_do_not_drive(target: DeployTarget, probe: _Probe, action: str) -> None:
    """A unit file where this deployer does not use systemd (none running, or a prefix other
    than ``/``): whoever put it there runs the agent through it; keep off."""
    if probe.unit_sha256 is not None and not probe.systemd:
        raise RemoteCommandFailed(target.host.name, f"refusing to {action} the agent: systemd runs "
                             f"it from {target.layout.unit_path} (Ansible role rbdfleet_agent); "
                             "deploy with ansible-playbook, or `systemctl disable --now "
                             "rbdfleet-agent` and remove the unit first", rc=-1)


def _verb(step: Callable[..., Any]) -> str:
    return getattr(step, "__name__", "step").strip("_").removesuffix("_one")
