"""Promotion: time from the promote request to the first acknowledged write, warm vs cold.

Per store size (``--files``), one file image is bulk-loaded once (below), then ``--rounds``
rounds each promote one reader warm and one cold, in alternating order (warm first in even
rounds), all in the same run on the same image:

1. start a reader agent (a real ``python -m agents serve`` process on the image; it opens the
   volume cold, which is not measured) while the current writer agent is running;
2. the writer acknowledges ``--tail-puts`` small puts, which the reader follows by its journal
   tail (it may still lack the last few: the warm path reads them from the image);
3. SIGKILL the writer (it is fenced by being dead);
4. cold only: rewrite the superblock with the next generation, same geometry (what an
   administrator's tool may do): the reader's state no longer matches the image, so the
   agent takes its fallback, ``Volume.open`` on the read-write handle, i.e. the cold path
   exactly as a promotion without warm state runs it;
5. measure ``POST /v1/promote`` (new epoch, no readers) then one 4 KiB ``PUT`` acknowledged:
   the figure is request sent -> put answered 201. The agent's log must say
   ``event=promotion_warm`` or ``event=promotion_cold`` as intended, or the round fails.

The promoted reader is the next round's writer. After the rounds, the last writer takes 4 KiB
puts from ``--growth-clients`` clients for ``--growth-seconds`` (the store keeps growing past
its ``--files``; no reader is in sync then, so each put waits for its own durability alone):
their latency percentiles, p99.9 and the slowest included, say whether work that grows with
the store (checkpoints, the tree's commits) stalls writers. Bulk loader: the metadata tree
is built in this process by the engine's own B+tree (``agents.core.btree``, keys inserted in
order, 1 000 files per directory, 16-byte inline files) on pages allocated from the data area, and
its root and free map written as the image's checkpoint by the engine's codec
(``agents.core.checkpoint``); the agents then open the image as deployed. Each reader's
RSS once its volume is open is recorded (``reader_rss_mib``) with its open time. Usage:

    .venv/bin/python bench/promote_bench.py [--files 10000,100000] [--rounds 7]
        [--tail-puts 50] [--growth-seconds 30] [--growth-clients 8] [--workdir DIR]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.backends.file import FileDevice  # noqa: E402
from agents.core.superblock import SLOTS, Superblock, choose  # noqa: E402
from agents.device import ALIGN  # noqa: E402
from agents.testing import bulk_format  # noqa: E402
from bench.agents_bench import small_puts  # noqa: E402
from bench.run_all import spread  # noqa: E402
from tests.fixtures.agents import AgentClient, AgentFleet  # noqa: E402

PER_DIR = 1000
OPEN_TIMEOUT = 1800.0  # an agent opening 10^6 files cold on a loaded machine: minutes
GiB = 1 << 30


TXN_KEYS = 50_000  # keys per bulk transaction (its dirty pages are held in memory)


def image_bytes(files: int) -> int:
    """A sparse image with room for the tree and the benchmark's puts."""
    return max(2 * GiB, min(files * 8 << 10, 16 * GiB))



def bulk_image(path: Path, fleet: str, files: int) -> float:
    """Format ``path`` and make its checkpoint hold ``files`` files; seconds taken."""
    started = time.monotonic()
    with path.open("wb") as f:
        f.truncate(image_bytes(files))
    device = FileDevice(str(path))
    try:
        bulk_format(device, fleet=fleet, files=files, per_dir=PER_DIR, txn_keys=TXN_KEYS)
    finally:
        device.close()
    return time.monotonic() - started


def rss_mib(pid: int) -> float:
    """Resident set of process ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def bump_generation(path: Path) -> None:
    """Rewrite the superblock as its next generation (same geometry)."""
    with path.open("r+b") as f:
        raw = f.read(2 * ALIGN)
        sb = choose([raw[s : s + ALIGN] for s in SLOTS])
        bumped = Superblock(**{**sb.__dict__, "generation": sb.generation + 1})
        f.seek(bumped.slot)
        f.write(bumped.encode())


class Chain:
    """The agents of one image: the current writer, and readers promoted one by one."""

    def __init__(self, fleet: AgentFleet, tail_puts: int) -> None:
        self.fleet = fleet
        self.tail_puts = tail_puts
        self.epoch = 2
        self.serial = 0
        self.writer = "w0"
        started = time.monotonic()
        fleet.add(self.writer, role="writer", epoch=self.epoch, log_level="info",
                  start_timeout=OPEN_TIMEOUT)
        self.open_s = [time.monotonic() - started]
        self.reader_rss: list[float] = []

    def round(self, mode: str) -> float:
        """Promote a fresh reader (``mode``: warm or cold); request -> first ack, seconds."""
        fleet = self.fleet
        self.serial += 1
        node = f"r{self.serial}"
        started = time.monotonic()
        # ready once its volume is open (cold, not measured)
        fleet.add(node, log_level="info", start_timeout=OPEN_TIMEOUT)
        self.open_s.append(time.monotonic() - started)
        proc = fleet[node].proc
        assert proc is not None
        self.reader_rss.append(rss_mib(proc.pid))
        grant = fleet.grant(self.writer, "writer", self.epoch)
        for i in range(self.tail_puts):
            resp = fleet.client.put(fleet[self.writer].address, f"/tail/{node}/{i}", b"t" * 100,
                                    grant)
            assert resp.status == 201, resp.body
        fleet[self.writer].kill()
        if mode == "cold":
            bump_generation(Path(fleet.backend.removeprefix("file:")))
        self.epoch += 1
        t0 = time.monotonic()
        resp = fleet.client.call(
            fleet[node].address, "POST", "/v1/promote", fleet.grant(node, "promote", self.epoch),
            {"fleet": fleet.name, "node": node, "epoch": self.epoch, "in_sync": [],
             "readers": [], "push_grants": {}})
        assert resp.status == 200, resp.body
        put = fleet.client.put(fleet[node].address, f"/first/{node}", b"f" * 4096,
                               fleet.grant(node, "writer", self.epoch))
        elapsed = time.monotonic() - t0
        assert put.status == 201, put.body
        log = fleet[node].log.read_text()
        if not re.search(rf"event=promotion_{mode} node={node}\b", log):
            raise RuntimeError(f"{node} was meant to promote {mode}:\n{log[-2000:]}")
        self.writer = node
        return elapsed


def run(files: int, rounds: int, tail_puts: int, growth: tuple[float, int],
        workdir: Path) -> dict[str, Any]:
    fleet = AgentFleet(f"pb-{uuid.uuid4().hex[:6]}", f"file:{workdir / 'image.raw'}",
                       workdir / "agents")
    fleet.dir.mkdir()
    fleet.client = AgentClient(timeout=OPEN_TIMEOUT)  # a cold promotion answers after the open
    built = bulk_image(workdir / "image.raw", fleet.name, files)
    print(f"promote_bench: {files} files loaded in {built:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {"warm": [], "cold": []}
    try:
        chain = Chain(fleet, tail_puts)
        for r in range(rounds):
            for mode in (("warm", "cold") if r % 2 == 0 else ("cold", "warm")):
                times[mode].append(chain.round(mode))
                print(f"promote_bench: files={files} round={r} {mode} "
                      f"{times[mode][-1]:.3f} s", file=sys.stderr)
        seconds, clients = growth
        grown = small_puts(fleet, seconds, clients, writer=chain.writer, readers=(),
                           prefix="grow")
    finally:
        fleet.close()
    return {"files": files, "bulk_load_s": built, "reader_open_s": spread(chain.open_s),
            "reader_rss_mib": spread(chain.reader_rss),
            "warm_s": spread(times["warm"]), "cold_s": spread(times["cold"]),
            "growth": {"clients": growth[1], "seconds": growth[0], **grown},
            "cold_over_warm": statistics.median(times["cold"]) / statistics.median(
                times["warm"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=lambda v: [int(x) for x in v.split(",")],
                        default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tail-puts", type=int, default=50)
    parser.add_argument("--growth-seconds", type=float, default=30.0)
    parser.add_argument("--growth-clients", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where images go (default: a temporary directory under /var/tmp)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"rounds": args.rounds, "tail_puts": args.tail_puts, "sizes": {}}
    for files in args.files:
        with tempfile.TemporaryDirectory(prefix="rbdfleet-promote-",
                                         dir=args.workdir or "/var/tmp") as tmp:
            result["sizes"][str(files)] = run(
                files, args.rounds, args.tail_puts,
                (args.growth_seconds, args.growth_clients), Path(tmp))
        one = result["sizes"][str(files)]
        print(f"files={files}: warm median {one['warm_s']['median']:.3f} s "
              f"(min {one['warm_s']['min']:.3f}, max {one['warm_s']['max']:.3f}); cold median "
              f"{one['cold_s']['median']:.3f} s (min {one['cold_s']['min']:.3f}, max "
              f"{one['cold_s']['max']:.3f}); reader open median "
              f"{one['reader_open_s']['median']:.2f} s, reader RSS median "
              f"{one['reader_rss_mib']['median']:.1f} MiB; growing: "
              f"{one['growth']['puts']} puts, p99.9 {one['growth']['p999_ms']:.1f} ms, "
              f"max {one['growth']['max_ms']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
