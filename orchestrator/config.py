"""The fleet config (``rbdfleet.toml``, schema in docs/config.md) as frozen dataclasses.

:func:`load` reads the file, applies ``RBDFLEET_<SECTION>_<KEY>`` overrides from the given
environment and calls :func:`validate`; :func:`from_mapping` does the same from an already
parsed mapping. Both are pure apart from reading the one file. Every problem is a
:class:`~orchestrator.errors.ConfigError` naming the key (``fleet.writer``, ``vm[2].name``...).

Invariants of a validated :class:`FleetConfig`:

* exactly one writer, naming a non-spare VM of the fleet (none only when there is no VM:
  a Ceph-only config, as ``sandbox up`` writes without VMs);
* VM names and (uri, domain) pairs are unique, and so are VM addresses;
* the image size is a positive multiple of 4 KiB (the agents' O_DIRECT alignment);
* every path is absolute;
* every libvirt URI is ``driver[+transport]://...`` with a transport libvirt knows; an SSH
  one (``+ssh``, ``+libssh``, ``+libssh2``) names its host, verifies the host key (no
  ``no_verify``, no ``known_hosts_verify=auto|ignore``), has absolute ``keyfile`` and
  ``known_hosts`` paths, carries no password, and a ``+ssh`` one carries none of the
  libssh-only parameters OpenSSH would silently ignore (``known_hosts`` ...);
* no key, table or ``RBDFLEET_*`` environment variable is unknown: a typo is refused with a
  suggestion (``config ceph.create_pol: unknown key (did you mean ceph.create_pool?)``), never
  silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.core.sizes import parse_size
from orchestrator.errors import ConfigError

__all__ = [
    "ENV_VARS",
    "TABLES",
    "AgentTimings",
    "CephConfig",
    "FleetConfig",
    "FleetSettings",
    "HostConfig",
    "LibvirtConfig",
    "SandboxConfig",
    "SshConfig",
    "TlsConfig",
    "VmConfig",
    "check_uri",
    "display_uri",
    "from_mapping",
    "load",
    "render",
    "validate",
]

_ALIGN = 4096
# Names end up in cephx ids, libvirt secret usages, RBD image names and disk serials.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
ENV_PREFIX = "RBDFLEET_"
# libvirt's remote transports (``driver+transport://``; none: local, or tls with a host)
_TRANSPORTS = frozenset({"", "unix", "ssh", "libssh", "libssh2", "tls", "tcp", "ext"})
_SSH_TRANSPORTS = frozenset({"ssh", "libssh", "libssh2"})
# read by the libssh transports only: on a +ssh URI libvirt drops them without a word
_LIBSSH_ONLY = ("known_hosts", "known_hosts_verify", "sshauth")
# The keys of the [coordinator] table, which orchestrator/coordinator/config.py reads (a unit test
# keeps this equal to its CoordinatorConfig's fields).
COORDINATOR_KEYS = frozenset({
    "urls", "listen", "lease_seconds", "probe_interval", "probe_timeout", "suspect_after",
    "dead_after", "confirm_failures", "retry_delay", "grant_ttl", "tls_cert", "tls_key",
    "insecure_plaintext",
})
# Tables overridable by RBDFLEET_<TABLE>_<KEY>. Not [sandbox]: RBDFLEET_SANDBOX_DIR is the
# `rbdfleet sandbox` commands' directory, and a [sandbox] table must not appear from the
# environment (it narrows where SSH may connect).
_ENV_TABLES = ("ceph", "libvirt", "ssh", "fleet", "tls", "coordinator", "agents")
# RBDFLEET_* variables that are not key overrides: what each is for.
OTHER_ENV_VARS: dict[str, str] = {
    "RBDFLEET_CONFIG": "the config file (--config)",
    "RBDFLEET_SANDBOX_DIR": "the sandbox directory (rbdfleet sandbox --dir)",
    "RBDFLEET_TEST_CEPH_CONF": "tests: an existing cluster's ceph.conf",
    "RBDFLEET_TEST_SEED": "tests: the seed of the randomized tests",
}


@dataclass(frozen=True)
class CephConfig:
    """How the orchestrator reaches the cluster, and the fleet's pool."""

    conf: Path
    keyring: Path
    user: str = "admin"
    pool: str = "rbd"
    create_pool: bool = False
    mon_host: str | None = None


@dataclass(frozen=True)
class LibvirtConfig:
    """Default hypervisor connection for VMs that do not name their own."""

    uri: str = "qemu:///system"


@dataclass(frozen=True)
class SshConfig:
    """SSH identity and pinned host keys used to reach the VMs."""

    key: Path | None = None  # required when the config has VMs or hosts
    known_hosts: Path | None = None
    user: str = "root"


@dataclass(frozen=True)
class FleetSettings:
    """The ``[fleet]`` table: the shared image and who starts as writer."""

    name: str
    image: str
    size: int
    writer: str
    secret_file: Path  # the master key: the coordinator's and the deployer's, never a VM's
    agent_port: int = 7480
    client: str = "admin"  # this CLI's client credential (rbdfleet client add)
    client_secret_file: Path | None = None


@dataclass(frozen=True)
class TlsConfig:
    """The ``[tls]`` table: where the fleet's certificates are, or that there are none."""

    dir: Path | None = None  # the PKI directory (orchestrator/pki.py); None: next to secret_file
    insecure_plaintext: bool = False  # no TLS anywhere: refused unless said so


@dataclass(frozen=True)
class AgentTimings:
    """The ``[agents]`` table: timings (seconds) that every agent of the fleet is deployed
    with, the agent's ``[timing]`` keys (docs/agent.md); None leaves the agent's default."""

    ack_timeout: float | None = None
    retry_interval: float | None = None
    tail_interval: float | None = None
    heartbeat_interval: float | None = None
    selftest_interval: float | None = None
    idle_checkpoint: float | None = None

    def settings(self) -> dict[str, float]:
        """The timings that are set, as agent config keys."""
        return {f.name: value for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class VmConfig:
    """One ``[[vm]]`` table; ``uri`` is already resolved to the default when omitted."""

    name: str
    domain: str
    uri: str
    address: str
    spare: bool = False


@dataclass(frozen=True)
class HostConfig:
    """A sandbox network-namespace host (tests, Ansible)."""

    name: str
    address: str
    root: Path


@dataclass(frozen=True)
class SandboxConfig:
    """Present only in sandbox-written configs."""

    dir: Path


@dataclass(frozen=True)
class FleetConfig:
    """The whole ``rbdfleet.toml``."""

    ceph: CephConfig
    libvirt: LibvirtConfig
    ssh: SshConfig
    fleet: FleetSettings
    vms: tuple[VmConfig, ...]
    hosts: tuple[HostConfig, ...] = ()
    sandbox: SandboxConfig | None = None
    tls: TlsConfig = TlsConfig()
    agents: AgentTimings = AgentTimings()
    source: Path | None = field(default=None, compare=False)

    @property
    def pki_dir(self) -> Path:
        """The fleet's PKI directory: ``[tls] dir``, else ``tls/`` beside the master key."""
        return self.tls.dir or self.fleet.secret_file.parent / "tls"

    def vm(self, name: str) -> VmConfig:
        """The VM called ``name``; ConfigError when the fleet has none."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise ConfigError("vm", f"fleet {self.fleet.name!r} has no VM named {name!r}")

    @property
    def active_vms(self) -> tuple[VmConfig, ...]:
        """The VMs attached at provisioning time (spares are attached only on demand)."""
        return tuple(vm for vm in self.vms if not vm.spare)


def _keys(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


# Every table of rbdfleet.toml and its keys; "vm" and "host" are arrays of tables.
TABLES: dict[str, frozenset[str]] = {
    "ceph": _keys(CephConfig),
    "libvirt": _keys(LibvirtConfig),
    "ssh": _keys(SshConfig),
    "fleet": _keys(FleetSettings),
    "vm": _keys(VmConfig),
    "host": _keys(HostConfig),
    "sandbox": _keys(SandboxConfig),
    "tls": _keys(TlsConfig),
    "coordinator": COORDINATOR_KEYS,
    "agents": _keys(AgentTimings),
}
# Every RBDFLEET_* variable rbdfleet reads.
ENV_VARS: frozenset[str] = frozenset(OTHER_ENV_VARS) | {
    f"{ENV_PREFIX}{table}_{key}".upper() for table in _ENV_TABLES for key in TABLES[table]
}


def unknown(
    where: str, name: str, known: frozenset[str], what: str = "key", shown: str = "{}"
) -> ConfigError:
    """The error for an unknown ``name`` at ``where``: the closest known name, formatted with
    ``shown``, as a suggestion (else the list of known names)."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
        hint = f"did you mean {shown.format(close[0])}?"
    else:
        hint = "known: " + ", ".join(shown.format(k) for k in sorted(known))
    return ConfigError(where, f"unknown {what} ({hint})")


def check_names(data: Mapping[str, Any], env: Mapping[str, str]) -> None:
    """Refuse any table, key or ``RBDFLEET_*`` variable rbdfleet does not know."""
    for name, value in data.items():
        if name not in TABLES:
            what = "table" if isinstance(value, Mapping | list) else "top-level key"
            raise unknown(name, name, frozenset(TABLES), what, "[{}]")
        tables = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, table in tables:
            if not isinstance(table, Mapping):
                continue  # the table's own check says what it must be
            where = name if i is None else f"{name}[{i}]"
            for key in table:
                if key not in TABLES[name]:
                    raise unknown(f"{where}.{key}", key, TABLES[name], shown=f"{where}.{{}}")
    for var in env:
        if var.startswith(ENV_PREFIX) and var not in ENV_VARS:
            suffixes = frozenset(v.removeprefix(ENV_PREFIX) for v in ENV_VARS)
            raise unknown(var, var.removeprefix(ENV_PREFIX), suffixes, "environment variable",
                          ENV_PREFIX + "{}")


def load(path: Path | str, env: Mapping[str, str] = os.environ) -> FleetConfig:
    """Read and validate ``path``, with ``RBDFLEET_<SECTION>_<KEY>`` overrides from ``env``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("path", f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError("path", f"{path} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("path", f"{path} is not valid TOML: {exc}") from exc
    return dataclasses.replace(from_mapping(data, env), source=path)


def from_mapping(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> FleetConfig:
    """Build and validate a FleetConfig from parsed TOML plus optional env overrides."""
    check_names(data, env or {})
    merged = _apply_env({k: v for k, v in data.items()}, env or {})
    config = _build(merged)
    validate(config)
    return config


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``RBDFLEET_<SECTION>_<KEY>`` values (strings; typed later) on the tables.

    ``[coordinator]`` overrides are applied where that table is read (cli/coordinator.py).
    """
    for var, value in env.items():
        if var not in ENV_VARS or var in OTHER_ENV_VARS:
            continue
        section, _, key = var[len(ENV_PREFIX):].lower().partition("_")
        if section == "coordinator":
            continue
        table = dict(data.get(section) or {})
        table[key] = value
        data[section] = table
    return data


def _table(data: Mapping[str, Any], name: str, required: bool = True) -> Mapping[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(name, "section missing")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, "must be a table")
    return value


def _table_array(data: Mapping[str, Any], key: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The tables of ``[[key]]`` (none when absent), each with its place (``key[i]``)."""
    items = data.get(key, [])
    if not isinstance(items, list):
        raise ConfigError(key, f"must be an array of tables ([[{key}]])")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{key}[{i}]", "must be a table")
    return [(f"{key}[{i}]", item) for i, item in enumerate(items)]


def _str(table: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"{where}.{key}", "missing")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}", f"expected a non-empty string, got {value!r}")
    return value


def _path(table: Mapping[str, Any], key: str, where: str) -> Path:
    path = Path(_str(table, key, where))
    if not path.is_absolute():
        raise ConfigError(f"{where}.{key}", f"path must be absolute, got {str(path)!r}")
    return path


def _bool(table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{where}.{key}", f"expected true or false, got {value!r}")


def _int(table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool):
        raise ConfigError(f"{where}.{key}", f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"{where}.{key}", f"expected an integer, got {value!r}")


def _seconds(table: Mapping[str, Any], key: str, where: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
        raise ConfigError(f"{where}.{key}", f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _writer(table: Mapping[str, Any]) -> str:
    value = table.get("writer", "")
    if isinstance(value, list):
        if len(value) > 1:
            raise ConfigError("fleet.writer", f"two writers {value!r}: a fleet has exactly one")
        if not value:
            raise ConfigError("fleet.writer", "no writer: a fleet has exactly one")
        value = value[0]
    if not isinstance(value, str):
        raise ConfigError("fleet.writer", f"expected a VM name, got {value!r}")
    return value


def _build(data: Mapping[str, Any]) -> FleetConfig:
    ceph_t = _table(data, "ceph")
    mon_host = ceph_t.get("mon_host")
    ceph = CephConfig(
        conf=_path(ceph_t, "conf", "ceph"),
        keyring=_path(ceph_t, "keyring", "ceph"),
        user=_str(ceph_t, "user", "ceph", "admin"),
        pool=_str(ceph_t, "pool", "ceph", "rbd"),
        create_pool=_bool(ceph_t, "create_pool", "ceph", False),
        mon_host=None if mon_host in (None, "") else _str(ceph_t, "mon_host", "ceph"),
    )
    libvirt_t = _table(data, "libvirt", required=False)
    libvirt = LibvirtConfig(uri=_str(libvirt_t, "uri", "libvirt", "qemu:///system"))
    ssh_t = _table(data, "ssh", required=False)
    ssh = SshConfig(
        key=_path(ssh_t, "key", "ssh") if "key" in ssh_t else None,
        known_hosts=_path(ssh_t, "known_hosts", "ssh") if "known_hosts" in ssh_t else None,
        user=_str(ssh_t, "user", "ssh", "root"),
    )
    fleet_t = _table(data, "fleet")
    if "size" not in fleet_t:
        raise ConfigError("fleet.size", "missing")
    fleet = FleetSettings(
        name=_str(fleet_t, "name", "fleet"),
        image=_str(fleet_t, "image", "fleet"),
        size=parse_size(fleet_t["size"], "fleet.size"),
        writer=_writer(fleet_t),
        secret_file=_path(fleet_t, "secret_file", "fleet"),
        agent_port=_int(fleet_t, "agent_port", "fleet", 7480),
        client=_str(fleet_t, "client", "fleet", "admin"),
        client_secret_file=(_path(fleet_t, "client_secret_file", "fleet")
                            if "client_secret_file" in fleet_t else None),
    )
    vms = [
        VmConfig(
            name=_str(vm_t, "name", where),
            domain=_str(vm_t, "domain", where),
            uri=_str(vm_t, "uri", where, libvirt.uri),
            address=_str(vm_t, "address", where),
            spare=_bool(vm_t, "spare", where, False),
        )
        for where, vm_t in _table_array(data, "vm")
    ]
    hosts = [
        HostConfig(
            name=_str(host_t, "name", where),
            address=_str(host_t, "address", where),
            root=_path(host_t, "root", where),
        )
        for where, host_t in _table_array(data, "host")
    ]
    sandbox_t = _table(data, "sandbox", required=False)
    sandbox = SandboxConfig(dir=_path(sandbox_t, "dir", "sandbox")) if sandbox_t else None
    tls_t = _table(data, "tls", required=False)
    tls = TlsConfig(dir=_path(tls_t, "dir", "tls") if "dir" in tls_t else None,
                    insecure_plaintext=_bool(tls_t, "insecure_plaintext", "tls", False))
    agents_t = _table(data, "agents", required=False)
    agents = AgentTimings(**{f.name: _seconds(agents_t, f.name, "agents")
                             for f in dataclasses.fields(AgentTimings)})
    return FleetConfig(ceph, libvirt, ssh, fleet, tuple(vms), tuple(hosts), sandbox, tls, agents)


def display_uri(uri: str) -> str:
    """``uri`` fit for a message or a log: scheme, user, host, port and path, without the
    query (key file paths and options) and without any password."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{parts.username}@" if parts.username else "") + host
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"  # urlunsplit drops an empty host's //


def check_uri(where: str, uri: str) -> None:
    """Refuse a libvirt URI that libvirt would not open, or whose SSH transport would not
    verify the hypervisor's host key (module docstring); the message shows the URI without
    its password, if it has one."""
    parts = urllib.parse.urlsplit(uri)
    shown = uri if parts.password is None else uri.replace(f":{parts.password}@", ":***@", 1)
    driver, _, transport = parts.scheme.partition("+")
    if not driver or "://" not in uri:
        raise ConfigError(where, f"{shown!r} is not a libvirt URI: driver[+transport]://"
                          "[user@][host][:port]/path, e.g. qemu:///system or "
                          "qemu+ssh://root@hv1.example/system")
    if transport not in _TRANSPORTS:
        known = ", ".join(sorted(t for t in _TRANSPORTS if t))
        raise ConfigError(where, f"{shown!r}: unknown transport {transport!r} (known: {known})")
    if parts.password is not None:
        raise ConfigError(where, f"{shown!r}: no password in a URI; log in with a key "
                          "(keyfile=)")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ConfigError(where, f"{shown!r}: the port is not a number 0-65535") from None
    if transport not in _SSH_TRANSPORTS:
        return
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if not parts.hostname:
        raise ConfigError(where, f"{shown!r}: an SSH URI names its host "
                          "(qemu+ssh://root@hv1.example/system)")
    if transport == "ssh":
        ignored = [name for name in _LIBSSH_ONLY if name in params]
        if ignored:
            raise ConfigError(where, f"{shown!r}: qemu+ssh ignores {', '.join(ignored)} (the "
                              "libssh transports read them): pin the host key in the OpenSSH "
                              "known_hosts of the coordinator's user, or use qemu+libssh://")
    if params.get("no_verify", "0") not in ("", "0"):
        raise ConfigError(where, f"{shown!r}: no_verify accepts any new host key; pin the "
                          "hypervisor's host key instead (docs/provisioning.md)")
    if params.get("known_hosts_verify", "normal") != "normal":
        raise ConfigError(where, f"{shown!r}: known_hosts_verify="
                          f"{params['known_hosts_verify']} does not verify an unknown host "
                          "key; pin it in the known_hosts file and leave the default (normal)")
    for name in ("keyfile", "known_hosts"):
        if name in params and not Path(params[name]).is_absolute():
            raise ConfigError(where, f"{shown!r}: {name} must be an absolute path")


def validate(config: FleetConfig) -> None:
    """Raise ConfigError for the first rule ``config`` breaks (see the module docstring)."""
    fleet = config.fleet
    check_uri("libvirt.uri", config.libvirt.uri)
    if not _NAME_RE.match(fleet.name):
        raise ConfigError("fleet.name", f"{fleet.name!r}: use letters, digits, '_', '-', '.'")
    if not _IMAGE_RE.match(fleet.image):
        raise ConfigError("fleet.image", f"{fleet.image!r}: use letters, digits, '_', '-', '.'")
    if not _NAME_RE.match(config.ceph.pool):
        raise ConfigError("ceph.pool", f"{config.ceph.pool!r} is not a valid pool name")
    if fleet.size <= 0 or fleet.size % _ALIGN:
        raise ConfigError(
            "fleet.size", f"{fleet.size} bytes: must be a positive multiple of 4 KiB"
        )
    if not 1 <= fleet.agent_port <= 65535:
        raise ConfigError("fleet.agent_port", f"{fleet.agent_port} is not a TCP port")
    if (config.vms or config.hosts) and (config.ssh.key is None or config.ssh.known_hosts is None):
        raise ConfigError("ssh.key", "ssh.key and ssh.known_hosts are required with VMs or hosts")
    if not config.vms:
        if fleet.writer:
            raise ConfigError("fleet.writer", f"{fleet.writer!r} is not a VM of the fleet")
        return  # a Ceph-only config (no [[vm]]): nothing to attach, no writer
    seen_names: set[str] = set()
    seen_domains: set[tuple[str, str]] = set()
    seen_addresses: set[str] = set()
    for i, vm in enumerate(config.vms):
        if not _NAME_RE.match(vm.name):
            raise ConfigError(f"vm[{i}].name", f"{vm.name!r}: use letters, digits, '_', '-', '.'")
        if vm.name in seen_names:
            raise ConfigError(f"vm[{i}].name", f"{vm.name!r} appears twice")
        check_uri(f"vm[{i}].uri", vm.uri)
        if (vm.uri, vm.domain) in seen_domains:
            raise ConfigError(f"vm[{i}].domain", f"{vm.domain!r} on {vm.uri} appears twice")
        if vm.address in seen_addresses:
            raise ConfigError(f"vm[{i}].address", f"{vm.address!r} appears twice")
        seen_names.add(vm.name)
        seen_domains.add((vm.uri, vm.domain))
        seen_addresses.add(vm.address)
    if fleet.writer not in seen_names:
        raise ConfigError("fleet.writer", f"{fleet.writer!r} is not a VM of the fleet")
    if config.vm(fleet.writer).spare:
        raise ConfigError("fleet.writer", f"{fleet.writer!r} is a spare; a spare cannot write")


def render(data: Mapping[str, Any]) -> str:
    """``data`` (what :func:`tomllib.loads` gives for an rbdfleet.toml: tables of scalars and
    lists of scalars, arrays of tables) as TOML text that loads back to the same mapping."""
    lines: list[str] = []
    for name, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{name}]", *_render_pairs(value)]
        elif isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
            for table in value:
                lines += ["", f"[[{name}]]", *_render_pairs(table)]
        else:
            raise ConfigError(name, "a top-level key outside any table")
    return "\n".join(lines).lstrip("\n") + "\n"


def _render_pairs(table: Mapping[str, Any]) -> list[str]:
    return [f"{key} = {_render_value(f'{key}', value)}" for key, value in table.items()]


def _render_value(where: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, but for DEL (TOML escapes it, JSON need not)
        # and astral characters (JSON's surrogate-pair escapes are not TOML's): kept literal
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_render_value(where, v) for v in value) + "]"
    raise ConfigError(where, f"{type(value).__name__} has no place in rbdfleet.toml")
