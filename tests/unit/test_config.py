"""orchestrator.config: load + RBDFLEET_* overrides + validate, one clear ConfigError each."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest

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
           "RBDFLEET_FLEET_WRITER": "vm2", "UNRELATED": "x",
           # not key overrides: read elsewhere, and never a [sandbox] table
           "RBDFLEET_CONFIG": "/c.toml", "RBDFLEET_SANDBOX_DIR": "/sb"}
    cfg = config.from_mapping(BASE, env)
    assert cfg.ceph.pool == "volumes" and cfg.ceph.create_pool is True
    assert cfg.fleet.size == 2 << 30 and cfg.fleet.agent_port == 9000
    assert cfg.fleet.writer == "vm2" and cfg.sandbox is None
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
    ({"fleet__size": "0MiB"}, "fleet.size", "more than 0 bytes"),
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


# (parsed TOML, environment, key the error names, its reason)
UNKNOWN_NAMES: list[tuple[dict[str, Any], dict[str, str], str, str]] = [
    (data(ceph__create_pol=True), {}, "ceph.create_pol",
     "unknown key (did you mean ceph.create_pool?)"),
    ({**BASE, "cephh": {"pool": "rbd"}}, {}, "cephh", "unknown table (did you mean [ceph]?)"),
    ({**BASE, "vm": [*BASE["vm"], {"name": "vm4", "domian": "d4", "address": "10.0.0.4"}]}, {},
     "vm[3].domian", "unknown key (did you mean vm[3].domain?)"),
    ({**BASE, "coordinator": {"lease_second": 2.0}}, {}, "coordinator.lease_second",
     "unknown key (did you mean coordinator.lease_seconds?)"),
    (BASE, {"RBDFLEET_CEPH_POLL": "volumes"}, "RBDFLEET_CEPH_POLL",
     "unknown environment variable (did you mean RBDFLEET_CEPH_POOL?)"),
    (BASE, {"RBDFLEET_SANDBOX_DIRR": "/x"}, "RBDFLEET_SANDBOX_DIRR",
     "unknown environment variable (did you mean RBDFLEET_SANDBOX_DIR?)"),
    (BASE, {"RBDFLEET_COORDINATOR_URL": "http://x"}, "RBDFLEET_COORDINATOR_URL",
     "unknown environment variable (did you mean RBDFLEET_COORDINATOR_URLS?)"),
]


@pytest.mark.parametrize(("parsed", "env", "key", "reason"), UNKNOWN_NAMES)
def test_unknown_names_are_refused_with_a_suggestion(
    parsed: dict[str, Any], env: dict[str, str], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_mapping(parsed, env)
    assert (err.value.key, err.value.reason) == (key, reason)


def test_unknown_name_without_a_close_match_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError,
                       match=r"unknown table \(known: \[agents\], \[ceph\], \[coordinator\]"):
        config.from_mapping({**BASE, "zzz": {}})


def test_a_typo_in_the_file_is_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "rbdfleet.toml"
    path.write_text('[ceph]\nconf = "/c"\nkeyring = "/k"\ncreate_pol = true\n')
    with pytest.raises(ConfigError, match=r"did you mean ceph.create_pool\?"):
        config.load(path, env={})


def test_coordinator_keys_are_the_coordinator_config_fields() -> None:
    from orchestrator.coordinator.config import CoordinatorConfig

    assert {f.name for f in dataclasses.fields(CoordinatorConfig)} == config.COORDINATOR_KEYS


def test_coordinator_table_reader_refuses_typos_too(tmp_path: Path) -> None:
    from orchestrator.coordinator.config import coordinator_config

    path = tmp_path / "rbdfleet.toml"
    path.write_text("[coordinator]\nprobe_intervall = 0.5\n")
    with pytest.raises(ConfigError, match=r"did you mean coordinator.probe_interval\?"):
        coordinator_config(path, env={})
    path.write_text("[coordinator]\nprobe_interval = 0.5\n")
    with pytest.raises(ConfigError, match=r"did you mean RBDFLEET_COORDINATOR_DEAD_AFTER\?"):
        coordinator_config(path, env={"RBDFLEET_COORDINATOR_DEAD_AFTR": "2"})
    cfg = coordinator_config(path, env={"RBDFLEET_COORDINATOR_DEAD_AFTER": "2"})
    assert (cfg.probe_interval, cfg.dead_after) == (0.5, 2.0)


def test_agent_timings_are_the_agents_own_timing_settings() -> None:
    from agents.daemon import AgentConfig

    agent_fields = {f.name: f.type for f in dataclasses.fields(AgentConfig)}
    assert all(agent_fields[key] == "float" for key in config.TABLES["agents"])


def test_agent_timings_set_are_passed_on_and_others_left_to_the_agent() -> None:
    cfg = config.from_mapping({**BASE, "agents": {"idle_checkpoint": 1, "ack_timeout": 2.5}},
                              {"RBDFLEET_AGENTS_TAIL_INTERVAL": "0.25"})
    assert cfg.agents.settings() == {"idle_checkpoint": 1.0, "ack_timeout": 2.5,
                                     "tail_interval": 0.25}
    assert config.from_mapping(BASE).agents.settings() == {}


@pytest.mark.parametrize("value", [0, -1, "soon", True, float("nan"), float("inf"), [1]])
def test_an_agent_timing_that_is_not_a_positive_number_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"agents\.idle_checkpoint: expected a positive number"):
        config.from_mapping({**BASE, "agents": {"idle_checkpoint": value}})


def test_an_unknown_agent_timing_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"did you mean agents\.idle_checkpoint\?"):
        config.from_mapping({**BASE, "agents": {"idle_checkpoints": 1.0}})
