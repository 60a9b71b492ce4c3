"""The agent as a systemd service: the one unit both deployers install, and its launcher.

**The unit.** :data:`UNIT` is the only text of ``rbdfleet-agent.service``. ``rbdfleet deploy``
(``orchestrator.deploy``) renders it with :func:`render_unit`; the Ansible role's
``templates/rbdfleet-agent.service.j2`` is generated from it by :func:`ansible_template`
(``python -m agents.service --ansible-template > ansible/roles/.../rbdfleet-agent.service.j2``)
and a unit test fails when the two differ, so the deployers cannot drift apart and each sees
the other's unit as unchanged.

**The launcher** (:func:`main`, the unit's ``ExecStart``) execs the daemon. systemd restarts a
crashed agent, and after a reboot starts it again, with the config it was deployed with; that
config may name it the writer (the fleet's bootstrap writer, or any node deployed while it was
the writer). Started again as a writer it would promote itself to a new epoch with no
coordinator's word. So a start with exactly the config of the previous start (its sha256 is
kept in the state directory) runs the agent as a **reader** whenever a coordinator is
configured: it rejoins as a reader of the current epoch, and only the coordinator names a
writer. A new config (a deploy) is honoured once. Without a coordinator nobody else could
name a writer, so the config's role is kept.

**Who it runs as.** :data:`AGENT_USER`, a system account without a shell or a home of its own
that both deployers make (docs/security.md, "Least privilege on the VMs"), with the ``disk``
group for the shared disk's device node (root:disk 0660) and no capability. What it writes:
the launcher's state in its ``StateDirectory`` (``/var/lib/rbdfleet``, its own); nothing else
on a VM. The pidfile is root's: systemd writes it outside the sandbox (``+``), so the pid both
deployers signal as root is never the agent's word.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import shlex
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AGENT_USER",
    "ANSIBLE_VARIABLES",
    "DEVICE_GROUP",
    "RESTART_SEC",
    "UNIT",
    "UNIT_NAME",
    "UnitParams",
    "ansible_template",
    "main",
    "read_write_paths",
    "render_unit",
    "role_override",
]

UNIT_NAME = "rbdfleet-agent.service"
RESTART_SEC = 3
STATE_FILE = "started-config.sha256"
# The agent's account on a VM (user and its own group) and the group of block device nodes
# (udev's rule on Debian), which opens the shared disk without any capability.
AGENT_USER = "rbdfleet-agent"
DEVICE_GROUP = "disk"


class _Template(string.Template):
    delimiter = "@"  # systemd owns "$" (variables) and "%" (specifiers)


# The sandboxing every rbdfleet service shares (the agent's unit here, the coordinator's in
# orchestrator/coordinator_hosts.py): no capability, a read-only system, no kernel knobs.
HARDENING = """\
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
LockPersonality=yes
SystemCallArchitectures=native
"""

UNIT = _Template("""\
# Installed by `rbdfleet deploy` or the Ansible role rbdfleet_agent, both rendering
# agents/service.py: edit it there, not here.
[Unit]
Description=rbdfleet agent @{node} (fleet @{fleet})
After=network-online.target
Wants=network-online.target
# Never give up on a crashing agent: RestartSec bounds the rate (one start per
# @{restart_sec} s at most), and the coordinator keeps a node that keeps dying out of the map.
StartLimitIntervalSec=0

[Service]
Type=simple
# The release itself, never `current`: a new release rewrites this unit and restarts.
Environment=PYTHONPATH=@{release}
WorkingDirectory=@{workdir}
# agents.service execs the daemon; started again with the same config it is a reader.
ExecStart=@{python} -m agents.service --config @{config} --state-dir @{workdir} -- @{launch}
# The pidfile both deployers read to see the agent running, written by root ("+": outside
# the sandbox) into a directory the agent cannot write: the pid they signal is not its word.
ExecStartPost=+/bin/sh -c 'mkdir -p -m 0755 @{piddir} && echo $$MAINPID > @{pidfile}'
ExecStopPost=+/bin/rm -f @{pidfile}
StandardOutput=journal
StandardError=journal
SyslogIdentifier=rbdfleet-agent
# SIGTERM is the agent's graceful stop.
KillSignal=SIGTERM
TimeoutStopSec=@{stop_timeout}
Restart=always
RestartSec=@{restart_sec}
UMask=0077

# Its own account, no capability: it reads its config, keys and TLS key (0600, its own, in
# root's 0750 directory of its group), opens the shared disk through the group of its device
# node (root:disk 0660, also after a hot-plug) and writes only its state directory
# (/var/lib/rbdfleet, the working directory: the launcher's marker). No ProtectClock: it
# implies DeviceAllow=char-rtc, which shuts every other device out (systemd issue 18142).
User=@{user}
Group=@{user}
SupplementaryGroups=@{device_group}
StateDirectory=rbdfleet
StateDirectoryMode=0750
""" + HARDENING + """ReadWritePaths=@{read_write}

[Install]
WantedBy=multi-user.target
""")

# The Jinja expression of each placeholder in the Ansible role (its vars/ and defaults/);
# ``read_write`` mirrors :func:`read_write_paths`.
ANSIBLE_VARIABLES: Mapping[str, str] = {
    "node": "{{ rbdfleet_agent_config.node }}",
    "fleet": "{{ rbdfleet_agent_config.fleet | default('?') }}",
    "release": "{{ rbdfleet_agent_release_dir }}",
    "workdir": "{{ rbdfleet_agent_workdir }}",
    "python": "{{ rbdfleet_agent_python }}",
    "config": "{{ rbdfleet_agent_config_path }}",
    "launch": "{{ rbdfleet_agent_launch | map('quote') | join(' ') }}",
    "pidfile": "{{ rbdfleet_agent_pidfile }}",
    "piddir": "{{ rbdfleet_agent_pidfile | dirname }}",
    "user": "{{ rbdfleet_agent_user }}",
    "device_group": DEVICE_GROUP,
    "stop_timeout": "{{ rbdfleet_agent_stop_timeout }}",
    "restart_sec": str(RESTART_SEC),
    "read_write": (
        "{{ ([rbdfleet_agent_workdir]"
        " + ([rbdfleet_agent_config.backend[5:] | dirname]"
        " if rbdfleet_agent_config.backend | default('') is match('file:') else [])"
        " + ([rbdfleet_agent_config.ready_file | dirname]"
        " if rbdfleet_agent_config.ready_file is defined else []))"
        " | unique | join(' ') }}"
    ),
}


@dataclass(frozen=True)
class UnitParams:
    """What the unit names: the agent's layout on its host and its config."""

    release: str  # the release directory (PYTHONPATH)
    workdir: str  # /var/lib/rbdfleet where systemd runs it: the unit's StateDirectory
    config_path: str
    pidfile: str
    config: Mapping[str, Any]  # the agent's config (node, fleet, backend, ready_file)
    launch: Sequence[str] = ("-m", "agents", "serve")
    python: str = "/usr/bin/python3"
    stop_timeout: float = 5.0


def read_write_paths(workdir: str, config: Mapping[str, Any]) -> list[str]:
    """What the agent writes under ``ProtectSystem=strict``: its working directory, a file
    backend's directory and the ready file's."""
    paths = [workdir]
    backend = str(config.get("backend", ""))
    if backend.startswith("file:"):
        paths.append(posixpath.dirname(backend[5:]))
    if "ready_file" in config:
        paths.append(posixpath.dirname(str(config["ready_file"])))
    return list(dict.fromkeys(paths))


def render_unit(params: UnitParams) -> str:
    """The unit text for one host (what ``rbdfleet deploy`` installs)."""
    timeout = params.stop_timeout
    return UNIT.substitute(
        node=params.config.get("node", "?"),
        fleet=params.config.get("fleet", "?"),
        release=params.release,
        workdir=params.workdir,
        python=params.python,
        config=params.config_path,
        launch=shlex.join(params.launch),  # what Ansible's ``quote`` filter does
        pidfile=params.pidfile,
        piddir=posixpath.dirname(params.pidfile),
        user=AGENT_USER,
        device_group=DEVICE_GROUP,
        stop_timeout=int(timeout) if float(timeout).is_integer() else timeout,
        restart_sec=RESTART_SEC,
        read_write=" ".join(read_write_paths(params.workdir, params.config)),
    )


def ansible_template() -> str:
    """The Ansible role's ``rbdfleet-agent.service.j2``: :data:`UNIT` with Jinja variables."""
    return UNIT.substitute(ANSIBLE_VARIABLES)


def role_override(config_path: str, state_dir: str) -> str | None:
    """``"reader"`` when this start must not take the config's writer role, else None; and
    remember this start's config.

    A reader, when the config names this node the writer, a coordinator is configured, and
    the previous start had exactly this config (see the module docstring).
    """
    with open(config_path, "rb") as handle:
        raw = handle.read()
    digest = hashlib.sha256(raw).hexdigest()
    state = os.path.join(state_dir, STATE_FILE)
    try:
        with open(state) as handle:
            previous = handle.read().strip()
    except FileNotFoundError:
        previous = ""
    if previous != digest:
        tmp = f"{state}.tmp-{os.getpid()}"
        with open(tmp, "w") as handle:
            handle.write(digest + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, state)
        return None
    config = _parse(config_path, raw)
    if config.get("role") == "writer" and config.get("coordinator"):
        return "reader"
    return None


def _parse(path: str, raw: bytes) -> dict[str, Any]:
    if path.endswith(".toml"):
        import tomllib

        return tomllib.loads(raw.decode())
    loaded = json.loads(raw)
    return loaded if isinstance(loaded, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.service --config FILE --state-dir DIR -- LAUNCH...``: exec the
    daemon (``--ansible-template``: print the role's template instead)."""
    parser = argparse.ArgumentParser(prog="python -m agents.service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ansible-template", action="store_true")
    parser.add_argument("--config")
    parser.add_argument("--state-dir")
    parser.add_argument("launch", nargs="*", help="python3 arguments before --config")
    args = parser.parse_args(argv)
    if args.ansible_template:
        sys.stdout.write(ansible_template())
        return 0
    if not args.config or not args.state_dir or not args.launch:
        parser.error("--config, --state-dir and the launch arguments are required")
    command = [sys.executable, *args.launch, "--config", args.config]
    role = role_override(args.config, args.state_dir)
    if role is not None:
        print(f"rbdfleet-agent: started again with the config of its last start "
              f"({args.config}): as a {role}; the coordinator names the writer",
              file=sys.stderr, flush=True)
        command += ["--role", role]
    os.execv(command[0], command)
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    raise SystemExit(main())
