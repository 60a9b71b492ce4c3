"""libvirtd for the sandbox without systemd: start ``virtlogd`` + ``libvirtd`` unless running.

Two host fixes come first: ``/dev/kvm`` must be ``root:kvm 0660`` (else
libvirt re-probes QEMU on every call and a define takes a minute, even on TCG-only hosts) and
``/var/lib/libvirt/dnsmasq`` must exist (else the first domain start on a network fails).

A daemon we start is recorded in the StateFile (kind ``libvirt.daemon``, pid + start time) as
soon as its pid is known, before anything relies on it; only those may be stopped by ``down``,
by pid, and libvirtd only while no domain or network is left on it, since other sandboxes on
the machine may share the same daemon.
"""

from __future__ import annotations

import fcntl
import grp
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.errors import SandboxError
from orchestrator.sandbox import identity
from orchestrator.sandbox.state import StateFile

__all__ = [
    "PROBES",
    "SYSTEM_URI",
    "TEARDOWN",
    "balance_vm_cpu_share",
    "daemon_alive",
    "ensure_libvirtd",
    "libvirtd_held",
    "libvirtd_running",
    "stop_daemon",
]

Progress = Callable[[str], None]

SYSTEM_URI = "qemu:///system"
LOCK_PATH = Path("/run/rbdfleet/libvirtd.lock")
# name -> (binary, pid file). virtlogd first: libvirtd hands it every console log.
DAEMONS = {
    "virtlogd": ("/usr/sbin/virtlogd", Path("/run/virtlogd.pid")),
    "libvirtd": ("/usr/sbin/libvirtd", Path("/run/libvirtd.pid")),
}
STOP_TIMEOUT = 10.0  # SIGTERM is not followed by SIGKILL: a shared daemon shuts down cleanly
START_TIMEOUT = 90.0  # the first start on a machine probes QEMU's capabilities: ~9 s idle


@contextmanager
def libvirtd_held(state: StateFile | None, progress: Progress | None = None) -> Iterator[None]:
    """Make ``qemu:///system`` answer (starting virtlogd and libvirtd if needed) and keep
    any ``down`` from stopping it while the block runs.

    Daemons started here are recorded in ``state``; with ``state=None`` they are not
    recorded, so no ``down`` will stop them (teardown paths use that). Safe when several
    sandboxes call it at once: the start runs under a machine-wide exclusive lock, the block
    under a shared one, which :func:`stop_daemon` must take exclusively. Raises
    :class:`SandboxError` naming the log to read when the daemon does not come up.
    """
    say = progress or (lambda _msg: None)
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _fix_host()
        for name, (binary, pid_file) in DAEMONS.items():
            if _running_pid(pid_file) is not None:
                continue
            say(f"starting {name}")
            pid = _start(name, binary, pid_file)
            if state is not None:
                state.record(
                    "libvirt.daemon", name=name, pid=pid, start_time=identity.start_time(pid)
                )
        _wait_answering(say)
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def ensure_libvirtd(state: StateFile | None, progress: Progress | None = None) -> None:
    """Make ``qemu:///system`` answer, starting virtlogd and libvirtd if needed.

    See :func:`libvirtd_held`; callers that create libvirt objects next should hold it
    until the first object exists, so a concurrent ``down`` cannot stop the daemon between.
    """
    with libvirtd_held(state, progress):
        pass


def libvirtd_running() -> bool:
    """Whether the libvirtd of the pid file is alive."""
    return _running_pid(DAEMONS["libvirtd"][1]) is not None


def stop_daemon(resource: dict[str, Any]) -> None:
    """Undo a ``libvirt.daemon`` record: SIGTERM the pid if it is still the same process.

    Other sandboxes on the machine may share the daemon, so libvirtd stays up while any
    domain, active network or secret remains, or while a sandbox holds
    :func:`libvirtd_held` (it is booting); virtlogd stays up while libvirtd runs.
    """
    pid, name = int(resource["pid"]), str(resource["name"])
    if not daemon_alive(resource):
        return  # gone, or the pid was reused by another process
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        if name == "libvirtd" and _libvirt_in_use():
            return
        if name == "virtlogd" and libvirtd_running():
            return
        start = int(resource["start_time"])
        if identity.send(pid, start, signal.SIGTERM):
            identity.wait_gone({pid: start}, STOP_TIMEOUT)


def balance_vm_cpu_share(
    running_domains: int, cgroup_cpu: Path = Path("/sys/fs/cgroup/cpu")
) -> int | None:
    """Weigh libvirt's ``machine`` cpu cgroup like one ordinary task per running VM.

    Without systemd, libvirt puts every QEMU under the cgroup-v1 group ``machine``, whose
    ``cpu.shares`` is 1024, the weight of ONE process in the root group. On a busy host all
    VMs together then get a single task's share: at load 18 each guest ran at 3 % CPU and
    none booted in 5 minutes. Call after starting domains, with the number of running
    domains (all sandboxes'). Returns the new ``cpu.shares`` (None without cgroup-v1 cpu).
    """
    shares = cgroup_cpu / "machine" / "cpu.shares"
    if not shares.exists():
        return None
    wanted = 1024 * max(1, running_domains)
    shares.write_text(str(wanted))
    return wanted


def daemon_alive(resource: dict[str, Any]) -> bool:
    """Whether a ``libvirt.daemon`` record's process still runs (same pid, same start)."""
    start = resource.get("start_time")
    return start is not None and identity.same_process(int(resource["pid"]), int(start))


TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {"libvirt.daemon": stop_daemon}
# kind -> "is this recorded resource still there?" (for ``sandbox status``)
PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {"libvirt.daemon": daemon_alive}


def _fix_host() -> None:
    kvm = Path("/dev/kvm")
    if kvm.exists():
        try:
            kvm_gid = grp.getgrnam("kvm").gr_gid
        except KeyError:
            kvm_gid = None
        if kvm_gid is not None:
            info = kvm.stat()
            if info.st_gid != kvm_gid or info.st_mode & 0o777 != 0o660:
                os.chown(kvm, 0, kvm_gid)
                os.chmod(kvm, 0o660)
    Path("/var/lib/libvirt/dnsmasq").mkdir(parents=True, exist_ok=True)
    Path("/run/libvirt").mkdir(parents=True, exist_ok=True)


def _start(name: str, binary: str, pid_file: Path) -> int:
    """Start ``binary -d`` (it daemonizes and writes ``pid_file``); return the daemon's pid."""
    result = subprocess.run([binary, "-d"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SandboxError(f"{name} -d failed (rc {result.returncode}): {result.stderr.strip()}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = _running_pid(pid_file)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise SandboxError(f"{name} started but {pid_file} names no live process")


def _wait_answering(say: Progress) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    announced = False
    last = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["virsh", "-c", SYSTEM_URI, "version"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            return
        last = result.stderr.strip()
        if not announced:
            say("waiting for libvirtd to answer (the first start probes QEMU, ~10 s)")
            announced = True
        time.sleep(0.1)
    raise SandboxError(
        f"libvirtd did not answer on {SYSTEM_URI} within {START_TIMEOUT:.0f} s: {last}; "
        "see /var/log/libvirt/libvirtd.log"
    )


def _libvirt_in_use() -> bool:
    # Debian's persistent but inactive "default" network does not count.
    for listing in (["list", "--all", "--name"], ["net-list", "--name"], ["secret-list"]):
        result = subprocess.run(
            ["virsh", "-q", "-c", SYSTEM_URI, *listing], capture_output=True, text=True,
            check=False,
        )
        if result.returncode != 0 or result.stdout.strip():
            return True  # in use, or cannot tell: leave it running
    return False


def _running_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if identity.running(pid) else None
