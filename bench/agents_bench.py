"""Agents vs ``rbd bench`` on the same cluster, same run (the ratios docs/benchmarks.md targets).

Measures, with 1 writer + 2 reader agents (real processes) on one RBD image:
- large-file write through the writer (PUT, streamed) vs ``rbd bench`` sequential write;
- large-file read from one reader (GET, streamed) vs ``rbd bench`` sequential read, and the
  same file read by ``Volume.read`` in the benchmark process (the engine without the agent);
- 4 KiB puts/s acknowledged (= durable and acked by both readers), p50/p99 put latency, at
  each client concurrency of ``--clients`` (one keep-alive connection per client thread), next
  to ``rbd bench`` 4 KiB random writes with 32 threads (the OSD's small-write ceiling);
- each large-file figure is taken between two ``rbd bench`` runs (``--rounds`` rounds, fresh
  bench image each) and its ratio is against their mean; the median ratio is reported;
- visibility lag: time from the writer's ack to the reader serving the file (p50/p99; it
  includes one GET round trip, so it is an upper bound);
- idle RSS of the agents (librbd backend) and of one agent on a file image (the footprint of
  the ``device:`` backend that agents in VMs use).

Usage (starts its own throwaway cluster under /var/tmp and stops it by pid):

    .venv/bin/python bench/agents_bench.py [--size-mib 256] [--objectstore bluestore]
        [--rounds 3] [--small-seconds 5] [--clients 8,32] [--json out.json]
        [--conf CEPH_CONF]

``--conf`` uses a running cluster instead (pool ``rbd``; the image is created and removed).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.core.protocol import PutRequest  # noqa: E402
from agents.daemon import open_backend  # noqa: E402
from agents.volume import Volume  # noqa: E402
from bench.report import emit  # noqa: E402
from orchestrator.sandbox.ceph import CephCluster, cluster_from_conf, start_cluster, stop_cluster  # noqa: E402
from orchestrator.sandbox.state import StateFile  # noqa: E402
from tests.fixtures.agents import AgentFleet, client_context, format_image  # noqa: E402

MiB = 1 << 20
BLOCK = 4 * MiB


def rbd_bench(conf: Path, spec: str, io_type: str, total: int, *, io_size: int = BLOCK,
              threads: int = 16, pattern: str = "seq") -> float:
    """``rbd bench`` (default: sequential 4M, 16 threads), rbd_cache off: bytes/s."""
    out = subprocess.run(
        ["rbd", "-c", str(conf), "bench", "--io-type", io_type, "--io-size", str(io_size),
         "--io-threads", str(threads), "--io-total", str(total), "--io-pattern", pattern,
         "--rbd-cache=false", spec],
        capture_output=True, text=True, check=True, timeout=600).stdout
    # "elapsed: 0   ops: 8   ops/sec: 35.0877   bytes/sec: 140 MiB/s": elapsed is whole
    # seconds and bytes/sec rounded, so use ops/sec x the op size.
    match = re.search(r"ops/sec:\s*([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"cannot parse rbd bench output:\n{out}")
    return float(match.group(1)) * io_size


def _conn(address: str) -> http.client.HTTPConnection:
    """To an agent of the fleet: TLS, as deployed (the fixtures' test CA)."""
    host, _, port = address.rpartition(":")
    return http.client.HTTPSConnection(host, int(port), timeout=300, context=client_context())


def put_large(fleet: AgentFleet, path: str, size: int) -> float:
    """Stream ``size`` bytes to the writer; bytes/s from first byte to the ack."""
    block = os.urandom(BLOCK)

    def body() -> Iterator[bytes]:
        for _ in range(size // BLOCK):
            yield block

    grant = fleet.grant("w", "writer", fleet.epoch("w"))
    conn = _conn(fleet["w"].address)
    started = time.perf_counter()
    conn.request("PUT", "/v1/files" + path, body=body(),
                 headers=PutRequest(grant=grant, size=size).to_headers())
    resp = conn.getresponse()
    resp.read()
    elapsed = time.perf_counter() - started
    conn.close()
    if resp.status != 201:
        raise RuntimeError(f"large put failed: {resp.status}")
    return size / elapsed


def get_large(fleet: AgentFleet, node: str, path: str, size: int) -> float:
    """Stream the file from ``node``, discarding it; bytes/s."""
    grant = fleet.grant(node, "reader", fleet.epoch(node))
    conn = _conn(fleet[node].address)
    started = time.perf_counter()
    conn.request("GET", "/v1/files" + path, headers={"Authorization": "Bearer " + grant})
    resp = conn.getresponse()
    got = 0
    while chunk := resp.read(BLOCK):
        got += len(chunk)
    elapsed = time.perf_counter() - started
    conn.close()
    if resp.status != 200 or got != size:
        raise RuntimeError(f"large get failed: {resp.status}, {got} of {size} bytes")
    return size / elapsed


def volume_read(backend: str, path: str, size: int, **ceph: Any) -> float:
    """The storage engine alone: ``Volume.read`` in this process (read-only handle), bytes/s.
    Separates the engine's speed from the agent's HTTP and process overhead."""
    device = open_backend(backend, read_only=True, **ceph)
    try:
        volume = Volume.open(device)
        started = time.perf_counter()
        got = sum(len(chunk) for chunk in volume.read(path))
        elapsed = time.perf_counter() - started
        volume.close()
    finally:
        device.close()
    if got != size:
        raise RuntimeError(f"volume read {got} of {size} bytes")
    return size / elapsed


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def small_puts(fleet: AgentFleet, seconds: float, clients: int, *, writer: str = "w",
               readers: tuple[str, ...] = ("r1", "r2"), prefix: str = "small",
               ) -> dict[str, float]:
    """4 KiB puts to ``writer`` from ``clients`` threads (one keep-alive connection each) for
    ``seconds``, each acknowledged by every one of ``readers``."""
    grant = fleet.grant(writer, "writer", fleet.epoch(writer))
    payload = os.urandom(4096)
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    addresses = fleet.reader_addresses(*readers)

    def client(n: int) -> None:
        conn = _conn(fleet[writer].address)
        headers = PutRequest(grant=grant, size=len(payload), readers=addresses).to_headers()
        i = 0
        mine = []
        while time.perf_counter() < stop:
            started = time.perf_counter()
            conn.request("PUT", f"/v1/files/{prefix}/c{n}-{i}", body=payload, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 201 or json.loads(body)["lagging"]:
                raise RuntimeError(f"small put: {resp.status} {body[:200]!r}")
            mine.append(time.perf_counter() - started)
            i += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"puts": len(latencies), "puts_per_s": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5) * 1e3, "p99_ms": pct(latencies, 0.99) * 1e3,
            "p999_ms": pct(latencies, 0.999) * 1e3, "max_ms": max(latencies) * 1e3}


def visibility_lag(fleet: AgentFleet, count: int) -> dict[str, float]:
    """Put a 4 KiB file, then GET it from r1 until served: time from the ack (ms)."""
    wgrant = fleet.grant("w", "writer", fleet.epoch("w"))
    rgrant = fleet.grant("r1", "reader", fleet.epoch("r1"))
    wconn, rconn = _conn(fleet["w"].address), _conn(fleet["r1"].address)
    payload = os.urandom(4096)
    headers = PutRequest(grant=wgrant, size=len(payload),
                         readers=fleet.reader_addresses("r1", "r2")).to_headers()
    lags = []
    for i in range(count):
        wconn.request("PUT", f"/v1/files/lag/{i}", body=payload, headers=headers)
        resp = wconn.getresponse()
        resp.read()
        acked = time.perf_counter()
        while True:
            rconn.request("GET", f"/v1/files/lag/{i}",
                          headers={"Authorization": "Bearer " + rgrant})
            got = rconn.getresponse()
            got.read()
            if got.status == 200:
                break
        lags.append(time.perf_counter() - acked)
    wconn.close()
    rconn.close()
    return {"samples": count, "p50_ms": pct(lags, 0.5) * 1e3, "p99_ms": pct(lags, 0.99) * 1e3,
            "max_ms": max(lags) * 1e3}


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def file_agent_rss(work: Path) -> float:
    """Idle RSS (MiB) of an agent on a file image: the footprint of the ``device:`` backend
    VMs use (same code path, O_DIRECT file I/O, no librbd in the process)."""
    work.mkdir()
    image = work / "image.raw"
    with image.open("wb") as f:
        f.truncate(16 * MiB)
    fleet = AgentFleet("rss", f"file:{image}", work, extra={"log_level": "info"})
    format_image(fleet.backend, "rss")
    try:
        agent = fleet.add("f1")
        time.sleep(2)
        assert agent.proc is not None
        return round(rss_kib(agent.proc.pid) / 1024, 1)
    finally:
        fleet.close()


def ceph_credentials(cluster: CephCluster) -> dict[str, str]:
    """The agents' (and ``open_backend``'s) Ceph settings for ``cluster``: client.admin."""
    return {"ceph_conf": str(cluster.conf), "ceph_user": "admin",
            "ceph_keyring": str(cluster.keyring)}


def start_agents(fleet: AgentFleet, ceph: dict[str, str]) -> None:
    """Format the fleet's image and start readers ``r1``, ``r2`` and writer ``w`` on it (the
    writer pushes to both): the shape every benchmark of the agents measures."""
    format_image(fleet.backend, "bench", **ceph)
    for node in ("r1", "r2"):
        fleet.add(node)
    fleet.add("w", role="writer", readers={n: fleet[n].address for n in ("r1", "r2")})


@contextlib.contextmanager
def served_image(cluster: CephCluster, image: str, size_mib: int,
                 work: Path) -> Iterator[AgentFleet]:
    """A fresh thin image in the cluster's pool, served by :func:`start_agents`'s fleet;
    afterwards the agents are stopped and the image removed."""
    ceph = ceph_credentials(cluster)
    spec = f"{cluster.pool}/{image}"
    subprocess.run(["rbd", "-c", str(cluster.conf), "create", "--size", f"{size_mib}M", spec],
                   check=True, timeout=120)
    fleet = AgentFleet("bench", f"rbd:{spec}", work, extra={**ceph, "log_level": "info"})
    try:
        start_agents(fleet, ceph)
        yield fleet
    finally:
        fleet.close()
        subprocess.run(["rbd", "-c", str(cluster.conf), "rm", "--no-progress", spec],
                       capture_output=True, timeout=120)


def run(cluster: CephCluster, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every measurement on one cluster. Large files: ``args.rounds`` rounds, each agent figure
    bracketed by ``rbd bench`` runs just before and just after it (a fresh bench image per
    round, one more closing round): other jobs' I/O on the shared host swings absolute speeds
    by 2-3x within a minute, so a ratio against the mean of its two brackets is the honest
    one, and the median over rounds is reported."""
    size = args.size_mib * MiB
    rounds = args.rounds
    image_size = (rounds + 1) * size + 256 * MiB
    tag = uuid.uuid4().hex[:8]
    bench_images = [f"bench-{tag}-{r}" for r in range(rounds + 1)]
    agent_image = f"bench-agents-{tag}"
    conf = cluster.conf
    ceph = ceph_credentials(cluster)
    results: dict[str, Any] = {"size_mib": args.size_mib, "objectstore": cluster.objectstore,
                               "rounds": rounds}
    for name in bench_images:
        subprocess.run(["rbd", "-c", str(conf), "create", "--size", f"{size // MiB}M",
                        f"{cluster.pool}/{name}"], check=True, timeout=120)
    subprocess.run(["rbd", "-c", str(conf), "create", "--size", f"{image_size // MiB}M",
                    f"{cluster.pool}/{agent_image}"], check=True, timeout=120)
    fleet = AgentFleet("bench", f"rbd:{cluster.pool}/{agent_image}", work,
                       extra={**ceph, "log_level": "info"})
    try:
        start_agents(fleet, ceph)
        time.sleep(2)
        results["agent_idle_rss_mib_librbd"] = {
            n: round(rss_kib(fleet[n].proc.pid) / 1024, 1)  # type: ignore[union-attr]
            for n in ("w", "r1", "r2")}
        results["agent_idle_rss_mib_file"] = file_agent_rss(work / "rss")
        rbd_write: list[float] = []
        rbd_read: list[float] = []
        agent_write: list[float] = []
        agent_read: list[float] = []
        engine_read: list[float] = []
        for r in range(rounds + 1):
            spec = f"{cluster.pool}/{bench_images[r]}"
            rbd_write.append(rbd_bench(conf, spec, "write", size) / MiB)
            if r < rounds:
                agent_write.append(put_large(fleet, f"/large{r}", size) / MiB)
            rbd_read.append(rbd_bench(conf, spec, "read", size) / MiB)
            if r < rounds:
                agent_read.append(get_large(fleet, "r1", f"/large{r}", size) / MiB)
                engine_read.append(volume_read(fleet.backend, f"/large{r}", size, **ceph) / MiB)

        def ratios(agent: list[float], baseline: list[float]) -> list[float]:
            return [a / ((baseline[r] + baseline[r + 1]) / 2) for r, a in enumerate(agent)]

        results["rbd_bench_write_mib_s"] = rbd_write
        results["agent_write_mib_s"] = agent_write
        results["rbd_bench_read_mib_s"] = rbd_read
        results["agent_read_mib_s"] = agent_read
        results["volume_read_in_process_mib_s"] = engine_read
        for name, agent, baseline in (("write_ratio", agent_write, rbd_write),
                                      ("read_ratio", agent_read, rbd_read),
                                      ("engine_read_ratio", engine_read, rbd_read)):
            each = ratios(agent, baseline)
            results[name] = {"median": statistics.median(each), "rounds": each}
        # the OSD's own ceiling for small writes, bracketing every round of 4 KiB puts (each
        # one journal write shared by its group commit: files up to 16 KiB travel inline)
        def rbd_4k() -> float:
            return rbd_bench(conf, f"{cluster.pool}/{bench_images[0]}", "write", 2048 * 4096,
                             io_size=4096, threads=32, pattern="rand") / 4096

        iops = [rbd_4k()]
        runs: dict[int, list[dict[str, float]]] = {c: [] for c in args.clients}
        for _ in range(args.small_rounds):
            for clients in args.clients:
                runs[clients].append(small_puts(fleet, args.small_seconds, clients))
            iops.append(rbd_4k())
        results["rbd_bench_4k_randwrite_iops"] = iops
        results["small_4k"] = {
            str(clients): {
                "rounds": each,
                "ratio": [run["puts_per_s"] / ((iops[r] + iops[r + 1]) / 2)
                          for r, run in enumerate(each)],
                "puts_per_s": statistics.median(run["puts_per_s"] for run in each),
                "p99_ms": statistics.median(run["p99_ms"] for run in each)}
            for clients, each in runs.items()}
        results["visibility_lag"] = visibility_lag(fleet, args.lag_samples)
    finally:
        fleet.close()
        for name in (*bench_images, agent_image):
            subprocess.run(["rbd", "-c", str(conf), "rm", "--no-progress",
                            f"{cluster.pool}/{name}"], capture_output=True, timeout=120)
    return results


def main() -> int:
    """Run the benchmark and print (and optionally save) the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--objectstore", default="bluestore", choices=("bluestore", "memstore"))
    parser.add_argument("--rounds", type=int, default=3,
                        help="bracketed large-file rounds (median ratio reported)")
    parser.add_argument("--small-seconds", type=float, default=5.0)
    parser.add_argument("--small-rounds", type=int, default=7,
                        help="rounds of 4 KiB puts, each bracketed by rbd bench 4 KiB writes")
    parser.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",")],
                        default=[8, 32], help="client concurrencies for the 4 KiB puts")
    parser.add_argument("--lag-samples", type=int, default=200)
    parser.add_argument("--conf", help="use this running cluster's ceph.conf")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.size_mib % 4:
        parser.error("--size-mib must be a multiple of 4")
    work = Path(tempfile.mkdtemp(prefix="rbdfleet-bench-", dir="/var/tmp"))
    work.chmod(0o755)
    (work / "agents").mkdir()
    try:
        if args.conf:
            results = run(cluster_from_conf(Path(args.conf)), args, work / "agents")
        else:
            state = StateFile(work / "state.json")
            cluster = start_cluster(work / "ceph", state, osds=1,
                                    objectstore=args.objectstore, mgr=False)
            try:
                results = run(cluster, args, work / "agents")
            finally:
                stop_cluster(cluster, state)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average"] = os.getloadavg()
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
