"""Sandbox VMs: N small Debian guests booted in parallel on an isolated libvirt network.

Each sandbox gets a run id, so several coexist on one machine: domains
``rbdfleet-<runid>-vmN``, a transient network ``rbdfleet-<runid>`` on bridge ``rbfbr-<runid>``
(no DHCP, no DNS, no forwarding), and the first free ``10.87.X.0/24`` (X even). The guests boot the
cached image (:mod:`orchestrator.sandbox.guest`) from per-VM qcow2 overlays; the static
address comes from the kernel command line.

SSH is pinned both ways: the sandbox makes one client key and, per VM, a host key pair on
the host, and hands both to the guest on a tiny read-only seed disk (serial
``rbdfleet-seed``, a tar archive) that the guest's init installs into ``/run``. The
``known_hosts`` written here holds exactly those host keys; nothing ever connects with
``StrictHostKeyChecking=no``.

Routing guard: ``unreachable <the subnet's /23> metric 9999``
is added before the bridge exists and removed last, so while the bridge is down the guests'
addresses never route off the machine; and every SSH connection first checks that ``ip route get``
sends the address out of our bridge.

Everything is recorded in the StateFile before use; :data:`TEARDOWN` maps each record kind
to its undo function, and every undo function is idempotent. libvirt is driven through
``virsh`` (the ``libvirt`` binding belongs to the hypervisor adapter), which costs ~50 ms a
call and keeps the sandbox free of a long-lived connection.
"""

from __future__ import annotations

import fcntl
import io
import ipaddress
import json
import secrets
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from orchestrator.errors import HostUnreachable, HypervisorError, SandboxError
from orchestrator.sandbox import guest, libvirtd
from orchestrator.sandbox.libvirtd import (
    SYSTEM_URI,
    balance_vm_cpu_share,
    ensure_libvirtd,
    libvirtd_held,
    libvirtd_running,
)
from orchestrator.sandbox.state import StateFile

__all__ = [
    "PROBES",
    "TEARDOWN",
    "SandboxVM",
    "VmSet",
    "boot_vms",
    "choose_subnet",
    "domain_xml",
    "guard_network",
    "network_xml",
    "tear_down",
    "vm_exec",
]

Progress = Callable[[str], None]

SUBNET_POOL = ipaddress.IPv4Network("10.87.0.0/16")
GUARD_METRIC = 9999
RUNTIME_ROOT = Path("/var/lib/rbdfleet/vms")  # QEMU (user libvirt-qemu) must traverse it
LOCK_DIR = Path("/run/rbdfleet")
# TCG, 3 guests booting systemd at once on 2 cores: all answer SSH after ~55-65 s with the
# machine loaded by other tests (load ~10; the busybox-init guests took ~52-55 s then, ~20-30 s
# on an idle machine); generous for a loaded machine
BOOT_TIMEOUT = 300.0
SSH_OPTIONS_COMMON = (
    "-F",
    "/dev/null",  # no user config can loosen the options below
    "-o",
    "StrictHostKeyChecking=yes",
    "-o",
    "GlobalKnownHostsFile=/dev/null",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=10",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=6",
    "-o",
    "LogLevel=ERROR",
)


@dataclass(frozen=True)
class SandboxVM:
    """One booted guest: ``name`` is rbdfleet's (vm1), ``domain`` libvirt's."""

    name: str
    domain: str
    address: str
    uri: str
    console_log: Path


@dataclass(frozen=True)
class VmSet:
    """The VMs of one sandbox and what it takes to reach them.

    ``disk_dir`` is a directory QEMU can open files in (pytest's tmp dirs are 0700, so
    shared raw disk files for tests belong here); it is removed at teardown.
    """

    run_id: str
    vms: tuple[SandboxVM, ...]
    network: str
    bridge: str
    subnet: str
    gateway: str
    ssh_key: Path
    known_hosts: Path
    control_dir: Path
    disk_dir: Path
    domain_type: str

    def vm(self, name: str) -> SandboxVM:
        """The VM called ``name`` (``vm1``...)."""
        for candidate in self.vms:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def exec(
        self, vm: SandboxVM | str, argv: Sequence[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as root on ``vm`` over the pinned, multiplexed SSH connection."""
        target = self._target(vm)
        return vm_exec(
            target, self.ssh_key, self.known_hosts, argv, timeout, control_dir=self.control_dir
        )

    def ssh_argv(self, vm: SandboxVM | str) -> list[str]:
        """``ssh`` argv prefix (up to and including ``root@ADDR``) for scripts and tools."""
        target = self._target(vm)
        return _ssh_argv(target.address, self.ssh_key, self.known_hosts, self.control_dir)

    # Fault hooks (kazoo-style methods, no monkeypatching). Each takes a VM or its name.

    def pause(self, vm: SandboxVM | str) -> None:
        """Freeze the guest (``virsh suspend``): TCP still reaches the bridge, nothing answers."""
        _virsh("suspend", self._target(vm).domain)

    def resume(self, vm: SandboxVM | str) -> None:
        """Thaw a paused guest."""
        _virsh("resume", self._target(vm).domain)

    def crash(self, vm: SandboxVM | str) -> None:
        """Power the guest off hard (``virsh destroy``), like a host losing power.

        Its SSH master is closed first: one left waiting on a dead peer would hold every
        later command for ~30 s (ServerAliveInterval x ServerAliveCountMax).
        """
        target = self._target(vm)
        close_ssh_master(
            {"control_path": str(self.control_dir / target.address), "address": target.address}
        )
        _virsh("destroy", target.domain)

    def start(
        self, vm: SandboxVM | str, timeout: float = BOOT_TIMEOUT, progress: Progress | None = None
    ) -> None:
        """Boot a crashed guest again and wait until it answers SSH (same keys, same disk)."""
        target = self._target(vm)
        target.console_log.unlink(missing_ok=True)
        _virsh("start", target.domain)
        balance_vm_cpu_share(len(_virsh("list", "--name").split()))
        self.wait_booted(target, 0, timeout, progress)

    def reboot(self, vm: SandboxVM | str) -> int:
        """Reboot the guest from inside, as an operator does (``systemctl reboot``): systemd
        stops its services (the agent gets its SIGTERM), then the guest resets in place (the
        domain's ``on_reboot``: libvirt reports no lifecycle change, the domain stays
        running). Returns at once with the console log's length, the ``since`` of
        :meth:`wait_booted`.

        ``virsh reboot`` would not do: it presses the ACPI power button, and the guest has
        no logind to act on it. The SSH master is closed after the command, as for
        :meth:`crash`: the guest's sshd goes away with the reboot.
        """
        target = self._target(vm)
        since = target.console_log.stat().st_size if target.console_log.exists() else 0
        # rc 255 when sshd is stopped before the answer came back: the reboot is under way
        done = self.exec(target, ["systemctl", "reboot"], timeout=30)
        if done.returncode not in (0, 255):
            raise SandboxError(f"{target.name}: systemctl reboot failed: {done.stderr.strip()}")
        close_ssh_master(
            {"control_path": str(self.control_dir / target.address), "address": target.address}
        )
        return since

    def wait_booted(
        self,
        vm: SandboxVM | str,
        since: int,
        timeout: float = BOOT_TIMEOUT,
        progress: Progress | None = None,
    ) -> None:
        """Wait until the guest booted (its ready marker past byte ``since`` of the console
        log) and answers SSH; its clock is set from the host's."""
        _wait_ready(
            self._target(vm),
            self.bridge,
            self.ssh_key,
            self.known_hosts,
            self.control_dir,
            time.monotonic() + timeout,
            progress or (lambda _msg: None),
            since,
        )

    def _target(self, vm: SandboxVM | str) -> SandboxVM:
        return self.vm(vm) if isinstance(vm, str) else vm


@dataclass(frozen=True)
class _Plan:
    """Names and addresses of a sandbox being booted (before anything exists)."""

    run_id: str
    subnet: ipaddress.IPv4Network
    runtime: Path

    @property
    def network(self) -> str:
        return f"rbdfleet-{self.run_id}"

    @property
    def bridge(self) -> str:
        return f"rbfbr-{self.run_id}"  # <= 15 chars (IFNAMSIZ)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + 10 + index)

    def mac(self, index: int) -> str:
        third = int(self.subnet.network_address.packed[2])
        return f"52:54:00:87:{third:02x}:{10 + index:02x}"


# ---------------------------------------------------------------------------------------------
# Pure builders


def network_xml(name: str, bridge: str, gateway: str, prefix: int) -> str:
    """An isolated network: no ``<forward>``, no DHCP, DNS off, so libvirt starts no dnsmasq."""
    return (
        f"<network>\n  <name>{escape(name)}</name>\n"
        f"  <bridge name={quoteattr(bridge)} stp='off' delay='0'/>\n"
        "  <dns enable='no'/>\n"
        f"  <ip address={quoteattr(gateway)} prefix='{prefix}'/>\n</network>\n"
    )


def domain_xml(
    *,
    domain: str,
    domain_type: str,
    memory_mib: int,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    overlay: Path,
    seed: Path,
    network: str,
    mac: str,
    console_log: Path,
) -> str:
    """Domain XML for one sandbox guest (direct kernel boot, virtio everywhere).

    The root overlay comes first so the guest probes it as ``/dev/vda``; the seed disk is
    read-only and found in the guest by its serial. ``<rom enabled='no'/>`` drops the NIC's
    iPXE ROM (~3.5 s of TCG); the TCG translation cache is capped, else each VM grows to
    ~1.4 GiB RSS. A reboot from inside the guest resets it in place (libvirt's default, what
    users' VMs do): the same QEMU, so the same disks and the same Ceph clients.
    """
    tcg = "<tcg><tb-cache unit='MiB'>128</tb-cache></tcg>" if domain_type == "qemu" else ""
    return f"""<domain type={quoteattr(domain_type)}>
  <name>{escape(domain)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/>{tcg}</features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file={quoteattr(str(overlay))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(seed))}/>
      <target dev='vdb' bus='virtio'/>
      <serial>{guest.SEED_SERIAL}</serial>
      <readonly/>
    </disk>
    <interface type='network'>
      <source network={quoteattr(network)}/>
      <mac address={quoteattr(mac)}/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <serial type='pty'>
      <log file={quoteattr(str(console_log))} append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def choose_subnet(
    taken: Sequence[ipaddress.IPv4Network], pool: ipaddress.IPv4Network = SUBNET_POOL
) -> ipaddress.IPv4Network:
    """The first /24 of ``pool`` whose guard /23 (see :func:`guard_network`) overlaps none of
    ``taken``; default routes are ignored."""
    relevant = [net for net in taken if net.prefixlen > 0]
    for guard in pool.subnets(new_prefix=23):
        if not any(guard.overlaps(net) for net in relevant):
            return next(guard.subnets(new_prefix=24))
    raise SandboxError(f"no free /23 left in {pool}: remove stale sandboxes (sandbox down)")


def guard_network(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The prefix of the ``unreachable`` guard route for ``subnet``: its /23.

    Not the /24 itself: libvirt's ``net-create`` refuses a network whose exact prefix is
    already routed ("Network is already in use by interface *"). The /23 is less specific
    than the bridge's /24, so it loses while the bridge is up and catches everything while
    the bridge is absent or down.
    """
    return subnet.supernet(new_prefix=23)


def accelerator(kvm_module_loaded: bool, probe: Callable[[], bool]) -> str:
    """libvirt domain type: ``kvm`` only if a real KVM module is loaded and a probe boot works.

    ``/dev/kvm`` alone proves nothing (here it is PVM, which hangs stock kernels).
    """
    if kvm_module_loaded and probe():
        return "kvm"
    return "qemu"


# ---------------------------------------------------------------------------------------------
# Boot


def boot_vms(
    dir: Path,
    state: StateFile,
    count: int,
    *,
    memory_mib: int = 256,
    progress: Progress | None = None,
    timeout: float = BOOT_TIMEOUT,
) -> VmSet:
    """Boot ``count`` guests in parallel and return once each answers ``ssh ... true``.

    ``dir`` receives the SSH client key, ``known_hosts`` and the console logs; VM disks live
    under ``/var/lib/rbdfleet/vms/<runid>``. Every resource is recorded in ``state`` before
    use, so :data:`TEARDOWN` (applied in reverse order) undoes a half-finished boot too.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    image = guest.ensure_guest_image(progress=say)
    run_id = secrets.token_hex(3)
    dir = dir.resolve()
    (dir / "console").mkdir(parents=True, exist_ok=True)
    ssh_dir = dir / "ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    with libvirtd_held(state, progress=say):  # until our network exists, no down stops it
        subnet = _reserve_subnet(state, say)
        plan = _Plan(run_id=run_id, subnet=subnet, runtime=RUNTIME_ROOT / run_id)
        say(f"sandbox {run_id}: network {plan.network} on {plan.bridge}, {subnet}")
        state.record("vm.network", name=plan.network, uri=SYSTEM_URI)
        _virsh_with_file("net-create", network_xml(plan.network, plan.bridge, plan.gateway, 24))

    state.record("vm.dir", path=str(plan.runtime))
    RUNTIME_ROOT.mkdir(parents=True, exist_ok=True)
    RUNTIME_ROOT.chmod(0o755)
    plan.runtime.mkdir(mode=0o711)
    control_dir = plan.runtime / "cm"
    control_dir.mkdir(mode=0o700)
    disk_dir = plan.runtime / "disks"
    disk_dir.mkdir(mode=0o755)

    ssh_key = ssh_dir / "id_ed25519"
    known_hosts = ssh_dir / "known_hosts"
    _keygen(ssh_key, f"rbdfleet-{run_id}-client")
    client_public = (ssh_key.with_suffix(".pub")).read_text()

    domain_type = accelerator(_kvm_module_loaded(), lambda: _probe_kvm(plan, image, state))
    vms: list[SandboxVM] = []
    pinned: list[str] = []
    for index in range(1, count + 1):
        name = f"vm{index}"
        vm = SandboxVM(
            name=name,
            domain=f"rbdfleet-{run_id}-{name}",
            address=plan.address(index),
            uri=SYSTEM_URI,
            console_log=dir / "console" / f"{name}.log",
        )
        host_public = _write_seed(plan.runtime / f"{name}.seed", client_public, vm.domain)
        pinned.append(f"{vm.address} {host_public}")
        overlay = plan.runtime / f"{name}.qcow2"
        _run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(image.base),
                str(overlay),
            ]
        )
        xml = domain_xml(
            domain=vm.domain,
            domain_type=domain_type,
            memory_mib=memory_mib,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=guest.kernel_cmdline(f"{vm.address}/24", name),
            overlay=overlay,
            seed=plan.runtime / f"{name}.seed",
            network=plan.network,
            mac=plan.mac(index),
            console_log=vm.console_log,
        )
        state.record("vm.domain", name=vm.domain, uri=SYSTEM_URI)
        _virsh_with_file("define", xml)
        vms.append(vm)
    known_hosts.write_text("".join(f"{line}\n" for line in pinned))
    known_hosts.chmod(0o600)

    for vm in vms:  # the masters appear at the first ssh; recorded before that
        state.record(
            "vm.ssh_master", control_path=str(control_dir / vm.address), address=vm.address
        )
    say(f"sandbox {run_id}: starting {count} {domain_type.upper()} guest(s)")
    for vm in vms:
        vm.console_log.unlink(missing_ok=True)
        _virsh("start", vm.domain)
    balance_vm_cpu_share(len(_virsh("list", "--name").split()))
    deadline = time.monotonic() + timeout
    errors: dict[str, BaseException] = {}

    def wait(vm: SandboxVM) -> None:
        try:
            _wait_ready(vm, plan.bridge, ssh_key, known_hosts, control_dir, deadline, say)
        except BaseException as exc:  # reported below, per VM
            errors[vm.name] = exc

    threads = [threading.Thread(target=wait, args=(vm,), daemon=True) for vm in vms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        first = next(iter(errors.values()))
        raise SandboxError(
            "; ".join(f"{name}: {exc}" for name, exc in sorted(errors.items()))
        ) from first
    say(f"sandbox {run_id}: {count} VM(s) answer SSH after {time.monotonic() - started:.1f} s")
    return VmSet(
        run_id=run_id,
        vms=tuple(vms),
        network=plan.network,
        bridge=plan.bridge,
        subnet=str(subnet),
        gateway=plan.gateway,
        ssh_key=ssh_key,
        known_hosts=known_hosts,
        control_dir=control_dir,
        disk_dir=disk_dir,
        domain_type=domain_type,
    )


def vm_exec(
    vm: SandboxVM,
    ssh_key: Path,
    known_hosts: Path,
    argv: Sequence[str],
    timeout: float,
    *,
    control_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as root on ``vm`` with the system ``ssh`` and the pinned ``known_hosts``.

    With ``control_dir`` the connection is multiplexed (one master per VM, ~0.15 s per
    command instead of a 2-3 s TCG handshake). A host key other than the pinned one is
    refused by ssh (rc 255). The result is returned whatever the exit status.
    """
    command = [*_ssh_argv(vm.address, ssh_key, known_hosts, control_dir), shlex.join(argv)]
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise HostUnreachable(vm.name, f"{shlex.join(argv)!r} timed out after {timeout} s") from exc


def _ssh_argv(
    address: str, ssh_key: Path, known_hosts: Path, control_dir: Path | None
) -> list[str]:
    argv = [
        "ssh",
        *SSH_OPTIONS_COMMON,
        "-i",
        str(ssh_key),
        "-o",
        f"UserKnownHostsFile={known_hosts}",
    ]
    if control_dir is not None:
        argv += [
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={control_dir}/%h",
            "-o",
            "ControlPersist=600",
        ]
    return [*argv, f"root@{address}"]


def _wait_ready(
    vm: SandboxVM,
    bridge: str,
    ssh_key: Path,
    known_hosts: Path,
    control_dir: Path,
    deadline: float,
    say: Progress,
    since: int = 0,
) -> None:
    """Ready marker on the serial console (past byte ``since``: an earlier boot's does not
    count), then an SSH banner, then ``ssh ... true``; then the guest's clock is set from the
    host's."""
    while True:
        text = _console_since(vm.console_log, since)
        if guest.FAILED_MARKER in text:
            raise SandboxError(f"guest init failed; console:\n{_tail(text)}")
        if guest.READY_MARKER in text:
            break
        if time.monotonic() > deadline:
            raise SandboxError(f"no {guest.READY_MARKER} on the console; tail:\n{_tail(text)}")
        time.sleep(0.2)
    say(f"{vm.name}: console ready")
    _assert_routed_to(vm.address, bridge)
    while not _ssh_banner(vm.address):
        if time.monotonic() > deadline:
            raise HostUnreachable(vm.name, "no SSH banner on port 22")
        time.sleep(0.2)
    while True:
        result = vm_exec(vm, ssh_key, known_hosts, ["true"], timeout=60, control_dir=control_dir)
        if result.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise HostUnreachable(vm.name, f"ssh true failed: {result.stderr.strip()}")
        time.sleep(0.5)
    # The guest read the 1-second CMOS clock while starved of CPU: it can be >1 s behind,
    # which grant expiry checks would notice. Set it from the host (off by one SSH hop).
    vm_exec(
        vm,
        ssh_key,
        known_hosts,
        ["date", "-u", "-s", f"@{time.time():.3f}"],
        timeout=30,
        control_dir=control_dir,
    )
    say(f"{vm.name}: ssh ok ({vm.address})")


def _console_since(log: Path, since: int) -> str:
    """The console log from byte ``since`` on ("" while it does not exist)."""
    try:
        with log.open("rb") as handle:
            handle.seek(since)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _assert_routed_to(address: str, bridge: str) -> None:
    """Refuse to connect unless the kernel sends ``address`` out of our own bridge."""
    result = subprocess.run(
        ["ip", "-j", "route", "get", address], capture_output=True, text=True, check=False
    )
    routes = json.loads(result.stdout) if result.returncode == 0 and result.stdout else []
    if not routes or routes[0].get("dev") != bridge:
        raise SandboxError(
            f"{address} would not route via {bridge}: {result.stdout.strip()} "
            f"{result.stderr.strip()}; refusing to connect"
        )


def _ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=2) as sock:
            sock.settimeout(5)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _reserve_subnet(state: StateFile, say: Progress) -> ipaddress.IPv4Network:
    """Pick a free /24 and claim it with the guard route, under a machine-wide lock.

    The guard route itself is what the next picker sees as taken.
    """
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_DIR / "vm-subnet.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subnet = choose_subnet(_networks_in_use())
        guard = guard_network(subnet)
        state.record("vm.route", subnet=str(guard), metric=GUARD_METRIC)
        _run(["ip", "route", "add", "unreachable", str(guard), "metric", str(GUARD_METRIC)])
    say(f"guard route: unreachable {guard} metric {GUARD_METRIC}")
    return subnet


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix on an interface or in any routing table of this namespace."""
    taken: list[ipaddress.IPv4Network] = []
    addrs = json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]")
    for link in addrs:
        for info in link.get("addr_info", []):
            taken.append(
                ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            )
    routes = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default":
            taken.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return taken


def _keygen(path: Path, comment: str) -> None:
    """A fresh ed25519 key pair (an older one at ``path`` is replaced, not prompted about)."""
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    path.chmod(0o600)


def _write_seed(seed: Path, authorized_keys: str, comment: str) -> str:
    """Write the VM's seed disk (tar: host key pair + authorized_keys); return the public host key.

    The host's copy of the private host key exists only inside the 0600 seed file.
    """
    with tempfile.TemporaryDirectory(dir=seed.parent) as tmp:
        key = Path(tmp) / "ssh_host_ed25519_key"
        _keygen(key, comment)
        public = key.with_suffix(".pub").read_text()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for name, data, mode in (
                ("ssh_host_ed25519_key", key.read_bytes(), 0o600),
                ("ssh_host_ed25519_key.pub", public.encode(), 0o644),
                ("authorized_keys", authorized_keys.encode(), 0o600),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), mode, int(time.time())
                archive.addfile(info, io.BytesIO(data))
    seed.touch(mode=0o600)
    seed.write_bytes(buffer.getvalue())  # a multiple of 10 KiB: a valid raw disk size
    return " ".join(public.split()[:2])  # "ssh-ed25519 AAAA...", without the comment


def _kvm_module_loaded() -> bool:
    return any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))


def _probe_kvm(plan: _Plan, image: guest.GuestImage, state: StateFile) -> bool:
    """Boot the guest kernel once under KVM, without disks: does it reach its initramfs?"""
    domain = f"rbdfleet-{plan.run_id}-kvmprobe"
    log = plan.runtime / "kvmprobe.log"
    xml = (
        f"<domain type='kvm'><name>{domain}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{image.kernel}</kernel>"
        f"<initrd>{image.initrd}</initrd><cmdline>console=ttyS0 panic=-1</cmdline></os>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><devices>"
        f"<serial type='pty'><log file='{log}' append='off'/><target port='0'/></serial>"
        "<memballoon model='none'/></devices></domain>"
    )
    state.record("vm.domain", name=domain, uri=SYSTEM_URI)
    try:
        _virsh_with_file("create", xml)
    except HypervisorError:
        return False
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if log.exists() and "Run /init as init process" in log.read_text(errors="replace"):
                return True
            time.sleep(0.2)
        return False
    finally:
        destroy_domain({"name": domain, "uri": SYSTEM_URI})


# ---------------------------------------------------------------------------------------------
# libvirt through virsh, and other commands


def _virsh(*args: str, uri: str = SYSTEM_URI) -> str:
    result = subprocess.run(
        ["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise HypervisorError(f"virsh {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def _virsh_with_file(command: str, xml: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
        handle.write(xml)
        handle.flush()
        return _virsh(command, handle.name)


def _run(argv: list[str]) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=120, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise SandboxError(
            f"{shlex.join(argv)} failed (rc {result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


# ---------------------------------------------------------------------------------------------
# Teardown: one idempotent undo function per record kind


def _missing(exc: HypervisorError) -> bool:
    # virsh 9.0 says only "failed to get domain 'X'" for a missing domain
    text = str(exc)
    return any(sign in text for sign in ("not found", "failed to get domain",
                                         "failed to get network"))


def destroy_domain(resource: dict[str, Any]) -> None:
    """Destroy (if running) and undefine the domain recorded by exact name."""
    uri = str(resource.get("uri", SYSTEM_URI))
    if uri == SYSTEM_URI and not libvirtd_running():
        # Another sandbox's ``down`` may have stopped the shared daemon; our QEMU still
        # runs and only libvirtd can stop it cleanly. Restarted unrecorded: left running.
        ensure_libvirtd(None)
    for command in ("destroy", "undefine"):
        try:
            _virsh(command, str(resource["name"]), uri=uri)
        except HypervisorError as exc:
            if not (_missing(exc) or "not running" in str(exc)):
                raise


def destroy_network(resource: dict[str, Any]) -> None:
    """Destroy the transient network recorded by exact name."""
    try:
        _virsh("net-destroy", str(resource["name"]), uri=str(resource.get("uri", SYSTEM_URI)))
    except HypervisorError as exc:
        if not _missing(exc):
            raise


def remove_guard_route(resource: dict[str, Any]) -> None:
    """Delete the ``unreachable SUBNET metric 9999`` guard route (last of all)."""
    argv = [
        "ip",
        "route",
        "del",
        "unreachable",
        str(resource["subnet"]),
        "metric",
        str(resource.get("metric", GUARD_METRIC)),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0 and "No such process" not in result.stderr:
        raise SandboxError(f"{shlex.join(argv)}: {result.stderr.strip()}")


def remove_runtime_dir(resource: dict[str, Any]) -> None:
    """Remove the VMs' overlays, seeds, shared disk files and control sockets."""
    path = Path(str(resource["path"]))
    if path.parent != RUNTIME_ROOT:
        raise SandboxError(f"refusing to remove {path}: not under {RUNTIME_ROOT}")
    if path.exists():
        shutil.rmtree(path)


def close_ssh_master(resource: dict[str, Any]) -> None:
    """Ask the VM's SSH ControlMaster to exit (a no-op when it is already gone)."""
    control = Path(str(resource["control_path"]))
    if not control.exists():
        return
    subprocess.run(
        [
            "ssh",
            *SSH_OPTIONS_COMMON,
            "-o",
            f"ControlPath={control}",
            "-O",
            "exit",
            f"root@{resource['address']}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=15,
    )


def tear_down(state: StateFile) -> list[str]:
    """Undo every resource in ``state`` this module knows, newest first; return the errors.

    Consecutive records of one kind (the VMs' domains, their SSH masters) are independent
    and undone in parallel: destroying a TCG domain waits ~2 s for QEMU to exit. A resource
    is forgotten once undone, so a second call retries only what failed. Kinds of other
    modules are left alone.
    """
    errors: list[str] = []
    known = [r for r in reversed(state.resources) if r["kind"] in TEARDOWN]
    batches: list[list[dict[str, Any]]] = []
    for resource in known:
        if batches and batches[-1][0]["kind"] == resource["kind"]:
            batches[-1].append(resource)
        else:
            batches.append([resource])

    def undo(resource: dict[str, Any]) -> None:
        try:
            TEARDOWN[resource["kind"]](resource)
        except Exception as exc:  # keep going: a stuck domain must not strand the route
            errors.append(f"{resource['kind']} {resource}: {exc}")
            return
        fields = {k: v for k, v in resource.items() if k != "kind"}
        state.forget(resource["kind"], **fields)

    for batch in batches:
        threads = [threading.Thread(target=undo, args=(r,)) for r in batch]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return errors


TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {
    "vm.ssh_master": close_ssh_master,
    "vm.domain": destroy_domain,
    "vm.dir": remove_runtime_dir,
    "vm.network": destroy_network,
    "vm.route": remove_guard_route,
    **libvirtd.TEARDOWN,  # boot_vms records the daemons it starts in the same StateFile
}
# kind -> "is this recorded resource still there?" (for ``sandbox status``)
PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "vm.ssh_master": lambda r: Path(str(r["control_path"])).is_socket(),
    "vm.domain": lambda r: _probe_virsh("domstate", r) == "running",
    "vm.dir": lambda r: Path(str(r["path"])).is_dir(),
    "vm.network": lambda r: _probe_virsh("net-info", r) != "",
    "vm.route": lambda r: "unreachable" in _run(["ip", "route", "show", "exact", str(r["subnet"])]),
    **libvirtd.PROBES,
}


def _probe_virsh(command: str, resource: dict[str, Any]) -> str:
    """``virsh COMMAND NAME`` output, or "" when the object (or libvirtd) is not there."""
    result = subprocess.run(
        ["virsh", "-q", "-c", str(resource.get("uri", SYSTEM_URI)), command, str(resource["name"])],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return result.stdout.strip() if result.returncode == 0 else ""
