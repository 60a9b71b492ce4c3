"""Pure helpers of the sandbox Ceph cluster: conf rendering and re-reading, /proc and
``ceph`` JSON parsing, process ownership."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import SandboxError
from orchestrator.sandbox import ceph
from orchestrator.sandbox.ceph import (
    OsdStat,
    OsdState,
    cluster_from_conf,
    cluster_from_dir,
    parse_osd_dump,
    parse_osd_stat,
    render_conf,
)

pytestmark = pytest.mark.unit

FSID = "9ed8bab0-0a8a-4261-a75a-df7e41fcbfcf"


@pytest.mark.parametrize(
    ("osds", "objectstore", "size"), [(1, "memstore", 1), (3, "memstore", 3), (1, "bluestore", 1)]
)
def test_conf_round_trips_through_cluster_from_dir(
    tmp_path: Path, osds: int, objectstore: str, size: int
) -> None:
    text = render_conf(tmp_path, FSID, 24000, osds=osds, objectstore=objectstore)
    (tmp_path / "ceph.conf").write_text(text)
    for n in range(osds):
        (tmp_path / f"osd.{n}").mkdir()
    (tmp_path / "osd.notanumber").mkdir()
    cluster = cluster_from_dir(tmp_path)
    assert cluster.fsid == FSID
    assert (cluster.mon_v2, cluster.mon_v1) == ("127.0.0.1:24000", "127.0.0.1:24001")
    assert cluster.mon_host == "[v2:127.0.0.1:24000,v1:127.0.0.1:24001]"
    assert cluster.mon_port == 24000
    assert (cluster.osds, cluster.objectstore, cluster.pool) == (osds, objectstore, "rbd")
    assert cluster.keyring == tmp_path / "keyring"
    assert cluster.mgr is False  # no mgr.x dir
    assert f"osd_pool_default_size = {size}\n" in text


@given(port=st.integers(1024, 65000).map(lambda p: p - p % 2), osds=st.integers(1, 5),
       name=st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20),
       objectstore=st.sampled_from(ceph.OBJECTSTORES))
def test_any_rendered_conf_reads_back(port: int, osds: int, name: str, objectstore: str) -> None:
    base = Path("/var/tmp") / f"x{name}" / "ceph"
    conf = ceph._read_conf_text(render_conf(base, FSID, port, osds=osds, objectstore=objectstore))
    assert conf.get("global", "mon_host") == f"[v2:127.0.0.1:{port},v1:127.0.0.1:{port + 1}]"
    assert conf.get("client", "keyring") == f"{base}/keyring"
    assert conf.get("global", "osd_objectstore") == objectstore


def test_remove_cluster_dir_leaves_foreign_files(tmp_path: Path) -> None:
    for entry in ("keys", "log", "run", "mon.a", "mgr.x", "osd.0", "osd.12"):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "f").write_text("x")
    for entry in ("ceph.conf", "keyring", "monmap"):
        (tmp_path / entry).write_text("x")
    (tmp_path / "osd.backup").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    ceph.remove_cluster_dir({"kind": "ceph.dir", "path": str(tmp_path)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "osd.backup"]
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "osd.backup").rmdir()
    ceph.remove_cluster_dir({"kind": "ceph.dir", "path": str(tmp_path)})
    assert not tmp_path.exists()
    ceph.remove_cluster_dir({"kind": "ceph.dir", "path": str(tmp_path)})  # idempotent


def test_conf_keeps_every_path_inside_the_dir(tmp_path: Path) -> None:
    text = render_conf(tmp_path, FSID, 24000, osds=1, objectstore="memstore")
    paths = [
        line.split("=", 1)[1].strip()
        for line in text.splitlines()
        if line.split("=", 1)[0]
        .strip()
        .endswith(("_data", "_file", "_dir", "keyring", "admin_socket"))
    ]
    assert paths and all(p.startswith(str(tmp_path) + "/") for p in paths), paths
    # the two settings that make start-up fast
    assert "paxos_propose_interval = 0.01" in text and "bdev_aio_poll_ms = 20" in text
    assert "auth_client_required = cephx" in text
    assert "bluestore_block_path" not in text  # setting it makes mkfs loop on a symlink


def test_conf_refuses_unknown_objectstore(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="objectstore"):
        render_conf(tmp_path, FSID, 24000, osds=1, objectstore="filestore")


def test_cluster_from_dir_without_conf_is_a_sandbox_error(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match=r"no ceph\.conf"):
        cluster_from_dir(tmp_path)


def test_cluster_from_conf_takes_a_v2_only_mon_host(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(
        f"[global]\nfsid = {FSID}\nmon_host = [v2:127.0.0.1:13300]\n"
        f"[client]\nkeyring = {tmp_path}/keyring\n"
    )
    cluster = cluster_from_conf(conf)
    assert (cluster.mon_v2, cluster.mon_v1) == ("127.0.0.1:13300", "127.0.0.1:13301")


def test_cluster_from_conf_without_v2_address_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(
        f"[global]\nfsid = {FSID}\nmon_host = 127.0.0.1:6789\n"
        f"[client]\nkeyring = {tmp_path}/keyring\n"
    )
    with pytest.raises(SandboxError, match="no v2 address"):
        cluster_from_conf(conf)


def test_parse_osd_stat() -> None:
    text = json.dumps(
        {
            "epoch": 11,
            "num_osds": 3,
            "num_up_osds": 2,
            "osd_up_since": 0,
            "num_in_osds": 3,
            "osd_in_since": 0,
            "num_remapped_pgs": 0,
        }
    )
    assert parse_osd_stat(text) == OsdStat(epoch=11, osds=3, up=2, in_=3)


def test_parse_osd_dump() -> None:
    text = json.dumps(
        {
            "epoch": 15,
            "osds": [
                {"osd": 0, "up": 1, "in": 1, "up_from": 14, "up_thru": 14, "down_at": 12},
                {"osd": 1, "up": 0, "in": 1, "up_from": 0, "up_thru": 0, "down_at": 0},
            ],
        }
    )
    assert parse_osd_dump(text) == {
        0: OsdState(up=True, up_from=14),
        1: OsdState(up=False, up_from=0),
    }


def test_ownership_needs_a_ceph_binary_and_this_conf() -> None:
    conf = "/var/tmp/x/ceph/ceph.conf"
    assert ceph._owns(["ceph-osd", "-f", "-c", "/var/tmp/x/ceph/ceph.conf", "-i", "0"], conf)
    assert ceph._owns(["/usr/bin/ceph-mon", "-f", "-c", "/var/tmp/x/ceph/ceph.conf"], conf)
    assert not ceph._owns(["ceph-osd", "-c", "/var/tmp/y/ceph/ceph.conf"], conf)
    assert not ceph._owns(["ceph-osd", "-c", "/var/tmp/x/ceph/ceph.conf.old"], conf)
    assert not ceph._owns(["python3", "ceph-osd", "/var/tmp/x/ceph/ceph.conf"], conf)
    assert not ceph._owns([], conf)  # a zombie's cmdline


def test_public_names_are_pinned() -> None:
    assert set(ceph.__all__) == {
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
    }
    assert set(ceph.TEARDOWN) == set(ceph.PROBES) == {"ceph.daemon", "ceph.dir"}
