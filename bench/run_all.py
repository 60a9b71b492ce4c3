"""`make bench`: every benchmark of bench/ in turn, merged into bench/results/latest.json.

Each benchmark runs as it is (its own process, its own throwaway cluster or sandbox, torn down
by itself) and writes its JSON to a temporary file; this script reads them and keeps, under
stable keys (docs/benchmarks.md, "make bench"), one figure each with its spread over rounds
(``min`` / ``median`` / ``max`` and the ``rounds`` themselves), plus each benchmark's full
output under ``raw``. ``--quick`` (``make bench QUICK=1``) uses fewer and smaller rounds.

    .venv/bin/python bench/run_all.py [--quick]
        [--only agents,devices,storage,storage4k,cephfs,failover,promote,vm]
        [--out bench/results/latest.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHES = ("agents", "devices", "storage", "storage4k", "cephfs", "failover", "promote", "vm")



def argv_of(name: str, quick: bool, out: Path) -> list[str]:
    """The command line of benchmark ``name`` (full or quick rounds), JSON into ``out``."""
    py = sys.executable
    if name == "agents":
        sizes = ["--size-mib", "64", "--rounds", "1", "--small-seconds", "3", "--clients", "32",
                 "--lag-samples", "50"] if quick else ["--rounds", "3", "--clients", "8,32"]
        return [py, "bench/agents_bench.py", *sizes, "--json", str(out)]
    if name == "devices":
        return [py, "bench/device_bench.py", "--size-mib", "64" if quick else "256",
                "--rounds", "7", "--json", str(out)]
    if name == "storage":
        return [py, "bench/storage_bench.py", "--files", "20" if quick else "200",
                "--file-kib", "1024", "--json", str(out)]
    if name == "storage4k":  # small files, measured once they moved home
        return [py, "bench/storage_bench.py", "--files", "1000" if quick else "10000",
                "--file-kib", "4", "--json", str(out)]
    if name == "cephfs":  # rbdfleet beside CephFS, same cluster, interleaved rounds
        sizes = (["--rounds", "2", "--files", "300", "--size-mib", "64"] if quick
                 else ["--rounds", "7", "--files", "2000", "--size-mib", "256"])
        return [py, "bench/cephfs_bench.py", *sizes, "--json", str(out)]
    if name == "promote":
        return [py, "bench/promote_bench.py", "--files",
                "10000,100000" if quick else "10000,100000,1000000",
                "--rounds", "3" if quick else "7",
                "--growth-seconds", "10" if quick else "30", "--json", str(out)]
    if name == "failover":
        return [py, "-m", "bench.failover_bench", "--kills", "3" if quick else "20",
                "--json", str(out)]
    # QUICK: one kill, pause and cut-off each, a smoke run inside the 10-minute budget (a
    # power-off's recovery alone is ~70 s on TCG guests, which the budget no longer has room
    # for beside the CephFS part); the figures are the full run's 10 per kind, all four kinds
    kinds = ["--rounds", "1", "--kinds", "kill,pause,cutoff"] if quick else ["--rounds", "10"]
    return [py, "-m", "bench.vm_failover_bench", *kinds,
            "--json", str(out), "--png", str(
                REPO / ("bench/results/vm_failover.png" if quick
                        else "docs/benchmarks/vm_failover.png"))]


def spread(values: list[float]) -> dict[str, Any]:
    """A figure with its rounds: min / median / max."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "rounds": [round(v, 4) for v in values]}


def from_agents(raw: dict[str, Any]) -> dict[str, Any]:
    small = raw["small_4k"][max(raw["small_4k"], key=int)]  # the highest concurrency
    return {
        "large_write_ratio": spread(raw["write_ratio"]["rounds"]),
        "large_read_ratio": spread(raw["read_ratio"]["rounds"]),
        "small_put_ratio": spread(small["ratio"]),
        "small_put_p99_ms": spread([run["p99_ms"] for run in small["rounds"]]),
    }


def from_devices(raw: dict[str, Any]) -> dict[str, Any]:
    """``device_<backend>_<write|read>_ratio``: each backend ÷ ``rbd bench`` 4M seq."""
    return {f"device_{key}_ratio": spread(ratio["rounds"])
            for key, ratio in raw["ratio"].items()}


def from_storage(raw: dict[str, Any]) -> dict[str, Any]:
    return {"storage_1m_ratio": spread([raw["raw_ratio"]]),
            "storage_after_delete_ratio": spread([raw["storage_after_delete_ratio"]])}


def from_storage_4k(raw: dict[str, Any]) -> dict[str, Any]:
    return {"storage_4k_ratio": spread([raw["stored_ratio"]])}


def from_cephfs(raw: dict[str, Any]) -> dict[str, Any]:
    """``cephfs_<metric>``: CephFS's own figure; ``vs_cephfs_<metric>_ratio``: ours ÷ CephFS
    in the same round (storage: one reading, lower is better for us)."""
    keys: dict[str, Any] = {}
    for metric, short in (("large_write_mib_s", "large_write"), ("large_read_mib_s", "large_read"),
                          ("create_4k_per_s", "create_4k"), ("stat_per_s", "stat"),
                          ("small_read_per_s", "small_read")):
        figures = raw["metrics"][metric]
        keys[f"cephfs_{metric}"] = spread(figures["cephfs"]["rounds"])
        keys[f"vs_cephfs_{short}_ratio"] = spread(figures["ratio"]["rounds"])
    storage = raw["storage_4k"]
    keys["cephfs_storage_4k_ratio"] = spread([storage["cephfs"]])
    keys["vs_cephfs_storage_4k_ratio"] = spread([storage["ratio"]])
    return keys


def from_failover(raw: dict[str, Any]) -> dict[str, Any]:
    return {"failover_process_p99_s": spread([raw["writable"]["p99"]]),
            "failover_process_failed_reads": raw["reads"]["failed"]}


def from_promote(raw: dict[str, Any]) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for files, tag in (("100000", "1e5"), ("1000000", "1e6")):
        if files in raw["sizes"]:
            size = raw["sizes"][files]
            keys[f"promote_{tag}_s"] = spread(size["warm_s"]["rounds"])
            keys[f"promote_cold_{tag}_s"] = spread(size["cold_s"]["rounds"])
            keys[f"open_{tag}_s"] = spread(size["reader_open_s"]["rounds"])
            keys[f"files_{tag}_reader_rss_mib"] = spread(size["reader_rss_mib"]["rounds"])
            keys[f"put_p999_ms_at_{tag}"] = spread([size["growth"]["p999_ms"]])
    return keys


def from_vm(raw: dict[str, Any]) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for kind, per in raw["summary"].items():
        first = [r["first_put"] for r in raw["rows"]
                 if r["kind"] == kind and r["first_put"] is not None]
        if first:
            keys[f"failover_vm_{kind}_first_put_s"] = spread(first)
            keys[f"failover_vm_{kind}_p99_s"] = per["first_put"]["p99"]
        keys[f"failover_vm_{kind}_failed_reads"] = per["failed_reads"]
    return keys


EXTRACT: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "agents": from_agents, "devices": from_devices, "storage": from_storage,
    "storage4k": from_storage_4k, "cephfs": from_cephfs,
    "failover": from_failover, "promote": from_promote, "vm": from_vm}


def one_line(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return (f"{key:<40} {value['median']:>10.4g}  (min {value['min']:.4g}, max "
                f"{value['max']:.4g}, {len(value['rounds'])} round(s))")
    return f"{key:<40} {value!s:>10}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds")
    parser.add_argument("--only", type=lambda v: v.split(","), default=list(BENCHES))
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/latest.json")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(BENCHES):
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHES)}")
    result: dict[str, Any] = {"quick": args.quick, "started": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average_before": os.getloadavg(),
        "seconds": {}, "failed": {}, "raw": {}}
    with tempfile.TemporaryDirectory(prefix="rbdfleet-bench-all-") as tmp:
        for name in args.only:
            out = Path(tmp) / f"{name}.json"
            started = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            done = subprocess.run(argv_of(name, args.quick, out), cwd=REPO, check=False,
                                  stdout=subprocess.DEVNULL)
            result["seconds"][name] = round(time.monotonic() - started, 1)
            if done.returncode != 0 or not out.exists():
                result["failed"][name] = f"exit {done.returncode}"
                continue
            raw = json.loads(out.read_text())
            result["raw"][name] = raw
            result.update(EXTRACT[name](raw))
    result["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    skip = {"quick", "started", "load_average_before", "load_average_after", "seconds",
            "failed", "raw"}
    for key, value in result.items():
        if key not in skip:
            print(one_line(key, value))
    for name, why in result["failed"].items():
        print(f"{name + ' benchmark':<40} FAILED ({why})")
    print(f"written: {args.out}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
