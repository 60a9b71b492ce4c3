"""Storage amplification: bytes in Ceph / bytes of user data, for files of one size.

On a throwaway cluster (bluestore, with a mgr: ``ceph df`` needs one), a fresh thin RBD image
is formatted and served by a writer + 2 reader agents (real processes, librbd backend).
``--files`` files of ``--file-kib`` KiB are put through the writer (each acknowledged by both
readers). Small files (up to 16 KiB) travel in their journal records and move to their data
blocks at the writer's next checkpoint; every reading is taken once the writer says it has
settled (``settled`` in its health: its idle checkpoints have moved the last files home and
the journal ring was given back), so it measures the store at rest. The pool's ``stored``
(logical bytes in RADOS: data, journal records, checkpoints, superblocks) and ``bytes_used``
(raw, i.e. stored x pool size plus allocation rounding) come from ``ceph df detail --format
json``, read before the puts and after them once the mgr's numbers settled (OSD stats arrive
every ~5 s).

Target: raw bytes / user bytes <= pool size x 1.02; the HDFS-style baseline (three copies
on the same pool) is 3 x pool size.

Then every file is deleted (each delete acknowledged by both readers, so the writer releases
and discards the freed extents at once) and the pool is read again once settled:
``storage_after_delete_ratio`` = stored bytes after deleting everything / stored bytes of the
empty formatted image (the ``before`` reading).

    .venv/bin/python bench/storage_bench.py [--files 200] [--file-kib 1024] [--osds 1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.core.protocol import PutRequest  # noqa: E402
from bench.agents_bench import served_image  # noqa: E402
from bench.report import emit  # noqa: E402
from orchestrator.sandbox.ceph import CephCluster, start_cluster, stop_cluster  # noqa: E402
from orchestrator.sandbox.state import StateFile  # noqa: E402
from tests.fixtures.agents import AgentFleet, client_context  # noqa: E402

MiB = 1 << 20
SETTLE_POLL = 2.0  # seconds between ``ceph df`` reads while the mgr's numbers settle
STATS_PERIOD = 5.0  # seconds between OSD stats reports to the mgr (mgr_stats_period)
SETTLE_TIMEOUT = 90.0


def usage_by_pool(cluster: CephCluster) -> dict[str, dict[str, int]]:
    """``stored``, ``bytes_used`` and ``objects`` of every pool the mgr knows
    (``ceph df detail``)."""
    out = subprocess.run(
        ["ceph", "-c", str(cluster.conf), "df", "detail", "--format", "json"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    return {pool["name"]: {k: int(pool["stats"][k]) for k in ("stored", "bytes_used", "objects")}
            for pool in json.loads(out)["pools"]}


def pool_usage(cluster: CephCluster) -> dict[str, int] | None:
    """The usage of the cluster's pool; None until the mgr knows the pool."""
    return usage_by_pool(cluster).get(cluster.pool)


def pool_size(cluster: CephCluster) -> int:
    """The replica count of the cluster's pool."""
    out = subprocess.run(
        ["ceph", "-c", str(cluster.conf), "osd", "pool", "get", cluster.pool, "size",
         "--format", "json"], capture_output=True, text=True, check=True, timeout=60).stdout
    return int(json.loads(out)["size"])


Reading = TypeVar("Reading")


def settled(read: Callable[[], Reading | None], previous: Reading | None) -> Reading:
    """``read()`` (pool usage) once it differs from ``previous`` (if given) and then held
    still for two stats periods: the mgr reports what the OSDs sent in their last stats beat,
    and a beat taken mid-way would otherwise pass for the end."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    seen: Reading | None = None
    since = 0.0
    while time.monotonic() < deadline:
        usage = read()
        now = time.monotonic()
        if usage is None or usage == previous or usage != seen:
            seen, since = usage, now
        elif now - since >= 2 * STATS_PERIOD:
            return usage
        time.sleep(SETTLE_POLL)
    raise RuntimeError(f"pool stats did not settle in {SETTLE_TIMEOUT}s (last {seen})")


def settled_usage(cluster: CephCluster, previous: dict[str, int] | None) -> dict[str, int]:
    """The usage of the cluster's pool, :func:`settled`."""
    return settled(lambda: pool_usage(cluster), previous)


def wait_settled(fleet: AgentFleet) -> float:
    """Seconds until the writer reports ``settled`` (nothing left to write at rest)."""
    started = time.monotonic()
    while not fleet.health("w")["settled"]:
        if time.monotonic() - started > SETTLE_TIMEOUT:
            raise RuntimeError(f"the writer did not settle in {SETTLE_TIMEOUT}s")
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


def write_files(fleet: AgentFleet, count: int, size: int, *, delete: bool = False) -> None:
    """Put ``count`` distinct files of ``size`` random bytes through the writer (or delete
    them), one keep-alive connection; each must be acknowledged by both readers."""
    grant = fleet.grant("w", "writer", fleet.epoch("w"))
    host, _, port = fleet["w"].address.rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=120, context=client_context())
    headers = PutRequest(grant=grant, size=0 if delete else size,
                         readers=fleet.reader_addresses("r1", "r2")).to_headers()
    method, status = ("DELETE", 200) if delete else ("PUT", 201)
    try:
        for i in range(count):
            conn.request(method, f"/v1/files/data/f{i:05d}",
                         body=None if delete else os.urandom(size), headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != status or json.loads(body)["lagging"]:
                raise RuntimeError(f"{method} {i}: {resp.status} {body[:200]!r}")
    finally:
        conn.close()


def run(cluster: CephCluster, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Format a fresh image, serve it, measure the pool around the puts."""
    user = args.files * args.file_kib * 1024
    image = "storage-bench"
    image_mib = max(256, 2 * user // MiB + 256)
    with served_image(cluster, image, image_mib, work) as fleet:
        wait_settled(fleet)
        before = settled_usage(cluster, None)
        started = time.perf_counter()
        write_files(fleet, args.files, args.file_kib * 1024)
        put_seconds = time.perf_counter() - started
        settle_seconds = {"after_puts": wait_settled(fleet)}
        after = settled_usage(cluster, before)
        write_files(fleet, args.files, 0, delete=True)
        settle_seconds["after_deletes"] = wait_settled(fleet)
        deleted = settled_usage(cluster, after)
    size = pool_size(cluster)
    stored = after["stored"] - before["stored"]
    raw = after["bytes_used"] - before["bytes_used"]
    return {
        "files": args.files, "file_kib": args.file_kib, "user_bytes": user,
        "pool_size": size, "objectstore": cluster.objectstore,
        "before": before, "after": after, "after_delete": deleted,
        "put_seconds": round(put_seconds, 2), "writer_settled_after_s": settle_seconds,
        "stored_ratio": stored / user,
        "raw_ratio": raw / user,
        "raw_ratio_whole_image": after["bytes_used"] / user,
        "target_raw_ratio": size * 1.02,
        "hdfs_style_raw_ratio": 3 * size,
        "storage_after_delete_ratio": deleted["stored"] / before["stored"],
        "after_delete_over_user": (deleted["stored"] - before["stored"]) / user,
    }


def main() -> int:
    """Run the benchmark on its own cluster and print (and optionally save) the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--file-kib", type=int, default=1024)
    parser.add_argument("--osds", type=int, default=1)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rbdfleet-storage-", dir="/var/tmp"))
    work.chmod(0o755)
    (work / "agents").mkdir()
    try:
        state = StateFile(work / "state.json")
        cluster = start_cluster(work / "ceph", state, osds=args.osds, objectstore="bluestore",
                                mgr=True)
        try:
            results = run(cluster, args, work / "agents")
        finally:
            stop_cluster(cluster, state)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
