"""SSH test hosts as network namespaces on a private bridge.

Each host is a network namespace ``th-RUN-hN`` joined to the bridge ``tbRUN`` by the veth
``tvRUNhN``, with its own uts/mount/pid namespaces (``unshare``) whose pid 1 is an ``sshd``
listening on the host's address, port 22. The host set's subnet is the first free
``10.250.X.0/24``; the bridge holds ``.1`` (the *gateway*: the controller's address as seen
from the hosts) and host N holds ``.(10+N)``. Hosts have no default route, the machine does
not forward, and an ``unreachable SUBNET metric 9999`` guard route is added before the bridge
and removed after it, so test traffic can never leave the machine, even while the bridge is
down.

Every namespace, link, route and process is recorded in the :class:`StateFile` before it is
relied on (the route right after it is added: its prefix is not ours until the add succeeds),
and :data:`TEARDOWN` maps each recorded kind to the function that undoes it. Processes are
killed by recorded pid only after checking their start time, never by name.

The hosts share the machine's filesystem: host N's install prefix is ``DIR/hN/root``
(exported to SSH sessions as ``$TESTHOST_ROOT``).

Fault hooks are methods of :class:`HostSet`: :meth:`~HostSet.crash` / :meth:`~HostSet.start`,
:meth:`~HostSet.freeze` / :meth:`~HostSet.thaw`, :meth:`~HostSet.partition` /
:meth:`~HostSet.heal`, :meth:`~HostSet.stop` (graceful) and :meth:`~HostSet.exec_on`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from orchestrator.errors import SandboxError
from orchestrator.sandbox import identity
from orchestrator.sandbox.state import StateFile

Progress = Callable[[str], None]

SSHD = "/usr/sbin/sshd"
SUBNET_POOL = ipaddress.IPv4Network("10.250.0.0/16")
GUARD_METRIC = 9999
FIRST_HOST_OCTET = 11
READY_TIMEOUT = 10.0
MAX_HOSTS = 200

KIND_ROUTE = "testhost.route"
KIND_BRIDGE = "testhost.bridge"
KIND_NETNS = "testhost.netns"
KIND_VETH = "testhost.veth"
KIND_SSHD = "testhost.sshd"


def _quiet(_message: str) -> None:
    """Default progress sink: say nothing."""


@dataclass(frozen=True)
class TestHost:
    """One namespace host: SSH on ``address:22``, files under ``root``."""

    __test__: ClassVar[bool] = False  # not a pytest test class despite the name

    name: str
    address: str
    root: Path
    netns: str
    veth: str
    port: int = 22


# --- small shell helpers -------------------------------------------------------------------


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> str:
    """Run a local command; a failure is a SandboxError naming the command and its stderr."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise SandboxError(f"{' '.join(argv)} failed (rc {proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return proc.stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _run(["ip", "-j", *args])
    return list(json.loads(out)) if out.strip() else []


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _pids_in_namespace(namespace: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _pid_namespace(int(entry.name)) == namespace:
            pids.append(int(entry.name))
    return pids


# --- teardown: one undo function per recorded kind -------------------------------------------


def _undo_sshd(res: dict[str, Any]) -> None:
    """SIGKILL the host's ``unshare`` wrapper (it ignores SIGTERM); its pid namespace dies."""
    pid, start = int(res["pid"]), int(res["start"])
    inner = {c: s for c in _children(pid) if (s := identity.start_time(c)) is not None}
    if not identity.send(pid, start, signal.SIGKILL):
        identity.reap(pid, start)
        return
    if identity.wait_gone({pid: start, **inner}, timeout=5.0):
        raise SandboxError(f"host {res.get('host')}: pid {pid} or its namespace survived SIGKILL")


def _undo_netns(res: dict[str, Any]) -> None:
    if Path("/run/netns", res["name"]).exists():
        _run(["ip", "netns", "del", res["name"]])


def _undo_link(res: dict[str, Any]) -> None:
    if Path("/sys/class/net", res["name"]).exists():
        _run(["ip", "link", "del", res["name"]])


def _route_present(subnet: str) -> bool:
    routes = _ip_json("-4", "route", "show", "type", "unreachable", subnet)
    return any(r.get("metric") == GUARD_METRIC for r in routes)


def _undo_route(res: dict[str, Any]) -> None:
    if _route_present(res["subnet"]):
        _run(["ip", "route", "del", "unreachable", res["subnet"], "metric", str(GUARD_METRIC)])


TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {
    KIND_SSHD: _undo_sshd,
    KIND_VETH: _undo_link,
    KIND_NETNS: _undo_netns,
    KIND_BRIDGE: _undo_link,
    KIND_ROUTE: _undo_route,
}

PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {
    KIND_SSHD: lambda r: identity.same_process(int(r["pid"]), int(r["start"])),
    KIND_VETH: lambda r: Path("/sys/class/net", r["name"]).exists(),
    KIND_NETNS: lambda r: Path("/run/netns", r["name"]).exists(),
    KIND_BRIDGE: lambda r: Path("/sys/class/net", r["name"]).exists(),
    KIND_ROUTE: lambda r: _route_present(r["subnet"]),
}


def teardown_run(state: StateFile, run: str) -> list[str]:
    """Undo every resource of host set ``run`` recorded in ``state``, newest first.

    Returns the errors (empty when clean); one failed undo never stops the others.
    """
    errors: list[str] = []
    for res in reversed(state.resources):
        if res.get("run") != run or res["kind"] not in TEARDOWN:
            continue
        try:
            TEARDOWN[res["kind"]](res)
        except (SandboxError, OSError) as exc:
            errors.append(f"{res['kind']} {res}: {exc}")
            continue
        state.forget(res["kind"], **{k: v for k, v in res.items() if k != "kind"})
    return errors


# --- the host set ----------------------------------------------------------------------------


@dataclass
class _Running:
    """The live wrapper process of one host (kept to reap it, pitfall 13)."""

    popen: subprocess.Popen[bytes]
    start: int
    log_offset: int  # where this run's lines begin in the (appended) sshd.log


@dataclass
class HostSet:
    """A running set of namespace hosts, with fault hooks. Tear down with :meth:`down`."""

    dir: Path
    state: StateFile
    run: str
    subnet: str
    bridge: str
    gateway: str
    hosts: tuple[TestHost, ...]
    ssh_key: Path
    known_hosts: Path
    _running: dict[str, _Running] = field(default_factory=dict, repr=False)

    def host(self, name: str) -> TestHost:
        """The host called ``name``."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise SandboxError(f"no test host {name!r} in run {self.run} "
                           f"(have {', '.join(h.name for h in self.hosts)})")

    # lifecycle of one host ------------------------------------------------------------------

    def start(self, name: str) -> None:
        """Start the host's sshd (after :meth:`crash`): files under its root are still there."""
        host = self.host(name)
        if name in self._running and self._running[name].popen.poll() is None:
            raise SandboxError(f"host {name} is already running")
        self._spawn(host)
        self._wait_ready([host])

    def crash(self, name: str) -> None:
        """SIGKILL the host: every process in its pid namespace dies at once; the link stays up."""
        running = self._running.pop(name, None)
        if running is None:
            raise SandboxError(f"host {name} is not running")
        res = self._sshd_record(name, running)
        _undo_sshd(res)
        running.popen.wait(timeout=5)
        self.state.forget(KIND_SSHD, **{k: v for k, v in res.items() if k != "kind"})

    def stop(self, name: str, *, grace: float = 3.0) -> None:
        """Shut the host down cleanly: SIGTERM its processes but pid 1, wait ``grace``, crash."""
        pid1 = self.pid1(name)
        others = {p: s for p in self.pids(name) if p != pid1
                  and (s := identity.start_time(p)) is not None}
        for pid, start in others.items():
            identity.send(pid, start, signal.SIGTERM)
        identity.wait_gone(others, grace)
        self.crash(name)

    def freeze(self, name: str) -> None:
        """SIGSTOP every process of the host: TCP still connects (backlog), nothing answers."""
        self._signal_all(name, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        """SIGCONT every process of the host."""
        self._signal_all(name, signal.SIGCONT)

    def partition(self, name: str) -> None:
        """Cut the host off: its veth goes down (never the bridge), both directions, all peers."""
        _run(["ip", "link", "set", self.host(name).veth, "down"])

    def heal(self, name: str) -> None:
        """Undo :meth:`partition`; returns once the link carries traffic again.

        Neighbour entries that went FAILED during the cut are flushed (on the bridge, in the
        host and in its peers), else the first packets after a heal fail with "No route to
        host" until the kernel retries resolution on its own.
        """
        host = self.host(name)
        _run(["ip", "link", "set", host.veth, "up"])
        operstate = Path("/sys/class/net", host.veth, "operstate")
        deadline = time.monotonic() + 5.0
        while operstate.read_text().strip() != "up":
            if time.monotonic() > deadline:
                raise SandboxError(f"{host.veth} of {name} did not come up within 5 s")
            time.sleep(0.01)
        _run(["ip", "neigh", "flush", "dev", self.bridge, "to", host.address])
        _run(["ip", "-n", host.netns, "neigh", "flush", "dev", "eth0"])
        for peer in self.hosts:
            if peer.name != name:
                _run(["ip", "-n", peer.netns, "neigh", "flush", "dev", "eth0", "to",
                      host.address])

    # looking inside ------------------------------------------------------------------------

    def pid1(self, name: str) -> int:
        """Global pid of the host's pid 1 (its sshd)."""
        running = self._running.get(name)
        if running is None or running.popen.poll() is not None:
            raise SandboxError(f"host {name} is not running")
        children = _children(running.popen.pid)
        if not children:
            raise SandboxError(f"host {name}: wrapper {running.popen.pid} has no pid 1")
        return children[0]

    def pids(self, name: str) -> list[int]:
        """Global pids of every process of the host (its pid namespace)."""
        namespace = _pid_namespace(self.pid1(name))
        return _pids_in_namespace(namespace) if namespace else []

    def exec_on(self, name: str, argv: Sequence[str], *, timeout: float = 30.0,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the host's namespaces (net, mount, uts, pid) without SSH."""
        host = self.host(name)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TESTHOST_NAME": host.name,
               "TESTHOST_ADDR": host.address, "TESTHOST_ROOT": str(host.root)}
        cmd = ["nsenter", "-t", str(self.pid1(name)), "-n", "-m", "-u", "-p", "--", *argv]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  input=input, env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"exec_on {name}: {argv[0]} did not finish in {timeout} s") from exc

    def down(self) -> list[str]:
        """Tear the whole set down from its state records; returns the errors (empty = clean)."""
        errors = teardown_run(self.state, self.run)
        for running in self._running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                running.popen.wait(timeout=1)
        self._running.clear()
        return errors

    def __enter__(self) -> HostSet:
        return self

    def __exit__(self, *exc: object) -> None:
        errors = self.down()
        if errors:
            raise SandboxError("host set teardown left: " + "; ".join(errors))

    # internals ---------------------------------------------------------------------------

    def _signal_all(self, name: str, sig: signal.Signals) -> None:
        # Twice: a process forked while we were signalling the others is caught the second time.
        for _ in range(2):
            for pid in self.pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def _sshd_record(self, name: str, running: _Running) -> dict[str, Any]:
        return {"kind": KIND_SSHD, "run": self.run, "host": name, "pid": running.popen.pid,
                "start": running.start}

    def _spawn(self, host: TestHost) -> None:
        log_path = self.dir / host.name / "sshd.log"
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it from here
        script = f"hostname {host.name}; exec {SSHD} -D -e -f {self.dir / host.name}/sshd_config"
        try:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount",
                 "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "sh", "-ec", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            log.close()
        start = identity.start_time(popen.pid)
        if start is None:  # died before we could look: readiness reports the log
            start = -1
        running = _Running(popen, start, log_offset)
        self._running[host.name] = running
        rec = self._sshd_record(host.name, running)
        self.state.record(KIND_SSHD, **{k: v for k, v in rec.items() if k != "kind"})

    def _wait_ready(self, hosts: Sequence[TestHost]) -> None:
        """Wait for ``Server listening on`` in each log (a TCP probe would make sshd log noise)."""
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(hosts)
        while pending:
            for host in list(pending):
                running = self._running[host.name]
                with open(self.dir / host.name / "sshd.log", "rb") as log_file:
                    log_file.seek(running.log_offset)
                    log = log_file.read().decode(errors="replace")
                if "Server listening on" in log:
                    pending.remove(host)
                elif running.popen.poll() is not None:
                    raise SandboxError(f"sshd of {host.name} exited: {log.strip()[-400:]}")
            if pending and time.monotonic() > deadline:
                raise SandboxError(f"sshd not ready in {READY_TIMEOUT} s on "
                                   f"{', '.join(h.name for h in pending)}")
            if pending:
                time.sleep(0.01)


# --- bring-up --------------------------------------------------------------------------------


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for link in _ip_json("-4", "addr", "show"):
        for info in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst != "default":
            used.append(ipaddress.ip_network(dst, strict=False))
    return [n for n in used if isinstance(n, ipaddress.IPv4Network)]


def _claim_subnet(state: StateFile, run: str, dir: Path) -> ipaddress.IPv4Network:
    """Add the guard route for the first free 10.250.X.0/24 and return that subnet.

    The route add is the lock between concurrent host sets: it fails with "File exists" when
    another set claimed the same prefix first, and we move on to the next one.
    """
    used = _used_networks()
    for candidate in SUBNET_POOL.subnets(new_prefix=24):
        if not candidate.is_private or any(candidate.overlaps(n) for n in used):
            continue
        proc = subprocess.run(["ip", "route", "add", "unreachable", str(candidate), "metric",
                               str(GUARD_METRIC)], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            # Recorded after the add, not before: until the add succeeds the prefix may be
            # another set's, and teardown must never remove someone else's guard route.
            state.record(KIND_ROUTE, run=run, subnet=str(candidate), dir=str(dir))
            return candidate
        if "File exists" not in proc.stderr:
            raise SandboxError(f"ip route add unreachable {candidate}: {proc.stderr.strip()}")
    raise SandboxError(f"no free /24 left in {SUBNET_POOL}")


def _refuse_busy_dir(state: StateFile, dir: Path) -> None:
    """A second set in the same directory would overwrite the first one's keys."""
    resources = state.resources
    for route in resources:
        if route["kind"] == KIND_ROUTE and route.get("dir") == str(dir):
            alive = [r for r in resources if r["kind"] == KIND_SSHD
                     and r["run"] == route["run"] and PROBES[KIND_SSHD](r)]
            if alive:
                raise SandboxError(f"host set {route['run']} is running in {dir}; "
                                   f"tear it down first or use another directory")


def _keygen(paths: Sequence[Path]) -> None:
    """Make ed25519 keys (no passphrase) at ``paths``, in parallel, replacing old ones."""
    procs = []
    for path in paths:
        path.unlink(missing_ok=True)
        path.with_suffix(".pub").unlink(missing_ok=True)
        procs.append(subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                       path.parent.name, "-f", str(path)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    failures = [p.communicate(timeout=20)[1].decode() for p in procs]
    if any(p.returncode for p in procs):
        raise SandboxError(f"ssh-keygen failed: {' '.join(f.strip() for f in failures)}")


def _sshd_config(host_dir: Path, address: str, authorized_keys: Path, root: Path) -> str:
    return "\n".join([
        f"ListenAddress {address}:22",
        f"HostKey {host_dir / 'ssh_host_ed25519_key'}",
        "PidFile none",
        f"AuthorizedKeysFile {authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # The set's dir may sit under a world-writable temp dir (pitfall 2).
        "StrictModes no",
        "UseDNS no",
        "MaxStartups 100:30:200",
        "MaxSessions 50",
        "ClientAliveInterval 5",
        "ClientAliveCountMax 3",
        "Subsystem sftp internal-sftp",
        f"SetEnv TESTHOST_NAME={host_dir.name} TESTHOST_ADDR={address} TESTHOST_ROOT={root}",
        "",
    ])


def _names(run: str, index: int) -> tuple[str, str, str]:
    """(host name, netns, veth) for host ``index`` of ``run`` (veth ≤ 15 chars)."""
    return f"h{index}", f"th-{run}-h{index}", f"tv{run}h{index}"


def start_hosts(dir: Path, state: StateFile, count: int, *,
                progress: Progress = _quiet) -> HostSet:
    """Bring up ``count`` namespace hosts under ``dir``; on failure undo what was made.

    ``dir`` receives the client key (``client_key``, 0600), ``authorized_keys``, the pinned
    ``known_hosts`` and one ``hN/`` per host (host key, sshd_config, sshd.log, ``root/``).
    """
    if not 1 <= count <= MAX_HOSTS:
        raise SandboxError(f"host count must be 1..{MAX_HOSTS}, got {count}")
    if os.geteuid() != 0:
        raise SandboxError("namespace hosts need root (ip netns, unshare)")
    dir = dir.absolute()
    _refuse_busy_dir(state, dir)
    dir.mkdir(parents=True, exist_ok=True)
    run = secrets.token_hex(3)
    client_key = dir / "client_key"
    host_dirs = [dir / f"h{i}" for i in range(1, count + 1)]
    for host_dir in host_dirs:
        (host_dir / "root").mkdir(parents=True, exist_ok=True)
    progress(f"hosts {run}: generating {count + 1} ssh keys")
    _keygen([client_key, *(d / "ssh_host_ed25519_key" for d in host_dirs)])
    authorized_keys = dir / "authorized_keys"
    authorized_keys.write_text(client_key.with_suffix(".pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir

    subnet = _claim_subnet(state, run, dir)
    addresses = list(subnet.hosts())
    gateway = str(addresses[0])
    bridge = f"tb{run}"
    host_set = HostSet(dir=dir, state=state, run=run, subnet=str(subnet), bridge=bridge,
                       gateway=gateway, hosts=(), ssh_key=client_key,
                       known_hosts=dir / "known_hosts")
    try:
        progress(f"hosts {run}: bridge {bridge} on {subnet}")
        state.record(KIND_BRIDGE, run=run, name=bridge)
        _run(["ip", "link", "add", bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        hosts = []
        for index, host_dir in enumerate(host_dirs, start=1):
            name, netns, veth = _names(run, index)
            address = str(addresses[FIRST_HOST_OCTET - 1 + index - 1])
            host = TestHost(name=name, address=address, root=host_dir / "root", netns=netns,
                            veth=veth)
            _add_namespace(state, run, host, bridge, subnet.prefixlen)
            (host_dir / "sshd_config").write_text(
                _sshd_config(host_dir, address, authorized_keys, host.root))
            hosts.append(host)
        host_set.hosts = tuple(hosts)
        _write_known_hosts(host_set)
        progress(f"hosts {run}: starting {count} sshd")
        for host in hosts:  # start them all, then wait for all
            host_set._spawn(host)
        host_set._wait_ready(hosts)
    except BaseException:
        host_set.down()
        raise
    progress(f"hosts {run}: {count} hosts up on {subnet}")
    return host_set


def _add_namespace(state: StateFile, run: str, host: TestHost, bridge: str,
                   prefixlen: int) -> None:
    state.record(KIND_NETNS, run=run, name=host.netns)
    _run(["ip", "netns", "add", host.netns])
    state.record(KIND_VETH, run=run, name=host.veth)
    _run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns",
          host.netns])
    _run(["ip", "link", "set", host.veth, "master", bridge, "up"])
    _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/{prefixlen}", "dev", "eth0"])
    _run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
    _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])  # no default route, on purpose


def _write_known_hosts(host_set: HostSet) -> None:
    """Pin exactly the host keys we generated: one line per host address."""
    lines = []
    for host in host_set.hosts:
        pub = (host_set.dir / host.name / "ssh_host_ed25519_key.pub").read_text().split()
        lines.append(f"{host.address} {pub[0]} {pub[1]}")
    host_set.known_hosts.write_text("\n".join(lines) + "\n")

