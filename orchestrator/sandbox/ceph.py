"""A throwaway Ceph cluster on loopback: 1 mon, 1 mgr, 1-3 OSDs, everything inside one directory.

On request (:func:`start_mds`), one MDS and a CephFS file system on two more pools of the same
cluster, for benchmarks that put rbdfleet beside CephFS.

The recipe: a conf whose every path points into DIR, all keys made up
front with ``ceph-authtool``, mon mkfs + start while the OSDs mkfs in parallel, every mon
command through ONE ``ceph`` process on stdin, then the mgr and the OSDs, readiness by polling
the mon's osdmap (``osd dump``: each OSD up in a new incarnation; never ``pg stat``, which waits
for the mgr's 5 s stats) and ``rbd pool init``. Clients need only ``CEPH_CONF``: the
client.admin keyring is named in ``[client]``.

Only the Ceph CLI tools are run here (stdlib + subprocess); the ``rados``/``rbd`` bindings
belong to the Ceph adapter.

Daemons run in the foreground (``-f``) as our children in their own session, so the pid we
record is the daemon's own from the first instant; each one is recorded in the
:class:`~orchestrator.sandbox.state.StateFile` right after it is spawned and before anything
waits on it. Teardown signals a recorded pid only when ``/proc/PID`` still names a ``ceph-``
binary run with this cluster's conf and its start time (field 22 of ``/proc/PID/stat``) is the
recorded one, so a reused pid is never hit. The MDS stops first (it flushes its journal to the
OSDs on SIGTERM), then the OSDs, then the mgr, then the mon.

Mon ports are picked by a bind test; if another process takes the pair before the mon binds
it, the mon is stopped and another pair is tried (its own sockets are checked, since a mon that
cannot bind retries for ~15 s before it dies).

What this does not guarantee: memstore OSDs lose every PG on restart (use bluestore to
restart or resume); a daemon that dies later is not restarted (``cluster_health`` shows it).
"""

from __future__ import annotations

import configparser
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import SandboxError
from orchestrator.sandbox import identity
from orchestrator.sandbox.state import StateFile

__all__ = [
    "OBJECTSTORES",
    "POOL",
    "PROBES",
    "REQUIRED_BINARIES",
    "TEARDOWN",
    "CephCluster",
    "CephFs",
    "OsdStat",
    "OsdState",
    "cluster_from_conf",
    "cluster_from_dir",
    "cluster_health",
    "cluster_processes",
    "daemon_alive",
    "kill_daemon",
    "parse_osd_dump",
    "parse_osd_stat",
    "remove_cluster_dir",
    "render_conf",
    "restart_osd",
    "resume_cluster",
    "start_cluster",
    "start_mds",
    "start_osd",
    "stop_cluster",
    "stop_osd",
]

LOG = logging.getLogger(__name__)

POOL = "rbd"
OBJECTSTORES = ("memstore", "bluestore")
MON_ID = "a"
MGR_ID = "x"
MDS_ID = "a"
FS_NAME = "cephfs"
FS_METADATA_POOL = "cephfs_metadata"
FS_DATA_POOL = "cephfs_data"
MDS_START_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
POLL_INTERVAL_S = 0.2
MON_PORT_ATTEMPTS = 3
MON_BIND_WAIT_S = 20.0
# Mon ports come from below the kernel's ephemeral range (32768+), so outgoing client
# connections never take the port between the bind test and the mon's start.
PORT_RANGE = (20000, 32000)

# binary -> Debian package that ships it
REQUIRED_BINARIES: dict[str, str] = {
    "ceph-mon": "ceph-mon",
    "ceph-mgr": "ceph-mgr",
    "ceph-osd": "ceph-osd",
    "monmaptool": "ceph-base",
    "ceph-authtool": "ceph-common",
    "ceph": "ceph-common",
    "rbd": "ceph-common",
}

# entity -> caps: the least each daemon and client needs
_ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
_MON_CAPS = {"mon": "allow *"}
_MGR_CAPS = {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}
_OSD_CAPS = {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"}
_MDS_CAPS = {"mon": "allow profile mds", "mgr": "allow profile mds", "osd": "allow rwx",
             "mds": "allow *"}

# teardown order of daemon groups: an MDS stopping flushes its journal, so the OSDs stay up
# until it is gone (without them it would hang until its SIGKILL)
_GROUP_ORDER = ("mds", "osd", "mgr", "mon")


@dataclass(frozen=True)
class CephCluster:
    """A sandbox cluster: where it lives and how clients reach it."""

    dir: Path
    conf: Path  # mode 0644: QEMU (libvirt-qemu) reads it
    keyring: Path  # client.admin keyring, mode 0600
    fsid: str
    mon_v2: str  # "127.0.0.1:PORT", msgr2
    mon_v1: str  # "127.0.0.1:PORT+1", legacy msgr1
    osds: int
    objectstore: str
    pool: str = POOL
    mgr: bool = True

    @property
    def mon_host(self) -> str:
        """The ``mon_host`` value clients use: ``[v2:...,v1:...]``."""
        return f"[v2:{self.mon_v2},v1:{self.mon_v1}]"

    @property
    def mon_port(self) -> int:
        """The msgr2 port of the mon."""
        return int(self.mon_v2.rsplit(":", 1)[1])


@dataclass(frozen=True)
class CephFs:
    """The CephFS file system of a sandbox cluster (:func:`start_mds`)."""

    name: str
    metadata_pool: str
    data_pool: str
    mds: str  # the daemon's name, "mds.a"

    @property
    def pools(self) -> tuple[str, str]:
        """Both pools: what the file system stores, metadata and data."""
        return (self.metadata_pool, self.data_pool)


@dataclass(frozen=True)
class OsdStat:
    """The mon's ``osd stat``."""

    epoch: int
    osds: int
    up: int
    in_: int


# --------------------------------------------------------------------------- pure helpers


def render_conf(dir: Path, fsid: str, mon_port: int, *, osds: int, objectstore: str) -> str:
    """The ceph.conf of a sandbox cluster; every path is inside ``dir``.

    ``$id`` and ``$name`` are Ceph's own metavariables and stay literal.
    """
    if objectstore not in OBJECTSTORES:
        raise ValueError(f"objectstore must be one of {OBJECTSTORES}, not {objectstore!r}")
    size = 3 if osds >= 3 else 1
    d = str(dir)
    return f"""\
# rbdfleet sandbox cluster: every path is inside {d}
[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{mon_port},v1:127.0.0.1:{mon_port + 1}]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = {d}/run
osd_crush_chooseleaf_type = 0
osd_pool_default_size = {size}
osd_pool_default_min_size = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mon_max_pg_per_osd = 1000
osd_objectstore = {objectstore}
osd_crush_initial_weight = 1
paxos_propose_interval = 0.01

[mon]
mon_data = {d}/mon.$id
keyring = {d}/mon.$id/keyring
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok
mon_cluster_log_file = {d}/log/cluster.log

[mgr]
mgr_data = {d}/mgr.$id
keyring = {d}/keys/$name.keyring
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok

[osd]
osd_data = {d}/osd.$id
keyring = {d}/keys/$name.keyring
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok
memstore_device_bytes = 4294967296
bluestore_block_create = true
bluestore_block_size = 8589934592
bluestore_fsck_on_mkfs = false
bdev_aio_poll_ms = 20
osd_memory_target = 1073741824

[mds]
mds_data = {d}/mds.$id
keyring = {d}/keys/$name.keyring
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok

[client]
keyring = {d}/keyring
log_file = {d}/log/client.log
"""


def _read_conf_text(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=("#", ";"), strict=False)
    parser.read_string(text)
    return parser


def _read_conf(conf: Path) -> configparser.RawConfigParser:
    try:
        return _read_conf_text(conf.read_text())
    except (OSError, configparser.Error) as exc:
        raise SandboxError(f"{conf}: not a readable ceph.conf ({exc})") from exc


_MON_HOST = re.compile(r"v2:(?P<v2>[\d.]+:\d+)(?:,v1:(?P<v1>[\d.]+:\d+))?")


def parse_osd_stat(text: str) -> OsdStat:
    """Parse ``ceph osd stat -f json`` (``{"epoch":..,"num_osds":..,"num_up_osds":..}``)."""
    data = json.loads(text)
    return OsdStat(
        epoch=int(data["epoch"]),
        osds=int(data["num_osds"]),
        up=int(data["num_up_osds"]),
        in_=int(data["num_in_osds"]),
    )


@dataclass(frozen=True)
class OsdState:
    """One OSD in ``ceph osd dump``: up or not, and the osdmap epoch its incarnation booted in."""

    up: bool
    up_from: int


def parse_osd_dump(text: str) -> dict[int, OsdState]:
    """Parse ``ceph osd dump -f json`` into ``{osd id: OsdState}``."""
    return {
        int(o["osd"]): OsdState(up=bool(o["up"]), up_from=int(o["up_from"]))
        for o in json.loads(text)["osds"]
    }


def _owns(argv: Sequence[str], conf: str) -> bool:
    """A ceph daemon (``ceph-*`` binary) started with this conf."""
    return bool(argv) and os.path.basename(argv[0]).startswith("ceph-") and conf in argv


# --------------------------------------------------------------------------- processes


def _starttime(pid: int) -> int:
    start = identity.start_time(pid)
    if start is None:
        raise SandboxError(f"process {pid} vanished before it could be recorded")
    return start


def _is_ours(res: dict[str, Any]) -> bool:
    """The recorded daemon runs: same pid and start time, a ``ceph-`` binary with our conf.

    Checked before any signal, so a reused pid is never signalled. A daemon whose main thread
    has exited counts as running until its last thread is gone (:mod:`.identity`); its command
    line is empty by then, so it is no longer signalled, only waited for.
    """
    pid, start = int(res["pid"]), int(res["starttime"])
    identity.reap(pid, start)
    return identity.same_process(pid, start) and _owns(identity.command_line(pid), str(res["conf"]))


def _signal_group(
    resources: Sequence[dict[str, Any]], grace: float, first: signal.Signals = signal.SIGTERM
) -> None:
    """Signal every daemon of the group that is still ours, wait, SIGKILL after ``grace``."""
    targets = {int(r["pid"]): int(r["starttime"]) for r in resources if _is_ours(r)}
    outcome = identity.terminate(targets, grace, first=first)
    names = {int(r["pid"]): r["name"] for r in resources}
    for pid in outcome.killed:
        LOG.warning(
            "ceph daemon %s (pid %s) still there %.0fs after %s: SIGKILL",
            names[pid],
            pid,
            grace,
            first.name,
        )
    if outcome.survivors:
        left = ", ".join(f"{names[pid]} (pid {pid})" for pid in outcome.survivors)
        raise SandboxError(f"ceph daemons survived SIGKILL: {left}")


def kill_daemon(resource: dict[str, Any], grace: float = STOP_GRACE_S) -> None:
    """Undo one ``ceph.daemon`` record: SIGTERM, then SIGKILL after ``grace``; idempotent."""
    _signal_group([resource], grace)


def cluster_processes(conf: Path) -> list[int]:
    """Pids of live (non-zombie) ``ceph-*`` processes started with ``conf``: for checks only."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if identity.running(pid) and _owns(identity.command_line(pid), str(conf)):
            found.append(pid)
    return found


# names start_cluster creates inside DIR; remove_cluster_dir removes exactly these
_DIR_ENTRIES = (
    "ceph.conf",
    "ceph.conf.tmp",
    "keyring",
    "keys",
    "monmap",
    "run",
    "log",
    f"mon.{MON_ID}",
    f"mgr.{MGR_ID}",
)


def remove_cluster_dir(resource: dict[str, Any]) -> None:
    """Undo a ``ceph.dir`` record: remove what a sandbox cluster puts in DIR, then DIR if empty."""
    d = Path(resource["path"])
    if not d.is_dir():
        return
    for entry in d.iterdir():
        if entry.name in _DIR_ENTRIES or re.fullmatch(r"osd\.\d+", entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {
    "ceph.daemon": kill_daemon,
    "ceph.dir": remove_cluster_dir,
}


def daemon_alive(resource: dict[str, Any]) -> bool:
    """A ``ceph.daemon`` record's process still runs (same pid, start time, binary and conf)."""
    return _is_ours(resource)


PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "ceph.daemon": daemon_alive,
    "ceph.dir": lambda resource: Path(resource["path"]).is_dir(),
}


# --------------------------------------------------------------------------- start


class _Deadline:
    def __init__(self, seconds: float, task: str = "ceph cluster start") -> None:
        self.seconds = seconds
        self.task = task
        self.end = time.monotonic() + seconds

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise SandboxError(f"{self.task} exceeded {self.seconds:.0f}s while {what}")
        return left


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox Ceph cluster must be started as root")
    missing = {b: p for b, p in REQUIRED_BINARIES.items() if shutil.which(b) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        raise SandboxError(
            f"missing Ceph binaries {', '.join(sorted(missing))}: apt-get install {pkgs}"
        )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_mon_port(rng: random.Random) -> int:
    """An even port P with P and P+1 both free on 127.0.0.1 (never 3300/6789)."""
    lo, hi = PORT_RANGE
    for _ in range(200):
        port = rng.randrange(lo, hi, 2)
        if _port_free(port) and _port_free(port + 1):
            return port
    raise SandboxError(f"no free mon port pair found in {lo}-{hi}")


def _run(argv: list[str], deadline: _Deadline, what: str, *, input: str | None = None) -> str:
    """Run a short Ceph tool; a failure raises SandboxError with its output."""
    try:
        done = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=deadline.left(what),
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{what}: {argv[0]} did not finish in time") from exc
    if done.returncode != 0:
        out = (done.stderr or done.stdout).strip()[-2000:]
        raise SandboxError(f"{what}: {argv[0]} exited {done.returncode}: {out}")
    return done.stdout


class _Starter:
    """One start (or restart) of daemons: spawns, records, and remembers what it must undo."""

    def __init__(
        self,
        dir: Path,
        conf: Path,
        state: StateFile,
        deadline: _Deadline,
        *,
        bound_to_caller: bool = False,
    ) -> None:
        self.dir = dir
        self.conf = conf
        self.state = state
        self.deadline = deadline
        self.bound_to_caller = bound_to_caller
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.oneshots: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str], *, oneshot: bool = False) -> None:
        """Start a process in its own session and record it before anything relies on it.

        A one-shot (mkfs) is recorded too, so a start killed mid-way can still end it.
        Bound to the caller, the process gets SIGTERM when the calling thread dies
        (``setpriv --pdeathsig`` execs it, so the pid stays the daemon's).
        """
        if self.bound_to_caller:
            argv = ["setpriv", "--pdeathsig", "TERM", *argv]
        out = (self.dir / "log" / f"{name}.out").open("ab")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        self.state.record(
            "ceph.daemon",
            pid=proc.pid,
            name=name,
            conf=str(self.conf),
            starttime=_starttime(proc.pid),
        )
        (self.oneshots if oneshot else self.daemons)[name] = proc

    def wait_exit(self, name: str, what: str) -> None:
        """Wait for a one-shot process (mkfs) and forget its record; fail on non-zero exit."""
        proc = self.oneshots.pop(name)
        try:
            rc = proc.wait(timeout=self.deadline.left(what))
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"{what} did not finish in time") from exc
        self.state.forget("ceph.daemon", pid=proc.pid, name=name)
        if rc != 0:
            raise SandboxError(f"{what} exited {rc}: {_tail(self.dir / 'log' / f'{name}.out')}")

    def stop(self, name: str) -> None:
        """SIGKILL a daemon of this start and forget it (a mon that lost its port race)."""
        proc = self.daemons.pop(name)
        records = [r for r in _daemon_records(self.conf, self.state) if r["pid"] == proc.pid]
        _signal_group(records, STOP_GRACE_S, first=signal.SIGKILL)
        proc.wait()
        self.state.forget("ceph.daemon", pid=proc.pid, name=name)

    def check_alive(self) -> None:
        """Fail fast when a daemon started by us has died."""
        for name, proc in self.daemons.items():
            rc = proc.poll()
            if rc is not None:
                log = self.dir / "log" / f"{name}.log"
                raise SandboxError(f"{name} exited {rc} during start: {_tail(log)}")


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no {path.name})"
    return " | ".join(text[-lines:]) or f"({path.name} is empty)"


def _make_keys(dir: Path, osds: int, deadline: _Deadline) -> None:
    """Every key up front: one keyring per entity, all in the mon's."""
    keys = dir / "keys"
    keys.mkdir(mode=0o700)
    entities: list[tuple[str, Path, dict[str, str]]] = [
        ("mon.", keys / "mon.keyring", _MON_CAPS),
        ("client.admin", dir / "keyring", _ADMIN_CAPS),
        (f"mgr.{MGR_ID}", keys / f"mgr.{MGR_ID}.keyring", _MGR_CAPS),
    ] + [(f"osd.{n}", keys / f"osd.{n}.keyring", _OSD_CAPS) for n in range(osds)]
    procs = []
    for name, path, caps in entities:
        argv = ["ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name]
        for service, cap in caps.items():
            argv += ["--cap", service, cap]
        procs.append(
            (
                name,
                subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                ),
            )
        )
    for name, proc in procs:
        try:
            _, err = proc.communicate(timeout=deadline.left("making keys"))
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            raise SandboxError(f"ceph-authtool for {name} did not finish") from exc
        if proc.returncode != 0:
            raise SandboxError(f"ceph-authtool for {name} failed: {err.strip()[-500:]}")
    # the mon's mkfs keyring holds every entity; keyring files are INI sections, so they
    # concatenate. ceph-authtool already made each keyring 0600; this one is born 0600.
    mkfs_keyring = keys / "mon-mkfs.keyring"
    fd = os.open(mkfs_keyring, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(p.read_text() for _, p, _ in entities))
    for _, path, _ in entities:
        path.chmod(0o600)


def _refuse_existing(dir: Path) -> None:
    conf = dir / "ceph.conf"
    if conf.exists():
        running = cluster_processes(conf)
        if running:
            raise SandboxError(
                f"{dir} already holds a running Ceph cluster (pids {running}); stop it first"
            )
        raise SandboxError(f"{dir} already holds a stopped Ceph cluster: resume it "
                           "(resume_cluster, bluestore only) or remove the directory first")
    if dir.exists() and any(dir.iterdir()):
        raise SandboxError(f"{dir} is not empty; a sandbox cluster needs an empty directory")


def _ceph_json(conf: Path, args: list[str], timeout: float) -> str:
    """One mon command through the ``ceph`` CLI, JSON out; bounded by ``timeout``."""
    try:
        out = subprocess.run(
            [
                "ceph",
                "-c",
                str(conf),
                "--connect-timeout",
                str(max(1, int(timeout))),
                *args,
                "-f",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"ceph {' '.join(args)} did not answer in {timeout:.0f}s") from exc
    if out.returncode != 0:
        raise SandboxError(
            f"ceph {' '.join(args)} exited {out.returncode}: {out.stderr.strip()[-500:]}"
        )
    return out.stdout


def _osd_boots(conf: Path, timeout: float) -> dict[int, int]:
    return {
        n: s.up_from
        for n, s in parse_osd_dump(_ceph_json(conf, ["osd", "dump"], timeout)).items()
        if s.up
    }


def _wait_osds_booted(starter: _Starter, ids: Sequence[int], before: dict[int, int]) -> None:
    """Wait until each OSD in ``ids`` is up in a NEW incarnation (``up_from`` past ``before``).

    An OSD killed with SIGKILL stays "up" in the osdmap until its successor boots, so "up"
    alone would not prove the restarted one is there.
    """
    what = f"waiting for osd {', '.join(map(str, ids))} to boot"
    while True:
        starter.check_alive()
        left = starter.deadline.left(what)
        try:
            booted = _osd_boots(starter.conf, min(10.0, left))
        except (SandboxError, ValueError, KeyError):
            booted = {}
        if all(booted.get(n, 0) > before.get(n, 0) for n in ids):
            return
        time.sleep(POLL_INTERVAL_S)


def start_cluster(
    dir: Path,
    state: StateFile,
    *,
    osds: int = 1,
    objectstore: str = "memstore",
    mgr: bool = True,
    progress: Callable[[str], None] | None = None,
    timeout: float = START_TIMEOUT_S,
    bound_to_caller: bool = False,
) -> CephCluster:
    """Start a fresh cluster in ``dir`` (absent or empty) with pool ``rbd`` ready for images.

    Every daemon is in ``state`` before it is relied on. A failed start is undone before the
    :class:`SandboxError` is raised; a start killed outright is undone from ``state`` with
    :data:`TEARDOWN`. Pool size is 3 with 3+ OSDs, else 1. ``bound_to_caller=True`` (test
    fixtures) makes the daemons get SIGTERM if the calling thread dies without stopping them;
    leave it off when the cluster must outlive the caller (``sandbox up``).
    """
    say = progress or (lambda _msg: None)
    if osds < 1:
        raise SandboxError(f"a cluster needs at least one OSD, not {osds}")
    if objectstore not in OBJECTSTORES:
        raise SandboxError(f"objectstore must be one of {OBJECTSTORES}, not {objectstore!r}")
    _check_prerequisites()
    dir = dir.absolute()
    _refuse_existing(dir)
    deadline = _Deadline(timeout)
    conf = dir / "ceph.conf"
    state.record("ceph.dir", path=str(dir))
    starter = _Starter(dir, conf, state, deadline, bound_to_caller=bound_to_caller)
    try:
        cluster = _start(dir, starter, osds=osds, objectstore=objectstore, mgr=mgr, say=say)
    except BaseException as exc:
        _undo_start(dir, conf, state)
        if isinstance(exc, SandboxError):
            raise SandboxError(f"ceph cluster start in {dir} failed (undone): {exc}") from exc
        raise
    return cluster


def _undo_start(dir: Path, conf: Path, state: StateFile) -> None:
    try:
        _stop_recorded(conf, state, grace=5.0)
    finally:
        remove_cluster_dir({"path": str(dir)})
        state.forget("ceph.dir", path=str(dir))


def _write_conf(conf: Path, text: str) -> None:
    """Atomically (OSD mkfs may be reading it), mode 0644: QEMU (libvirt-qemu) reads it."""
    tmp = conf.with_name(conf.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, conf)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # 0A = LISTEN
            inodes.add(fields[9])
    return inodes


def _binds(pid: int, ports: Sequence[int]) -> bool:
    """``pid`` itself holds a listening socket on every one of ``ports`` (not a squatter)."""
    try:
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except (FileNotFoundError, ProcessLookupError):
        return False
    return all(any(f"socket:[{i}]" in links for i in _listening_inodes(p)) for p in ports)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def _start_mon(starter: _Starter, fsid: str, port: int) -> bool:
    """monmap, mkfs and start of the mon on ``port``/``port+1``; False if the port was taken.

    A mon that cannot bind retries for ~15 s (ms_bind_retry_count) before it dies, so its
    sockets are checked directly instead of waiting for that.
    """
    dir, conf, deadline = starter.dir, starter.conf, starter.deadline
    mon_dir = dir / f"mon.{MON_ID}"
    if mon_dir.exists():
        shutil.rmtree(mon_dir)
    mon_dir.mkdir(mode=0o750)
    monmap = dir / "monmap"
    _run(
        [
            "monmaptool",
            "--create",
            "--clobber",
            "--fsid",
            fsid,
            "--addv",
            MON_ID,
            f"[v2:127.0.0.1:{port},v1:127.0.0.1:{port + 1}]",
            str(monmap),
        ],
        deadline,
        "creating the monmap",
    )
    _run(
        [
            "ceph-mon",
            "-c",
            str(conf),
            "-i",
            MON_ID,
            "--mkfs",
            "--monmap",
            str(monmap),
            "--keyring",
            str(dir / "keys" / "mon-mkfs.keyring"),
        ],
        deadline,
        "mon mkfs",
    )
    return _spawn_mon(starter, port)


def _spawn_mon(starter: _Starter, port: int) -> bool:
    """Start the mon and wait until it holds its two ports; False (mon stopped) if taken."""
    name = f"mon.{MON_ID}"
    log = starter.dir / "log" / f"{name}.log"
    log_start = log.stat().st_size if log.exists() else 0  # earlier attempts log there too
    starter.spawn(name, ["ceph-mon", "-f", "-c", str(starter.conf), "-i", MON_ID])
    bind_deadline = time.monotonic() + MON_BIND_WAIT_S
    while True:
        starter.check_alive()
        pid = starter.daemons[name].pid
        if _binds(pid, (port, port + 1)):
            return True
        taken = b"Address already in use" in _read_from(log, log_start)
        if taken or time.monotonic() > bind_deadline:
            starter.stop(name)
            return False
        starter.deadline.left("waiting for the mon to bind its port")
        time.sleep(0.02)


def _start(
    dir: Path,
    starter: _Starter,
    *,
    osds: int,
    objectstore: str,
    mgr: bool,
    say: Callable[[str], None],
) -> CephCluster:
    deadline = starter.deadline
    conf = starter.conf
    dir.mkdir(parents=True, exist_ok=True)
    dir.chmod(0o755)  # QEMU (libvirt-qemu) must reach ceph.conf
    for sub in ("run", "log", f"mon.{MON_ID}", *(f"osd.{n}" for n in range(osds))):
        (dir / sub).mkdir(mode=0o750)
    if mgr:
        (dir / f"mgr.{MGR_ID}").mkdir(mode=0o750)
    fsid = str(uuid.uuid4())
    rng = random.Random()
    port = _pick_mon_port(rng)
    _write_conf(conf, render_conf(dir, fsid, port, osds=osds, objectstore=objectstore))
    say("ceph: conf written")

    _make_keys(dir, osds, deadline)
    say("ceph: keys made")

    osd_uuids = [str(uuid.uuid4()) for _ in range(osds)]
    for n, osd_uuid in enumerate(osd_uuids):  # mkfs needs no mon: in parallel with it
        starter.spawn(
            f"osd.{n}.mkfs",
            [
                "ceph-osd",
                "-c",
                str(conf),
                "-i",
                str(n),
                "--mkfs",
                "--no-mon-config",
                "--osd-uuid",
                osd_uuid,
            ],
            oneshot=True,
        )
    for attempt in range(1, MON_PORT_ATTEMPTS + 1):
        if _start_mon(starter, fsid, port):
            break
        LOG.warning(
            "mon port %d (or %d) was taken before the mon bound it (attempt %d)",
            port,
            port + 1,
            attempt,
        )
        port = _pick_mon_port(rng)
        _write_conf(conf, render_conf(dir, fsid, port, osds=osds, objectstore=objectstore))
    else:
        raise SandboxError(f"the mon could not bind a free port in {MON_PORT_ATTEMPTS} attempts")
    say(f"ceph: mon started on 127.0.0.1:{port}")

    commands = [f"osd new {u} {n}" for n, u in enumerate(osd_uuids)]
    commands += [
        f"osd pool create {POOL} 8 8 replicated",
        f"osd pool application enable {POOL} rbd",
    ]
    _run(
        ["ceph", "-c", str(conf), "--connect-timeout", "30"],
        deadline,
        "registering OSDs and the pool",
        input="\n".join(commands) + "\n",
    )
    starter.check_alive()
    say("ceph: OSDs and pool registered")

    if mgr:
        starter.spawn(f"mgr.{MGR_ID}", ["ceph-mgr", "-f", "-c", str(conf), "-i", MGR_ID])
    for n in range(osds):
        starter.wait_exit(f"osd.{n}.mkfs", f"osd.{n} mkfs")
    for n in range(osds):
        starter.spawn(f"osd.{n}", ["ceph-osd", "-f", "-c", str(conf), "-i", str(n)])
    say(f"ceph: {osds} OSD(s) started")

    _wait_osds_booted(starter, range(osds), {})
    say("ceph: OSDs up")
    _run(["rbd", "-c", str(conf), "pool", "init", POOL], deadline, "rbd pool init")
    starter.check_alive()
    say(f"ceph: pool {POOL} ready")
    return cluster_from_dir(dir)


# --------------------------------------------------------------------------- existing clusters


def cluster_from_conf(conf: Path) -> CephCluster:
    """Describe the sandbox cluster whose ceph.conf is ``conf`` (it need not be running)."""
    conf = conf.absolute()
    parser = _read_conf(conf)
    try:
        fsid = parser.get("global", "fsid")
        mon_host = parser.get("global", "mon_host")
        keyring = Path(parser.get("client", "keyring"))
    except (configparser.Error, KeyError) as exc:
        raise SandboxError(f"{conf}: missing {exc}") from exc
    match = _MON_HOST.search(mon_host)
    if match is None:
        raise SandboxError(f"{conf}: mon_host {mon_host!r} has no v2 address")
    v2 = match["v2"]
    host, port = v2.rsplit(":", 1)
    v1 = match["v1"] or f"{host}:{int(port) + 1}"
    dir = conf.parent
    osds = sum(1 for p in dir.glob("osd.*") if p.is_dir() and re.fullmatch(r"osd\.\d+", p.name))
    return CephCluster(
        dir=dir,
        conf=conf,
        keyring=keyring,
        fsid=fsid,
        mon_v2=v2,
        mon_v1=v1,
        osds=osds,
        objectstore=parser.get("global", "osd_objectstore", fallback="memstore"),
        pool=POOL,
        mgr=(dir / f"mgr.{MGR_ID}").is_dir(),
    )


def cluster_from_dir(dir: Path) -> CephCluster:
    """Re-read the sandbox cluster in ``dir`` (for status, stop and restarts)."""
    conf = dir.absolute() / "ceph.conf"
    if not conf.is_file():
        raise SandboxError(f"{dir} holds no sandbox Ceph cluster (no ceph.conf)")
    return cluster_from_conf(conf)


def _daemon_records(conf: Path, state: StateFile) -> list[dict[str, Any]]:
    return [r for r in state.resources if r["kind"] == "ceph.daemon" and r["conf"] == str(conf)]


def _stop_recorded(
    conf: Path, state: StateFile, *, grace: float, first: signal.Signals = signal.SIGTERM
) -> None:
    """Stop recorded daemons of ``conf`` group by group (OSDs, mgr, mon), then forget them."""
    records = _daemon_records(conf, state)
    for group in _GROUP_ORDER:
        members = [r for r in records if r["name"].split(".")[0] == group]
        _signal_group(members, grace, first)
        for r in members:
            state.forget("ceph.daemon", pid=r["pid"], name=r["name"])
    rest = [r for r in records if r["name"].split(".")[0] not in _GROUP_ORDER]
    _signal_group(rest, grace, first)
    for r in rest:
        state.forget("ceph.daemon", pid=r["pid"], name=r["name"])


def stop_cluster(
    cluster: CephCluster,
    state: StateFile,
    *,
    remove_dir: bool = True,
    grace: float = STOP_GRACE_S,
    kill: bool = False,
) -> None:
    """Stop every recorded daemon (OSDs, mgr, mon; SIGKILL after ``grace``), then remove DIR.

    With ``remove_dir=False`` a bluestore cluster keeps its data for :func:`resume_cluster`;
    ``kill=True`` sends SIGKILL at once (a crash of the whole cluster).
    """
    try:
        _stop_recorded(
            cluster.conf, state, grace=grace, first=signal.SIGKILL if kill else signal.SIGTERM
        )
    finally:
        if remove_dir:
            remove_cluster_dir({"path": str(cluster.dir)})
            state.forget("ceph.dir", path=str(cluster.dir))


def _osd_records(cluster: CephCluster, osd_id: int, state: StateFile) -> list[dict[str, Any]]:
    if not 0 <= osd_id < cluster.osds:
        raise SandboxError(f"{cluster.dir} has no osd.{osd_id}")
    return [r for r in _daemon_records(cluster.conf, state) if r["name"] == f"osd.{osd_id}"]


def stop_osd(cluster: CephCluster, osd_id: int, state: StateFile, *, kill: bool = False) -> None:
    """Stop one OSD: SIGTERM (or SIGKILL with ``kill=True``, a crash) and wait until it is gone."""
    records = _osd_records(cluster, osd_id, state)
    if not any(_is_ours(r) for r in records):
        raise SandboxError(f"osd.{osd_id} of {cluster.dir} is not running")
    _signal_group(records, STOP_GRACE_S, first=signal.SIGKILL if kill else signal.SIGTERM)
    for r in records:
        state.forget("ceph.daemon", pid=r["pid"], name=r["name"])


def start_osd(
    cluster: CephCluster,
    osd_id: int,
    state: StateFile,
    *,
    timeout: float = 60.0,
    bound_to_caller: bool = False,
) -> None:
    """Start one stopped OSD and wait until the mon has seen it boot."""
    if any(_is_ours(r) for r in _osd_records(cluster, osd_id, state)):
        raise SandboxError(f"osd.{osd_id} of {cluster.dir} is already running")
    starter = _Starter(
        cluster.dir, cluster.conf, state, _Deadline(timeout), bound_to_caller=bound_to_caller
    )
    before = _osd_boots(cluster.conf, min(10.0, timeout))
    starter.spawn(f"osd.{osd_id}", ["ceph-osd", "-f", "-c", str(cluster.conf), "-i", str(osd_id)])
    _wait_osds_booted(starter, [osd_id], before)


def restart_osd(
    cluster: CephCluster,
    osd_id: int,
    state: StateFile,
    *,
    kill: bool = False,
    bound_to_caller: bool = False,
) -> None:
    """Stop (SIGTERM, or SIGKILL with ``kill=True``) and start one OSD; bluestore keeps its data."""
    stop_osd(cluster, osd_id, state, kill=kill)
    start_osd(cluster, osd_id, state, bound_to_caller=bound_to_caller)


def resume_cluster(
    dir: Path, state: StateFile, *, timeout: float = START_TIMEOUT_S, bound_to_caller: bool = False
) -> CephCluster:
    """Start every daemon of a stopped bluestore cluster again (its data kept; notes §4).

    Refused for memstore (its OSDs come back owning no PG) and for a running cluster. A
    failed resume stops what it started and keeps the directory.
    """
    cluster = cluster_from_dir(dir)
    running = cluster_processes(cluster.conf)
    if running:
        raise SandboxError(f"{cluster.dir} already runs a Ceph cluster (pids {running})")
    if cluster.objectstore != "bluestore":
        raise SandboxError(
            f"{cluster.dir} is {cluster.objectstore}: its OSDs lose every PG when "
            "stopped; start a new cluster instead"
        )
    _check_prerequisites()
    if not any(r["kind"] == "ceph.dir" and r["path"] == str(cluster.dir) for r in state.resources):
        state.record("ceph.dir", path=str(cluster.dir))
    starter = _Starter(
        cluster.dir, cluster.conf, state, _Deadline(timeout), bound_to_caller=bound_to_caller
    )
    try:
        if not _spawn_mon(starter, cluster.mon_port):
            raise SandboxError(f"mon port {cluster.mon_port} or {cluster.mon_port + 1} is taken")
        before = _osd_boots(cluster.conf, min(10.0, starter.deadline.left("asking the mon")))
        if cluster.mgr:
            starter.spawn(
                f"mgr.{MGR_ID}", ["ceph-mgr", "-f", "-c", str(cluster.conf), "-i", MGR_ID]
            )
        for n in range(cluster.osds):
            starter.spawn(f"osd.{n}", ["ceph-osd", "-f", "-c", str(cluster.conf), "-i", str(n)])
        _wait_osds_booted(starter, range(cluster.osds), before)
    except BaseException as exc:
        _stop_recorded(cluster.conf, state, grace=5.0)
        if isinstance(exc, SandboxError):
            raise SandboxError(f"resuming the ceph cluster in {dir} failed: {exc}") from exc
        raise
    return cluster


def _active_mds(conf: Path, fs_name: str, timeout: float) -> list[str]:
    """Names of the MDS daemons active for ``fs_name`` (``fs dump``: a mon command, no mgr)."""
    for fs in json.loads(_ceph_json(conf, ["fs", "dump"], timeout))["filesystems"]:
        mdsmap = fs["mdsmap"]
        if mdsmap["fs_name"] == fs_name:
            return [m["name"] for m in mdsmap["info"].values() if m["state"] == "up:active"]
    return []


def start_mds(
    cluster: CephCluster,
    state: StateFile,
    *,
    timeout: float = MDS_START_TIMEOUT_S,
    bound_to_caller: bool = False,
) -> CephFs:
    """One MDS and a CephFS file system (pools ``cephfs_metadata`` + ``cephfs_data``) on a
    running sandbox cluster; returns once the MDS is active for it.

    The MDS is recorded in ``state`` like every daemon, so :func:`stop_cluster` and
    :data:`TEARDOWN` stop it (first, while the OSDs are still there). A start that fails or
    overruns ``timeout`` stops the MDS again and raises :class:`SandboxError` with the tail of
    its log; the pools and the file system stay in the cluster, which goes with it.
    """
    if shutil.which("ceph-mds") is None:
        raise SandboxError("missing Ceph binary ceph-mds: apt-get install ceph-mds")
    name = f"mds.{MDS_ID}"
    if any(r["name"] == name and _is_ours(r) for r in _daemon_records(cluster.conf, state)):
        raise SandboxError(f"{cluster.dir} already runs {name}")
    conf = cluster.conf
    deadline = _Deadline(timeout, f"{name} start")
    keyring = cluster.dir / "keys" / f"{name}.keyring"
    caps = [word for service, cap in _MDS_CAPS.items() for word in (service, cap)]
    _run(["ceph", "-c", str(conf), "auth", "get-or-create", name, *caps, "-o", str(keyring)],
         deadline, f"making the {name} key")
    keyring.chmod(0o600)
    _run(
        ["ceph", "-c", str(conf), "--connect-timeout", "30"],
        deadline,
        "creating the file system",
        input="\n".join([
            f"osd pool create {FS_METADATA_POOL} 8 8 replicated",
            f"osd pool create {FS_DATA_POOL} 8 8 replicated",
            f"fs new {FS_NAME} {FS_METADATA_POOL} {FS_DATA_POOL}",
        ]) + "\n",
    )
    starter = _Starter(cluster.dir, conf, state, deadline, bound_to_caller=bound_to_caller)
    starter.spawn(name, ["ceph-mds", "-f", "-c", str(conf), "-i", MDS_ID])
    log = cluster.dir / "log" / f"{name}.log"
    mds = starter.daemons[name]
    try:
        while True:
            if mds.poll() is not None:
                raise SandboxError(f"it exited {mds.returncode}")
            left = deadline.left("waiting for it to become active")
            try:
                if MDS_ID in _active_mds(conf, FS_NAME, min(10.0, left)):
                    break
            except (SandboxError, ValueError, KeyError):
                pass  # the mon busy or the map not there yet: asked again until the deadline
            time.sleep(POLL_INTERVAL_S)
    except BaseException as exc:
        records = [r for r in _daemon_records(conf, state) if r["name"] == name]
        _signal_group(records, 5.0)
        for r in records:
            state.forget("ceph.daemon", pid=r["pid"], name=name)
        if isinstance(exc, SandboxError):
            raise SandboxError(f"{name} did not become active: {exc}; its log: "
                               f"{_tail(log)}") from exc
        raise
    return CephFs(FS_NAME, FS_METADATA_POOL, FS_DATA_POOL, name)


def cluster_health(cluster: CephCluster, *, timeout: float = 5.0) -> dict[str, Any]:
    """Cheap status for ``sandbox status``: the mon's ``osd stat`` (never ``pg stat``).

    Never raises for an unreachable cluster: ``reachable`` is False and ``error`` says why.
    """
    report: dict[str, Any] = {
        "fsid": cluster.fsid,
        "mon": cluster.mon_v2,
        "objectstore": cluster.objectstore,
        "pool": cluster.pool,
        "osds_expected": cluster.osds,
        "processes": len(cluster_processes(cluster.conf)),
    }
    try:
        stat = parse_osd_stat(_ceph_json(cluster.conf, ["osd", "stat"], timeout))
    except (SandboxError, ValueError, KeyError, OSError) as exc:
        return {**report, "reachable": False, "error": str(exc) or type(exc).__name__}
    return {
        **report,
        "reachable": True,
        "epoch": stat.epoch,
        "osds": stat.osds,
        "up": stat.up,
        "in": stat.in_,
        "ok": stat.up == stat.osds == cluster.osds,
    }
