"""A volume's memory does not grow with the namespace: a reader opened on 10^5 files holds
its page cache and overlay, not the files (format 1 held ~726 B per file: ~70 MiB here)."""

from __future__ import annotations

import random
import tracemalloc
import zlib

import pytest

from agents.core import checkpoint as ckpt
from agents.core.allocator import Allocator, Extent
from agents.core.btree import Tree
from agents.core.index import Entry, Node
from agents.core.pages import encode_entry, path_key
from agents.core.superblock import SLOTS, choose
from agents.device import ALIGN
from agents.testing import MemoryDevice
from agents.volume import CACHE_PAGES, LAYOUT, TREE_PAGE, Volume

pytestmark = pytest.mark.unit

FILES = 100_000
PER_DIR = 1000


class _Pages:
    def __init__(self, device: MemoryDevice, allocator: Allocator) -> None:
        self.device, self.allocator = device, allocator

    def read_page(self, page_no: int) -> bytes:
        return self.device.read_at(page_no * ALIGN, TREE_PAGE)

    def allocate(self) -> int:
        (got,) = self.allocator.allocate(TREE_PAGE)
        return got.offset // ALIGN

    def write_page(self, page_no: int, data: bytes) -> None:
        self.device.write_at(page_no * ALIGN, data)

    def free(self, page_no: int) -> None:
        self.allocator.give_back([Extent(page_no * ALIGN, TREE_PAGE)])


def _image() -> MemoryDevice:
    """FILES small files in FILES / PER_DIR directories, in a checkpointed tree."""
    device = MemoryDevice(64 << 20)
    Volume.format(device, fleet="mem")
    sb = choose([device.read_at(s, ALIGN) for s in SLOTS])
    allocator = Allocator(sb.data_offset, sb.data_offset + sb.data_bytes)
    items = [(path_key(f"/d{d}"), encode_entry(Node(Entry(f"/d{d}", "dir", 0, 1, 1, 0.0,
                                                          None))))
             for d in range(FILES // PER_DIR)]
    for i in range(FILES):
        path, data = f"/d{i // PER_DIR}/f{i}", b"%015d\n" % i
        items.append((path_key(path), encode_entry(Node(
            Entry(path, "file", len(data), i + 2, 1, 0.0, zlib.crc32(data)), inline=data))))
    items.sort()
    txn = Tree(_Pages(device, allocator), layout=LAYOUT).begin(None)
    for key, value in items:
        txn.put(key, value)
    root = txn.commit().root
    device.write_at(sb.checkpoint_offsets[0], ckpt.encode(
        FILES, 1, root, allocator.free_extents(), [], 0, sb.checkpoint_bytes))
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
