"""The Ansible path for real: ansible-playbook deploys the real agent to namespace hosts.

The three hosts share one blank image file the way VMs share the RBD image: h1 is the writer,
h2 and h3 are readers. ansible-playbook runs take ~10-20 s each (more under load), so the
fleet is deployed once for the module (:func:`deployed`: ``--check`` on the fresh hosts, the
first run, the second run) with TLS, and the two tests of a working fleet read what those
runs did and found; the refusals get fresh hosts of their own.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import stat
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.ansible import (
    AnsibleRunner,
    InventoryHost,
    PlaybookRun,
    TlsFiles,
    write_package,
)
from orchestrator.adapters.ssh import ParamikoShell
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.deploy import AgentDeployer, DeployTarget
from orchestrator.errors import DeployError
from orchestrator.packaging import AgentPackage
from orchestrator.sandbox.hosts import HostSet
from tests.fixtures.hosts import host_set, shell_for

pytestmark = pytest.mark.integration

MASTER = b"ansible-test-master-" + b"s" * 44  # never leaves the controller
KEYS = FleetKeys("t", (MASTER,), time.time)
_TS = re.compile(r"^ts=(\S+ \S+) .*event=(\w+)", re.MULTILINE)


def make_secret(directory: Path) -> Path:
    """Each host's own key in ``keys/<host>.key``; the returned path names it per host, as
    ``rbdfleet inventory`` does (Ansible templates ``inventory_hostname``)."""
    keys = directory / "keys"
    keys.mkdir(mode=0o700)
    for host in ("h1", "h2", "h3"):
        path = keys / f"{host}.key"
        path.write_bytes(KEYS.node_key_file(host))
        path.chmod(0o600)
    return keys / "{{ inventory_hostname }}.key"


def make_image(directory: Path) -> Path:
    """A blank shared image (all zeros: the writer formats it)."""
    path = directory / "shared.img"
    with open(path, "wb") as out:
        out.truncate(32 << 20)
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return make_secret(tmp_path)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


def fleet(hosts: HostSet, image: Path, *, plaintext: bool = True,
          **extra: Any) -> list[InventoryHost]:
    """h1 writer, h2 and h3 readers of one volume, as an operator's inventory says; plaintext
    for the refusals (they are about the role's steps), HTTPS with the TLS material the role
    installs for the module's fleet (:func:`deployed`)."""
    readers = {h.name: f"{h.address}:7480" for h in hosts.hosts[1:]}
    return [InventoryHost(h.name, h.address, str(h.root), {
        "node": h.name, "fleet": "t", "backend": f"file:{image}",
        "listen": f"{h.address}:7480", "advertise": f"{h.address}:7480",
        "role": "writer" if h.name == "h1" else "reader",
        **({"insecure_plaintext": True} if plaintext else {}),
        **({"readers": readers} if h.name == "h1" else {}), **extra}) for h in hosts.hosts]


def installed_config(host: InventoryHost) -> dict[str, Any]:
    """The agent config the role writes for ``host`` of the module's fleet: the inventory's,
    with the files it installed beside it (the host's own key, the TLS material)."""
    etc = Path(host.prefix, "etc/rbdfleet")
    return {**host.config, "secret_file": str(etc / "fleet.secret"),
            "tls": {"cert": str(etc / "agent.crt"), "key": str(etc / "agent.key"),
                    "ca": str(etc / "ca.crt")}}


def changed(run: PlaybookRun) -> dict[str, int]:
    return {name: recap.changed for name, recap in run.recap.items()}


def pid_of(host: InventoryHost) -> int:
    return int(Path(host.prefix, "run/rbdfleet/agent.pid").read_text().split()[0])


def events(host: InventoryHost) -> list[tuple[datetime.datetime, str]]:
    log = Path(host.prefix, "var/log/rbdfleet/agent.log").read_text()
    return [(datetime.datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f"), event)
            for ts, event in _TS.findall(log)]


def make_tls(directory: Path, addresses: list[str]) -> TlsFiles:
    """A CA and one agent certificate for ``addresses`` (IP SANs), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                    signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, agent_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    files = TlsFiles(directory / "agent.crt", directory / "agent.key", directory / "ca.crt")
    assert files.ca is not None
    files.ca.write_bytes(certificate("test ca", ca_key, "test ca", ca_key, True)
                         .public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(certificate("agent", agent_key, "test ca", ca_key, False)
                           .public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(agent_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return files


@dataclass(frozen=True)
class Deployed:
    """The module's fleet, deployed once: what each run of the fixture reported and what the
    fresh hosts held after the ``--check`` on them."""

    hosts: HostSet
    inventory: tuple[InventoryHost, ...]
    runner: AnsibleRunner
    secret: Path
    image: Path
    tls: TlsFiles
    dry: PlaybookRun  # --check on the fresh hosts
    left_by_dry: list[str]  # what existed on the hosts after it
    blank_after_dry: bool  # the image's first 8 KiB still all zeros after it
    first: PlaybookRun
    pids: dict[str, int]  # the agents' after the first run
    again: PlaybookRun  # the second run


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory,
             package: AgentPackage) -> Iterator[Deployed]:
    """``--check`` on three fresh hosts, then the fleet playbook twice, with TLS; the hosts
    are torn down after the module."""
    directory = tmp_path_factory.mktemp("ansible-fleet")
    with host_set(directory, 3) as hosts:
        image, secret = make_image(directory), make_secret(directory)
        tls = make_tls(directory, [h.address for h in hosts.hosts])
        inventory = tuple(fleet(hosts, image, plaintext=False))
        runner = AnsibleRunner(directory / "ansible", ssh_key=hosts.ssh_key,
                               known_hosts=hosts.known_hosts)
        dry = runner.deploy_agents(inventory, package, secret=secret, tls=tls, check=True)
        left = [str(Path(h.prefix, d)) for h in inventory for d in ("opt", "etc", "run", "var")
                if Path(h.prefix, d).exists()]
        blank = not any(image.read_bytes()[:8192])
        first = runner.deploy_agents(inventory, package, secret=secret, tls=tls)
        pids = {h.name: pid_of(h) for h in inventory}
        again = runner.deploy_agents(inventory, package, secret=secret, tls=tls)
        yield Deployed(hosts, inventory, runner, secret, image, tls, dry, left, blank, first,
                       pids, again)


def test_fleet_playbook_formats_orders_converges_and_checks_clean(
        deployed: Deployed, package: AgentPackage) -> None:
    inventory, runner, image = list(deployed.inventory), deployed.runner, deployed.image
    secret, tls = deployed.secret, deployed.tls

    # --check on fresh hosts: clean, and nothing on them or the image changes.
    dry = deployed.dry
    assert all(r.succeeded for r in dry.recap.values()), dry.recap
    assert all(n > 0 for n in changed(dry).values())  # it reports what it would do
    assert deployed.left_by_dry == []
    assert deployed.blank_after_dry

    first = deployed.first
    assert all(r.succeeded and r.changed > 0 for r in first.recap.values()), first.recap
    assert any(image.read_bytes()[:8192])  # formatted by the writer
    assert "ok: [h1]" in first.output  # no_log on secrets:
    assert not any(KEYS.node_key_file(h.name).decode().strip() in first.output for h in inventory)
    for host in inventory:
        root = Path(host.prefix)
        installed = root / "etc/rbdfleet/fleet.secret"
        assert installed.read_bytes() == KEYS.node_key_file(host.name)  # its own key only
        assert stat.S_IMODE(installed.stat().st_mode) == 0o600
        config = json.loads((root / "etc/rbdfleet/agent.json").read_text())
        assert config == installed_config(host)
        assert ("event=serving" in (root / "var/log/rbdfleet/agent.log").read_text())
    # Readers before the writer: both readers served before the writer logged anything.
    served = [t for h in inventory[1:] for t, e in events(h) if e == "serving"]
    assert len(served) == 2 and max(served) < min(t for t, _ in events(inventory[0]))
    pids = deployed.pids

    again = deployed.again
    assert changed(again) == {"h1": 0, "h2": 0, "h3": 0}, again.output[-2000:]
    assert {h.name: pid_of(h) for h in inventory} == pids
    converged = runner.deploy_agents(inventory, package, secret=secret, tls=tls, check=True)
    assert changed(converged) == {"h1": 0, "h2": 0, "h3": 0}, converged.output[-2000:]

    # The SSH deployer reads the same release, config bytes and pidfile: nothing to do.
    targets = [DeployTarget(deployed.hosts.host(h.name), h.prefix, installed_config(h))
               for h in inventory]
    with shell_for(deployed.hosts, connect_timeout=1.0) as shell:
        seen = AgentDeployer(shell, package).deploy(targets)
    assert {n: (r.changed, r.pid) for n, r in seen.items()} == {
        n: (False, pid) for n, pid in pids.items()}

    # A changed config goes through the restart handler: that agent only, a new pid.
    inventory[2] = InventoryHost("h3", inventory[2].address, inventory[2].prefix,
                                 {**inventory[2].config, "log_level": "debug"})
    third = runner.deploy_agents(inventory, package, secret=secret, tls=tls)
    assert third.recap["h3"].changed > 0 and changed(third)["h1"] == 0
    assert changed(third)["h2"] == 0
    assert pid_of(inventory[2]) != pids["h3"]
    assert (pid_of(inventory[0]), pid_of(inventory[1])) == (pids["h1"], pids["h2"])
    assert "Stop the agent with start-stop-daemon for its restart" in third.output


def test_tls_material_is_installed_and_the_agents_serve_https(deployed: Deployed) -> None:
    """Every agent of the fleet with TLS: key 0600, config names the files, the role's health
    check and this one verify the agents against the CA; no key in any output; the second
    run changed nothing."""
    tls = deployed.tls
    assert all(r.succeeded and r.changed > 0 for r in deployed.first.recap.values())
    context = ssl.create_default_context(cafile=str(tls.ca))
    for host in deployed.inventory:
        etc = Path(host.prefix, "etc/rbdfleet")
        assert json.loads((etc / "agent.json").read_text())["tls"] == installed_config(host)["tls"]
        assert (etc / "agent.key").read_bytes() == tls.key.read_bytes()
        assert stat.S_IMODE((etc / "agent.key").stat().st_mode) == 0o600
        with urllib.request.urlopen(f"https://{host.address}:7480/v1/health", timeout=5,
                                    context=context) as resp:
            assert json.loads(resp.read())["node"] == host.name
    for run in (deployed.dry, deployed.first, deployed.again):
        assert "PRIVATE KEY" not in run.output
    assert changed(deployed.again) == {"h1": 0, "h2": 0, "h3": 0}


def test_an_unpinned_host_fails_alone_and_a_bad_agent_fails_its_health_check(
        hosts3: HostSet, package: AgentPackage, secret: Path, image: Path,
        tmp_path: Path) -> None:
    """h2's key is not pinned: h2 fails alone. h3's agent cannot start: its health check
    fails with the agent's own words; the writer is still deployed."""
    inventory = fleet(hosts3, image)
    inventory[2] = InventoryHost("h3", inventory[2].address, inventory[2].prefix,
                                 {**inventory[2].config, "max_body": "lots"})
    pinned = hosts3.known_hosts.read_text().splitlines()
    without_h2 = tmp_path / "known_hosts"
    without_h2.write_text(f"{pinned[0]}\n{pinned[2]}\n")
    runner = AnsibleRunner(tmp_path / "partial", ssh_key=hosts3.ssh_key, known_hosts=without_h2)
    with pytest.raises(DeployError) as info:
        runner.run("deploy-agents.yml", inventory, {
            "rbdfleet_agent_package": str(write_package(package, tmp_path)),
            "rbdfleet_agent_version": package.version,
            "rbdfleet_agent_secret_src": str(secret),
            "rbdfleet_agent_health_retries": 5})
    recap = info.value.results
    assert recap["h1"].succeeded and recap["h1"].changed > 0
    assert recap["h2"].unreachable == 1 and "Host key verification failed" in recap["h2"].error
    assert recap["h3"].failed == 1 and "max_body" in recap["h3"].error, recap["h3"].error
    assert not Path(inventory[1].prefix, "opt").exists()


def test_the_ssh_deployer_keeps_off_an_agent_systemd_runs(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage) -> None:
    """Where the role installed its unit, systemd owns the agent: no second one by SSH."""
    targets = [DeployTarget(h, str(h.root), {"node": h.name}) for h in hosts3.hosts]
    unit = Path(targets[0].layout.unit_path)
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    deployer = AgentDeployer(shell3, package, launch=("-c", "import time; time.sleep(600)"),
                             settle=0.3)
    with pytest.raises(DeployError) as info:
        deployer.deploy(targets)
    results = info.value.results
    assert not results["h1"].ok and "systemd runs it from" in str(results["h1"].error)
    assert results["h2"].ok and results["h3"].ok and results["h2"].pid is not None
    assert not Path(targets[0].prefix, "opt").exists()
    with pytest.raises(DeployError) as stop:
        deployer.stop(targets[:1])
    assert "refusing to stop" in str(stop.value.results["h1"].error)


def test_the_role_refuses_systemd_next_to_an_agent_rbdfleet_deploy_started(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage, secret: Path,
        tmp_path: Path) -> None:
    """validate.yml on a host taken for a systemd host (the override; nothing is started by
    systemd here) where the SSH deployer's agent runs: refused, naming the pidfile."""
    host = hosts3.hosts[0]
    target = DeployTarget(host, str(host.root), {"node": host.name})
    AgentDeployer(shell3, package, launch=("-c", "import time; time.sleep(600)"),
                  settle=0.3).deploy([target])
    runner = AnsibleRunner(tmp_path / "validate", ssh_key=hosts3.ssh_key,
                           known_hosts=hosts3.known_hosts)
    with pytest.raises(DeployError) as info:
        runner.run("validate.yml", [InventoryHost(host.name, host.address, str(host.root),
                                                  {"node": host.name})], {
            "rbdfleet_agent_package": str(write_package(package, tmp_path)),
            "rbdfleet_agent_version": package.version,
            "rbdfleet_agent_secret_src": str(secret),
            "rbdfleet_agent_systemd": True})
    assert "started by `rbdfleet deploy` runs here" in str(info.value.results["h1"].error)
