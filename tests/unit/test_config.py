"""orchestrator.config: load + RBDFLEET_* overrides + validate, one clear ConfigError each."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import config
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "ceph": {"conf": "/etc/ceph/ceph.conf", "keyring": "/etc/ceph/keyring", "pool": "rbd"},
    "libvirt": {"uri": "qemu:///system"},
    "ssh": {"key": "/k/id", "known_hosts": "/k/known_hosts"},
    "fleet": {"name": "demo", "image": "rbdfleet-demo", "size": "1GiB", "writer": "vm1",
              "secret_file": "/k/fleet.secret"},
    "vm": [
        {"name": "vm1", "domain": "d1", "address": "10.0.0.1"},
        {"name": "vm2", "domain": "d2", "address": "10.0.0.2", "uri": "qemu+ssh://h2/system"},
        {"name": "vm3", "domain": "d3", "address": "10.0.0.3", "spare": True},
    ],
}


def data(**changes: Any) -> dict[str, Any]:
    """BASE with ``section__key=value`` changes (value None deletes the key)."""
    result = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if value is None:
            result[section].pop(key, None)
        else:
            result[section][key] = value
    return result


def test_load_file_defaults_and_uri_fallback(tmp_path: Path) -> None:
    path = tmp_path / "rbdfleet.toml"
    path.write_text(
        '[ceph]\nconf = "/c/ceph.conf"\nkeyring = "/c/keyring"\n'
        '[ssh]\nkey = "/k"\nknown_hosts = "/kh"\n'
        '[fleet]\nname = "demo"\nimage = "img"\nsize = "64MiB"\nwriter = "vm1"\n'
        'secret_file = "/s"\n'
        '[[vm]]\nname = "vm1"\ndomain = "d1"\naddress = "10.0.0.1"\n'
    )
    cfg = config.load(path, env={})
    assert cfg.source == path
    assert cfg.ceph.user == "admin" and cfg.ceph.pool == "rbd" and not cfg.ceph.create_pool
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.vms[0].uri == "qemu:///system"
    assert cfg.fleet.size == 64 << 20 and cfg.fleet.agent_port == 7480


def test_env_overrides_are_typed() -> None:
    env = {"RBDFLEET_CEPH_POOL": "volumes", "RBDFLEET_CEPH_CREATE_POOL": "true",
           "RBDFLEET_FLEET_SIZE": "2GiB", "RBDFLEET_FLEET_AGENT_PORT": "9000",
           "RBDFLEET_FLEET_WRITER": "vm2", "UNRELATED": "x", "RBDFLEET_NOPE_X": "y"}
    cfg = config.from_mapping(BASE, env)
    assert cfg.ceph.pool == "volumes" and cfg.ceph.create_pool is True
    assert cfg.fleet.size == 2 << 30 and cfg.fleet.agent_port == 9000
    assert cfg.fleet.writer == "vm2"
    assert cfg.vm("vm2").uri == "qemu+ssh://h2/system"
    assert [v.name for v in cfg.active_vms] == ["vm1", "vm2"]


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path / "absent.toml", env={})
    assert err.value.key == "path"
    bad = tmp_path / "bad.toml"
    bad.write_text("[ceph\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad, env={})


# (changes, key the error must name, part of the reason)
BAD_INPUTS: list[tuple[dict[str, Any], str, str]] = [
    ({"fleet__writer": ["vm1", "vm2"]}, "fleet.writer", "two writers"),
    ({"fleet__writer": "vm9"}, "fleet.writer", "not a VM"),
    ({"fleet__writer": "vm3"}, "fleet.writer", "spare"),
    ({"fleet__size": "1GB"}, "fleet.size", "unknown unit"),
    ({"fleet__size": "0MiB"}, "fleet.size", "positive multiple"),
    ({"fleet__size": "4097"}, "fleet.size", "multiple of 4 KiB"),
    ({"fleet__size": "big"}, "fleet.size", "expected a size"),
    ({"fleet__size": None}, "fleet.size", "missing"),
    ({"fleet__name": "bad name"}, "fleet.name", "letters"),
    ({"fleet__agent_port": 70000}, "fleet.agent_port", "not a TCP port"),
    ({"fleet__agent_port": "x"}, "fleet.agent_port", "integer"),
    ({"ceph__conf": "relative/ceph.conf"}, "ceph.conf", "absolute"),
    ({"ceph__keyring": None}, "ceph.keyring", "missing"),
    ({"ceph__create_pool": "maybe"}, "ceph.create_pool", "true or false"),
    ({"ssh__key": None}, "ssh.key", "required"),
]


@pytest.mark.parametrize(("changes", "key", "reason"), BAD_INPUTS)
def test_bad_input_names_the_key(changes: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_mapping(data(**changes))
    assert err.value.key == key
    assert reason in err.value.reason


def test_duplicates_are_refused() -> None:
    dup = copy.deepcopy(BASE)
    dup["vm"].append({"name": "vm1", "domain": "d9", "address": "10.0.0.9"})
    with pytest.raises(ConfigError, match="appears twice") as err:
        config.from_mapping(dup)
    assert err.value.key == "vm[3].name"
    same_domain = copy.deepcopy(BASE)
    same_domain["vm"].append({"name": "vm4", "domain": "d1", "address": "10.0.0.4"})
    with pytest.raises(ConfigError, match="d1"):
        config.from_mapping(same_domain)


def test_ceph_only_config_has_no_writer() -> None:
    ceph_only = {"ceph": BASE["ceph"], "fleet": {**BASE["fleet"], "writer": ""}}
    cfg = config.from_mapping(ceph_only)
    assert cfg.vms == () and cfg.fleet.writer == ""
    with pytest.raises(ConfigError, match="not a VM"):
        config.from_mapping({**ceph_only, "fleet": BASE["fleet"]})


def test_unknown_vm_lookup() -> None:
    with pytest.raises(ConfigError, match="no VM named 'vm7'"):
        config.from_mapping(BASE).vm("vm7")


@given(st.integers(min_value=1, max_value=1 << 44))
def test_size_format_round_trip(size: int) -> None:
    assert config.parse_size(config.format_size(size)) == size


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from(list(config.SIZE_UNITS)))
def test_parse_size_units(number: int, unit: str) -> None:
    assert config.parse_size(f"{number}{unit}") == number * config.SIZE_UNITS[unit]
    assert config.parse_size(f"{number} {unit}") == number * config.SIZE_UNITS[unit]
