"""Block-device backends vs ``rbd bench``, same run: sequential 4 MiB writes and reads through
each backend of agents/backends, with the same number of 4 MiB I/Os in flight as the
baseline ``rbd bench --io-size 4M --io-threads DEPTH --io-pattern seq``.

Backends, each on a fresh region per round (as ``rbd bench`` gets a fresh image):

- ``file``: FileDevice on a file under /var/tmp (O_DIRECT), DEPTH threads, each one
  4 MiB ``writev``/``readinto`` at a time from/into its own page-aligned buffer;
- ``loop``: DirectDevice (the ``device:`` backend of agents in VMs) on a loop block device
  (direct I/O) over a file under /var/tmp, driven like ``file``; no krbd here, so this is the
  host's disk, not Ceph: its ratio says how the block path compares with librbd on the same
  disk, not what a VM gets;
- ``librbd``: RbdDevice, two caller threads, each call a ``writev``/``readinto`` of DEPTH
  4 MiB objects from/into the caller's page-aligned buffer, with the backend's aio queue at
  depth DEPTH/2 (so DEPTH in flight in all; two callers, because a call returns only once
  all its objects did, and one caller alone would leave the queue empty at each call's end);
- ``librbd_threads``: RbdDevice, DEPTH threads each doing one 4 MiB ``writev``/``readinto``
  (one object: a synchronous librbd call) from/into its page-aligned buffer;
- ``librbd_bytes``: RbdDevice, DEPTH threads each doing one 4 MiB ``write_at`` of a
  ``bytes`` / ``read_at`` returning one (how agents/volume.py drives it today): the binding
  takes and returns ``bytes``, so this is the path without any copy in our code.

Bracketing: ``--rounds`` rounds; in each, ``rbd bench`` write, every backend's write (order
rotated per round), ``rbd bench`` read, every backend's read; each backend figure's ratio
is against the mean of the ``rbd bench`` runs before and after it (one closing round), the
median and spread over rounds are reported (the host is shared and swings 2-3x a minute).

    .venv/bin/python bench/device_bench.py [--size-mib 256] [--rounds 7] [--depth 8]
        [--conf CEPH_CONF] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.backends.direct import DirectDevice  # noqa: E402
from agents.backends.file import FileDevice  # noqa: E402
from agents.backends.librbd import RbdDevice  # noqa: E402
from agents.device import VectoredDevice, aligned_buffer  # noqa: E402
from bench.agents_bench import rbd_bench  # noqa: E402
from bench.report import emit  # noqa: E402
from orchestrator.sandbox.ceph import (  # noqa: E402
    CephCluster,
    cluster_from_conf,
    start_cluster,
    stop_cluster,
)
from orchestrator.sandbox.state import StateFile  # noqa: E402
from tests.shared_disk import LoopAttachments  # noqa: E402

MiB = 1 << 20
UNIT = 4 * MiB
RBD_MODES = ("librbd", "librbd_threads", "librbd_bytes")  # regions of the one librbd image


def timed(workers: list[Callable[[], None]]) -> float:
    """Seconds for ``workers`` to run to the end, one thread each (their buffers are made
    before: only the I/O is timed); the first error raised."""
    errors: list[BaseException] = []

    def run(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def by_threads(dev: VectoredDevice, op: str, base: int, size: int, depth: int,
               as_bytes: bool = False) -> float:
    """``depth`` threads, each one 4 MiB I/O at a time (next unit from a shared counter),
    from/into its page-aligned buffer, or (``as_bytes``) ``write_at`` of a ``bytes`` /
    ``read_at``."""
    units = iter(range(size // UNIT))
    lock = threading.Lock()
    data = os.urandom(UNIT)
    bufs = [aligned_buffer(UNIT) for _ in range(depth)]

    def worker(view: memoryview) -> Callable[[], None]:
        def work() -> None:
            while True:
                with lock:
                    unit = next(units, None)
                if unit is None:
                    return
                at = base + unit * UNIT
                if op == "write" and as_bytes:
                    dev.write_at(at, data)
                elif op == "write":
                    dev.writev(at, [view])
                elif as_bytes:
                    dev.read_at(at, UNIT)
                else:
                    dev.readinto(at, view)

        return work

    views = [memoryview(b) for b in bufs]
    try:
        for view in views:
            view[:] = data
        return size / timed([worker(v) for v in views])
    finally:
        for view, buf in zip(views, bufs, strict=True):
            view.release()
            buf.close()


def by_calls(dev: VectoredDevice, op: str, base: int, size: int, depth: int) -> float:
    """Two caller threads taking turns over the range; each call moves ``depth`` 4 MiB
    units from/into the caller's page-aligned buffer (the backend keeps them in flight)."""
    span = depth * UNIT
    spans = iter(range(0, size, span))
    lock = threading.Lock()
    bufs = [aligned_buffer(span) for _ in range(2)]
    views = [memoryview(b) for b in bufs]

    def caller(view: memoryview) -> Callable[[], None]:
        parts = [view[i * UNIT : (i + 1) * UNIT] for i in range(depth)]

        def work() -> None:
            while True:
                with lock:
                    at = next(spans, None)
                if at is None:
                    return
                n = min(span, size - at)
                if op == "write":
                    dev.writev(base + at, parts[: n // UNIT])
                else:
                    dev.readinto(base + at, view[:n])

        return work

    try:
        for view in views:
            view[:] = os.urandom(UNIT) * depth
        return size / timed([caller(v) for v in views])
    finally:
        for view, buf in zip(views, bufs, strict=True):
            view.release()
            buf.close()


def remove_image(conf: Path, pool: str, name: str) -> None:
    """``rbd rm`` (an image already gone is fine)."""
    subprocess.run(["rbd", "-c", str(conf), "rm", "--no-progress", f"{pool}/{name}"],
                   capture_output=True, timeout=120)


DRIVERS: dict[str, Callable[[VectoredDevice, str, int, int, int], float]] = {
    "file": by_threads, "loop": by_threads, "librbd": by_calls, "librbd_threads": by_threads,
    "librbd_bytes": functools.partial(by_threads, as_bytes=True)}


@contextmanager
def backends(cluster: CephCluster, work: Path, region: int, rounds: int, depth: int,
             skipped: dict[str, str]) -> Iterator[dict[str, VectoredDevice]]:
    """Every backend that this host can provide, on ``rounds`` fresh regions each; the
    others named in ``skipped`` with the reason."""
    devices: dict[str, VectoredDevice] = {}
    with ExitStack() as stack:
        for name in ("file", "loop"):
            image = work / f"{name}.img"
            with image.open("wb") as f:
                f.truncate(rounds * region)
            if name == "file":
                dev: VectoredDevice = FileDevice(image, direct=True)
            else:
                disks = LoopAttachments(image)
                stack.callback(disks.close)
                try:
                    dev = DirectDevice(disks.attach("bench", writable=True))
                except (RuntimeError, OSError) as exc:
                    skipped[name] = f"no loop device: {exc}"
                    continue
            stack.callback(dev.close)
            devices[name] = dev
        rbd_image = f"bench-dev-{uuid.uuid4().hex[:8]}"
        subprocess.run(["rbd", "-c", str(cluster.conf), "create", "--size",
                        f"{len(RBD_MODES) * rounds * region // MiB}M",
                        f"{cluster.pool}/{rbd_image}"],
                       check=True, timeout=120)
        stack.callback(remove_image, cluster.conf, cluster.pool, rbd_image)
        rbd = RbdDevice(str(cluster.conf), cluster.pool, rbd_image, "admin",
                        keyring=str(cluster.keyring), aio_depth=max(depth // 2, 1))
        stack.callback(rbd.close)
        for mode in RBD_MODES:  # one handle (one exclusive lock), a region each (see run)
            devices[mode] = rbd
        yield devices


def run(cluster: CephCluster, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The interleaved, bracketed rounds (see the module docstring)."""
    size: int = args.size_mib * MiB
    rounds: int = args.rounds
    depth: int = args.depth
    conf = cluster.conf
    tag = uuid.uuid4().hex[:8]
    bench_images = [f"bench-{tag}-{r}" for r in range(rounds + 1)]
    for name in bench_images:
        subprocess.run(["rbd", "-c", str(conf), "create", "--size", f"{size // MiB}M",
                        f"{cluster.pool}/{name}"], check=True, timeout=120)
    skipped: dict[str, str] = {}

    def region(name: str, r: int) -> int:
        """Where backend ``name`` works in round ``r`` (the librbd modes share one image,
        a part each)."""
        part = RBD_MODES.index(name) if name in RBD_MODES else 0
        return (part * rounds + r) * size

    mib_s: dict[str, list[float]] = {}
    baseline: dict[str, list[float]] = {"write": [], "read": []}
    try:
        with backends(cluster, work, size, rounds, depth, skipped) as devices:
            names = list(devices)
            for r in range(rounds + 1):
                spec = f"{cluster.pool}/{bench_images[r]}"
                order = names[r % len(names):] + names[: r % len(names)]
                for op in ("write", "read"):
                    baseline[op].append(
                        rbd_bench(conf, spec, op, size, threads=depth) / MiB)
                    if r == rounds:
                        continue
                    for name in order:
                        figure = DRIVERS[name](devices[name], op, region(name, r), size,
                                               depth) / MiB
                        mib_s.setdefault(f"{name}_{op}", []).append(figure)
                    print(f"round {r} {op}: rbd bench {baseline[op][-1]:.0f} MiB/s, " + ", ".join(
                        f"{n} {mib_s[f'{n}_{op}'][-1]:.0f}" for n in names), file=sys.stderr)
                # a round's image and regions are not read again: their space goes back
                remove_image(conf, cluster.pool, bench_images[r])
                for name in names if r < rounds else []:
                    devices[name].discard(region(name, r), size)
    finally:
        for name in bench_images:
            remove_image(conf, cluster.pool, name)
    ratios: dict[str, Any] = {}
    for key, values in mib_s.items():
        op = key.rsplit("_", 1)[1]
        each = [v / ((baseline[op][r] + baseline[op][r + 1]) / 2) for r, v in enumerate(values)]
        ratios[key] = {"median": statistics.median(each), "min": min(each), "max": max(each),
                       "rounds": each}
    return {"size_mib": args.size_mib, "rounds": rounds, "depth": depth,
            "objectstore": cluster.objectstore, "rbd_bench_mib_s": baseline,
            "backend_mib_s": mib_s, "ratio": ratios, "skipped": skipped}


def main() -> int:
    """Run the benchmark and print (and optionally save) the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="per backend, op and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--depth", type=int, default=8, help="4 MiB I/Os in flight")
    parser.add_argument("--objectstore", default="bluestore", choices=("bluestore", "memstore"))
    parser.add_argument("--conf", help="use this running cluster's ceph.conf")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.size_mib % (4 * args.depth):
        parser.error("--size-mib must be a multiple of 4 x --depth")
    work = Path(tempfile.mkdtemp(prefix="rbdfleet-device-bench-", dir="/var/tmp"))
    try:
        if args.conf:
            results = run(cluster_from_conf(Path(args.conf)), args, work)
        else:
            state = StateFile(work / "state.json")
            cluster = start_cluster(work / "ceph", state, osds=1,
                                    objectstore=args.objectstore, mgr=False)
            try:
                results = run(cluster, args, work)
            finally:
                stop_cluster(cluster, state)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average"] = os.getloadavg()
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
