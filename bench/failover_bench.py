"""Writer failover benchmark: N kill -9 of the writer under load, timings split by phase.

Setup: a sandbox Ceph cluster (coordinator state in RADOS, lease 2 s), one writer + two
readers as real agent processes on a file image (``--backend file``) or an RBD image
(``--backend rbd``, fence = blocklist of the exclusive-lock owner). One client thread puts
``--value-size`` byte values (default 4 KiB) continuously, two read them back from the
in-sync readers.

Per kill, measured from the SIGKILL (monotonic clock, same process):
  detect    -> the coordinator confirmed the writer dead (NodeFailed)
  fence     -> FenceNode done
  promote   -> PromoteNode done (agent replayed the journal and accepts writes)
  announce  -> PublishMap done (the new map is persisted and published)
  writable  -> the client's first put acknowledged at the new epoch (target: <= 3 s p99)
Reads: failed reads / total reads during the whole run (target: 0).

The killed agent is restarted as a reader and must be back in sync before the next kill; if it
refuses to start (or never gets back in sync) the benchmark fails loudly: an image a crashed
writer leaves must always be openable while the new writer goes on.

    .venv/bin/python -m bench.failover_bench --kills 20 [--backend file|rbd] [--value-size N]
                                             [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from agents.errors import NotFound, RbdfleetError
from orchestrator.client import FleetClient
from tests.coordinator_harness import (
    IMAGE_SIZE,
    LockOwnerFencer,
    PidFencer,
    bootstrap_map,
    file_image,
    fleet_client,
    rados_store,
    start_api,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import AgentFleet, format_image
from tests.fixtures.ceph import connect_admin, managed_cluster

PHASES = ("detect", "fence", "promote", "announce", "writable")


class Load:
    """A putting thread and reading threads; records acks (time, epoch) and read outcomes."""

    def __init__(self, client: FleetClient, value_size: int) -> None:
        self.client = client
        self.value = b"x" * value_size
        self.stop = threading.Event()
        self.acks: list[tuple[float, int]] = []
        self.reads_ok = 0
        self.reads_failed = 0
        self.threads = [threading.Thread(target=self._put)] + [
            threading.Thread(target=self._get) for _ in range(2)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _put(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                ack = self.client.put_bytes(self.value, f"/bench/{n % 16}")
            except RbdfleetError:
                continue
            self.acks.append((time.monotonic(), ack.epoch))

    def _get(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                self.client.get_bytes(f"/bench/{n % 16}")
            except NotFound:
                pass
            except RbdfleetError:
                self.reads_failed += 1
                continue
            self.reads_ok += 1
            time.sleep(0.002)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def fleet_state(service: Any, fleet: AgentFleet) -> str:
    """Each member's role and sync state in the coordinator's map, and whether its process
    is alive (a node the coordinator fenced is not restarted by this benchmark)."""
    m = service.require_active() if service.active else None
    members = {x.name: x for x in m.members} if m is not None else {}
    return ", ".join(
        f"{name}: {members[name].role if name in members else 'not in map'}"
        f"{' in sync' if name in members and members[name].in_sync else ''}"
        f"{'' if agent.alive else ' (process dead)'}"
        for name, agent in sorted(fleet.agents.items())
    )


def run(kills: int, backend: str, workdir: Path, value_size: int) -> dict[str, Any]:
    """One fleet on a fresh cluster; up to ``kills`` writer kills. Raw samples + reads."""
    with managed_cluster("rbdfleet-bench-failover-", osds=1, objectstore="memstore") as managed:
        cluster = managed.cluster
        admin = connect_admin(cluster)
        coordinator = start_api()
        fleet = AgentFleet(
            f"bench-{uuid.uuid4().hex[:6]}", "", workdir, extra={"coordinator": coordinator.url}
        )
        ceph: dict[str, Any] = {}
        if backend == "rbd":
            import rbd

            image = f"bench-{uuid.uuid4().hex[:6]}"
            with admin.open_ioctx(cluster.pool) as ioctx:
                rbd.RBD().create(
                    ioctx,
                    image,
                    IMAGE_SIZE,
                    old_format=False,
                    features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
                )
            fleet.backend = f"rbd:{cluster.pool}/{image}"
            ceph = {
                "ceph_conf": str(cluster.conf),
                "ceph_user": "admin",
                "ceph_keyring": str(cluster.keyring),
            }
            fleet.extra.update(ceph)
            fencer: Any = LockOwnerFencer(admin, cluster.pool, image)
        else:
            fleet.backend = f"file:{file_image(workdir / 'image.raw')}"
            fencer = PidFencer(fleet)
        format_image(fleet.backend, fleet.name, **ceph)
        for node in ("r1", "r2"):
            fleet.add(node)
        fleet.add("w", role="writer", readers={n: fleet[n].address for n in ("r1", "r2")})
        store = rados_store(admin, cluster.pool, fleet.name)
        service = start_service(coordinator, store, fencer, bootstrap_map(fleet))
        client = fleet_client([coordinator.url], fleet.name)
        samples: dict[str, list[float]] = {p: [] for p in PHASES}
        load = Load(client, value_size)
        try:
            wait_in_sync(service, 30)
            load.start()
            for i in range(kills):
                time.sleep(1.0)
                try:
                    wait_until(
                        lambda: (
                            service.active
                            and service.require_active().writer is not None
                            and len(service.require_active().in_sync_readers()) == 2
                        ),
                        60,
                        f"a writer and 2 in-sync readers before kill {i + 1}",
                    )
                except AssertionError as exc:  # say who is missing (dead? out of sync?)
                    raise AssertionError(f"{exc}: {fleet_state(service, fleet)}") from exc
                m = service.require_active()
                assert m.writer is not None
                victim, epoch = m.writer, m.epoch
                mark = len(service.timeline)
                killed_at = time.monotonic()
                fleet[victim].kill()
                wait_until(
                    lambda epoch=epoch: any(e > epoch for _, e in load.acks[-50:]),
                    30,
                    f"writes at a new epoch after kill {i + 1}",
                )
                events = list(service.timeline)[mark:]
                writable = min(t for t, e in load.acks if e > epoch)
                # Each phase is the first such event after the previous phase (a map published
                # for another reason, e.g. a reader back in sync, does not count).
                since = killed_at
                for phase, key in (
                    ("detect", "NodeFailed"),
                    ("fence", "FenceNode"),
                    ("promote", "PromoteNode"),
                    ("announce", "PublishMap"),
                ):
                    at = next((t for t, what, _ in events if what == key and t >= since), None)
                    if at is None:
                        samples[phase].append(float("nan"))
                        continue
                    samples[phase].append(at - killed_at)
                    since = at
                samples["writable"].append(writable - killed_at)
                print(
                    f"kill {i + 1:>2}: {victim} -> {service.require_active().writer} "
                    + " ".join(f"{p}={samples[p][-1]:.3f}" for p in PHASES),
                    flush=True,
                )
                # Bring the victim back as a reader and wait until it is in sync again.
                agent = fleet[victim]
                agent.config["role"] = "reader"
                agent.config["readers"] = {}
                try:
                    agent.start()
                except RuntimeError as exc:  # the agent refused to start: a bug, never skipped
                    raise RuntimeError(
                        f"{victim} refused to restart after kill {i + 1}: {str(exc)[-1500:]}"
                    ) from exc
                wait_until(
                    lambda v=victim: (
                        v in [r.name for r in service.require_active().in_sync_readers()]
                    ),
                    60,
                    f"{victim} back in sync",
                )
        finally:
            load.finish()
            coordinator.stop()
            store.close()
            fleet.close()
            admin.shutdown()
    return {"samples": samples, "reads_ok": load.reads_ok, "reads_failed": load.reads_failed}


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """p50 / p99 / max per phase."""
    return {
        phase: {"p50": statistics.median(v), "p99": percentile(v, 99), "max": max(v)}
        for phase, v in samples.items()
        if v
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--backend", choices=("file", "rbd"), default="file")
    parser.add_argument("--value-size", type=int, default=4096, help="bytes per put")
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep agent logs")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rbdfleet-fb-"))
        part = run(args.kills, args.backend, Path(tmp), args.value_size)
    samples: dict[str, list[float]] = part["samples"]
    reads_ok, reads_failed = part["reads_ok"], part["reads_failed"]
    kills = len(samples["writable"])
    result: dict[str, Any] = {
        "kills": kills,
        "backend": args.backend,
        "value_size": args.value_size,
        **summarize(samples),
        "reads": {"total": reads_ok + reads_failed, "failed": reads_failed},
    }
    print(
        f"\nwriter failover, {kills} kills, {args.backend} image, "
        f"{args.value_size} B puts (seconds from SIGKILL)"
    )
    print(f"{'phase':<10} {'p50':>7} {'p99':>7} {'max':>7}")
    for phase in PHASES:
        r = result[phase]
        print(f"{phase:<10} {r['p50']:>7.3f} {r['p99']:>7.3f} {r['max']:>7.3f}")
    reads = result["reads"]
    print(f"reads: {reads['total']} total, {reads['failed']} failed")
    target = result["writable"]["p99"] <= 3.0 and reads["failed"] == 0
    print(f"targets (writable <= 3 s p99, 0 failed reads): {'met' if target else 'NOT met'}")
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
