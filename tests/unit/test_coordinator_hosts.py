"""orchestrator.coordinator_hosts: the coordinator service's installer against a simulated host
(files, the package's release, systemd's view of the unit), its host config and its refusals;
the TOML the host config is written in; the package it ships."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import config as fleet_config
from orchestrator.adapters.ansible import CoordinatorInventoryHost, Inventory, InventoryHost
from orchestrator.coordinator.config import CoordinatorConfig
from orchestrator.coordinator_hosts import (
    CoordinatorHost,
    CoordinatorInstaller,
    CoordinatorLayout,
    CoordinatorTarget,
    ansible_template,
    coordinator_targets,
    host_config,
    role_variables,
)
from orchestrator.core.remote import Executable, RemoteCommand, RemoteResult, SshHost
from orchestrator.errors import ConfigError, DeployError, HostUnreachable
from orchestrator.packaging import INSTALL_RELEASE, CoordinatorPackage

pytestmark = pytest.mark.unit

PACKAGE = CoordinatorPackage(b"tarball", "0123456789abcdef")
LAYOUT = CoordinatorLayout("demo")


@dataclass
class SimulatedHost:
    """What the installer can see and change on one host."""

    systemd: bool = True
    python: str = "3.11"
    machine: str = "x86_64"
    missing: list[str] = field(default_factory=list)
    version: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    active: bool = False
    enabled: bool = False
    needs_reload: bool = False
    starts: int = 0


class SimulatedShell:
    """RemoteShell over :class:`SimulatedHost` objects by address; records commands."""

    def __init__(self, hosts: dict[str, SimulatedHost]) -> None:
        self.hosts = hosts
        self.commands: list[tuple[str, RemoteCommand]] = []

    def run(self, host: SshHost, cmd: RemoteCommand, timeout: float = 30.0, *,
            check: bool = False, stdin: bytes | None = None) -> RemoteResult:
        sim = self.hosts[host.address]
        self.commands.append((host.address, cmd))
        args = list(cmd.args)
        if cmd.executable is Executable.PYTHON3 and args[1] == INSTALL_RELEASE:
            sim.version = args[3]
            sim.files.pop(args[4])  # unpacked, then removed
        elif cmd.executable is Executable.PYTHON3 and "find_spec" in args[1]:  # the probe
            paths = [p for p in args[3].split("\n") if p]
            return RemoteResult(0, json.dumps({
                "systemd": sim.systemd, "python": sim.python, "machine": sim.machine,
                "missing": sim.missing, "version": sim.version,
                "sha256": {p: hashlib.sha256(sim.files[p]).hexdigest() if p in sim.files
                           else None for p in paths}}), "")
        elif cmd.executable is Executable.PYTHON3 and "rmtree" in args[1]:
            sim.files = {p: b for p, b in sim.files.items() if not p.startswith(args[2])}
            sim.files.pop(args[3], None)
        elif cmd.executable is Executable.SYSTEMCTL:
            return RemoteResult(0, self._systemctl(sim, args), "")
        return RemoteResult(0, "", "")

    @staticmethod
    def _systemctl(sim: SimulatedHost, args: list[str]) -> str:
        verb = args[0]
        if verb == "show":
            return (f"ActiveState={'active' if sim.active else 'inactive'}\n"
                    f"NeedDaemonReload={'yes' if sim.needs_reload else 'no'}\n"
                    f"UnitFileState={'enabled' if sim.enabled else 'disabled'}\n")
        if verb == "daemon-reload":
            sim.needs_reload = False
        elif verb == "enable":
            sim.enabled = True
        elif verb == "restart":
            sim.active, sim.starts = True, sim.starts + 1
        elif verb == "disable":
            sim.enabled = sim.active = False
        return ""

    def put_file(self, host: SshHost, source: Path | bytes, remote_path: str,
                 mode: int = 0o644, timeout: float = 60.0) -> None:
        sim = self.hosts[host.address]
        sim.files[remote_path] = source if isinstance(source, bytes) else source.read_bytes()
        if remote_path == LAYOUT.unit_path:
            sim.needs_reload = True

    def start_background(self, *args: Any, **kwargs: Any) -> int:
        raise AssertionError("a service is never started in the background")

    def close(self) -> None:
        pass


def _target(address: str, config: bytes = b"[fleet]\n") -> CoordinatorTarget:
    return CoordinatorTarget(CoordinatorHost(f"h-{address}", address),
                             f"https://{address}:7470", LAYOUT,
                             ((config, LAYOUT.config_path, 0o600),
                              (b"key", LAYOUT.at("fleet.secret"), 0o600)))


def _installer(shell: SimulatedShell, answers: dict[str, str] | None = None,
               timeout: float = 5.0) -> tuple[CoordinatorInstaller, list[str]]:
    asked: list[str] = []
    now = [0.0]

    def health(url: str) -> str:
        asked.append(url)
        if url in (answers or {}):
            return (answers or {})[url]
        raise HostUnreachable(url, "connection refused")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    installer = CoordinatorInstaller(shell, lambda: PACKAGE, health, ready_timeout=timeout,
                                     clock=lambda: now[0], sleep=sleep,
                                     local_python="3.11", local_machine="x86_64",
                                     fleet_urls=[f"https://{a}:7470" for a in shell.hosts])
    return installer, asked


def test_a_fresh_host_gets_package_files_unit_enabled_and_started_then_waits_for_health(
) -> None:
    hosts = {"10.0.0.1": SimulatedHost(), "10.0.0.2": SimulatedHost()}
    shell = SimulatedShell(hosts)
    installer, asked = _installer(shell, {"https://10.0.0.1:7470": "active",
                                          "https://10.0.0.2:7470": "standby"})
    results = installer.install([_target("10.0.0.1"), _target("10.0.0.2")])
    assert [r.role for r in results.values()] == ["active", "standby"]
    for sim in hosts.values():
        assert sim.version == PACKAGE.version and sim.enabled and sim.active and sim.starts == 1
        assert not sim.needs_reload  # the new unit was read before the start
        unit = sim.files[LAYOUT.unit_path].decode()
        assert f"PYTHONPATH={LAYOUT.release(PACKAGE.version)}" in unit
        assert "Restart=always" in unit and f"--config {LAYOUT.config_path}" in unit
    assert results["h-10.0.0.1"].actions == (
        f"installed {PACKAGE.version}", "wrote rbdfleet.toml", "wrote fleet.secret",
        f"wrote {LAYOUT.unit_name}", "enabled", "started")
    # one host, then the next; a standby's install also asks whether another is active
    assert asked == ["https://10.0.0.1:7470", "https://10.0.0.2:7470", "https://10.0.0.1:7470"]


def test_a_lone_standby_is_not_ready_until_some_coordinator_is_active() -> None:
    """A coordinator serves as a standby until it takes the lease: the first host's install
    waits for that (or for another coordinator that is active)."""
    hosts = {"10.0.0.1": SimulatedHost()}
    shell = SimulatedShell(hosts)
    answers = {"https://10.0.0.1:7470": "standby"}
    installer, _ = _installer(shell, answers, timeout=3.0)
    with pytest.raises(DeployError, match="no coordinator of the fleet is active yet"):
        installer.install([_target("10.0.0.1")])
    answers["https://10.0.0.1:7470"] = "active"  # it took the lease
    assert installer.install([_target("10.0.0.1")])["h-10.0.0.1"].role == "active"


def test_a_second_install_writes_nothing_and_restarts_nothing() -> None:
    hosts = {"10.0.0.1": SimulatedHost()}
    shell = SimulatedShell(hosts)
    installer, _ = _installer(shell, {"https://10.0.0.1:7470": "active"})
    installer.install([_target("10.0.0.1")])
    again = installer.install([_target("10.0.0.1")])
    assert again["h-10.0.0.1"].actions == () and not again["h-10.0.0.1"].changed
    assert hosts["10.0.0.1"].starts == 1


def test_a_changed_config_is_rewritten_and_the_coordinator_restarted() -> None:
    hosts = {"10.0.0.1": SimulatedHost()}
    installer, _ = _installer(SimulatedShell(hosts), {"https://10.0.0.1:7470": "active"})
    installer.install([_target("10.0.0.1")])
    changed = installer.install([_target("10.0.0.1", b"[fleet]\nname = 'x'\n")])
    assert changed["h-10.0.0.1"].actions == ("wrote rbdfleet.toml", "restarted")
    assert hosts["10.0.0.1"].starts == 2


def test_a_stopped_coordinator_is_started_even_when_nothing_changed() -> None:
    hosts = {"10.0.0.1": SimulatedHost()}
    installer, _ = _installer(SimulatedShell(hosts), {"https://10.0.0.1:7470": "active"})
    installer.install([_target("10.0.0.1")])
    hosts["10.0.0.1"].active = False
    assert installer.install([_target("10.0.0.1")])["h-10.0.0.1"].actions == ("started",)


@pytest.mark.parametrize(("sim", "said"), [
    (SimulatedHost(systemd=False), "systemd is not running"),
    (SimulatedHost(missing=["rados", "libvirt"]),
     "python3 lacks rados, libvirt: apt-get install python3-rados python3-rbd python3-libvirt"),
    (SimulatedHost(python="3.12"), "python3 there is 3.12 on x86_64"),
    (SimulatedHost(machine="aarch64"), "on aarch64, the package was built for 3.11 on x86_64"),
])
def test_a_host_that_cannot_run_it_is_refused_before_anything_is_written(
        sim: SimulatedHost, said: str) -> None:
    shell = SimulatedShell({"10.0.0.1": sim, "10.0.0.2": SimulatedHost()})
    installer, _ = _installer(shell, {"https://10.0.0.2:7470": "active"})
    with pytest.raises(DeployError, match=r"failed on h-10\.0\.0\.1") as caught:
        installer.install([_target("10.0.0.1"), _target("10.0.0.2")])
    assert said in (caught.value.results["h-10.0.0.1"].error or "")
    assert sim.files == {} and sim.version is None
    assert shell.hosts["10.0.0.2"].files == {}  # stopped there: the next host is not touched


def test_a_coordinator_that_never_answers_fails_the_host_and_stops_the_rollout() -> None:
    hosts = {"10.0.0.1": SimulatedHost(), "10.0.0.2": SimulatedHost()}
    installer, asked = _installer(SimulatedShell(hosts), {}, timeout=3.0)
    with pytest.raises(DeployError) as caught:
        installer.install([_target("10.0.0.1"), _target("10.0.0.2")])
    error = caught.value.results["h-10.0.0.1"].error or ""
    assert "not ready at https://10.0.0.1:7470 within 3 s" in error
    assert set(asked) == {"https://10.0.0.1:7470"} and hosts["10.0.0.2"].files == {}


def _never_built() -> CoordinatorPackage:
    raise AssertionError("uninstall builds no package")


def test_uninstall_stops_disables_and_removes_the_unit_and_files() -> None:
    hosts = {"10.0.0.1": SimulatedHost()}
    installer, _ = _installer(SimulatedShell(hosts), {"https://10.0.0.1:7470": "active"})
    installer.install([_target("10.0.0.1")])
    fresh, _ = _installer(SimulatedShell(hosts))
    fresh.build_package = _never_built
    result = fresh.uninstall([_target("10.0.0.1")])
    sim = hosts["10.0.0.1"]
    assert result["h-10.0.0.1"].actions == ("stopped", "removed")
    assert not sim.active and not sim.enabled and sim.files == {}


OPERATOR = {
    "ceph": {"conf": "/srv/ceph.conf", "keyring": "/srv/keyring", "pool": "rbd"},
    "libvirt": {"uri": "qemu:///system"},
    "ssh": {"user": "root", "key": "/root/.ssh/id", "known_hosts": "/root/.ssh/kh"},
    "fleet": {"name": "demo", "image": "img", "size": "1GiB", "writer": "vm1",
              "secret_file": "/srv/fleet.secret", "client_secret_file": "/srv/client.secret"},
    "vm": [{"name": "vm1", "domain": "d1", "address": "10.0.0.11"},
           {"name": "vm2", "domain": "d2", "address": "10.0.0.12",
            "uri": "qemu+ssh://root@hv2/system"}],
    "coordinator": {"urls": ["https://10.0.0.21:7470"], "listen": "0.0.0.0:7470",
                    "tls_cert": "/srv/c.pem", "tls_key": "/srv/c.key"},
    "tls": {"dir": "/srv/pki"},
    "sandbox": {"dir": "/srv"},
    "host": [{"name": "h1", "address": "10.9.0.1", "root": "/srv/h1"}],
}


def test_host_config_makes_every_path_the_hosts_and_drops_what_a_coordinator_never_uses(
) -> None:
    out = host_config(OPERATOR, LAYOUT, "10.0.0.21:7470", "qemu+tcp://127.0.0.1:16509/system")
    assert out["ceph"]["conf"] == "/etc/rbdfleet/coordinator/demo/ceph.conf"
    assert out["ceph"]["keyring"] == "/etc/rbdfleet/coordinator/demo/ceph.keyring"
    assert out["fleet"]["secret_file"] == "/etc/rbdfleet/coordinator/demo/fleet.secret"
    assert "client_secret_file" not in out["fleet"]  # the CLI's credential, not a coordinator's
    assert out["ssh"]["key"] == LAYOUT.at("no-ssh-key")  # no SSH key is installed
    assert out["tls"]["dir"] == LAYOUT.tls_dir
    assert out["coordinator"] == {"urls": ["https://10.0.0.21:7470"], "listen": "10.0.0.21:7470"}
    assert "sandbox" not in out and "host" not in out
    # local URIs become the given one; a remote one is left as the operator wrote it
    assert out["libvirt"]["uri"] == "qemu+tcp://127.0.0.1:16509/system"
    assert [vm.get("uri") for vm in out["vm"]] == ["qemu+tcp://127.0.0.1:16509/system",
                                                   "qemu+ssh://root@hv2/system"]
    assert OPERATOR["ceph"]["conf"] == "/srv/ceph.conf"  # the operator's mapping is untouched
    fleet_config.from_mapping(tomllib.loads(fleet_config.render(out)), env={})


def test_host_config_without_a_libvirt_uri_keeps_the_operators() -> None:
    out = host_config(OPERATOR, LAYOUT, "10.0.0.21:7470")
    assert out["libvirt"] == {"uri": "qemu:///system"} and out["vm"] == OPERATOR["vm"]


def test_targets_refuse_a_host_whose_url_is_not_a_configured_coordinator(tmp_path: Path
                                                                         ) -> None:
    source = tmp_path / "rbdfleet.toml"
    data = {k: v for k, v in OPERATOR.items() if k not in ("coordinator", "sandbox", "host")}
    source.write_text(fleet_config.render(data))
    cfg = fleet_config.load(source, env={})
    with pytest.raises(ConfigError, match=r"https://10.0.0.22:7470 \(host h2\) is not listed"):
        coordinator_targets(cfg, CoordinatorConfig(urls=("https://10.0.0.21:7470",)),
                            [CoordinatorHost("h2", "10.0.0.22")], 7470)


_SCALARS = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                     st.floats(allow_nan=False), st.text())
_KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
_TABLES = st.dictionaries(_KEYS, st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3)),
                          max_size=4)


@given(st.dictionaries(_KEYS, st.one_of(_TABLES, st.lists(_TABLES, min_size=1, max_size=3)),
                       max_size=4))
def test_rendered_toml_loads_back_to_the_same_mapping(data: dict[str, Any]) -> None:
    assert tomllib.loads(fleet_config.render(data)) == data


def test_the_coordinator_package_carries_the_cli_and_its_libraries_not_the_host_bindings(
) -> None:
    package = CoordinatorPackage.build()
    with tarfile.open(fileobj=io.BytesIO(package.tarball)) as tar:
        names = set(tar.getnames())
    tops = {name.split("/")[0] for name in names}
    assert {"agents", "orchestrator", "typer", "click", "paramiko", "cryptography"} <= tops
    assert "orchestrator/cli/app.py" in names and "orchestrator/sandbox/guest/boot" in names
    assert not tops & {"rados.py", "rbd.py", "libvirt.py", "rados", "rbd", "libvirt"}
    assert not any("__pycache__" in name for name in names)
    assert CoordinatorPackage.build().version == package.version  # deterministic


ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "rbdfleet_coordinator"


def test_the_roles_unit_template_is_generated_from_the_one_unit_text() -> None:
    """Regenerate with: python -c 'from orchestrator.coordinator_hosts import ansible_template;
    print(ansible_template(), end="")' > ansible/roles/rbdfleet_coordinator/templates/..."""
    template = ROLE / "templates" / "rbdfleet-coordinator.service.j2"
    assert template.read_text() == ansible_template()
    role_vars = (ROLE / "vars" / "main.yml").read_text()
    for variable in ("rbdfleet_coordinator_release_dir", "rbdfleet_coordinator_config_path"):
        assert f"\n{variable}:" in role_vars  # what the template's placeholders name


def test_role_variables_stage_the_hosts_files_privately_and_mark_the_secrets(tmp_path: Path
                                                                             ) -> None:
    target = CoordinatorTarget(
        CoordinatorHost("vm2", "10.0.0.12"), "https://10.0.0.12:7470", LAYOUT,
        ((b"[fleet]\n", LAYOUT.config_path, 0o600),
         (b"[global]\n", LAYOUT.at("ceph.conf"), 0o644),
         (b"KEY", LAYOUT.at("tls", "coordinator.key"), 0o600)))
    found = role_variables(target, PACKAGE, tmp_path / "coordinator-x.tar.gz",
                           tmp_path / "staged", "3.11")
    files = found["rbdfleet_coordinator_files"]
    assert [(f["dest"], f["mode"], f["secret"]) for f in files] == [
        (LAYOUT.config_path, "0600", True), (LAYOUT.at("ceph.conf"), "0644", False),
        (LAYOUT.at("tls", "coordinator.key"), "0600", True)]
    assert [Path(f["src"]).read_bytes() for f in files] == [b"[fleet]\n", b"[global]\n", b"KEY"]
    assert all(Path(f["src"]).stat().st_mode & 0o777 == 0o600 for f in files)
    assert (tmp_path / "staged" / "vm2").stat().st_mode & 0o777 == 0o700
    assert found["rbdfleet_coordinator_url"] == "https://10.0.0.12:7470"
    assert found["rbdfleet_coordinator_version"] == PACKAGE.version


def test_a_vm_that_is_also_a_coordinator_host_gets_both_roles_variables() -> None:
    agent = InventoryHost("vm2", "10.0.0.12", "/", {"node": "vm2", "role": "reader"})
    coordinator = CoordinatorInventoryHost("vm2", "10.0.0.12", {"rbdfleet_coordinator_url": "u"})
    lone = CoordinatorInventoryHost("c1", "10.0.0.21", {"rbdfleet_coordinator_url": "v"})
    found = Inventory([agent], {"ansible_user": "root"}, [coordinator, lone])
    listing = found.to_script()
    assert listing["rbdfleet_coordinators"] == {"hosts": ["vm2", "c1"]}
    assert "rbdfleet_coordinators" in listing["all"]["children"]
    vm2 = listing["_meta"]["hostvars"]["vm2"]
    assert vm2["rbdfleet_agent_config"]["role"] == "reader"
    assert vm2["rbdfleet_coordinator_url"] == "u"
    assert found.hostvars("c1")["ansible_host"] == "10.0.0.21"
    assert found.hostvars("c1")["ansible_user"] == "root"
    static = found.to_static()["all"]["children"]
    assert static["rbdfleet_coordinators"]["hosts"]["vm2"] == vm2
