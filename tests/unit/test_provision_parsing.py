"""Pure helpers of provisioning: mon_host parsing, mon session parsing, watcher → VM mapping."""

from __future__ import annotations

import pytest

from orchestrator.adapters.ceph import client_addresses, parse_sessions
from orchestrator.errors import ConfigError
from orchestrator.ports import ClientSession, MonHost, SecretKey, Watcher
from orchestrator.provision import parse_mon_host

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:13300", (MonHost("127.0.0.1", 13300),)),
    ("[v2:127.0.0.1:13300,v1:127.0.0.1:13301]", (MonHost("127.0.0.1", 13300),)),
    ("10.0.0.1:3300,10.0.0.2:3300", (MonHost("10.0.0.1", 3300), MonHost("10.0.0.2", 3300))),
    ("[v2:10.0.0.1:3300,v1:10.0.0.1:6789] [v2:10.0.0.2:3300,v1:10.0.0.2:6789]",
     (MonHost("10.0.0.1", 3300), MonHost("10.0.0.2", 3300))),
])
def test_parse_mon_host(value: str, expected: tuple[MonHost, ...]) -> None:
    assert parse_mon_host(value) == expected


@pytest.mark.parametrize("value", ["", "host-without-port", "h:port"])
def test_parse_mon_host_refuses_garbage(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_mon_host(value)
    assert err.value.key == "ceph.mon_host"


# Shape of `sessions` from a 16.2.15 mon (trimmed), as seen on the sandbox cluster.
SESSIONS = [
    {"name": "mon.0", "entity_name": "", "con_type": "mon", "global_id": 0,
     "addrs": {"addrvec": [{"type": "v2", "addr": "127.0.0.1:13910", "nonce": 0}]}},
    {"name": "osd.0", "entity_name": "osd.0", "con_type": "osd", "global_id": 4100,
     "addrs": {"addrvec": [{"type": "v2", "addr": "127.0.0.1:6800", "nonce": 17247}]}},
    {"name": "client.?", "entity_name": "client.admin", "con_type": "client", "global_id": 4106,
     "addrs": {"addrvec": [{"type": "any", "addr": "127.0.0.1:0", "nonce": 569929099}]}},
    {"name": "client.4112", "entity_name": "client.rbdfleet-demo-vm1", "con_type": "client",
     "global_id": 4112,
     "addrs": {"addrvec": [{"type": "any", "addr": "127.0.0.1:0", "nonce": 2428668946}]}},
]


def test_sessions_keep_clients_only() -> None:
    assert parse_sessions(SESSIONS) == [
        ClientSession(4106, "client.admin", "127.0.0.1:0/569929099"),
        ClientSession(4112, "client.rbdfleet-demo-vm1", "127.0.0.1:0/2428668946"),
    ]


def test_client_addresses_are_exactly_the_vms_watchers() -> None:
    sessions = [*parse_sessions(SESSIONS),
                ClientSession(4200, "client.rbdfleet-demo-vm2", "127.0.0.1:0/7")]
    watchers = [Watcher("127.0.0.1:0/2428668946", 4112), Watcher("127.0.0.1:0/7", 4200),
                Watcher("127.0.0.1:0/8", 4300)]
    assert client_addresses(watchers, sessions, "rbdfleet-demo-vm1") == ["127.0.0.1:0/2428668946"]
    assert client_addresses(watchers, sessions, "rbdfleet-demo-vm3") == []


def test_secret_key_never_shows_its_value() -> None:
    key = SecretKey(b"very-secret-bytes")
    assert "very" not in repr(key) and "very" not in str(key) and "very" not in f"{key}"
    assert key.reveal() == b"very-secret-bytes" and key == SecretKey(b"very-secret-bytes")
