"""`rbdfleet inventory`: the fleet as an Ansible inventory (a dynamic inventory script).

``rbdfleet inventory --list`` (or ``--json``) prints every group with ``_meta.hostvars``;
``--host NAME`` prints one host's variables; alone it prints a table (VM, group, address).
The groups are those ``ansible/deploy-agents.yml`` plays on: ``agents`` (children
``rbdfleet_writer`` and ``rbdfleet_readers``) and ``rbdfleet_spares`` (listed for ad-hoc
commands, never deployed). Each active VM carries the agent config that ``rbdfleet deploy``
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
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator import config as fleet_config
from orchestrator.adapters.ansible import (
    Inventory,
    InventoryHost,
    TlsFiles,
    ssh_vars,
    write_package,
)
from orchestrator.cli._output import JsonOption, emit_json, print_table
from orchestrator.cli.coordinator import coordinator_config, read_secret
from orchestrator.cli.provision import DEFAULT_CONFIG, ConfigOption
from orchestrator.client import CoordinatorClient, Transport
from orchestrator.config import FleetConfig
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.errors import AgentUnreachable, ConfigError
from orchestrator.packaging import AgentPackage
from orchestrator.rollout import agent_config

DEFAULT_PACKAGE_DIR = Path("/var/tmp/rbdfleet/packages")


def fleet_inventory(cfg: FleetConfig, *, coordinator: str | None,
                    fleet_map: Mapping[str, Any] | None,
                    package: tuple[Path, str] | None, key_dir: Path) -> Inventory:
    """The fleet's VMs as an :class:`Inventory` (pure: the map and package are inputs).

    ``fleet_map``: the coordinator's map (None: the config's writer at epoch 1);
    ``package``: the agents tarball on this machine and its version; ``key_dir``: where the
    VMs' own keys are on this machine (:func:`write_agent_keys`).
    """
    if cfg.ssh.key is None or cfg.ssh.known_hosts is None:
        raise ConfigError("ssh.key", "ssh.key and ssh.known_hosts are needed for an inventory")
    writer, epoch = cfg.fleet.writer, 1
    if fleet_map is not None:
        writer, epoch = fleet_map.get("writer") or "", int(fleet_map["epoch"])
    hosts = [InventoryHost(vm.name, vm.address, "/", {} if vm.spare else agent_config(
                 cfg, vm.name, coordinator=coordinator, writer=writer, epoch=epoch),
                 spare=vm.spare)
             for vm in cfg.vms]
    variables = ssh_vars(cfg.ssh.user, cfg.ssh.key, cfg.ssh.known_hosts)
    variables["rbdfleet_agent_secret_src"] = str(key_dir / "{{ inventory_hostname }}.key")
    if not cfg.tls.insecure_plaintext:  # each VM's certificate and key from the fleet's PKI
        variables.update(TlsFiles(cfg.pki_dir / "{{ inventory_hostname }}.pem",
                                  cfg.pki_dir / "{{ inventory_hostname }}.key",
                                  cfg.pki_dir / "ca.pem").role_vars())
    if package is not None:
        variables["rbdfleet_agent_package"] = str(package[0])
        variables["rbdfleet_agent_version"] = package[1]
    return Inventory(hosts, variables)


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
    as_json: JsonOption = False,
) -> None:
    """Print the fleet as an Ansible inventory: the VMs, their addresses and roles. With --list
    (or --json) and --host it is a dynamic inventory script: ansible-playbook -i SCRIPT
    ansible/deploy-agents.yml, SCRIPT running `rbdfleet inventory --config FILE "$@"`."""
    if list_all and host is not None:
        raise ConfigError("inventory", "--list and --host exclude each other")
    cfg = fleet_config.load(config)
    urls = list(coordinator_config(config).urls)
    try:
        fleet_map: dict[str, Any] | None = CoordinatorClient(
            urls, cfg.fleet.name, None, transport=Transport.for_fleet(cfg)).map()
    except (AgentUnreachable, ConfigError):  # no fleet CA, so no coordinator, yet
        fleet_map = None  # no coordinator yet: the bootstrap roles of the config
    package = AgentPackage.build()
    key_dir = write_agent_keys(cfg, read_secret(cfg), package_dir / "keys" / cfg.fleet.name)
    found = fleet_inventory(cfg, coordinator=urls[0], fleet_map=fleet_map,
                            package=(write_package(package, package_dir), package.version),
                            key_dir=key_dir)
    if host is not None or list_all or as_json:
        emit_json(found.hostvars(host) if host is not None else found.to_script())
        return
    print_table(["VM", "GROUP", "ADDRESS"], [(vm.name, vm.group, vm.address) for vm in found.hosts])


def register(root: typer.Typer) -> None:
    """Add ``inventory`` to the root app."""
    root.command("inventory")(inventory)
