"""`rbdfleet inventory`: the fleet as an Ansible inventory (a dynamic inventory script).

``rbdfleet inventory --list`` (or ``--json``) prints every group with ``_meta.hostvars``;
``--host NAME`` prints one host's variables; alone it prints a table (VM, group, address).
The groups are those ``ansible/deploy-agents.yml`` plays on: ``agents`` (children
``rbdfleet_writer``, ``rbdfleet_readers`` and ``rbdfleet_spares``, whose agents wait for the
disk the coordinator attaches). Each VM carries the agent config that ``rbdfleet deploy``
would write (:func:`orchestrator.rollout.agent_config`), with the roles of the active
coordinator's map when one answers, else the config's bootstrap roles.

No key appears: each VM's own key (derived from the fleet's master key, which never leaves this
machine) is written to ``KEY_DIR/<vm>.key`` (0600, the directory 0700), and
``rbdfleet_agent_secret_src`` names it per host (``{{ inventory_hostname }}``); the role copies
it. The agents tarball is written once to ``--package-dir`` (its name carries its content
hash) and named likewise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption
from orchestrator.cli._output import JsonOption, emit_json, print_table
from orchestrator.config import FleetConfig
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.coordinator_hosts import CoordinatorHost
from orchestrator.errors import AgentUnreachable, ConfigError
from orchestrator.services import open_services

DEFAULT_PACKAGE_DIR = Path("/var/tmp/rbdfleet/packages")


def write_agent_keys(cfg: FleetConfig, masters: tuple[bytes, ...], key_dir: Path) -> Path:
    """Each VM's own key in ``key_dir/<vm>.key`` (0600; the directory 0700); ``key_dir``."""
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_dir.chmod(0o700)
    keys = FleetKeys(cfg.fleet.name, masters, time.time)
    for vm in cfg.vms:
        path = key_dir / f"{vm.name}.key"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_bytes(keys.node_key_file(vm.name))
    return key_dir


def inventory(
    config: ConfigOption = DEFAULT_CONFIG,
    list_all: Annotated[bool, typer.Option(
        "--list", help="every group and host as JSON (what Ansible asks a script)")] = False,
    host: Annotated[str | None, typer.Option("--host", help="one host's variables")] = None,
    package_dir: Annotated[Path, typer.Option(
        "--package-dir", help="where the agents tarball is written (once per version)")]
    = DEFAULT_PACKAGE_DIR,
    coordinators: Annotated[list[str] | None, typer.Option(
        "--coordinator", help="a coordinator host (a VM name or an address; repeat it) for "
        "group rbdfleet_coordinators (ansible/deploy-coordinators.yml)")] = None,
    coordinator_port: Annotated[int, typer.Option(
        "--coordinator-port", help="the port each coordinator serves on")] = 7470,
    libvirt_uri: Annotated[str | None, typer.Option(
        "--libvirt-uri", help="how the coordinator hosts reach the hypervisor this machine "
        "reaches locally (as for `coordinator install`)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the fleet as an Ansible inventory: the VMs, their addresses and roles. With --list
    (or --json) and --host it is a dynamic inventory script: ansible-playbook -i SCRIPT
    ansible/deploy-agents.yml, SCRIPT running `rbdfleet inventory --config FILE "$@"`."""
    if list_all and host is not None:
        raise ConfigError("inventory", "--list and --host exclude each other")
    with open_services(config) as services:
        cfg = services.config
        try:
            fleet_map: dict[str, Any] | None = services.map_reader(services.transport()).map()
        except (AgentUnreachable, ConfigError):  # no fleet CA, so no coordinator, yet
            fleet_map = None  # no coordinator yet: the bootstrap roles of the config
        key_dir = write_agent_keys(cfg, services.master_keys,
                                   package_dir / "keys" / cfg.fleet.name)
        hosts = [CoordinatorHost.named(cfg, name) for name in coordinators or ()]
        found = services.inventory(fleet_map, package_dir, key_dir, hosts, coordinator_port,
                                   libvirt_uri)
    if host is not None or list_all or as_json:
        emit_json(found.hostvars(host) if host is not None else found.to_script())
        return
    print_table(["HOST", "GROUP", "ADDRESS"],
                [*((vm.name, vm.group, vm.address) for vm in found.hosts),
                 *((h.name, "rbdfleet_coordinators", h.address) for h in found.coordinators)])


def register(root: typer.Typer) -> None:
    """Add ``inventory`` to the root app."""
    root.command("inventory")(inventory)
