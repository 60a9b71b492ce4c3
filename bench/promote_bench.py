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

The promoted reader is the next round's writer. Bulk loader: the index is built in this
process by ``Index.apply`` of put records (1 000 files per directory, 16-byte inline files)
and written as the image's checkpoint by the engine's codec (``agents.core.checkpoint``);
the agents then open the image as deployed. Usage:

    .venv/bin/python bench/promote_bench.py [--files 10000,100000] [--rounds 7]
        [--tail-puts 50] [--workdir DIR] [--json out.json]
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
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.backends.file import FileDevice  # noqa: E402
from agents.core import checkpoint as ckpt  # noqa: E402
from agents.core.index import Index, put_payload  # noqa: E402
from agents.core.record import Record  # noqa: E402
from agents.core.superblock import SLOTS, Superblock, choose  # noqa: E402
from agents.device import ALIGN  # noqa: E402
from agents.volume import Volume  # noqa: E402
from bench.run_all import spread  # noqa: E402
from tests.fixtures.agents import AgentClient, AgentFleet  # noqa: E402

PER_DIR = 1000
OPEN_TIMEOUT = 1800.0  # an agent opening 10^6 files cold on a loaded machine: minutes
GiB = 1 << 30


def image_bytes(files: int) -> int:
    """A sparse image whose checkpoint slot (1/32 of it, at most 256 MiB) holds the index."""
    return max(2 * GiB, min(files * 8 << 10, 16 * GiB))


def bulk_image(path: Path, fleet: str, files: int) -> float:
    """Format ``path`` and make its checkpoint hold ``files`` files; seconds taken."""
    started = time.monotonic()
    with path.open("wb") as f:
        f.truncate(image_bytes(files))
    device = FileDevice(str(path))
    try:
        Volume.format(device, fleet=fleet)
        sb = choose([device.read_at(s, ALIGN) for s in SLOTS])
        index = Index()
        index.apply(Record(1, 1, "epoch-start", {"epoch": 1}, commit_seq=0,
                           volume_tag=sb.volume_tag))
        for i in range(files):
            data = f"{i:015d}\n".encode()
            payload = put_payload(f"/d{i // PER_DIR}/f{i}", size=len(data), mtime=0.0,
                                  crc=zlib.crc32(data), chunk=0, extents=[], sums=[],
                                  inline=data)
            index.apply(Record(i + 2, 1, "put", payload, commit_seq=i + 1,
                               volume_tag=sb.volume_tag))
        device.write_at(sb.checkpoint_offsets[0], ckpt.encode(index, [], 0, sb.checkpoint_bytes))
        device.flush()
    finally:
        device.close()
    return time.monotonic() - started


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

    def round(self, mode: str) -> float:
        """Promote a fresh reader (``mode``: warm or cold); request -> first ack, seconds."""
        fleet = self.fleet
        self.serial += 1
        node = f"r{self.serial}"
        started = time.monotonic()
        # ready once its volume is open (cold, not measured)
        fleet.add(node, log_level="info", start_timeout=OPEN_TIMEOUT)
        self.open_s.append(time.monotonic() - started)
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


def run(files: int, rounds: int, tail_puts: int, workdir: Path) -> dict[str, Any]:
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
    finally:
        fleet.close()
    return {"files": files, "bulk_load_s": built, "reader_open_s": spread(chain.open_s),
            "warm_s": spread(times["warm"]), "cold_s": spread(times["cold"]),
            "cold_over_warm": statistics.median(times["cold"]) / statistics.median(
                times["warm"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=lambda v: [int(x) for x in v.split(",")],
                        default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tail-puts", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where images go (default: a temporary directory under /var/tmp)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"rounds": args.rounds, "tail_puts": args.tail_puts, "sizes": {}}
    for files in args.files:
        with tempfile.TemporaryDirectory(prefix="rbdfleet-promote-",
                                         dir=args.workdir or "/var/tmp") as tmp:
            result["sizes"][str(files)] = run(files, args.rounds, args.tail_puts, Path(tmp))
        one = result["sizes"][str(files)]
        print(f"files={files}: warm median {one['warm_s']['median']:.3f} s "
              f"(min {one['warm_s']['min']:.3f}, max {one['warm_s']['max']:.3f}); cold median "
              f"{one['cold_s']['median']:.3f} s (min {one['cold_s']['min']:.3f}, max "
              f"{one['cold_s']['max']:.3f}); reader open median "
              f"{one['reader_open_s']['median']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
