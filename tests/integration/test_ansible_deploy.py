"""The Ansible path for real: ansible-playbook deploys the real agent to namespace hosts.

The three hosts share one blank image file the way VMs share the RBD image: h1 is the writer,
h2 and h3 are readers. ansible-playbook runs take ~10-20 s each (more under load).
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

pytestmark = pytest.mark.integration

MASTER = b"ansible-test-master-" + b"s" * 44  # never leaves the controller
KEYS = FleetKeys("t", (MASTER,), time.time)
_TS = re.compile(r"^ts=(\S+ \S+) .*event=(\w+)", re.MULTILINE)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """Each host's own key in ``keys/<host>.key``; the returned path names it per host, as
    ``rbdfleet inventory`` does (Ansible templates ``inventory_hostname``)."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    for host in ("h1", "h2", "h3"):
        path = keys / f"{host}.key"
        path.write_bytes(KEYS.node_key_file(host))
        path.chmod(0o600)
    return keys / "{{ inventory_hostname }}.key"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "shared.img"
    with open(path, "wb") as out:
        out.truncate(32 << 20)  # all zeros: blank, the writer formats it
    return path


def fleet(hosts: HostSet, image: Path, **extra: Any) -> list[InventoryHost]:
    """h1 writer, h2 and h3 readers of one volume, as an operator's inventory says; plaintext
    on purpose (these tests are about the role's steps; TLS: the test with ``make_tls``)."""
    readers = {h.name: f"{h.address}:7480" for h in hosts.hosts[1:]}
    return [InventoryHost(h.name, h.address, str(h.root), {
        "node": h.name, "fleet": "t", "backend": f"file:{image}",
        "listen": f"{h.address}:7480", "advertise": f"{h.address}:7480",
        "role": "writer" if h.name == "h1" else "reader",
        "insecure_plaintext": True,
        **({"readers": readers} if h.name == "h1" else {}), **extra}) for h in hosts.hosts]


def changed(run: PlaybookRun) -> dict[str, int]:
    return {name: recap.changed for name, recap in run.recap.items()}


def pid_of(host: InventoryHost) -> int:
    return int(Path(host.prefix, "run/rbdfleet/agent.pid").read_text().split()[0])


def events(host: InventoryHost) -> list[tuple[datetime.datetime, str]]:
    log = Path(host.prefix, "var/log/rbdfleet/agent.log").read_text()
    return [(datetime.datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f"), event)
            for ts, event in _TS.findall(log)]


def test_fleet_playbook_formats_orders_converges_and_checks_clean(
        hosts3: HostSet, shell3: ParamikoShell, package: AgentPackage, secret: Path,
        image: Path, tmp_path: Path) -> None:
    inventory = fleet(hosts3, image)
    runner = AnsibleRunner(tmp_path / "ansible", ssh_key=hosts3.ssh_key,
                           known_hosts=hosts3.known_hosts)

    # --check on fresh hosts: clean, and nothing on them or the image changes.
    dry = runner.deploy_agents(inventory, package, secret=secret, check=True)
    assert all(r.succeeded for r in dry.recap.values()), dry.recap
    assert all(n > 0 for n in changed(dry).values())  # it reports what it would do
    assert not any(Path(h.prefix).joinpath(d).exists() for h in inventory
                   for d in ("opt", "etc", "run", "var"))
    assert not any(image.read_bytes()[:8192])

    first = runner.deploy_agents(inventory, package, secret=secret)
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
        assert config == {**host.config, "secret_file": str(installed)}
        assert ("event=serving" in (root / "var/log/rbdfleet/agent.log").read_text())
    # Readers before the writer: both readers served before the writer logged anything.
    served = [t for h in inventory[1:] for t, e in events(h) if e == "serving"]
    assert len(served) == 2 and max(served) < min(t for t, _ in events(inventory[0]))
    pids = {h.name: pid_of(h) for h in inventory}

    again = runner.deploy_agents(inventory, package, secret=secret)
    assert changed(again) == {"h1": 0, "h2": 0, "h3": 0}, again.output[-2000:]
    assert {h.name: pid_of(h) for h in inventory} == pids
    converged = runner.deploy_agents(inventory, package, secret=secret, check=True)
    assert changed(converged) == {"h1": 0, "h2": 0, "h3": 0}, converged.output[-2000:]

    # The SSH deployer reads the same release, config bytes and pidfile: nothing to do.
    targets = [DeployTarget(hosts3.host(h.name), h.prefix,
                            {**h.config, "secret_file": f"{h.prefix}/etc/rbdfleet/fleet.secret"})
               for h in inventory]
    seen = AgentDeployer(shell3, package).deploy(targets)
    assert {n: (r.changed, r.pid) for n, r in seen.items()} == {
        n: (False, pid) for n, pid in pids.items()}

    # A changed config goes through the restart handler: that agent only, a new pid.
    inventory[2] = InventoryHost("h3", inventory[2].address, inventory[2].prefix,
                                 {**inventory[2].config, "log_level": "debug"})
    third = runner.deploy_agents(inventory, package, secret=secret)
    assert third.recap["h3"].changed > 0 and changed(third)["h1"] == 0
    assert changed(third)["h2"] == 0
    assert pid_of(inventory[2]) != pids["h3"]
    assert (pid_of(inventory[0]), pid_of(inventory[1])) == (pids["h1"], pids["h2"])
    assert "Stop the agent with start-stop-daemon for its restart" in third.output


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


def test_tls_material_is_installed_and_the_agent_serves_https(
        hosts3: HostSet, package: AgentPackage, secret: Path, image: Path,
        tmp_path: Path) -> None:
    """The writer alone, with TLS: key 0600, config names the files, the role's health check
    and this one verify the agent against the CA."""
    writer = fleet(hosts3, image)[0]
    writer = InventoryHost(writer.name, writer.address, writer.prefix,
                           {k: v for k, v in writer.config.items()
                            if k not in ("readers", "insecure_plaintext")})
    tls = make_tls(tmp_path, [writer.address])
    runner = AnsibleRunner(tmp_path / "ansible", ssh_key=hosts3.ssh_key,
                           known_hosts=hosts3.known_hosts)
    run = runner.deploy_agents([writer], package, secret=secret, tls=tls)
    assert run.recap["h1"].succeeded and run.recap["h1"].changed > 0
    etc = Path(writer.prefix, "etc/rbdfleet")
    assert json.loads((etc / "agent.json").read_text())["tls"] == {
        "cert": str(etc / "agent.crt"), "key": str(etc / "agent.key"), "ca": str(etc / "ca.crt")}
    assert (etc / "agent.key").read_bytes() == tls.key.read_bytes()
    assert stat.S_IMODE((etc / "agent.key").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in run.output.encode()
    context = ssl.create_default_context(cafile=str(tls.ca))
    with urllib.request.urlopen(f"https://{writer.address}:7480/v1/health", timeout=5,
                                context=context) as resp:
        assert json.loads(resp.read())["node"] == "h1"
    again = runner.deploy_agents([writer], package, secret=secret, tls=tls)
    assert changed(again) == {"h1": 0}


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
