"""The sandbox Ceph cluster, for real: I/O through librbd, side-by-side clusters, refusals,
undo of a start killed mid-way, bluestore OSD restarts that keep data, and an MDS whose
CephFS serves files and goes with the cluster.

Budget: ~30 s on 2 busy cores (the session cluster, three extra memstore clusters, two killed
starts, one bluestore cluster).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import SandboxError
from orchestrator.sandbox.ceph import (
    TEARDOWN,
    CephCluster,
    cluster_from_dir,
    cluster_health,
    cluster_processes,
    resume_cluster,
    start_cluster,
    start_mds,
    stop_cluster,
)
from orchestrator.sandbox.identity import command_line
from orchestrator.sandbox.state import StateFile
from tests.fixtures.ceph import ManagedCluster, connect_admin, managed_cluster, remove_image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def _write_read(cluster: CephCluster, image: str, data: bytes, *, create: bool) -> bytes:
    """Write ``data`` at offset 0 (creating the image if asked) and read it back, via librbd."""
    import rbd

    client = connect_admin(cluster)
    try:
        with client.open_ioctx(cluster.pool) as ioctx:
            if create:
                rbd.RBD().create(ioctx, image, 16 * MIB)
            with rbd.Image(ioctx, image) as img:
                if data:
                    img.write(data, 0)
                    img.flush()
                return bytes(img.read(0, 4 * MIB))
    finally:
        client.shutdown()


def _read(cluster: CephCluster, image: str) -> bytes:
    return _write_read(cluster, image, b"", create=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private /var/tmp dir, removed afterwards even when a test left a cluster in it."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rbdfleet-test-a-", dir="/var/tmp"))
    yield base
    state_path = base / "state.json"
    if state_path.exists():
        _undo(StateFile(state_path))
    shutil.rmtree(base, ignore_errors=True)


def _undo(state: StateFile) -> None:
    """What `sandbox down` does: every recorded resource undone, newest first."""
    for resource in reversed(state.resources):
        TEARDOWN[resource["kind"]](resource)
        state.forget(resource["kind"], **{k: v for k, v in resource.items() if k != "kind"})


def test_session_cluster_serves_rbd_io(rbd_image: tuple[CephCluster, str]) -> None:
    cluster, image = rbd_image
    data = os.urandom(4 * MIB)
    import rbd

    client = connect_admin(cluster)
    try:
        with client.open_ioctx(cluster.pool) as ioctx, rbd.Image(ioctx, image) as img:
            assert img.size() == 64 * MIB
            img.write(data, 0)
            img.flush()
            assert hashlib.sha256(img.read(0, 4 * MIB)).digest() == hashlib.sha256(data).digest()
    finally:
        client.shutdown()
    health = cluster_health(cluster)
    assert health["reachable"] and health["up"] == health["osds"] == cluster.osds


def test_files_modes_and_reread(ceph_cluster: CephCluster) -> None:
    assert ceph_cluster.conf.stat().st_mode & 0o777 == 0o644  # QEMU (libvirt-qemu) reads it
    assert ceph_cluster.keyring.stat().st_mode & 0o777 == 0o600
    for key in (ceph_cluster.dir / "keys").iterdir():
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert cluster_from_dir(ceph_cluster.dir) == ceph_cluster
    assert ceph_cluster.mon_port not in (3300, 6789)


def test_two_clusters_side_by_side_then_stop_leaves_nothing(workdir: Path) -> None:
    state = StateFile(workdir / "state.json")
    first = start_cluster(workdir / "one", state, mgr=False)
    second = start_cluster(workdir / "two", state, mgr=False)
    assert {first.mon_port, first.mon_port + 1}.isdisjoint({second.mon_port, second.mon_port + 1})
    assert first.fsid != second.fsid
    a, b = os.urandom(4 * MIB), os.urandom(4 * MIB)
    assert _write_read(first, "img", a, create=True) == a
    assert _write_read(second, "img", b, create=True) == b
    assert _read(first, "img") == a  # each cluster kept its own data

    with pytest.raises(SandboxError, match="already holds a running Ceph cluster"):
        start_cluster(workdir / "one", state, mgr=False)
    assert _read(first, "img") == a  # the refused start touched nothing

    pids = cluster_processes(first.conf) + cluster_processes(second.conf)
    assert len(pids) == 4  # mon + osd each
    stop_cluster(first, state, remove_dir=False)
    health = cluster_health(first, timeout=1.0)
    assert not health["reachable"] and health["processes"] == 0, health
    with pytest.raises(SandboxError, match="lose every PG"):  # memstore: create, use, destroy
        resume_cluster(first.dir, state)
    assert cluster_processes(first.conf) == []
    stop_cluster(first, state)
    stop_cluster(second, state)
    for pid in pids:
        assert not _running(pid), f"pid {pid} survived stop_cluster"
    assert not (workdir / "one").exists() and not (workdir / "two").exists()
    assert state.resources == []


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


_STARTER = """
import sys
from pathlib import Path
from orchestrator.sandbox.ceph import start_cluster
from orchestrator.sandbox.state import StateFile
base = Path(sys.argv[1])
start_cluster(base / "ceph", StateFile(base / "state.json"), mgr=True,
              progress=lambda m: print(m, flush=True))
print("DONE", flush=True)
"""


@pytest.mark.parametrize("kill_after", ["mon started", "OSD(s) started"])
def test_killed_start_is_undone_from_the_state_file(workdir: Path, kill_after: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        seen.append(line.strip())
        if kill_after in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(kill_after in s for s in seen), seen
    conf = workdir / "ceph" / "ceph.conf"
    state = StateFile(workdir / "state.json")
    daemons = [r for r in state.resources if r["kind"] == "ceph.daemon"]
    assert any(r["name"] == "mon.a" for r in daemons)
    assert set(cluster_processes(conf)) <= {r["pid"] for r in daemons}  # nothing unrecorded

    _undo(state)
    assert cluster_processes(conf) == []
    for r in daemons:
        assert not _running(r["pid"]), r
    assert not (workdir / "ceph").exists()
    assert state.resources == []


def test_refusals(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = StateFile(workdir / "state.json")
    (workdir / "busy").mkdir()
    (workdir / "busy" / "something").write_text("x")
    with pytest.raises(SandboxError, match="not empty"):
        start_cluster(workdir / "busy", state)
    with pytest.raises(SandboxError, match="objectstore"):
        start_cluster(workdir / "c", state, objectstore="filestore")
    monkeypatch.setenv("PATH", str(workdir / "empty-bin"))
    with pytest.raises(SandboxError, match="apt-get install ceph-base ceph-common ceph-mgr"):
        start_cluster(workdir / "c", state)
    assert state.resources == []


def test_non_root_is_refused(workdir: Path) -> None:
    script = (
        "from pathlib import Path\n"
        "from orchestrator.errors import SandboxError\n"
        "from orchestrator.sandbox.ceph import start_cluster\n"
        "from orchestrator.sandbox.state import StateFile\n"
        "try:\n"
        "    start_cluster(Path('/nonexistent/c'), StateFile(Path('/nonexistent/s.json')))\n"
        "except SandboxError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        user=65534,
        group=65534,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "must be started as root" in done.stdout, done.stdout + done.stderr


def test_bluestore_osd_restart_keeps_data(bluestore_cluster: ManagedCluster) -> None:
    cluster = bluestore_cluster.cluster
    data = os.urandom(4 * MIB)
    assert _write_read(cluster, "keep", data, create=True) == data
    bluestore_cluster.restart_osd(0)  # SIGTERM
    assert _read(cluster, "keep") == data
    bluestore_cluster.restart_osd(0, kill=True)  # SIGKILL: a crash
    assert _read(cluster, "keep") == data
    health: dict[str, Any] = cluster_health(cluster)
    assert health["ok"], health


def test_bluestore_cluster_crash_and_resume_keeps_data(bluestore_cluster: ManagedCluster) -> None:
    cluster = bluestore_cluster.cluster
    data = os.urandom(4 * MIB)
    assert _write_read(cluster, "crash", data, create=True) == data
    bluestore_cluster.stop(kill=True)  # every daemon SIGKILLed
    assert cluster_processes(cluster.conf) == []
    bluestore_cluster.resume()
    assert _read(cluster, "crash") == data
    assert cluster_health(cluster)["ok"]
    with pytest.raises(SandboxError, match="already runs"):
        bluestore_cluster.resume()


_BOUND = """
import sys, time
from pathlib import Path
from orchestrator.sandbox.ceph import start_cluster
from orchestrator.sandbox.state import StateFile
base = Path(sys.argv[1])
start_cluster(base / "ceph", StateFile(base / "state.json"), mgr=False, bound_to_caller=True)
print("READY", flush=True)
time.sleep(600)
"""


def test_bound_cluster_dies_with_its_caller(workdir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOUND, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "READY"
        conf = workdir / "ceph" / "ceph.conf"
        assert len(cluster_processes(conf)) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while cluster_processes(conf) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster_processes(conf) == []


def test_mon_port_taken_after_the_bind_test_is_retried(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from orchestrator.sandbox import ceph

    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    picks: list[int] = []
    real_pick = ceph._pick_mon_port

    def pick_taken_first(rng: Any) -> int:
        # the race: the pair looked free to the bind test, then someone bound the v1 port
        picks.append(taken - 1 if not picks else real_pick(rng))
        return picks[-1]

    monkeypatch.setattr(ceph, "_pick_mon_port", pick_taken_first)
    state = StateFile(workdir / "state.json")
    try:
        cluster = start_cluster(workdir / "c", state, mgr=False)
        assert len(picks) == 2 and cluster.mon_port == picks[1]
        assert cluster_health(cluster)["ok"]
        stop_cluster(cluster, state)
    finally:
        squatter.close()
    assert state.resources == []


@pytest.mark.parametrize("rbd_image", [16 * MIB], indirect=True)
def test_rbd_image_size_is_a_parameter(
    rbd_image: tuple[CephCluster, str], rados_admin: Any
) -> None:
    import rbd

    cluster, name = rbd_image
    with rados_admin.open_ioctx(cluster.pool) as ioctx, rbd.Image(ioctx, name) as img:
        assert img.size() == 16 * MIB


_HOLDER = """
import sys, time, rados, rbd
c = rados.Rados(conffile=sys.argv[1], rados_id="admin")
c.connect()
img = rbd.Image(c.open_ioctx("rbd"), sys.argv[2])
img.write(b"x" * 4096, 0)  # takes the exclusive lock
print(c.get_addrs(), flush=True)
time.sleep(600)
"""


def test_image_of_a_killed_client_is_removed_without_blocklisting_the_admin(
    ceph_cluster: CephCluster, rados_admin: Any, rbd_image_factory: Any
) -> None:
    import rbd

    name = rbd_image_factory(4 * MIB)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ceph_cluster.conf), name],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    dead_addr = holder.stdout.readline().strip()
    holder.kill()
    holder.wait()
    with rados_admin.open_ioctx(ceph_cluster.pool) as ioctx:
        with rbd.Image(ioctx, name, read_only=True) as img:
            assert dead_addr in [w["addr"] for w in img.watchers_list()]  # the leftover watch
        remove_image(rados_admin, ceph_cluster.pool, name)
        assert name not in rbd.RBD().list(ioctx)
        rbd.RBD().create(ioctx, name, MIB)  # the admin client still works
        rbd.RBD().remove(ioctx, name)


def _listening_addresses(pid: int) -> set[str]:
    """``ip:port`` (hex, as /proc/net/tcp writes it) of every TCP socket ``pid`` listens on."""
    links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in links:  # 0A = LISTEN
                found.add(fields[1])
    return found


def test_mds_serves_cephfs_and_goes_with_the_cluster() -> None:
    import cephfs

    data = os.urandom(MIB + 123)
    with managed_cluster("rbdfleet-test-cephfs-", osds=1, objectstore="memstore",
                         mgr=False) as managed:
        cluster, state = managed.cluster, managed.state
        fs = start_mds(cluster, state, bound_to_caller=True)
        [mds] = [r for r in state.resources if r.get("name") == fs.mds]
        assert os.path.basename(command_line(mds["pid"])[0]) == "ceph-mds"
        addresses = _listening_addresses(mds["pid"])
        assert addresses and all(a.startswith("0100007F:") for a in addresses), addresses
        writer, reader = (cephfs.LibCephFS(conffile=str(cluster.conf), auth_id="admin")
                          for _ in range(2))
        try:
            writer.mount()
            fd = writer.open("/hello", "w", 0o644)
            writer.write(fd, data, 0)
            writer.fsync(fd, 0)
            writer.close(fd)
            reader.mount()  # another client: the bytes come from the OSD, not a cache
            fd = reader.open("/hello", "r", 0)
            assert reader.read(fd, 0, len(data) + 1) == data
            reader.close(fd)
        finally:
            for client in (writer, reader):
                client.shutdown()
        with pytest.raises(SandboxError, match=r"already runs mds\.a"):
            start_mds(cluster, state)
    assert not _running(mds["pid"]), "ceph-mds survived the cluster's teardown"
    assert cluster_processes(cluster.conf) == []
