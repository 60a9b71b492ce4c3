"""``AnsibleRunner``: deploy agents with the playbooks in ``ansible/``, run as a program.

Ansible is never imported (an optional extra, not a library dependency): ``ansible-playbook``
from the project's venv (the ``ansible`` extra) runs as a subprocess with
``ANSIBLE_CONFIG=ansible/ansible.cfg``. Each run gets its own work directory holding the
inventory (:class:`Inventory`, as JSON, which Ansible's YAML inventory plugin reads; ``rbdfleet
inventory`` prints the same groups), the extra vars (a 0600 file, never argv: they name the
secret files, never their content), the agents tarball, the SSH control sockets and Ansible's
local temp files.

Connections use ``ansible_connection=ssh`` (the paramiko plugin is deprecated in 2.19) with
the pinned ``known_hosts`` and ``StrictHostKeyChecking=yes``: an unknown or changed host key
fails that host. The same target guard as the SSH adapter is applied to every address first.

Results come from the ``PLAY RECAP`` (one line per host) and the ``fatal: [host]`` lines:
a host's error is its last failure not followed by ``...ignoring`` (a failure that a
``rescue`` handled comes before the one that stopped the host), and only a host the recap
counts as failed or unreachable has one. Any failed or unreachable host raises
:class:`~orchestrator.errors.DeployError` with every host's recap; what Ansible does not
tell (e.g. a host missing from the recap because the play never reached it) is reported as
a failure of that host, never silently dropped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.errors import BindingUnavailable
from orchestrator.adapters.ssh import require_local_target
from orchestrator.config import FleetConfig
from orchestrator.errors import ConfigError, DeployError
from orchestrator.packaging import DEFAULT_LAUNCH, AgentPackage, CoordinatorPackage

__all__ = ["ANSIBLE_DIR", "COORDINATORS", "AnsibleRunner", "CoordinatorInventoryHost", "Inventory",
           "InventoryHost", "PlayRecap", "PlaybookRun", "TlsFiles", "ssh_vars", "write_package"]

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"

_RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+"
    r"rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)")
_FATAL = re.compile(r"^fatal: \[(?P<host>[^\]\s]+)[^\]]*\]: (?P<kind>FAILED|UNREACHABLE)! => "
                    r"(?P<body>.*)$")


@dataclass(frozen=True)
class InventoryHost:
    """One agent host: address, install prefix and the agent's config (its ``role`` key says
    writer, reader or spare: a spare's agent waits for the disk the coordinator attaches)."""

    name: str
    address: str
    prefix: str = "/"
    config: Mapping[str, Any] = field(default_factory=dict)
    spare: bool = False

    @property
    def group(self) -> str:
        """The inventory group that orders its start (readers before the writer)."""
        if self.spare:
            return "rbdfleet_spares"
        return "rbdfleet_writer" if self.config.get("role") == "writer" else "rbdfleet_readers"

    def hostvars(self) -> dict[str, Any]:
        """What the role reads from the inventory for this host."""
        return {"ansible_host": self.address, "ansible_port": 22,
                "rbdfleet_agent_prefix": self.prefix, "rbdfleet_agent_config": dict(self.config)}

    @staticmethod
    def from_fleet(config: FleetConfig,
                   agent_config: Callable[[str], Mapping[str, Any]]) -> list[InventoryHost]:
        """The fleet's VMs (prefix ``/``) and sandbox hosts (prefix = their root)."""
        vms = [InventoryHost(vm.name, vm.address, "/", agent_config(vm.name))
               for vm in config.vms]
        hosts = [InventoryHost(h.name, h.address, str(h.root), agent_config(h.name))
                 for h in config.hosts]
        return vms + hosts


GROUPS = ("rbdfleet_writer", "rbdfleet_readers", "rbdfleet_spares")
COORDINATORS = "rbdfleet_coordinators"  # what ansible/deploy-coordinators.yml plays on


@dataclass(frozen=True)
class CoordinatorInventoryHost:
    """One coordinator host: its address and the role ``rbdfleet_coordinator``'s variables
    (a VM of the fleet may be one too: its variables are merged with its agent's)."""

    name: str
    address: str
    variables: Mapping[str, Any]

    def hostvars(self) -> dict[str, Any]:
        return {"ansible_host": self.address, "ansible_port": 22, **self.variables}


def ssh_vars(user: str, ssh_key: Path, known_hosts: Path) -> dict[str, Any]:
    """Connection variables: OpenSSH with the fleet's key and pinned host keys only."""
    common_args = shlex.join(["-o", f"UserKnownHostsFile={known_hosts}",
                              "-o", "StrictHostKeyChecking=yes",
                              "-o", "GlobalKnownHostsFile=/dev/null"])
    return {
        "ansible_user": user,
        "ansible_connection": "ssh",
        "ansible_ssh_private_key_file": str(ssh_key),
        "ansible_ssh_common_args": common_args,
        "ansible_python_interpreter": "/usr/bin/python3",
    }


@dataclass(frozen=True)
class Inventory:
    """Agent hosts in the groups ``deploy-agents.yml`` plays on, with shared variables.

    ``agents`` holds ``rbdfleet_writer``, ``rbdfleet_readers`` and ``rbdfleet_spares`` (started
    with the readers; a spare's agent waits for its disk).
    """

    hosts: Sequence[InventoryHost]
    variables: Mapping[str, Any] = field(default_factory=dict)
    coordinators: Sequence[CoordinatorInventoryHost] = ()  # group rbdfleet_coordinators

    def _members(self, group: str) -> list[InventoryHost]:
        return [h for h in self.hosts if h.group == group]

    def _hostvars(self) -> dict[str, dict[str, Any]]:
        """Every host's own variables, an agent's and a coordinator's merged."""
        found: dict[str, dict[str, Any]] = {}
        hosts: list[InventoryHost | CoordinatorInventoryHost] = [*self.hosts, *self.coordinators]
        for host in hosts:
            found[host.name] = {**found.get(host.name, {}), **host.hostvars()}
        return found

    def to_script(self) -> dict[str, Any]:
        """The ``--list`` answer of a dynamic inventory script (hostvars under ``_meta``)."""
        children = ["agents", COORDINATORS] if self.coordinators else ["agents"]
        listing: dict[str, Any] = {
            "_meta": {"hostvars": self._hostvars()},
            "all": {"children": children, "vars": dict(self.variables)},
            "agents": {"children": list(GROUPS)},
        }
        for group in GROUPS:
            listing[group] = {"hosts": [h.name for h in self._members(group)]}
        if self.coordinators:
            listing[COORDINATORS] = {"hosts": [h.name for h in self.coordinators]}
        return listing

    def hostvars(self, name: str) -> dict[str, Any]:
        """The ``--host NAME`` answer: shared variables, then the host's own."""
        own = self._hostvars()
        if name not in own:
            raise ConfigError("inventory", f"no host named {name!r} in the inventory")
        return {**self.variables, **own[name]}

    def to_static(self) -> dict[str, Any]:
        """The same inventory as one YAML/JSON document (Ansible's yaml inventory plugin)."""
        own = self._hostvars()

        def members(group: str) -> dict[str, Any]:
            return {"hosts": {h.name: own[h.name] for h in self._members(group)}}

        children: dict[str, Any] = {"agents": {"children": {g: members(g) for g in GROUPS}}}
        if self.coordinators:
            children[COORDINATORS] = {"hosts": {h.name: own[h.name] for h in self.coordinators}}
        return {"all": {"vars": dict(self.variables), "children": children}}


@dataclass(frozen=True)
class PlayRecap:
    """One host's line of the play recap, plus its first failure message."""

    host: str
    ok: int = 0
    changed: int = 0
    unreachable: int = 0
    failed: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None and self.failed == 0 and self.unreachable == 0


@dataclass(frozen=True)
class PlaybookRun:
    """A finished ``ansible-playbook`` run."""

    playbook: str
    rc: int
    recap: dict[str, PlayRecap]
    output: str
    seconds: float


def parse_output(output: str, hosts: Sequence[str]) -> dict[str, PlayRecap]:
    """Recap per host from ``ansible-playbook`` output (default callback, no colour)."""
    errors: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    last: str | None = None  # host of the previous line's failure
    for line in output.splitlines():
        if last is not None and line.strip() == "...ignoring":
            errors.pop(last, None)
        last = None
        fatal = _FATAL.match(line)
        if fatal:
            last = fatal["host"]
            errors[last] = _failure_message(fatal["kind"], fatal["body"])
        recap = _RECAP.match(line)
        if recap:
            counts[recap["host"]] = {k: int(v) for k, v in recap.groupdict().items()
                                     if k != "host"}
    result = {}
    for host in hosts:
        if host in counts:
            failed = counts[host]["failed"] or counts[host]["unreachable"]
            result[host] = PlayRecap(host, **counts[host],
                                     error=errors.get(host, "failed, no message")
                                     if failed else None)
        else:
            result[host] = PlayRecap(host, error=errors.get(host, "not in the play recap"))
    return result


def _failure_message(kind: str, body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return f"{kind}: {body[:300]}"
    if not isinstance(data, dict):
        return f"{kind}: {body[:300]}"
    detail = data.get("msg") or data.get("stderr") or data.get("stdout")
    if not detail and "rc" in data:  # a command that failed silently: say which and how
        cmd = data.get("cmd")
        detail = f"{shlex.join(cmd) if isinstance(cmd, list) else cmd} exited {data['rc']}"
    return f"{kind}: {str(detail or body).strip()[:300]}"


@dataclass(frozen=True)
class TlsFiles:
    """The agents' TLS material on this machine (PEM files); the role copies it to each host."""

    cert: Path
    key: Path
    ca: Path | None = None

    def role_vars(self) -> dict[str, str]:
        return {"rbdfleet_agent_tls_cert_src": str(self.cert),
                "rbdfleet_agent_tls_key_src": str(self.key),
                "rbdfleet_agent_tls_ca_src": str(self.ca or "")}


def write_package(package: AgentPackage | CoordinatorPackage, directory: Path) -> Path:
    """``directory/agents-VERSION.tar.gz`` or ``coordinator-VERSION.tar.gz`` (written once:
    the version is its content hash)."""
    kind = "agents" if isinstance(package, AgentPackage) else "coordinator"
    tarball = directory / f"{kind}-{package.version}.tar.gz"
    if not tarball.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_name(f".{tarball.name}.{os.getpid()}")
        partial.write_bytes(package.tarball)
        partial.replace(tarball)
    return tarball


class AnsibleRunner:
    """Runs ``ansible/*.yml`` against hosts with pinned SSH keys."""

    def __init__(self, workdir: Path, *, ssh_key: Path, known_hosts: Path, user: str = "root",
                 ansible_dir: Path = ANSIBLE_DIR, timeout: float = 900.0,
                 target_guard: Callable[[str], None] = require_local_target) -> None:
        self.workdir = workdir
        self.ssh_key = ssh_key
        self.known_hosts = known_hosts
        self.user = user
        self.ansible_dir = ansible_dir
        self.timeout = timeout
        self.target_guard = target_guard
        self.playbook_bin = Path(sys.executable).parent / "ansible-playbook"
        if not self.playbook_bin.exists():
            raise BindingUnavailable("ansible-playbook", "ansible-core")

    def deploy_agents(self, hosts: Sequence[InventoryHost], package: AgentPackage, *,
                      secret: Path, tls: TlsFiles | None = None,
                      launch: Sequence[str] = DEFAULT_LAUNCH, check: bool = False) -> PlaybookRun:
        """Run ``deploy-agents.yml``: install everywhere, format a blank image on the writer,
        start the readers, then the writer. ``secret``/``tls``: files on this machine, copied
        0600; ``check``: ``--check`` (report, change nothing)."""
        return self.run("deploy-agents.yml", hosts,
                        self._package_vars(package, launch, secret, tls), check=check)

    def validate(self, hosts: Sequence[InventoryHost], package: AgentPackage, *,
                 secret: Path) -> PlaybookRun:
        """Run ``validate.yml``: facts, variables and python3 checks; changes nothing."""
        return self.run("validate.yml", hosts,
                        self._package_vars(package, DEFAULT_LAUNCH, secret, None))

    def run(self, playbook: str, hosts: Sequence[InventoryHost],
            extra_vars: Mapping[str, Any] | None = None, *, check: bool = False) -> PlaybookRun:
        """Run ``ansible/PLAYBOOK``; DeployError(recaps) if any host failed."""
        for host in hosts:
            self.target_guard(host.address)
        self.workdir.mkdir(parents=True, exist_ok=True)
        inventory = self.write_inventory(hosts)
        vars_file = self.workdir / "extra-vars.json"
        fd = os.open(vars_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(dict(extra_vars or {}), out)
        argv = [str(self.playbook_bin), "-i", str(inventory), "-e", f"@{vars_file}",
                *(["--check"] if check else []), str(self.ansible_dir / playbook)]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=self.ansible_dir, env=self._env(),
                                  capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"{playbook} did not finish in {self.timeout} s", {}) from exc
        output = proc.stdout + proc.stderr
        run = PlaybookRun(playbook, proc.returncode,
                          parse_output(proc.stdout, [h.name for h in hosts]), output,
                          round(time.monotonic() - started, 2))
        failed = sorted(name for name, recap in run.recap.items() if not recap.succeeded)
        if failed or proc.returncode != 0:
            detail = "; ".join(f"{n}: {run.recap[n].error}" for n in failed) or \
                output.strip()[-500:]
            raise DeployError(f"{playbook} failed (rc {proc.returncode}): {detail}",
                              dict(run.recap))
        return run

    def write_inventory(self, hosts: Sequence[InventoryHost]) -> Path:
        """The hosts as a JSON inventory (:meth:`Inventory.to_static`) in the work directory."""
        variables = ssh_vars(self.user, self.ssh_key, self.known_hosts)
        path = self.workdir / "inventory.json"
        path.write_text(json.dumps(Inventory(hosts, variables).to_static(), indent=2,
                                   sort_keys=True))
        return path

    def _package_vars(self, package: AgentPackage, launch: Sequence[str], secret: Path,
                      tls: TlsFiles | None) -> dict[str, Any]:
        tarball = write_package(package, self.workdir)
        return {"rbdfleet_agent_package": str(tarball),
                "rbdfleet_agent_version": package.version,
                "rbdfleet_agent_launch": list(launch),
                "rbdfleet_agent_secret_src": str(secret),
                **(tls.role_vars() if tls else {})}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        (self.workdir / "cp").mkdir(exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        env.update({
            "ANSIBLE_CONFIG": str(self.ansible_dir / "ansible.cfg"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.workdir / "cp"),
            "ANSIBLE_LOCAL_TEMP": str(self.workdir / "tmp"),
            "ANSIBLE_HOME": str(self.workdir / "home"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "PATH": f"{self.playbook_bin.parent}:{env.get('PATH', '/usr/bin:/bin')}",
        })
        return env
