"""Hypervisor URIs: what the config accepts (``config.check_uri``), what the libvirt adapter
opens (``non_interactive``) and how it names a URI in a message (``display_uri``)."""

from __future__ import annotations

import pytest

from orchestrator.adapters.libvirt import non_interactive
from orchestrator.config import check_uri, display_uri
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit

KEY = "keyfile=/etc/rbdfleet/hv_key"


@pytest.mark.parametrize("uri", [
    "qemu:///system",
    "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
    "qemu+ssh://root@hv1.example/system",
    f"qemu+ssh://root@hv1.example:2222/system?{KEY}&no_tty=1",
    f"qemu+libssh://root@hv1.example/system?{KEY}&known_hosts=/etc/rbdfleet/hv_known_hosts"
    "&known_hosts_verify=normal&sshauth=privkey",
    "qemu+libssh2://root@[2001:db8::1]:22/system",
    "qemu://hv1.example/system",  # tls
    "qemu+tcp://127.0.0.1:1/system",
])
def test_accepted_uris(uri: str) -> None:
    check_uri("vm[0].uri", uri)


@pytest.mark.parametrize(("uri", "reason"), [
    ("hv1.example", "not a libvirt URI"),
    ("qemu+telnet://hv1/system", "unknown transport 'telnet'"),
    ("qemu+ssh:///system", "names its host"),
    ("qemu+ssh://root@hv1/system?known_hosts=/etc/kh", "qemu+ssh ignores known_hosts"),
    ("qemu+ssh://root@hv1/system?sshauth=privkey", "qemu+ssh ignores sshauth"),
    ("qemu+ssh://root@hv1/system?no_verify=1", "no_verify accepts any new host key"),
    ("qemu+libssh://root@hv1/system?known_hosts_verify=auto", "known_hosts_verify=auto"),
    ("qemu+libssh://root@hv1/system?known_hosts_verify=ignore", "known_hosts_verify=ignore"),
    ("qemu+ssh://root@hv1/system?keyfile=hv_key", "keyfile must be an absolute path"),
    ("qemu+libssh://root@hv1/system?known_hosts=kh", "known_hosts must be an absolute path"),
    ("qemu+ssh://root@hv1:port/system", "port is not a number"),
])
def test_refused_uris_name_the_key_and_the_reason(uri: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=r"vm\[2\]\.uri") as err:
        check_uri("vm[2].uri", uri)
    assert reason in str(err.value), err.value


def test_a_password_is_refused_and_never_shown() -> None:
    with pytest.raises(ConfigError, match="no password") as err:
        check_uri("libvirt.uri", "qemu+ssh://root:hunter2@hv1/system")
    assert "hunter2" not in str(err.value)


def test_display_drops_the_query_and_any_password() -> None:
    assert display_uri(f"qemu+ssh://root:pw@hv1.example:2222/system?{KEY}&no_tty=1") == \
        "qemu+ssh://root@hv1.example:2222/system"
    assert display_uri("qemu:///system") == "qemu:///system"
    assert display_uri("qemu+libssh2://[2001:db8::1]:22/system?x=1") == \
        "qemu+libssh2://[2001:db8::1]:22/system"


def test_ssh_uris_are_opened_non_interactive_unless_they_say_otherwise() -> None:
    assert non_interactive("qemu+ssh://root@hv1/system") == \
        "qemu+ssh://root@hv1/system?no_tty=1"
    assert non_interactive(f"qemu+ssh://root@hv1/system?{KEY}") == \
        f"qemu+ssh://root@hv1/system?{KEY}&no_tty=1"
    for unchanged in ("qemu+ssh://root@hv1/system?no_tty=0", "qemu:///system",
                      "qemu+libssh://root@hv1/system?sshauth=privkey"):
        assert non_interactive(unchanged) == unchanged
