"""ParamikoShell against real sshd in namespace hosts: pinned keys, faults, atomic files."""

from __future__ import annotations

import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.adapters.ssh import ParamikoShell, require_local_target
from orchestrator.core.remote import Executable, RemoteCommand
from orchestrator.errors import (
    HostKeyMismatch,
    HostUnreachable,
    RemoteCommandFailed,
    UnsafeTarget,
)
from orchestrator.sandbox.hosts import HostSet
from tests.fixtures.hosts import host_set, shell_for

pytestmark = pytest.mark.integration

HOSTNAME = RemoteCommand(Executable.HOSTNAME)


def accepted_logins(hosts: HostSet, name: str) -> int:
    return (hosts.dir / name / "sshd.log").read_text().count("Accepted publickey")


def test_every_host_answers_with_its_own_name_over_pinned_keys(hosts5: HostSet) -> None:
    with shell_for(hosts5) as shell, ThreadPoolExecutor(len(hosts5.hosts)) as pool:
        script = RemoteCommand(Executable.SH, ["-c", 'echo "$(hostname) $TESTHOST_ROOT"'])
        results = list(pool.map(lambda h: shell.run(h, script, check=True), hosts5.hosts))
    for host, result in zip(hosts5.hosts, results, strict=True):
        assert result.stdout.split() == [host.name, str(host.root)]


def test_one_connection_per_host_is_reused(hosts3: HostSet, shell3: ParamikoShell) -> None:
    before = accepted_logins(hosts3, "h1")
    for _ in range(3):
        assert shell3.run(hosts3.host("h1"), HOSTNAME).stdout == "h1\n"
    assert accepted_logins(hosts3, "h1") == before + 1


def test_exit_status_output_and_stdin_come_back(hosts3: HostSet, shell3: ParamikoShell) -> None:
    h1 = hosts3.host("h1")
    failed = shell3.run(h1, RemoteCommand(Executable.SH, ["-c", "echo out; echo err >&2; exit 3"]))
    assert (failed.rc, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
    with pytest.raises(RemoteCommandFailed) as info:
        shell3.run(h1, RemoteCommand(Executable.TEST, ["-e", "/nonexistent/x"]), check=True)
    assert info.value.rc == 1 and info.value.host == "h1"
    echoed = shell3.run(h1, RemoteCommand(Executable.CAT), stdin=b"x" * 300_000)
    assert echoed.stdout == "x" * 300_000
    suicide = RemoteCommand(Executable.PYTHON3, ["-c", "import os; os.kill(os.getpid(), 9)"])
    assert shell3.run(h1, suicide).rc == -1  # a signal death is the command's, not the link's
    with pytest.raises(RemoteCommandFailed, match="killed by a signal"):
        shell3.run(h1, suicide, check=True)


def test_a_changed_host_key_is_refused(hosts3: HostSet, tmp_path: Path) -> None:
    lines = hosts3.known_hosts.read_text().splitlines()
    h1_address = hosts3.host("h1").address
    h2_key = lines[1].split(" ", 1)[1]
    swapped = tmp_path / "known_hosts"
    swapped.write_text(f"{h1_address} {h2_key}\n")
    with shell_for(hosts3, known_hosts=swapped) as shell, \
            pytest.raises(HostKeyMismatch, match="differs from the pinned"):
        shell.run(hosts3.host("h1"), HOSTNAME)


def test_a_host_without_a_pinned_key_is_refused_before_connecting(
        hosts3: HostSet, tmp_path: Path) -> None:
    only_h1 = tmp_path / "known_hosts"
    only_h1.write_text(hosts3.known_hosts.read_text().splitlines()[0] + "\n")
    before = (hosts3.dir / "h2" / "sshd.log").read_text()
    with shell_for(hosts3, known_hosts=only_h1) as shell:
        assert shell.run(hosts3.host("h1"), HOSTNAME).stdout == "h1\n"
        with pytest.raises(HostKeyMismatch, match="no pinned host key"):
            shell.run(hosts3.host("h2"), HOSTNAME)
    assert (hosts3.dir / "h2" / "sshd.log").read_text() == before  # no connection at all


def test_crashed_host_is_unreachable_then_back_after_start(
        hosts3: HostSet, shell3: ParamikoShell) -> None:
    h1 = hosts3.host("h1")
    assert shell3.run(h1, HOSTNAME).rc == 0
    sleeper = RemoteCommand(Executable.SH, ["-c", "echo started; exec sleep 60"])
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(shell3.run, h1, sleeper, 30.0)
        deadline = time.monotonic() + 10
        while "sleep" not in hosts3.exec_on("h1", ["ps", "-e", "-o", "comm="]).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hosts3.crash("h1")
        with pytest.raises(HostUnreachable, match="h1"):  # mid-command: the link, not a signal
            running.result()
    with pytest.raises(HostUnreachable) as info:
        shell3.run(h1, HOSTNAME)
    assert info.value.host == "h1"
    hosts3.start("h1")
    assert shell3.run(h1, HOSTNAME).stdout == "h1\n"  # the dead cached session is replaced


def test_partitioned_host_times_out_and_recovers_after_heal(
        hosts3: HostSet, shell3: ParamikoShell) -> None:
    h2 = hosts3.host("h2")
    assert shell3.run(h2, HOSTNAME).rc == 0
    hosts3.partition("h2")
    with pytest.raises(HostUnreachable):
        shell3.run(h2, HOSTNAME, timeout=2.0)
    assert shell3.run(hosts3.host("h3"), HOSTNAME).stdout == "h3\n"
    hosts3.heal("h2")
    shell3.disconnect(h2)  # after a partition, TCP backoff makes old sessions slow (pitfall 12)
    assert shell3.run(h2, HOSTNAME).stdout == "h2\n"


def test_frozen_host_is_unreachable_not_hanging(hosts3: HostSet, shell3: ParamikoShell) -> None:
    h3 = hosts3.host("h3")
    hosts3.freeze("h3")
    try:
        with pytest.raises(HostUnreachable):
            shell3.run(h3, HOSTNAME, timeout=2.0)
    finally:
        hosts3.thaw("h3")
    assert shell3.run(h3, HOSTNAME).stdout == "h3\n"


def test_a_command_past_its_deadline_is_reported(hosts3: HostSet, shell3: ParamikoShell) -> None:
    sleeper = RemoteCommand(Executable.PYTHON3, ["-c", "import time; time.sleep(5)"])
    with pytest.raises(HostUnreachable, match="timed out"):
        shell3.run(hosts3.host("h1"), sleeper, timeout=0.5)
    assert shell3.run(hosts3.host("h1"), HOSTNAME).rc == 0


def test_put_file_is_atomic_and_sets_the_mode(hosts3: HostSet, shell3: ParamikoShell) -> None:
    h1 = hosts3.host("h1")
    target = h1.root / "etc" / "secret.json"
    target.parent.mkdir(parents=True)
    shell3.put_file(h1, b'{"k": 1}', str(target), mode=0o600)
    assert target.read_bytes() == b'{"k": 1}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    source = hosts3.dir / "payload.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    shell3.put_file(h1, source, str(target), mode=0o644)  # replaces the old file
    assert target.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret.json"]  # no temp left
    with pytest.raises(RemoteCommandFailed, match="No such file"):
        shell3.put_file(h1, b"x", str(h1.root / "missing-dir" / "f"))


def test_background_process_outlives_the_session(hosts3: HostSet, shell3: ParamikoShell) -> None:
    h2 = hosts3.host("h2")
    sleeper = RemoteCommand(Executable.PYTHON3,
                            ["-c", "import os, time; print(os.environ['MARK'], flush=True); "
                                   "time.sleep(60)"])
    (h2.root / "log").write_text("the previous run said this\n")  # kept: appended to
    started = time.monotonic()
    pid = shell3.start_background(h2, sleeper, workdir=str(h2.root), log_path=str(h2.root / "log"),
                                  env={"MARK": "it's me"})
    assert time.monotonic() - started < 5  # returned without waiting for the sleeper
    shell3.disconnect(h2)
    alive = RemoteCommand(Executable.KILL, ["-0", str(pid)])
    assert shell3.run(h2, alive).rc == 0
    deadline = time.monotonic() + 5
    while "it's me" not in (h2.root / "log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (h2.root / "log").read_text() == "the previous run said this\nit's me\n"
    shell3.run(h2, RemoteCommand(Executable.KILL, [str(pid)]), check=True)
    with pytest.raises(RemoteCommandFailed):
        shell3.start_background(h2, sleeper, workdir=str(h2.root / "nowhere"),
                                log_path="/dev/null")


def test_only_loopback_or_local_bridge_targets_pass_the_guard(
        hosts3: HostSet, tmp_path: Path) -> None:
    require_local_target("127.0.0.1")
    require_local_target(hosts3.host("h1").address)
    for address in ("8.8.8.8", "192.0.2.1", "10.249.3.4", "localhost"):
        with pytest.raises(UnsafeTarget):
            require_local_target(address)
    with host_set(tmp_path / "gone", 1) as gone:
        address = gone.hosts[0].address
        require_local_target(address)
    with pytest.raises(UnsafeTarget):  # the guard route is gone too: off-box now, refused
        require_local_target(address)
