"""Micro-benchmark of the format v2 metadata tree (agents/core/btree.py), in one process.

Inserts ``--entries`` paths (1,000 directories, values = the entry record of a 4 KiB file:
one extent, one chunk checksum; 70 bytes) in transactions of ``--txn`` into an in-memory page
store, in random order (the worst case for copy-on-write: every put dirties another leaf) or
``--order sequential`` (the best). The store hands out freed pages again once the next
commit is done (a quarantine held for one commit, as if every reader acknowledged at once).
Then ``--lookups`` random lookups through a fresh snapshot with a ``--cache``-page LRU.

Reports (times are CPU time of this process, ``time.process_time``: the tree is pure
Python on one thread, and wall time on a shared host mostly measures the neighbours):
µs per insert (puts and commits), pages written per commit, tree height, pages in
use, µs per lookup and the cache hit ratio, peak RSS (``ru_maxrss``; the in-memory page store
is part of it: pages in use x page size).

    .venv/bin/python bench/btree_bench.py [--entries 1000000] [--txn 1000] [--cache 256]
        [--lookups 100000] [--order random|sequential] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.core.allocator import Extent  # noqa: E402
from agents.core.btree import PageCache, Tree  # noqa: E402
from agents.core.index import Entry, Node  # noqa: E402
from agents.core.pages import encode_entry, path_key  # noqa: E402
from agents.errors import CorruptMetadata  # noqa: E402


class MemoryPages:
    """Pages in a dict; freed pages are reused last-in first-out."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.free_list: list[int] = []
        self.next_page = 0
        self.reads = 0

    def read_page(self, page_no: int) -> bytes:
        self.reads += 1
        try:
            return self.pages[page_no]
        except KeyError:
            raise CorruptMetadata(f"page {page_no} was never written", page=page_no) from None

    def allocate(self) -> int:
        if self.free_list:
            return self.free_list.pop()
        self.next_page += 1
        return self.next_page - 1

    def write_page(self, page_no: int, data: bytes) -> None:
        self.pages[page_no] = data

    def free(self, page_no: int) -> None:
        self.pages.pop(page_no, None)
        self.free_list.append(page_no)


def _paths(entries: int, order: str, rng: random.Random) -> list[str]:
    paths = [f"/dir{i % 1000:04d}/file{i:08d}" for i in range(entries)]
    if order == "random":
        rng.shuffle(paths)
    else:
        paths.sort(key=path_key)
    return paths


def _value(i: int) -> bytes:
    entry = Entry("/", "file", 4096, i, 1, 1.7e9, 0x1234ABCD)
    return encode_entry(Node(entry, (Extent(i * 4096, 4096),), (0x1234ABCD,), 1 << 20))


def run(entries: int, per_txn: int, cache_pages: int, lookups: int, order: str) -> dict[str, Any]:
    rng = random.Random(42)
    paths = _paths(entries, order, rng)
    store = MemoryPages()
    tree = Tree(store, cache=PageCache(cache_pages))
    root = None
    quarantined: list[int] = []
    written: list[int] = []
    started = time.process_time()
    for start in range(0, entries, per_txn):
        txn = tree.begin(root)
        for i, path in enumerate(paths[start : start + per_txn], start):
            txn.put(path_key(path), _value(i))
        done = txn.commit()
        root = done.root
        for page_no in quarantined:  # the previous commit's frees: no reader holds them now
            store.free(page_no)
        quarantined = done.freed
        written.append(len(done.written))
    insert_s = time.process_time() - started

    cache = PageCache(cache_pages)
    snap = Tree(store, cache=cache).snapshot(root)
    probes = [path_key(p) for p in rng.sample(paths, min(lookups, entries))]
    reads = store.reads
    started = time.process_time()
    for key in probes:
        if snap.get(key) is None:
            raise AssertionError(f"lost {key!r}")
    lookup_s = time.process_time() - started
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "entries": entries,
        "txn": per_txn,
        "order": order,
        "insert_us": round(insert_s / entries * 1e6, 2),
        "pages_written_per_txn_mean": round(statistics.mean(written), 1),
        "pages_written_per_txn_max": max(written),
        "height": snap.height(),
        "pages_in_use": len(store.pages),
        "lookup_us": round(lookup_s / len(probes) * 1e6, 2),
        "lookup_pages_read": round((store.reads - reads) / len(probes), 3),
        "cache_pages": cache_pages,
        "cache_hit_ratio": round(cache.hits / max(1, cache.hits + cache.misses), 3),
        "peak_rss_mib": round(rss_kib / 1024, 1),
        "store_mib": round(len(store.pages) * tree.layout.page_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--txn", type=int, default=1000)
    parser.add_argument("--cache", type=int, default=256)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--order", choices=("random", "sequential"), default="random")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.entries, args.txn, args.cache, args.lookups, args.order)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
