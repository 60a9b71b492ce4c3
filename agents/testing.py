"""Shipped test kit for the storage port: :class:`MemoryDevice` and the
:func:`check_block_device` contract suite every BlockDevice backend must pass.

``check_block_device(make)`` takes ``make(read_only: bool) -> BlockDevice``: each call opens a
new handle on the SAME medium (so a read-only handle must see a writable handle's writes).
Handles are closed by the suite.
"""

from __future__ import annotations

import errno
import os
import threading
import zlib
from collections.abc import Callable

from agents.core import checkpoint as ckpt
from agents.core.allocator import Allocator, Extent
from agents.core.btree import Tree
from agents.core.index import Entry, Node
from agents.core.pages import encode_entry, path_key
from agents.core.superblock import SLOTS, choose
from agents.device import ALIGN, BlockDevice, check_discard, check_io
from agents.errors import DeviceError
from agents.follower import LAYOUT, TREE_PAGE
from agents.volume import Volume

__all__ = ["MemoryDevice", "check_block_device"]


class MemoryDevice:
    """A BlockDevice in RAM, with fault hooks for crash tests.

    Handles made with :meth:`reopen` share the medium. ``crash_after(n_bytes)`` lets the next
    ``n_bytes`` of writes through, then tears the write that crosses the budget (its prefix
    lands) and fails every later write and flush with EIO: the medium then holds exactly what
    a machine that lost power at that moment would have on disk.
    """

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size <= 0 or size % ALIGN:
            raise ValueError("size must be a positive multiple of 4096")
        self.read_only = read_only
        self._medium = _Medium(bytearray(size))
        self._closed = False

    def reopen(self, *, read_only: bool = False) -> MemoryDevice:
        """Another handle on the same medium (fault state cleared for the new handle)."""
        dev = MemoryDevice.__new__(MemoryDevice)
        dev.read_only = read_only
        dev._medium = self._medium
        dev._closed = False
        return dev

    def crash_after(self, n_bytes: int) -> None:
        """Arm a power cut after ``n_bytes`` more written bytes (see the class docstring)."""
        with self._medium.lock:
            self._medium.budget = n_bytes

    def heal(self) -> None:
        """Disarm the power cut: writes succeed again (the medium keeps what landed)."""
        with self._medium.lock:
            self._medium.budget = None

    def corrupt(self, offset: int, data: bytes) -> None:
        """Overwrite bytes behind the volume's back (bit rot, a stray writer)."""
        with self._medium.lock:
            self._medium.data[offset : offset + len(data)] = data

    def size(self) -> int:
        """Bytes on the medium."""
        return len(self._medium.data)

    def _check(self, offset: int, length: int) -> None:
        check_io(offset, length, len(self._medium.data), closed=self._closed)

    def read_at(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset``."""
        self._check(offset, length)
        with self._medium.lock:
            return bytes(self._medium.data[offset : offset + length])

    def write_at(self, offset: int, data: bytes) -> None:
        """Write (or tear, when a crash is armed)."""
        self._check(offset, len(data))
        if self.read_only:
            raise DeviceError("write to a read-only device", op="write", errno=errno.EROFS)
        medium = self._medium
        with medium.lock:
            if medium.budget is not None:
                if medium.budget < len(data):
                    medium.data[offset : offset + medium.budget] = data[: medium.budget]
                    medium.budget = 0
                    raise DeviceError("power cut (simulated)", op="write", errno=errno.EIO)
                medium.budget -= len(data)
            medium.data[offset : offset + len(data)] = data

    def discard(self, offset: int, length: int) -> bool:
        """Zero the range: a write of zeros (torn, like any write, by an armed power cut)."""
        check_discard(offset, length, len(self._medium.data), closed=self._closed,
                      read_only=self.read_only)
        self.write_at(offset, bytes(length))
        return True

    def flush(self) -> None:
        """Writes are durable when they return; fails after a simulated power cut."""
        if self._medium.budget == 0:
            raise DeviceError("power cut (simulated)", op="flush", errno=errno.EIO)

    def close(self) -> None:
        """Mark the handle closed."""
        self._closed = True


class _Medium:
    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.lock = threading.Lock()
        self.budget: int | None = None


def check_block_device(make: Callable[[bool], BlockDevice]) -> None:
    """Run the BlockDevice contract against a backend; raises AssertionError on a breach."""
    writer = make(False)
    reader = make(True)
    try:
        size = writer.size()
        assert size > 0 and size % ALIGN == 0, f"size {size} is not a positive multiple of 4096"
        assert reader.size() == size, "two handles on one medium disagree on its size"
        assert writer.read_only is False and reader.read_only is True

        # round trip at the start, the middle (multi-block) and the last block
        payloads = {
            0: os.urandom(ALIGN),
            (size // 2) // ALIGN * ALIGN: os.urandom(8 * ALIGN),
            size - ALIGN: os.urandom(ALIGN),
        }
        for offset, data in payloads.items():
            writer.write_at(offset, data)
        writer.flush()
        for offset, data in payloads.items():
            assert writer.read_at(offset, len(data)) == data, f"round trip at {offset}"
            # a second handle sees the write at once: no stale cache between handles
            assert reader.read_at(offset, len(data)) == data, f"reader is stale at {offset}"

        # an overwrite is seen by the other handle even for a range it has read before
        reader.read_at(0, 2 * ALIGN)
        fresh = os.urandom(2 * ALIGN)
        writer.write_at(0, fresh)
        writer.flush()
        assert reader.read_at(0, 2 * ALIGN) == fresh, "reader missed an overwrite"

        # a read-only handle refuses writes with DeviceError and changes nothing
        try:
            reader.write_at(0, bytes(ALIGN))
        except DeviceError as exc:
            assert exc.fields.get("errno") in (errno.EROFS, errno.EPERM, errno.EBADF), exc.fields
        else:
            raise AssertionError("a read-only handle accepted a write")
        assert writer.read_at(0, 2 * ALIGN) == fresh, "a refused write changed the medium"

        # I/O past the end is refused, not truncated silently
        for op in (
            lambda: writer.read_at(size, ALIGN),
            lambda: writer.write_at(size, bytes(ALIGN)),
        ):
            try:
                op()
            except (ValueError, DeviceError):
                pass
            else:
                raise AssertionError("I/O past the end of the device was accepted")

        # a discarded range reads as zeros or as its old bytes (never anything else) and its
        # neighbours keep theirs; a read-only handle refuses to discard
        kept = os.urandom(3 * ALIGN)
        writer.write_at(ALIGN, kept)
        writer.flush()
        if writer.discard(2 * ALIGN, ALIGN):
            middle = reader.read_at(2 * ALIGN, ALIGN)
            assert middle in (bytes(ALIGN), kept[ALIGN : 2 * ALIGN]), "discard left garbage"
        assert reader.read_at(ALIGN, ALIGN) == kept[:ALIGN], "discard reached the block before"
        assert reader.read_at(3 * ALIGN, ALIGN) == kept[2 * ALIGN :], "discard reached past"
        try:
            reader.discard(ALIGN, ALIGN)
        except DeviceError as exc:
            assert exc.fields.get("errno") in (errno.EROFS, errno.EPERM, errno.EBADF), exc.fields
        else:
            raise AssertionError("a read-only handle accepted a discard")

        # concurrent writers to distinct blocks all land
        blocks = [os.urandom(ALIGN) for _ in range(16)]
        base = ALIGN * 4

        def put(i: int) -> None:
            writer.write_at(base + i * ALIGN, blocks[i])

        threads = [threading.Thread(target=put, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writer.flush()
        assert reader.read_at(base, 16 * ALIGN) == b"".join(blocks), "concurrent writes lost"
    finally:
        reader.close()
        writer.close()


class _BulkPages:
    """Tree pages straight on a device, from a plain allocator (no quarantine: a bulk load
    has no reader to protect)."""

    def __init__(self, device: BlockDevice, allocator: Allocator) -> None:
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


def bulk_format(device: BlockDevice, *, fleet: str, files: int, per_dir: int,
                txn_keys: int = 50_000) -> int:
    """Format ``device`` and make its checkpoint hold ``files`` small files
    (``/d{i // per_dir}/f{i}``, 16 bytes each, inline) in ``files / per_dir`` directories,
    loaded into the tree ``txn_keys`` keys per transaction (its dirty pages are held in
    memory) instead of put by put: what the benchmarks and memory tests open. Returns the
    checkpoint's seq."""
    Volume.format(device, fleet=fleet)
    sb = choose([device.read_at(s, ALIGN) for s in SLOTS])
    allocator = Allocator(sb.data_offset, sb.data_offset + sb.data_bytes)
    pages = _BulkPages(device, allocator)
    tree = Tree(pages, layout=LAYOUT)
    items = [(path_key(f"/d{d}"), encode_entry(Node(Entry(f"/d{d}", "dir", 0, 1, 1, 0.0,
                                                          None))))
             for d in range(-(-files // per_dir))]
    for i in range(files):
        path, data = f"/d{i // per_dir}/f{i}", b"%015d\n" % i
        items.append((path_key(path), encode_entry(Node(
            Entry(path, "file", len(data), i + 2, 1, 0.0, zlib.crc32(data)), inline=data))))
    items.sort()
    root = None
    for at in range(0, len(items), txn_keys):
        txn = tree.begin(root)
        for key, value in items[at : at + txn_keys]:
            txn.put(key, value)
        commit = txn.commit()
        for page_no in commit.freed:  # the copied right edge: no root reaches it
            pages.free(page_no)
        root = commit.root
    seq = files + -(-files // per_dir) + 2
    device.write_at(sb.checkpoint_offsets[0], ckpt.encode(
        seq, 1, root, allocator.free_extents(), [], 0, sb.checkpoint_bytes))
    device.flush()
    return seq
