"""The coordinator as a systemd service on hosts, over SSH (``rbdfleet coordinator install``).

Each host runs ``rbdfleet coordinator run`` under systemd (``Restart=always``, journald,
hardened): an active and standbys that take its RADOS lease when it dies (docs/coordinator.md).
On each host::

    /opt/rbdfleet/coordinator/releases/<version>/    CoordinatorPackage (PYTHONPATH)
    /opt/rbdfleet/coordinator/current -> releases/<version>
    /etc/rbdfleet/coordinator/<fleet>/               root's, 0700
        rbdfleet.toml        the operator's config, its paths made this host's, listen= its own
        ceph.conf            mon_host and the keyring's path, nothing else of the operator's
        ceph.keyring         the config's Ceph credential (0600)
        fleet.secret         the fleet's master key: the coordinator signs grants (0600)
        known_hosts          the operator's pinned host keys (public; no SSH key is installed:
                             the coordinator never logs into a VM)
        tls/                 ca.pem, crl.pem, coordinator.pem, coordinator.key (0600): never
                             the CA's key
    /etc/systemd/system/rbdfleet-coordinator-<fleet>.service

The host brings Debian's python3 (the same minor version as the installing machine: the
package carries compiled libraries) and its Ceph and libvirt bindings (python3-rados,
python3-rbd, python3-libvirt), and systemd; the installer checks all of it first and says what
is missing. Hosts are done one after another, each until its coordinator answers
``/v1/health``, so a re-install restarts at most one coordinator at a time and the fleet keeps
an active one throughout. Idempotent: a second run with nothing changed writes nothing and
restarts nothing (every file is compared by sha256).
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import functools
import hashlib
import json
import platform
import posixpath
import string
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.errors import RbdfleetError
from agents.service import HARDENING
from orchestrator import config as fleet_config
from orchestrator.coordinator.config import CoordinatorConfig
from orchestrator.core.remote import Executable, RemoteCommand
from orchestrator.errors import ConfigError, CoordinationError, DeployError, RemoteCommandFailed
from orchestrator.packaging import HOST_BINDINGS, INSTALL_RELEASE, CoordinatorPackage
from orchestrator.pki import COORDINATOR, FleetPki
from orchestrator.ports import RemoteShell

__all__ = [
    "ANSIBLE_VARIABLES",
    "INSTALL_DIR",
    "UNIT",
    "CoordinatorHost",
    "CoordinatorInstaller",
    "CoordinatorLayout",
    "CoordinatorResult",
    "CoordinatorTarget",
    "ansible_template",
    "coordinator_targets",
    "host_config",
    "render_unit",
    "role_variables",
]

INSTALL_DIR = "/opt/rbdfleet/coordinator"
ETC_ROOT = "/etc/rbdfleet/coordinator"
UNIT_DIR = "/etc/systemd/system"
DEBIAN_BINDINGS = "python3-rados python3-rbd python3-libvirt"

UNIT = string.Template("""\
# Installed by `rbdfleet coordinator install` or the Ansible role rbdfleet_coordinator, both
# rendering orchestrator/coordinator_hosts.py: edit it there, not here.
[Unit]
Description=rbdfleet coordinator of fleet ${fleet}
After=network-online.target
Wants=network-online.target
# Never give up: RestartSec bounds the rate, and a standby holds the fleet meanwhile.
StartLimitIntervalSec=0

[Service]
Type=simple
# The release itself, never `current`: a new release rewrites this unit and restarts.
Environment=PYTHONPATH=${release}
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStart=${python} -m orchestrator.cli.app coordinator run --config ${config}
StandardOutput=journal
StandardError=journal
SyslogIdentifier=rbdfleet-coordinator
# SIGTERM steps down and releases the lease: a standby takes over at once.
KillSignal=SIGTERM
TimeoutStopSec=10
Restart=always
RestartSec=1

# root without a single capability: it reads its own 0600 files (owner), speaks TCP to Ceph,
# the agents and libvirt (or libvirt's socket), and writes nothing on disk.
""" + HARDENING + """\
PrivateDevices=yes
ProtectClock=yes
UMask=0077

[Install]
WantedBy=multi-user.target
""")


# The role's variables for the unit's placeholders (its vars/main.yml: the same layout).
ANSIBLE_VARIABLES = {
    "fleet": "{{ rbdfleet_coordinator_fleet }}",
    "release": "{{ rbdfleet_coordinator_release_dir }}",
    "config": "{{ rbdfleet_coordinator_config_path }}",
    "python": "{{ rbdfleet_coordinator_python }}",
}


def ansible_template() -> str:
    """The role's ``rbdfleet-coordinator.service.j2``: :data:`UNIT` with Jinja variables."""
    return UNIT.substitute(ANSIBLE_VARIABLES)


def render_unit(fleet: str, release: str, config: str,
                python: str = str(Executable.PYTHON3)) -> str:
    """The unit text of ``fleet``'s coordinator running ``release`` with ``config``."""
    return UNIT.substitute(fleet=fleet, release=release, config=config, python=python)


@dataclass(frozen=True)
class CoordinatorLayout:
    """Where one fleet's coordinator lives on a host (module docstring)."""

    fleet: str

    @property
    def install_dir(self) -> str:
        return INSTALL_DIR

    def release(self, version: str) -> str:
        return posixpath.join(INSTALL_DIR, "releases", version)

    @property
    def etc_dir(self) -> str:
        return posixpath.join(ETC_ROOT, self.fleet)

    def at(self, *parts: str) -> str:
        """A path under :attr:`etc_dir`."""
        return posixpath.join(self.etc_dir, *parts)

    @property
    def config_path(self) -> str:
        return self.at("rbdfleet.toml")

    @property
    def tls_dir(self) -> str:
        return self.at("tls")

    @property
    def unit_name(self) -> str:
        return f"rbdfleet-coordinator-{self.fleet}.service"

    @property
    def unit_path(self) -> str:
        return posixpath.join(UNIT_DIR, self.unit_name)


def host_config(data: Mapping[str, Any], layout: CoordinatorLayout, listen: str,
                libvirt_uri: str | None = None) -> dict[str, Any]:
    """The operator's parsed rbdfleet.toml made a coordinator host's: every path one of
    ``layout``'s, ``listen`` its own address, no client credential, no sandbox or test host
    table; with ``libvirt_uri``, every local libvirt URI (no host: ``qemu:///system``) becomes
    it (how this host reaches the hypervisors the operator's machine reaches locally)."""
    out = {name: (dict(value) if isinstance(value, Mapping) else value)
           for name, value in data.items() if name not in ("sandbox", "host")}
    out["ceph"] = {**out["ceph"], "conf": layout.at("ceph.conf"),
                   "keyring": layout.at("ceph.keyring")}
    ssh = {**out.get("ssh", {}), "key": layout.at("no-ssh-key"),
           "known_hosts": layout.at("known_hosts")}
    out["ssh"] = ssh
    fleet = {key: value for key, value in out["fleet"].items() if key != "client_secret_file"}
    out["fleet"] = {**fleet, "secret_file": layout.at("fleet.secret")}
    out["tls"] = {**out.get("tls", {}), "dir": layout.tls_dir}
    coordinator = {key: value for key, value in out.get("coordinator", {}).items()
                   if key not in ("tls_cert", "tls_key")}
    out["coordinator"] = {**coordinator, "listen": listen}
    if libvirt_uri is not None:
        out["libvirt"] = {**out.get("libvirt", {}), "uri": libvirt_uri}
        out["vm"] = [{**vm, "uri": libvirt_uri} if _local_uri(vm.get("uri")) else dict(vm)
                     for vm in out.get("vm", [])]
    return out


def _local_uri(uri: str | None) -> bool:
    """A libvirt URI without a host (or none: the ``[libvirt]`` default applies)."""
    return uri is None or uri.partition("://")[2].startswith("/")


@dataclass(frozen=True)
class CoordinatorHost:
    """A host to install on: a name for messages, the address to reach it (SSH and HTTPS)."""

    name: str
    address: str

    @staticmethod
    def named(cfg: fleet_config.FleetConfig, name: str) -> CoordinatorHost:
        """A VM of ``cfg`` by its name, else ``name`` is the host's address."""
        for vm in cfg.vms:
            if vm.name == name:
                return CoordinatorHost(vm.name, vm.address)
        return CoordinatorHost(name, name)


@dataclass(frozen=True)
class CoordinatorTarget:
    """One host and what goes on it: ``files`` are ``(content, path, mode)``."""

    host: CoordinatorHost
    url: str
    layout: CoordinatorLayout
    files: tuple[tuple[bytes, str, int], ...]


@dataclass(frozen=True)
class CoordinatorResult:
    """What happened on one host; ``role`` is what its coordinator answered once ready
    (``active`` or ``standby``). ``error`` is set iff ``ok`` is False."""

    host: str
    ok: bool
    url: str
    actions: tuple[str, ...] = ()
    version: str | None = None
    role: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        """Whether anything was written, started or stopped."""
        return bool(self.actions)


_PROBE = r'''
import hashlib, importlib.util, json, os, platform, sys
install = sys.argv[1]
def sha(path):
    try:
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    except OSError:
        return None
current = os.path.join(install, "current")
print(json.dumps({
    "systemd": os.path.isdir("/run/systemd/system"),
    "python": "%d.%d" % sys.version_info[:2], "machine": platform.machine(),
    "missing": [m for m in sys.argv[3].split(",") if importlib.util.find_spec(m) is None],
    "version": os.path.basename(os.readlink(current)) if os.path.islink(current) else None,
    "sha256": {path: sha(path) for path in sys.argv[2].split("\n") if path},
}))
'''

_REMOVE = r'''
import os, shutil, sys
etc, unit = sys.argv[1:3]
shutil.rmtree(etc, ignore_errors=True)
try:
    os.unlink(unit)
except FileNotFoundError:
    pass
'''


@dataclass
class CoordinatorInstaller:
    """Installs, checks and removes one fleet's coordinator service on hosts (module
    docstring). ``health(url)`` is the role the coordinator at ``url`` answers
    (``active``/``standby``) or raises while it does not answer; ``fleet_urls``, where a
    coordinator already active may answer."""

    shell: RemoteShell
    build_package: Callable[[], CoordinatorPackage]  # called once, by the first install
    health: Callable[[str], str]
    command_timeout: float = 120.0
    ready_timeout: float = 180.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    local_python: str = field(default_factory=lambda: "{}.{}".format(*sys.version_info[:2]))
    local_machine: str = field(default_factory=platform.machine)
    fleet_urls: Sequence[str] = ()  # every coordinator's URL (``[coordinator] urls``)

    @functools.cached_property
    def package(self) -> CoordinatorPackage:
        """What is installed (built on first use: ``uninstall`` needs none)."""
        return self.build_package()

    def install(self, targets: Sequence[CoordinatorTarget]) -> dict[str, CoordinatorResult]:
        """Each host in turn: checked, brought up to date, (re)started if anything changed or
        it was not running, and waited for until it answers. DeployError after the first host
        that fails (the next would be restarted without a ready one behind it)."""
        return self._each(targets, self._install_one, "install")

    def uninstall(self, targets: Sequence[CoordinatorTarget]) -> dict[str, CoordinatorResult]:
        """Stop and disable each host's service and remove its unit and files (not the
        package, which other fleets' coordinators may run)."""
        return self._each(targets, self._uninstall_one, "uninstall")

    def _each(self, targets: Sequence[CoordinatorTarget],
              step: Callable[[CoordinatorTarget], CoordinatorResult],
              verb: str) -> dict[str, CoordinatorResult]:
        results: dict[str, CoordinatorResult] = {}
        for target in targets:
            started = self.clock()
            try:
                result = step(target)
            except RbdfleetError as exc:
                result = CoordinatorResult(target.host.name, ok=False, url=target.url,
                                           error=str(exc))
            result = dataclasses.replace(result, seconds=round(self.clock() - started, 3))
            results[target.host.name] = result
            if not result.ok:
                raise DeployError(f"coordinator {verb} failed on {target.host.name}: "
                                  f"{result.error}", results)
        return results

    def _install_one(self, target: CoordinatorTarget) -> CoordinatorResult:
        layout, name = target.layout, target.host.name
        unit = render_unit(layout.fleet, layout.release(self.package.version),
                           layout.config_path).encode()
        files = [*target.files, (unit, layout.unit_path, 0o644)]
        probe = self._probe(target, [path for _, path, _ in files])
        self._check_host(name, probe)
        actions: list[str] = []
        self._run(target, RemoteCommand(Executable.MKDIR, ["-p", layout.install_dir]))
        self._run(target, RemoteCommand(Executable.MKDIR, ["-p", "-m", "0700", layout.tls_dir]))
        self._run(target, RemoteCommand(Executable.CHMOD, ["0700", layout.etc_dir]))
        if probe["version"] != self.package.version:
            tarball = posixpath.join(layout.install_dir,
                                     f".incoming-{self.package.version}.tar.gz")
            self.shell.put_file(target.host, self.package.tarball, tarball, 0o600,
                                self.command_timeout)
            self._run(target, RemoteCommand(Executable.PYTHON3, [
                "-c", INSTALL_RELEASE, layout.install_dir, self.package.version, tarball]))
            actions.append(f"installed {self.package.version}")
        written = set()
        for content, path, mode in files:
            if probe["sha256"].get(path) != hashlib.sha256(content).hexdigest():
                self.shell.put_file(target.host, content, path, mode, self.command_timeout)
                written.add(path)
                actions.append(f"wrote {posixpath.basename(path)}")
        shown = self._show(target, "ActiveState", "NeedDaemonReload", "UnitFileState")
        if shown.get("NeedDaemonReload") == "yes" or layout.unit_path in written:
            self._systemctl(target, "daemon-reload")
        if shown.get("UnitFileState") != "enabled":
            self._systemctl(target, "enable", layout.unit_name)
            actions.append("enabled")
        if actions or shown.get("ActiveState") != "active":
            self._systemctl(target, "restart", layout.unit_name)
            actions.append("restarted" if shown.get("ActiveState") == "active" else "started")
        role = self._wait_ready(target)
        return CoordinatorResult(name, ok=True, url=target.url, actions=tuple(actions),
                                 version=self.package.version, role=role)

    def _uninstall_one(self, target: CoordinatorTarget) -> CoordinatorResult:
        layout = target.layout
        probe = self._probe(target, [layout.unit_path])
        actions: list[str] = []
        if probe["systemd"] and probe["sha256"].get(layout.unit_path) is not None:
            self._systemctl(target, "disable", "--now", layout.unit_name)
            actions.append("stopped")
        self._run(target, RemoteCommand(Executable.PYTHON3, [
            "-c", _REMOVE, layout.etc_dir, layout.unit_path]))
        if probe["systemd"]:
            self._systemctl(target, "daemon-reload")
        return CoordinatorResult(target.host.name, ok=True, url=target.url,
                                 actions=(*actions, "removed"))

    def _check_host(self, name: str, probe: Mapping[str, Any]) -> None:
        """Refuse a host the service cannot run on, saying what it lacks."""
        if not probe["systemd"]:
            raise RemoteCommandFailed(name, "systemd is not running there: the coordinator "
                                      "service needs it (without systemd, run `rbdfleet "
                                      "coordinator run` under a supervisor of your own)", rc=-1)
        if probe["missing"]:
            raise RemoteCommandFailed(name, f"python3 lacks {', '.join(probe['missing'])}: "
                                      f"apt-get install {DEBIAN_BINDINGS}", rc=-1)
        if (probe["python"], probe["machine"]) != (self.local_python, self.local_machine):
            raise RemoteCommandFailed(
                name, f"python3 there is {probe['python']} on {probe['machine']}, the package "
                f"was built for {self.local_python} on {self.local_machine} (its compiled "
                "libraries): install from a machine that matches the hosts", rc=-1)

    def _wait_ready(self, target: CoordinatorTarget) -> str:
        """The role the coordinator answers once it serves and the fleet has an active
        coordinator (it, or one of ``fleet_urls``: a coordinator serves as a standby until it
        takes the lease); RemoteCommandFailed with its journal's tail if not within
        ``ready_timeout``."""
        deadline = self.clock() + self.ready_timeout
        while True:
            try:
                role = self.health(target.url)
                if role == "active" or self._active_elsewhere(target.url):
                    return role
                raise CoordinationError("no coordinator of the fleet is active yet")
            except RbdfleetError as exc:
                if self.clock() >= deadline:
                    tail = self._run(target, RemoteCommand(Executable.SH, [
                        "-c", f"journalctl -u {target.layout.unit_name} -n 15 --no-pager -o cat"
                    ]), check=False)
                    raise RemoteCommandFailed(
                        target.host.name, f"the coordinator was not ready at {target.url} "
                        f"within {self.ready_timeout:g} s ({exc}); its journal: "
                        f"{tail.strip()[-800:]}", rc=-1) from exc
            self.sleep(1.0)

    def _active_elsewhere(self, url: str) -> bool:
        for other in self.fleet_urls:
            if other != url:
                with contextlib.suppress(RbdfleetError):
                    if self.health(other) == "active":
                        return True
        return False

    def _probe(self, target: CoordinatorTarget, paths: Sequence[str]) -> dict[str, Any]:
        out = self._run(target, RemoteCommand(Executable.PYTHON3, [
            "-c", _PROBE, target.layout.install_dir, "\n".join(paths),
            ",".join(HOST_BINDINGS)]))
        probe: dict[str, Any] = json.loads(out)
        return probe

    def _show(self, target: CoordinatorTarget, *properties: str) -> dict[str, str]:
        out = self._systemctl(target, "show", *(f"--property={p}" for p in properties),
                              target.layout.unit_name)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def _systemctl(self, target: CoordinatorTarget, *args: str) -> str:
        return self._run(target, RemoteCommand(Executable.SYSTEMCTL, list(args)))

    def _run(self, target: CoordinatorTarget, cmd: RemoteCommand, check: bool = True) -> str:
        return self.shell.run(target.host, cmd, self.command_timeout, check=check).stdout


def coordinator_targets(cfg: fleet_config.FleetConfig, ccfg: CoordinatorConfig,
                        hosts: Sequence[CoordinatorHost], port: int,
                        libvirt_uri: str | None = None) -> list[CoordinatorTarget]:
    """What goes on each of ``hosts`` for the fleet of ``cfg`` (read from this machine's
    files). ConfigError when a host's URL (``https://ADDRESS:PORT``) is not one of
    ``[coordinator] urls``: agents and clients would never look for it there, and the
    coordinators' certificate would not name it."""
    if cfg.source is None:
        raise ConfigError("config", "the installer needs the config file it was loaded from")
    layout = CoordinatorLayout(cfg.fleet.name)
    plaintext = ccfg.insecure_plaintext or cfg.tls.insecure_plaintext
    scheme = "http" if plaintext else "https"
    urls = [f"{scheme}://{_url_host(host.address)}:{port}" for host in hosts]
    for host, url in zip(hosts, urls, strict=True):
        if url not in ccfg.urls:
            raise ConfigError("coordinator.urls", f"{url} (host {host.name}) is not listed "
                              f"({', '.join(ccfg.urls)}): add it, then `rbdfleet provision` "
                              "to reissue the coordinators' certificate, and deploy the agents")
    shared = _shared_files(cfg, ccfg, layout, plaintext)
    data = tomllib.loads(cfg.source.read_text())
    targets = []
    for host, url in zip(hosts, urls, strict=True):
        text = fleet_config.render(host_config(data, layout, f"{host.address}:{port}",
                                               libvirt_uri))
        fleet_config.from_mapping(tomllib.loads(text), env={})  # refused here, not there
        targets.append(CoordinatorTarget(host, url, layout, (
            (text.encode(), layout.config_path, 0o600), *shared)))
    return targets


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _shared_files(cfg: fleet_config.FleetConfig, ccfg: CoordinatorConfig,
                  layout: CoordinatorLayout, plaintext: bool) -> list[tuple[bytes, str, int]]:
    """Every host's files but its config: Ceph's, the master key, known_hosts, TLS."""
    ceph_conf = (f"[global]\nmon_host = {_mon_host(cfg)}\n"
                 f"keyring = {layout.at('ceph.keyring')}\n")
    files = [(ceph_conf.encode(), layout.at("ceph.conf"), 0o644),
             (cfg.ceph.keyring.read_bytes(), layout.at("ceph.keyring"), 0o600),
             (cfg.fleet.secret_file.read_bytes(), layout.at("fleet.secret"), 0o600)]
    if cfg.ssh.known_hosts is not None:
        files.append((cfg.ssh.known_hosts.read_bytes(), layout.at("known_hosts"), 0o644))
    if plaintext:
        return files
    pki = FleetPki(cfg.pki_dir, cfg.fleet.name)
    cert, key = ((Path(ccfg.tls_cert), Path(ccfg.tls_key)) if ccfg.tls_cert and ccfg.tls_key
                 else pki.identity(COORDINATOR))
    tls = layout.tls_dir
    return [*files,
            (pki.ca_file.read_bytes(), posixpath.join(tls, "ca.pem"), 0o644),
            (pki.crl_file.read_bytes(), posixpath.join(tls, "crl.pem"), 0o644),
            (cert.read_bytes(), posixpath.join(tls, f"{COORDINATOR}.pem"), 0o644),
            (key.read_bytes(), posixpath.join(tls, f"{COORDINATOR}.key"), 0o600)]


def _mon_host(cfg: fleet_config.FleetConfig) -> str:
    """The monitors as this machine's librados finds them: the ``[global] mon_host`` of the
    config's ceph.conf (with its v2/v1 address vectors), else the config's ``mon_host``."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(cfg.ceph.conf.read_text())
    for key in ("mon_host", "mon host"):
        if parser.has_option("global", key):
            return parser.get("global", key)
    if cfg.ceph.mon_host:
        return cfg.ceph.mon_host
    raise ConfigError("ceph.conf", f"{cfg.ceph.conf} has no [global] mon_host, and the config "
                      "sets no ceph.mon_host")


def role_variables(target: CoordinatorTarget, package: CoordinatorPackage, tarball: Path,
                   directory: Path, python_version: str) -> dict[str, Any]:
    """The Ansible role ``rbdfleet_coordinator``'s variables for ``target``: its files staged
    under ``directory/<host>/`` on this machine (0600 in 0700 directories: the role copies
    them, those without a group or other bit as secrets, ``no_log``, and only where the host
    holds other bytes than their recorded ``sha256``)."""
    staged = directory / target.host.name
    staged.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged.chmod(0o700)
    files = []
    for content, dest, mode in target.files:
        local = staged / posixpath.relpath(dest, target.layout.etc_dir).replace("/", "_")
        local.touch(mode=0o600)
        local.chmod(0o600)
        local.write_bytes(content)
        files.append({"src": str(local), "dest": dest, "mode": f"{mode:04o}",
                      "sha256": hashlib.sha256(content).hexdigest(),
                      "secret": not mode & 0o044})
    return {"rbdfleet_coordinator_fleet": target.layout.fleet,
            "rbdfleet_coordinator_version": package.version,
            "rbdfleet_coordinator_package": str(tarball),
            "rbdfleet_coordinator_url": target.url,
            "rbdfleet_coordinator_python_version": python_version,
            "rbdfleet_coordinator_files": files}
