"""rbdfleet beside CephFS on the same cluster, same run (issue 9).

One throwaway cluster (1 OSD, bluestore, with a mgr: ``ceph df`` needs one) holds both: an RBD
image served by 1 writer + 2 reader agents (real processes, librbd backend, exactly as
bench/agents_bench.py starts them) and a CephFS with one MDS (two more pools). Measured side
by side, ours then CephFS's, the order swapped every round (``--rounds``), each ratio
ours ÷ CephFS within its round: other jobs swing this host's speed 2-3x within a minute, so
only neighbours in time compare.

Each round, for each system:
- large file write (``--size-mib``): ours one streamed ``PUT`` through the writer (acked =
  durable and both readers acked); CephFS buffered 4 MiB writes through libcephfs, then
  ``fsync``. MiB/s.
- large file read: ours a streamed ``GET`` from reader ``r1``; CephFS the file read in 4 MiB
  calls by another client (a second mount, in its own process), so none of it is in the
  writer's cache. MiB/s.
- 4 KiB creates (``--files`` new files): 8 client threads in one process; ours durable puts
  acked by both readers (one keep-alive connection per thread), CephFS create + write +
  ``fsync`` + close on one mount. Files/s. The CephFS writer mount is then unmounted (it gives
  up its caps: the readers' MDS requests need no recall from it, CephFS's best case).
- stat from 2 clients: 2 client processes (one per reader for ours: ``GET /v1/stat`` to
  ``r1`` and ``r2``; one libcephfs mount each for CephFS), each once over all the round's new
  files, one request at a time, both at once. Stats/s of both together.
- 4 KiB reads from 2 clients: the same, each reading every new file once (for CephFS: open,
  read, close; first touch, so from the OSD, not the client's cache). Reads/s.

Before the rounds, storage: ``--files`` 4 KiB files into each (ours through the writer, CephFS
through one mount, 8 threads), then stored bytes ÷ user bytes, at rest: our writer has
settled (small files home, ring given back), the CephFS client unmounted and the MDS journal
flushed. Stored bytes are ``ceph df detail``'s ``stored`` (as bench/storage_bench.py reads it,
once settled) plus the pool's omap bytes after a deep scrub (``ceph df`` leaves omap out here,
and the MDS keeps its dentries and inodes there). For CephFS both its pools count.

    .venv/bin/python bench/cephfs_bench.py [--rounds 7] [--files 2000] [--size-mib 256]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cephfs  # noqa: E402
import rados  # noqa: E402

from agents.core.protocol import PutRequest  # noqa: E402
from bench.agents_bench import (  # noqa: E402
    BLOCK,
    MiB,
    _conn,
    get_large,
    put_large,
    served_image,
)
from bench.report import emit  # noqa: E402
from bench.storage_bench import settled, usage_by_pool, wait_settled  # noqa: E402
from orchestrator.sandbox.ceph import (  # noqa: E402
    CephCluster,
    CephFs,
    start_cluster,
    start_mds,
    stop_cluster,
)
from orchestrator.sandbox.state import StateFile  # noqa: E402
from tests.fixtures.agents import AgentFleet, client_context  # noqa: E402

SMALL = 4096
OMAP_PAGE = 1024
CREATE_THREADS = 8  # client threads creating 4 KiB files, the same on both sides
SYSTEMS = ("ours", "cephfs")
METRICS = ("large_write_mib_s", "large_read_mib_s", "create_4k_per_s", "stat_per_s",
           "small_read_per_s")


# --------------------------------------------------------------------------- pure helpers


def round_order(round_: int) -> tuple[str, str]:
    """Which system goes first in ``round_``: ours in even rounds, CephFS in odd ones, so
    neither always runs on a cluster the other has just warmed or left busy."""
    return SYSTEMS if round_ % 2 == 0 else (SYSTEMS[1], SYSTEMS[0])


def file_names(prefix: str, count: int) -> list[str]:
    """``count`` distinct absolute paths under ``/prefix``."""
    return [f"/{prefix}/f{i:05d}" for i in range(count)]


def summary(values: Sequence[float]) -> dict[str, Any]:
    """A figure over rounds: median, min, max and the rounds themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": list(values)}


def ratios(rounds: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per metric, ours ÷ CephFS of each round (both taken in that round) with the spread,
    and each side's own figures."""
    result = {}
    for metric in METRICS:
        ours = [r["ours"][metric] for r in rounds]
        theirs = [r["cephfs"][metric] for r in rounds]
        result[metric] = {"ours": summary(ours), "cephfs": summary(theirs),
                          "ratio": summary([a / b for a, b in zip(ours, theirs, strict=True)])}
    return result


def storage_ratio(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
                  pools: Sequence[str], user_bytes: int) -> float:
    """Bytes the files added to ``pools`` (``ceph df``'s ``stored`` plus the PGs' omap bytes)
    ÷ user bytes."""
    return sum(after[p][key] - before[p][key]
               for p in pools for key in ("stored", "omap_bytes")) / user_bytes


def omap_size(pairs: Iterable[tuple[str, bytes]]) -> int:
    """Bytes of omap entries: each key (UTF-8) and its value, as a PG counts them."""
    return sum(len(key.encode()) + len(value) for key, value in pairs)


def omap_pairs(ioctx: rados.Ioctx, name: str) -> Iterator[tuple[str, bytes]]:
    """Every omap entry of object ``name``, a page of :data:`OMAP_PAGE` per read."""
    after = ""
    while True:
        with rados.ReadOpCtx() as op:
            entries, _ = ioctx.get_omap_vals(op, after, "", OMAP_PAGE)
            ioctx.operate_read_op(op, name)
            page = list(entries)
        yield from page
        if len(page) < OMAP_PAGE:
            return
        after = page[-1][0]


def two_client_rate(results: Sequence[tuple[int, float]]) -> float:
    """Operations per second of clients that started together: every client's operations ÷
    the time the slowest one took."""
    return sum(ops for ops, _ in results) / max(elapsed for _, elapsed in results)


def say(message: str) -> None:
    """Progress on stderr (stdout carries the JSON)."""
    print(f"{time.strftime('%H:%M:%S')} cephfs_bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- client threads


def concurrently(names: Sequence[str], threads: int,
                 work: Callable[[Sequence[str]], None]) -> float:
    """``work`` over ``names`` split across ``threads`` threads (thread k takes every k-th
    name); names per second from the first start to the last end. A thread's exception is
    raised here."""
    errors: list[BaseException] = []

    def guarded(share: Sequence[str]) -> None:
        try:
            work(share)
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    workers = [threading.Thread(target=guarded, args=(names[k::threads],))
               for k in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return len(names) / elapsed


def ours_create(fleet: AgentFleet, names: Sequence[str]) -> float:
    """4 KiB durable puts, each acked by both readers, from :data:`CREATE_THREADS` threads
    (one keep-alive connection each); files/s."""
    payload = os.urandom(SMALL)
    headers = PutRequest(grant=fleet.grant("w", "writer", fleet.epoch("w")), size=SMALL,
                         readers=fleet.reader_addresses("r1", "r2")).to_headers()

    def put(share: Sequence[str]) -> None:
        conn = _conn(fleet["w"].address)
        try:
            for name in share:
                conn.request("PUT", "/v1/files" + name, body=payload, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 201 or json.loads(body)["lagging"]:
                    raise RuntimeError(f"put {name}: {resp.status} {body[:200]!r}")
        finally:
            conn.close()

    return concurrently(names, CREATE_THREADS, put)


def cephfs_mount(conf: Path) -> cephfs.LibCephFS:
    """A libcephfs client of the sandbox cluster, as client.admin, mounted."""
    fs = cephfs.LibCephFS(conffile=str(conf), auth_id="admin")
    fs.mount()
    return fs


def cephfs_create(fs: cephfs.LibCephFS, names: Sequence[str]) -> float:
    """4 KiB files created, written and fsynced (data and metadata durable) before close, from
    :data:`CREATE_THREADS` threads on one mount (libcephfs calls release the GIL); files/s."""
    payload = os.urandom(SMALL)

    def create(share: Sequence[str]) -> None:
        for name in share:
            fd = fs.open(name, "w", 0o644)
            fs.write(fd, payload, 0)
            fs.fsync(fd, 0)
            fs.close(fd)

    return concurrently(names, CREATE_THREADS, create)


def cephfs_write_large(fs: cephfs.LibCephFS, path: str, size: int) -> float:
    """``size`` bytes in 4 MiB buffered writes, then fsync; bytes/s to the end of the fsync."""
    block = os.urandom(BLOCK)
    started = time.perf_counter()
    fd = fs.open(path, "w", 0o644)
    for offset in range(0, size, BLOCK):
        fs.write(fd, block, offset)
    fs.fsync(fd, 0)
    fs.close(fd)
    return size / (time.perf_counter() - started)


# --------------------------------------------------------------------------- client processes


def _client_loop(conn: multiprocessing.connection.Connection) -> None:
    """A client process: runs one operation per message until its pipe closes. Operations
    return ``(operations, seconds)`` or, for a large read, bytes/s."""
    mounted: cephfs.LibCephFS | None = None

    def each(paths: Sequence[str], one: Callable[[str], None]) -> tuple[int, float]:
        started = time.perf_counter()
        for path in paths:
            one(path)
        return len(paths), time.perf_counter() - started

    def cephfs_stat(path: str) -> None:
        assert mounted is not None
        mounted.stat(path)

    def cephfs_read(path: str, size: int) -> None:
        assert mounted is not None
        fd = mounted.open(path, "r", 0)
        got = mounted.read(fd, 0, size)
        mounted.close(fd)
        if len(got) != size:
            raise RuntimeError(f"{path}: read {len(got)} of {size} bytes")

    def ours_each(address: str, grant: str, paths: Sequence[str], route: str,
                  size: int | None) -> tuple[int, float]:
        http_conn = _conn(address)
        headers = {"Authorization": "Bearer " + grant}

        def one(path: str) -> None:
            http_conn.request("GET", route + path, headers=headers)
            resp = http_conn.getresponse()
            body = resp.read()
            if resp.status != 200 or (size is not None and len(body) != size):
                raise RuntimeError(f"GET {route}{path}: {resp.status}, {len(body)} bytes")

        try:
            return each(paths, one)
        finally:
            http_conn.close()

    def cephfs_read_large(path: str, size: int) -> float:
        assert mounted is not None
        started = time.perf_counter()
        fd = mounted.open(path, "r", 0)
        got = 0
        while chunk := mounted.read(fd, got, BLOCK):
            got += len(chunk)
        mounted.close(fd)
        if got != size:
            raise RuntimeError(f"{path}: read {got} of {size} bytes")
        return size / (time.perf_counter() - started)

    while True:
        op, args = conn.recv()
        if op == "stop":
            break
        try:
            result: Any = None
            if op == "mount":
                mounted = cephfs_mount(args[0])
            elif op == "unmount" and mounted is not None:
                mounted.shutdown()
                mounted = None
            elif op == "cephfs_stat":
                result = each(args[0], cephfs_stat)
            elif op == "cephfs_read":
                result = each(args[0], functools.partial(cephfs_read, size=args[1]))
            elif op == "cephfs_read_large":
                result = cephfs_read_large(*args)
            elif op == "ours_stat":
                result = ours_each(*args, route="/v1/stat", size=None)
            elif op == "ours_read":
                result = ours_each(*args[:3], route="/v1/files", size=args[3])
            elif op != "unmount":
                raise ValueError(f"no client operation {op!r}")
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    if mounted is not None:
        mounted.shutdown()


class ClientProcess:
    """A forked client process (its own GIL, its own libcephfs mount) driven over a pipe."""

    def __init__(self, context: multiprocessing.context.ForkContext) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_client_loop, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def send(self, op: str, *args: Any) -> None:
        self.conn.send((op, args))

    def receive(self) -> Any:
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"client process failed:\n{result}")
        return result

    def call(self, op: str, *args: Any) -> Any:
        self.send(op, *args)
        return self.receive()

    def close(self) -> None:
        # a message, not EOF: every process forked later holds a copy of this pipe's end
        with contextlib.suppress(OSError):
            self.send("stop")
        self.conn.close()
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def both(clients: Sequence[ClientProcess], calls: Sequence[tuple[str, tuple[Any, ...]]]
         ) -> float:
    """One call per client, all at once; operations/s of them together."""
    for client, (op, args) in zip(clients, calls, strict=True):
        client.send(op, *args)
    return two_client_rate([client.receive() for client in clients])


# --------------------------------------------------------------------------- the benchmark


class Bench:
    """Both systems on one cluster: the agents, a CephFS writer mount (per phase) in this
    process and two client processes."""

    def __init__(self, cluster: CephCluster, fs: CephFs, fleet: AgentFleet,
                 clients: Sequence[ClientProcess], size: int, files: int) -> None:
        self.cluster, self.fs, self.fleet, self.clients = cluster, fs, fleet, clients
        self.size, self.files = size, files

    def storage(self) -> dict[str, Any]:
        """``files`` 4 KiB files into each system; stored ÷ user bytes at rest."""
        pools = (self.cluster.pool, *self.fs.pools)

        def usage() -> dict[str, dict[str, int]] | None:
            known = usage_by_pool(self.cluster)
            return {p: known[p] for p in pools} if set(pools) <= set(known) else None

        def at_rest(previous: dict[str, dict[str, int]] | None) -> dict[str, dict[str, int]]:
            omap = self.omap_bytes(pools)
            usage_now = settled(usage, previous)
            return {p: {**usage_now[p], "omap_bytes": omap[p]} for p in pools}

        wait_settled(self.fleet)
        before = at_rest(None)
        say("storage: empty stores read")
        names = file_names("store", self.files)
        ours_create(self.fleet, names)
        wait_settled(self.fleet)
        writer = cephfs_mount(self.cluster.conf)
        writer.mkdir("/store", 0o755)
        cephfs_create(writer, names)
        writer.shutdown()
        self.flush_mds_journal()
        say(f"storage: {self.files} files in each, at rest")
        after = at_rest(before)
        say("storage: full stores read")
        user = self.files * SMALL
        ours = storage_ratio(before, after, (self.cluster.pool,), user)
        theirs = storage_ratio(before, after, self.fs.pools, user)
        return {"files": self.files, "user_bytes": user, "before": before, "after": after,
                "ours": ours, "cephfs": theirs, "ratio": ours / theirs}

    def omap_bytes(self, pools: Sequence[str]) -> dict[str, int]:
        """Omap bytes (keys + values) of every object of each pool, read through librados:
        ``ceph df``'s ``stored`` leaves omap out here (``stored_omap`` stays 0 on this Pacific
        cluster; the PGs count omap only when deep-scrubbed), while the MDS keeps every
        dentry and inode in the omap of its directory objects."""
        client = rados.Rados(conffile=str(self.cluster.conf), rados_id="admin")
        client.connect(timeout=30)
        try:
            totals = {}
            for pool in pools:
                with client.open_ioctx(pool) as ioctx:
                    totals[pool] = sum(omap_size(omap_pairs(ioctx, obj.key))
                                       for obj in ioctx.list_objects())
            return totals
        finally:
            client.shutdown()

    def flush_mds_journal(self) -> None:
        """The MDS writes its journaled metadata home and trims the journal (at rest, as our
        writer's settled state is)."""
        socket = self.cluster.dir / "run" / f"{self.fs.mds}.asok"
        subprocess.run(["ceph", "--admin-daemon", str(socket), "flush", "journal"],
                       check=True, capture_output=True, timeout=120)

    def one_round(self, round_: int) -> dict[str, dict[str, float]]:
        """Every metric for both systems, per metric in this round's order."""
        order = round_order(round_)
        large = f"/large{round_}"
        names = file_names(f"r{round_}", self.files)
        figures: dict[str, dict[str, float]] = {"ours": {}, "cephfs": {}}
        writer = cephfs_mount(self.cluster.conf)
        writer.mkdir(f"/r{round_}", 0o755)
        steps: dict[str, dict[str, Callable[[], float]]] = {
            "large_write_mib_s": {
                "ours": lambda: put_large(self.fleet, large, self.size) / MiB,
                "cephfs": lambda: cephfs_write_large(writer, large, self.size) / MiB},
            "large_read_mib_s": {
                "ours": lambda: get_large(self.fleet, "r1", large, self.size) / MiB,
                "cephfs": lambda: self.clients[0].call("cephfs_read_large", large,
                                                       self.size) / MiB},
            "create_4k_per_s": {
                "ours": lambda: ours_create(self.fleet, names),
                "cephfs": lambda: cephfs_create(writer, names)},
            "stat_per_s": {
                "ours": lambda: both(self.clients, self.ours_calls("ours_stat", names)),
                "cephfs": lambda: both(self.clients, [("cephfs_stat", (names,))] * 2)},
            "small_read_per_s": {
                "ours": lambda: both(self.clients, self.ours_calls("ours_read", names, SMALL)),
                "cephfs": lambda: both(self.clients, [("cephfs_read", (names, SMALL))] * 2)},
        }
        try:
            for metric in METRICS:
                for system in order:
                    figures[system][metric] = steps[metric][system]()
                say(f"round {round_}: {metric} ours {figures['ours'][metric]:.1f}, "
                    f"cephfs {figures['cephfs'][metric]:.1f}")
                if metric == "create_4k_per_s":
                    writer.shutdown()  # flushes and gives up its caps before the readers come
        finally:
            writer.shutdown()  # a no-op once shut down
        return figures

    def ours_calls(self, op: str, names: Sequence[str], *extra: Any
                   ) -> list[tuple[str, tuple[Any, ...]]]:
        """One call per client process, the first to reader ``r1``, the second to ``r2``."""
        return [(op, (self.fleet[node].address,
                      self.fleet.grant(node, "reader", self.fleet.epoch(node)), names, *extra))
                for node in ("r1", "r2")]


def run(cluster: CephCluster, fs: CephFs, clients: Sequence[ClientProcess],
        args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The storage reading, then ``args.rounds`` rounds, on a fresh image served by the
    agents and the cluster's CephFS."""
    size = args.size_mib * MiB
    image = f"bench-cephfs-{uuid.uuid4().hex[:8]}"
    image_mib = args.rounds * (args.size_mib + 2 * args.files * SMALL // MiB) + 512
    with served_image(cluster, image, image_mib, work) as fleet:
        say("agents up")
        for client in clients:
            client.call("mount", cluster.conf)
        try:
            bench = Bench(cluster, fs, fleet, clients, size, args.files)
            started = time.monotonic()
            storage = bench.storage()
            seconds = {"storage": round(time.monotonic() - started, 1)}
            started = time.monotonic()
            rounds = [bench.one_round(r) for r in range(args.rounds)]
            seconds["rounds"] = round(time.monotonic() - started, 1)
        finally:
            for client in clients:
                client.call("unmount")
    return {"size_mib": args.size_mib, "files": args.files, "rounds": args.rounds,
            "create_threads": CREATE_THREADS, "objectstore": cluster.objectstore,
            "order": [list(round_order(r)) for r in range(args.rounds)],
            "per_round": rounds, "metrics": ratios(rounds), "storage_4k": storage,
            "seconds": seconds}


def main() -> int:
    """Run the benchmark on its own cluster and print (and optionally save) the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--files", type=int, default=2000,
                        help="4 KiB files per round and for the storage reading")
    parser.add_argument("--size-mib", type=int, default=256, help="the large file")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.size_mib % 4 or args.size_mib <= 0:
        parser.error("--size-mib must be a positive multiple of 4")
    if args.rounds < 1 or args.files < 1:
        parser.error("--rounds and --files must be at least 1")
    client_context()  # the test CA's files exist before the client processes share them
    # forked now, before any thread, cluster or mount of this process exists
    clients = [ClientProcess(multiprocessing.get_context("fork")) for _ in range(2)]
    work = Path(tempfile.mkdtemp(prefix="rbdfleet-cephfs-", dir="/var/tmp"))
    work.chmod(0o755)
    (work / "agents").mkdir()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    try:
        state = StateFile(work / "state.json")
        cluster = start_cluster(work / "ceph", state, osds=1, objectstore="bluestore", mgr=True)
        try:
            say("cluster up")
            fs = start_mds(cluster, state)
            say(f"{fs.mds} active")
            results = run(cluster, fs, clients, args, work / "agents")
        finally:
            stop_cluster(cluster, state)
            say("cluster stopped")
    finally:
        for client in clients:
            client.close()
        shutil.rmtree(work, ignore_errors=True)
    results.update(started=started, load_average_before=load_before,
                   load_average_after=os.getloadavg())
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
