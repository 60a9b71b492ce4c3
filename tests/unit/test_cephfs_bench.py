"""The CephFS comparison benchmark's pure parts: round order, per-round ratios, the storage
ratio over pools (stored + omap), two-client rates, and run_all's keys. No cluster."""

from __future__ import annotations

import pytest

from bench.cephfs_bench import (
    METRICS,
    file_names,
    omap_size,
    ratios,
    round_order,
    storage_ratio,
    two_client_rate,
)
from bench.run_all import from_cephfs

pytestmark = pytest.mark.unit


def test_the_order_alternates_and_each_system_goes_first_as_often() -> None:
    orders = [round_order(r) for r in range(7)]
    assert orders[:2] == [("ours", "cephfs"), ("cephfs", "ours")]
    assert all(sorted(order) == ["cephfs", "ours"] for order in orders)
    assert sum(order[0] == "ours" for order in orders) == 4  # 7 rounds: 4 and 3


def test_ratios_pair_each_round_with_itself() -> None:
    rounds = [{"ours": {m: 10.0 * (r + 1) for m in METRICS},
               "cephfs": {m: 5.0 * (r + 1) if r != 1 else 40.0 for m in METRICS}}
              for r in range(3)]
    got = ratios(rounds)
    assert set(got) == set(METRICS)
    small = got["small_read_per_s"]
    assert small["ratio"]["rounds"] == [2.0, 0.5, 2.0]  # round 1: 20 / 40, not 20 / 5
    assert (small["ratio"]["median"], small["ratio"]["min"], small["ratio"]["max"]) == (
        2.0, 0.5, 2.0)
    assert small["ours"]["rounds"] == [10.0, 20.0, 30.0]


def test_storage_ratio_counts_stored_and_omap_of_the_named_pools_only() -> None:
    before = {"rbd": {"stored": 1000, "omap_bytes": 100},
              "meta": {"stored": 10, "omap_bytes": 5}, "data": {"stored": 0, "omap_bytes": 0}}
    after = {"rbd": {"stored": 5096, "omap_bytes": 100},
             "meta": {"stored": 2010, "omap_bytes": 505}, "data": {"stored": 4096,
                                                                   "omap_bytes": 0}}
    assert storage_ratio(before, after, ("rbd",), 4096) == 1.0
    assert storage_ratio(before, after, ("meta", "data"), 4096) == (2000 + 500 + 4096) / 4096


def test_omap_size_counts_keys_as_utf8_and_values() -> None:
    assert omap_size([("f00001_head", b"x" * 500), ("é", b"")]) == 11 + 500 + 2
    assert omap_size([]) == 0


def test_two_clients_rate_is_all_operations_over_the_slowest() -> None:
    assert two_client_rate([(1000, 0.5), (1000, 1.0)]) == 2000.0


def test_file_names_are_distinct_and_absolute() -> None:
    names = file_names("r3", 1500)
    assert len(set(names)) == 1500 and names[0] == "/r3/f00000" and names[-1] == "/r3/f01499"


def test_run_all_keys() -> None:
    figure = {"ours": {"rounds": [2.0]}, "cephfs": {"rounds": [4.0, 5.0]},
              "ratio": {"rounds": [0.5, 0.4]}}
    raw = {"metrics": dict.fromkeys(METRICS, figure),
           "storage_4k": {"ours": 1.03, "cephfs": 1.6, "ratio": 1.03 / 1.6}}
    keys = from_cephfs(raw)
    assert sorted(keys) == sorted(
        [f"cephfs_{m}" for m in METRICS] + ["cephfs_storage_4k_ratio"]
        + [f"vs_cephfs_{short}_ratio" for short in (
            "large_write", "large_read", "create_4k", "stat", "small_read", "storage_4k")])
    assert keys["cephfs_stat_per_s"]["median"] == 4.5
    assert keys["vs_cephfs_small_read_ratio"]["rounds"] == [0.5, 0.4]
    assert keys["cephfs_storage_4k_ratio"]["rounds"] == [1.6]
