"""A volume's memory does not grow with the namespace: a reader opened on 10^5 files holds
its page cache and overlay, not the files (format 1 held ~726 B per file: ~70 MiB here)."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from agents.follower import CACHE_PAGES
from agents.testing import MemoryDevice, bulk_format
from agents.volume import Volume

pytestmark = pytest.mark.unit

FILES = 100_000
PER_DIR = 1000


def _image() -> MemoryDevice:
    """FILES small files in FILES / PER_DIR directories, in a checkpointed tree."""
    device = MemoryDevice(64 << 20)
    bulk_format(device, fleet="mem", files=FILES, per_dir=PER_DIR)
    return device


def test_a_reader_of_many_files_holds_its_cache_not_the_namespace() -> None:
    device = _image()
    rng = random.Random(1)
    tracemalloc.start()
    try:
        vol = Volume.open(device.reopen(read_only=True))
        for i in rng.sample(range(FILES), 300):
            assert b"".join(vol.read(f"/d{i // PER_DIR}/f{i}")) == b"%015d\n" % i
        after = None
        seen = 0
        while True:  # a whole directory, page by page
            page, after = vol.list_page("/d42", after=after, limit=100)
            seen += len(page)
            if after is None:
                break
        assert seen == PER_DIR
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the cache holds at most CACHE_PAGES decoded pages (about 300 entries each here)
    assert held < 24 << 20 and peak < 32 << 20, (held >> 20, peak >> 20)
    assert vol._tree.cache is not None and len(vol._tree.cache._pages) <= CACHE_PAGES
    assert vol._index.overlay_size == 0
