"""`rbdfleet cert rotate|revoke|rotate-ca` through typer's CliRunner: what changes in the PKI
directory and which files go to which VM, in which order, over a fake of the rollout (its
targets and the deployer's put_files)."""

from __future__ import annotations

import contextlib
import datetime
import json
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli import certs
from orchestrator.cli.app import app
from orchestrator.errors import RemoteError
from orchestrator.pki import FleetPki, inspect
from orchestrator.rollout import GUEST_TLS

pytestmark = pytest.mark.unit

RUNNER = CliRunner()
NOW = datetime.datetime.now(datetime.UTC)
GUEST_CRL = "/etc/rbdfleet/crl.pem"


class FakeRollout:
    """The VMs as targets; each put_files call recorded (vm, [(path, mode, bytes)])."""

    def __init__(self, vms: list[str], unreachable: frozenset[str] = frozenset()) -> None:
        self.vms = vms
        self.unreachable = unreachable
        self.puts: list[tuple[str, list[tuple[str, int, bytes]]]] = []
        self.deployer = self

    def targets(self) -> list[Any]:
        return [types.SimpleNamespace(host=types.SimpleNamespace(name=vm)) for vm in self.vms]

    def put_files(self, target: Any, files: list[tuple[bytes, str, int]]) -> None:
        if target.host.name in self.unreachable:
            raise RemoteError(target.host.name, "unreachable")
        self.puts.append((target.host.name, [(path, mode, data) for data, path, mode in files]))


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, FleetPki, FakeRollout]:
    config = tmp_path / "rbdfleet.toml"
    config.write_text(f"""\
[ceph]
conf = "/etc/ceph/ceph.conf"
keyring = "/etc/ceph/keyring"
[ssh]
key = "/k/id"
known_hosts = "/k/known_hosts"
[fleet]
name = "demo"
image = "rbdfleet-demo"
size = "1GiB"
writer = "vm1"
secret_file = "/k/fleet.secret"
[tls]
dir = "{tmp_path / 'tls'}"
[[vm]]
name = "vm1"
domain = "d1"
address = "10.0.0.1"
[[vm]]
name = "vm2"
domain = "d2"
address = "10.0.0.2"
""")
    pki = FleetPki(tmp_path / "tls", "demo")
    pki.ensure_ca(NOW)
    for vm, address in (("vm1", "10.0.0.1"), ("vm2", "10.0.0.2")):
        pki.ensure(vm, [address], NOW)
    rollout = FakeRollout(["vm1", "vm2"])

    @contextlib.contextmanager
    def open_rollout(path: Path, *, progress: Callable[[str], None]) -> Iterator[FakeRollout]:
        assert path == config
        yield rollout

    monkeypatch.setattr(certs, "open_rollout", open_rollout)
    return config, pki, rollout


def _run(config: Path, *args: str) -> Any:
    return RUNNER.invoke(app, ["cert", *args, "--config", str(config), "--json"])


def test_rotate_issues_new_certificates_and_installs_trust_everywhere_then_identities(
        fleet: tuple[Path, FleetPki, FakeRollout]) -> None:
    config, pki, rollout = fleet
    old = inspect(pki.cert_file("vm1").read_bytes())
    result = _run(config, "rotate", "--node", "vm1")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    new = inspect(pki.cert_file("vm1").read_bytes())
    assert answer["installed"] == ["vm1"] and answer["issued"][0]["serial"] == f"{new.serial:x}"
    assert new.serial != old.serial and "10.0.0.1" in new.sans
    trust = [(GUEST_TLS["ca"], 0o644, pki.ca_file.read_bytes()),
             (GUEST_CRL, 0o644, pki.crl_file.read_bytes())]
    assert rollout.puts == [
        ("vm1", trust), ("vm2", trust),  # every node trusts what the new certificate needs
        ("vm1", [(GUEST_TLS["key"], 0o600, pki.key_file("vm1").read_bytes()),  # key first
                 (GUEST_TLS["cert"], 0o644, pki.cert_file("vm1").read_bytes())])]
    # the coordinator's certificate is reissued in the directory, nothing to install
    rollout.puts.clear()
    result = _run(config, "rotate", "--node", "coordinator")
    assert result.exit_code == 0 and rollout.puts == [], result.output
    assert inspect(pki.cert_file("coordinator").read_bytes()).name == "coordinator"


def test_revoke_puts_the_serial_in_the_crl_and_installs_it_on_every_vm(
        fleet: tuple[Path, FleetPki, FakeRollout]) -> None:
    config, pki, rollout = fleet
    serial = inspect(pki.cert_file("vm2").read_bytes()).serial
    result = _run(config, "revoke", "vm2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["revoked"]["serial"] == f"{serial:x}"
    assert set(pki.revoked()) == {serial} and not pki.cert_file("vm2").exists()
    assert [vm for vm, _ in rollout.puts] == ["vm1", "vm2"]
    assert all(files[1] == (GUEST_CRL, 0o644, pki.crl_file.read_bytes())
               for _, files in rollout.puts)
    again = _run(config, "revoke", "vm2")  # nothing left to revoke
    assert again.exit_code != 0 and "cannot read" in again.output


def test_a_ca_rotation_in_three_commands(fleet: tuple[Path, FleetPki, FakeRollout]) -> None:
    config, pki, rollout = fleet
    begun = _run(config, "rotate-ca")
    assert begun.exit_code == 0 and pki.rotating_ca(), begun.output
    assert pki.ca_file.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    assert [vm for vm, _ in rollout.puts] == ["vm1", "vm2"]
    new_ca = json.loads(begun.stdout)["ca"]
    assert _run(config, "rotate", "--all").exit_code == 0
    for vm in ("vm1", "vm2", "coordinator"):  # each now of the new CA: nothing to reissue
        # now, not NOW: the CLI issued them at the real time, which in a full run is long
        # after this module was imported (a certificate is not valid before it was issued)
        assert not pki.ensure(vm, [], datetime.datetime.now(datetime.UTC))
    finished = _run(config, "rotate-ca", "--finish")
    assert finished.exit_code == 0, finished.output
    assert not pki.rotating_ca() and inspect(pki.ca_file.read_bytes()).name == new_ca
    assert rollout.puts[-1][1][0] == (GUEST_TLS["ca"], 0o644, pki.ca_file.read_bytes())


def test_bad_selections_and_unreachable_vms_are_errors(
        fleet: tuple[Path, FleetPki, FakeRollout]) -> None:
    config, _, rollout = fleet
    assert _run(config, "rotate").exit_code == 2  # neither --node nor --all
    unknown = _run(config, "rotate", "--node", "vm9")
    assert unknown.exit_code == 2 and "vm9" in unknown.output
    assert _run(config, "revoke", "vm9").exit_code == 2
    rollout.unreachable = frozenset({"vm2"})
    failed = _run(config, "revoke", "vm1")
    assert failed.exit_code == 7 and "vm2" in failed.output  # DeployError naming the VM
    assert [vm for vm, _ in rollout.puts] == ["vm1"]  # the others are done
