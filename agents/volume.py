"""The storage engine's shell: the on-disk format (docs/format.md) over a BlockDevice.

One ``Volume`` per agent. The writer (device writable, after :meth:`Volume.start_epoch`)
stores data copy-on-write, group-commits journal records and checkpoints; readers apply
pushed records (:meth:`Volume.apply`) or follow the journal on disk (:meth:`Volume.refresh`).
Both serve verified reads of a consistent version.

Concurrency: any number of threads may call put/read/stat at once. Journal writes are done by
one *leader* at a time; puts that arrive meanwhile queue and the next leader writes all of
them in one journal write (group commit). A device error during a journal write fails the
volume for good (``DeviceError`` on every later write): after a fence that is the point.
What this layer does not guarantee: durability of a record whose put() raised.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import errno
import logging
import mmap
import posixpath
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from agents.core import btree, journal
from agents.core import checkpoint as ckpt
from agents.core.allocator import Allocator, Extent
from agents.core.index import (
    Entry,
    Node,
    file_crc,
    locate,
    normalize_path,
    put_payload,
)
from agents.core.pages import Layout
from agents.core.record import HEADER, MAGIC, Record
from agents.core.superblock import SLOTS, Superblock, choose, layout
from agents.core.treeindex import TreeIndex
from agents.device import ALIGN, BlockDevice, VectoredDevice, aligned_buffer, byte_view, vectored
from agents.errors import (
    AgentError,
    BadPath,
    BadRequest,
    CatchingUp,
    ChecksumMismatch,
    CorruptMetadata,
    DeviceError,
    FormatError,
    JournalWrapped,
    NoSpace,
    NotWriter,
    SequenceGap,
    StaleEpoch,
    TornRecord,
    WrongKind,
)

__all__ = ["Commit", "Entry", "Record", "Volume", "normalize_path"]

LOG = logging.getLogger(__name__)

WRITE_UNIT = 4 << 20  # bytes per data write submitted to the device
IN_FLIGHT = 8  # data writes in flight per put (measured: 4 -> 0.89, 8 -> 0.98 of rbd bench)
# read units in flight per read stream: 3 -> 8 raised Volume.read's median from 519 to 577
# and 529 to 603 MiB/s in same-run sweeps against rbd bench (12 was worse)
READ_AHEAD = 8
IO_THREADS = 8  # per volume, shared by all streams
READ_UNIT = 4 << 20  # bytes per read task (whole chunks)
JOURNAL_WINDOW = 256 << 10  # bytes read at once when following the journal
CHECKPOINT_AT = 0.5  # checkpoint once this fraction of the journal ring is in use
# RBD's default object size: librbd deletes an object (its space goes back to the pool) only
# when a discard covers all of it, and merely zeroes the part another discard covers
DISCARD_UNIT = 4 << 20
DISCARD_WAIT = 5.0  # seconds between looks at space held by discards in flight
# metadata tree pages: 32 KiB, so that a key holds any path (4096 bytes: pages.py) and a
# leaf a few hundred entries; a page number is its device offset in 4 KiB blocks
TREE_PAGE = 32 << 10
LAYOUT = Layout(TREE_PAGE)
CACHE_PAGES = 128  # decoded tree pages kept per volume (a reader's metadata memory)
PAGE_RUN = 32  # tree pages allocated at once by a checkpoint (written as one run)
# paths changed since the last checkpoint kept in memory: past this the writer checkpoints
# (and readers switch roots when they apply its record), so memory stays bounded
OVERLAY_MAX = 4096
# pages a checkpoint may rewrite per changed path (a leaf and its branches: 4 levels of
# 32 KiB pages hold far more entries than a device holds files)
PAGES_PER_PATH = 4


def reserve_pages(data_bytes: int) -> int:
    """Tree pages the writer holds back from data (1/64 of the data area, 4 to 2048 pages):
    a full store can still checkpoint, so deletes go through and give the space back. Held
    as whole pages because a full data area is fragmented below a page's size."""
    return max(4, min(data_bytes // 64, 64 << 20) // TREE_PAGE)
RELOADS = 8  # checkpoint loads a reader tries while a live writer keeps moving
# I/O buffers kept mapped between puts and reads (a fresh 4 MiB buffer costs its page faults
# on every use; more than this stays out of an idle agent's RSS)
KEEP_BUFFERS = 16 << 20


class _Buffers:
    """Page-aligned I/O buffers (:func:`agents.device.aligned_buffer`: O_DIRECT reads into
    and writes from them as they are), reused across puts and reads by all threads; at most
    ``keep`` bytes stay mapped while nobody holds them, the others are dropped (unmapped once
    their last view is gone)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._free: dict[int, builtins.list[mmap.mmap]] = {}
        self._kept = 0

    def take(self, size: int) -> mmap.mmap:
        """A buffer of exactly ``size`` bytes; its contents are whatever its last user left."""
        with self._lock:
            free = self._free.get(size)
            if free:
                self._kept -= size
                return free.pop()
        return aligned_buffer(size)

    def give(self, buf: mmap.mmap) -> None:
        """Hand ``buf`` back: nobody may use it (or a view of it) any more."""
        with self._lock:
            if self._kept + len(buf) <= self._keep:
                self._free.setdefault(len(buf), []).append(buf)
                self._kept += len(buf)


@dataclass
class _Ticket:
    """One record waiting for a group commit. Its put sleeps on its own ``wake``, set once
    the ticket is ``done`` or handed the journal leadership (``leads``): a commit wakes the
    puts of its batch and at most one more, never every waiter. ``outside``: the key of its
    put's extents in :attr:`Volume._outside`, dropped there once the record is applied."""

    op: str
    payload: dict[str, Any]
    epoch: int
    nbytes: int
    record: Record | None = None
    error: BaseException | None = None
    done: bool = False
    outside: int | None = None
    leads: bool = False
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Commit:
    """One durable group commit as readers get it: its records (seq order) and their bytes as
    they lie in the journal ring from offset ``start`` (packed, without the batch's
    padding). ``data`` is read-only and stays valid: it is not reused."""

    records: builtins.list[Record]
    start: int
    data: memoryview


class _PageStore:
    """The metadata tree's pages in the data area (``btree.PageStore``): page ``n`` is the
    TREE_PAGE bytes at device offset ``n * 4096``. The writer allocates them from the volume's
    allocator PAGE_RUN at a time, buffers a commit's writes and writes them out sorted, in
    contiguous runs (:meth:`write_out`); pages a commit frees are quarantined by the volume
    like data extents. The writer also holds a reserve of pages (:func:`reserve_pages`) that
    no data may take; they are free in every checkpoint, so a crash leaks none."""

    def __init__(self, vol: Volume) -> None:
        self._vol = vol
        self._spare: builtins.list[int] = []
        self._reserve: builtins.list[int] = []
        self._writes: dict[int, bytes] = {}
        # next fit: a page freed by a checkpoint is reused only after the pages are laid
        # over the rest of the free space, so a reader that is not in sync (not protected
        # by the quarantine: opening, catching up) rarely meets its root's pages reused
        self._cursor = vol._sb.data_offset

    def read_page(self, page_no: int) -> bytes:
        sb = self._vol._sb
        offset = page_no * ALIGN
        if offset < sb.data_offset or offset + TREE_PAGE > sb.data_offset + sb.data_bytes:
            raise CorruptMetadata(f"metadata page {page_no} is outside the data area",
                                  page=page_no)
        return self._vol._device.read_at(offset, TREE_PAGE)

    def allocate(self) -> int:
        if not self._spare:
            allocator = self._vol._allocator
            try:
                got = allocator.allocate_after(self._cursor, PAGE_RUN * TREE_PAGE)
            except NoSpace:  # less free than a run: one page may still fit
                got = []
            if len(got) != 1:  # fragmented or nearly full: take one page
                allocator.give_back(got)
                got = self._one_page(allocator)
                if not got:
                    if not self._reserve:
                        raise NoSpace("no free run for a metadata page", needed=TREE_PAGE)
                    got = [Extent(self._reserve.pop() * ALIGN, TREE_PAGE)]
            run = got[0]
            self._spare = [(off // ALIGN) for off in range(run.end - TREE_PAGE,
                                                           run.offset - 1, -TREE_PAGE)]
        page_no = self._spare.pop()
        self._cursor = page_no * ALIGN + TREE_PAGE
        return page_no

    def _one_page(self, allocator: Allocator) -> builtins.list[Extent]:
        """One free page from ``allocator`` after the cursor, or [] (full or fragmented)."""
        try:
            got = allocator.allocate_after(self._cursor, TREE_PAGE)
        except NoSpace:
            return []
        if len(got) != 1:
            allocator.give_back(got)
            return []
        return got

    def refill_reserve(self) -> bool:
        """Take pages into the reserve (from the end of the data area) while the free map
        has them; True once full."""
        allocator = self._vol._allocator
        want = reserve_pages(self._vol._sb.data_bytes)
        while len(self._reserve) < want:
            got = allocator.allocate_last(TREE_PAGE)
            if got is None:
                return False
            self._reserve.append(got.offset // ALIGN)
        return True

    def drop_reserve(self) -> None:
        """Forget the reserve (its pages are free in a rebuilt free map)."""
        self._reserve.clear()

    def reserve_extents(self) -> builtins.list[Extent]:
        """The reserve's pages: free on the image, held back in memory."""
        return [Extent(p * ALIGN, TREE_PAGE) for p in self._reserve]

    def reserve_bytes(self) -> int:
        return len(self._reserve) * TREE_PAGE

    def write_page(self, page_no: int, data: bytes) -> None:
        self._writes[page_no] = data

    def free(self, page_no: int) -> None:
        self._writes.pop(page_no, None)
        self._vol._allocator.give_back([Extent(page_no * ALIGN, TREE_PAGE)])

    def write_out(self) -> None:
        """Write the buffered pages (one device write per contiguous run)."""
        writes, self._writes = self._writes, {}
        run: builtins.list[bytes] = []
        first = 0
        for page_no in sorted(writes):
            if run and page_no != first + len(run) * (TREE_PAGE // ALIGN):
                self._vol._device.write_at(first * ALIGN, b"".join(run))
                run = []
            if not run:
                first = page_no
            run.append(writes[page_no])
        if run:
            self._vol._device.write_at(first * ALIGN, b"".join(run))

    def give_back_spare(self) -> None:
        """Pages allocated ahead and not used go back to the free map."""
        spare, self._spare = self._spare, []
        self._writes.clear()
        if spare:
            self._vol._allocator.give_back(
                [Extent(p * ALIGN, TREE_PAGE) for p in spare])


def _coalesce(extents: Iterable[Extent]) -> builtins.list[Extent]:
    """``extents`` sorted, adjacent ones merged."""
    merged: builtins.list[Extent] = []
    for x in sorted(extents):
        if merged and merged[-1].end == x.offset:
            merged[-1] = Extent(merged[-1].offset, merged[-1].length + x.length)
        else:
            merged.append(x)
    return merged


class _JournalView:
    """Reads of the journal ring through a window cache (one per scan: never stale across
    scans)."""

    def __init__(self, device: BlockDevice, sb: Superblock) -> None:
        self._device = device
        self._base = sb.journal_offset
        self._ring = sb.journal_bytes
        self._tag = sb.volume_tag
        self._key = sb.record_key
        self._start = 0
        # a view of the window's bytes: a record is cut out of it without a copy, and a view
        # handed out keeps its window alive after the next one replaces it
        self._buf = memoryview(b"")
        self._window = 4 * ALIGN  # grows while the scan goes on: an idle refresh reads 16 KiB

    def read(self, start: int, length: int) -> memoryview:
        if start + length > self._ring:
            raise ValueError("journal read past the ring")
        if not (self._start <= start and start + length <= self._start + len(self._buf)):
            base = start - start % ALIGN  # records lie anywhere; device reads stay aligned
            want = min(self._ring - base,
                       max(journal.align_up(start + length) - base, self._window))
            self._window = min(self._window * 2, JOURNAL_WINDOW)
            self._buf = memoryview(self._device.read_at(self._base + base, want))
            self._start = base
        return self._buf[start - self._start : start - self._start + length]

    def _ours(self, start: int) -> int | None:
        """The length of the record of this volume that a header at ``start`` announces
        (unverified), or None: no header, another volume's (an earlier format of the image,
        whatever its record format), or longer than the rest of the ring."""
        if start >= self._ring:
            return None
        head = self.read(start, min(HEADER.size, self._ring - start))
        nbytes = Record.peek_length(head)
        if nbytes is None or start + nbytes > self._ring:
            return None
        numbers = Record.peek_numbers(head)
        return nbytes if numbers is not None and numbers[3] == self._tag else None

    def record_at(self, start: int) -> tuple[Record, int] | None:
        """The valid record starting at ``start`` and its length, or None (torn, corrupt, no
        record or another volume's). A record of this volume in a format this agent does not
        read raises UnsupportedFormat."""
        nbytes = self._ours(start)
        if nbytes is None:
            return None
        try:
            return Record.decode(self.read(start, nbytes), self._key), nbytes
        except (TornRecord, ChecksumMismatch):
            return None

    def witness_at(self, start: int) -> journal.Witness | None:
        """Like :meth:`record_at` (CRC checked) without parsing the payload."""
        nbytes = self._ours(start)
        if nbytes is None:
            return None
        try:
            seq, epoch, commit_seq, _ = Record.verify(self.read(start, nbytes), self._key)
        except (TornRecord, ChecksumMismatch):
            return None
        return journal.Witness(start, seq, epoch, commit_seq)


class Volume:
    """An rbdfleet volume on one BlockDevice (see the module docstring)."""

    def __init__(self, device: BlockDevice, sb: Superblock) -> None:
        self._device = device
        self._sb = sb
        self._buffers = _Buffers(KEEP_BUFFERS)
        self._ring = sb.journal_bytes
        self._lock = threading.RLock()  # index, allocator, cursor, pins
        # free space held while a released run (widened to whole units) is discarded: a put
        # short of space waits for it instead of failing
        self._discarding = 0
        self._discarded = threading.Condition(self._lock)
        self._cond = threading.Condition(threading.Lock())  # group-commit queue, leadership
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._leading = False
        self._exclusive = 0  # threads waiting in _leadership(): the next free turn is theirs
        self._failed: DeviceError | None = None
        self._writer_epoch: int | None = None
        self._pages = _PageStore(self)
        self._tree = btree.Tree(self._pages, layout=LAYOUT,
                                cache=btree.PageCache(CACHE_PAGES))
        self._index = TreeIndex(self._tree, None, 0, 0)
        self._allocator = Allocator(sb.data_offset, sb.data_offset + sb.data_bytes)
        # per record applied since the index's root: (seq, extents it claimed, extents it
        # freed), so a promoted reader rebuilds the writer's map from the checkpoint of that
        # root (a reader cannot follow the tree pages the writer allocates and frees)
        self._effects: builtins.list[tuple[int, builtins.list[Extent],
                                           builtins.list[Extent]]] = []
        # extents out of the allocator's map that no durable record names: puts in flight,
        # discards in flight. A checkpoint saves them as free (after a crash they are).
        self._outside: dict[int, builtins.list[Extent]] = {}
        # tree pages the writer's last checkpoint freed, quarantined at its next one
        self._retired: builtins.list[Extent] = []
        # whether a checkpoint record for the index's root is in the journal: readers on an
        # older root switch only when they apply one (a writer that crashed between the
        # checkpoint and its record left none, and its successor writes one first)
        self._announced = True
        self._cursor = journal.Cursor(0, 1, 0)
        self._used = 0  # ring bytes consumed since the newest checkpoint
        self._checkpoint_slot = 0
        self._positions: collections.deque[tuple[int, int, int]] = collections.deque()
        self._pins: collections.Counter[int] = collections.Counter()
        self._pool: ThreadPoolExecutor | None = None
        self._durable_seq = 0
        self._on_commit: Callable[[Commit], None] | None = None
        self._on_discard: Callable[[int], None] | None = None

    @property
    def _device(self) -> BlockDevice:
        """The handle as given (metadata I/O); :attr:`_io` is the same handle with
        ``readinto``/``writev`` (the data path), kept in step by the setter."""
        return self._handle

    @_device.setter
    def _device(self, device: BlockDevice) -> None:
        self._handle = device
        self._io: VectoredDevice = vectored(device)

    # ---- life cycle ----------------------------------------------------------------------

    @staticmethod
    def format(device: BlockDevice, *, fleet: str, journal_bytes: int | None = None) -> None:
        """Write an empty volume: checkpoint at seq 0 in slot A, slot B blanked, then both
        superblocks (a new volume uuid, hence a new journal tag)."""
        if device.read_only:
            raise DeviceError("cannot format a read-only device", op="format", errno=errno.EROFS)
        sb = layout(
            device.size(), fleet=fleet, volume_id=str(uuid.uuid4()), journal_bytes=journal_bytes
        )
        # the ring is not zeroed (thin images stay thin): records carry the volume tag, so
        # those of an earlier format of this image never join the chain
        device.write_at(sb.checkpoint_offsets[1], bytes(ALIGN))
        device.write_at(sb.checkpoint_offsets[0], ckpt.encode(
            0, 0, None, [Extent(sb.data_offset, sb.data_bytes)], [], 0, sb.checkpoint_bytes))
        device.flush()
        # superblocks last: an image is a volume only once everything else is in place
        older = Superblock(**{**sb.__dict__, "generation": 1})
        newer = Superblock(**{**sb.__dict__, "generation": 2})
        device.write_at(older.slot, older.encode())
        device.write_at(newer.slot, newer.encode())
        device.flush()

    @classmethod
    def open(cls, device: BlockDevice) -> Volume:
        """Superblock -> newest valid checkpoint -> replay the journal. Never writes.

        Raises ChecksumMismatch when the journal chain is broken by a corrupt record that
        later durable records prove was committed."""
        raw = device.read_at(0, 2 * ALIGN)
        sb = choose([raw[s : s + ALIGN] for s in SLOTS])
        if sb.device_size > device.size():
            raise FormatError(
                "the device is smaller than the volume it holds",
                volume=sb.device_size,
                device=device.size(),
            )
        vol = cls(device, sb)
        with vol._lock, vol._decoding():
            vol._load_checkpoint()
            vol._settle_end()
            vol._durable_seq = vol._index.applied_seq
        return vol

    def adopt(self, device: BlockDevice) -> str | None:
        """Warm promotion: move this reader's state (index, quarantine, pinned reads, applied
        seq) onto ``device``, a writable handle on the same image, instead of opening the
        volume again. Every check reads the image through ``device`` (the reader's own handle
        may be gone: a VM's read-only disk is unplugged before the read-write one is plugged):

        - the superblock is the one the state was built on (same generation and geometry);
        - the journal tail this reader has not applied is replayed from the image (the old
          writer is fenced by now, so it is the whole durable history);
        - every record after the newest checkpoint, pushed or read, is on the image where
          this state says it is (seq, length, place): a pushed record that never became
          durable would otherwise outlive the writer that sent it;
        - the newest checkpoint's position leads through those records to this state's
          journal head.

        Then the writer's own bookkeeping is taken from the image as :meth:`open` takes it:
        the checkpoint slot to write next and the ring bytes used since the newest checkpoint.
        Returns None once adopted (then :meth:`start_epoch`, as after :meth:`open`). Else the
        name of the first check that failed, and the volume stays on its old handle, a reader
        as before (with at most more durable records applied): the caller opens it cold.
        See docs/agent.md, "Warm promotion"."""
        with self._leadership(), self._lock, self._decoding():
            if self._writer_epoch is not None or self._failed is not None:
                return "not_a_reader"
            old, self._device = self._device, device
            try:
                reason = self._adopt_checks()
            except BaseException:
                self._device = old
                raise
            if reason is not None:
                self._device = old
            return reason

    def _adopt_checks(self) -> str | None:
        """:meth:`adopt`'s checks, on the new handle; the state is changed only at the end
        (and by the tail replay, which applies durable records only)."""
        raw = self._device.read_at(0, 2 * ALIGN)
        try:
            sb = choose([raw[s : s + ALIGN] for s in SLOTS])
        except FormatError:
            return "superblock"
        if sb != self._sb or sb.device_size > self._device.size():
            return "superblock"
        index = self._index
        self._refresh_locked()
        if self._index is not index:  # it had fallen behind a wrap: a cold load after all
            LOG.info("event=adopt_reloaded_checkpoint applied_seq=%d", self._index.applied_seq)
        headers = self._checkpoint_headers()
        newest = ckpt.choose(headers)
        if not newest:
            return "checkpoint"
        slot = newest[0]
        header = headers[slot]
        assert header is not None
        applied = self._index.applied_seq
        if header.seq > applied:
            return "checkpoint"
        tail = [p for p in self._positions if p[0] > header.seq]
        if [seq for seq, _, _ in tail] != list(range(header.seq + 1, applied + 1)):
            return "journal_positions"
        view = _JournalView(self._device, self._sb)
        head, used, epoch = header.journal_pos, 0, header.epoch
        for seq, start, nbytes in tail:
            if start not in journal.candidates(head, self._ring):
                return "journal_positions"
            found = view.witness_at(start)
            if (found is None or found.seq != seq or found.epoch < epoch
                    or Record.peek_length(view.read(start, HEADER.size)) != nbytes):
                return "record_not_on_disk"
            epoch = found.epoch
            used += journal.consumed(head, start, nbytes, self._ring)
            head = start + nbytes
        # a checkpoint holds its journal position rounded up to the next batch's boundary
        if (journal.align_up(head) != journal.align_up(self._cursor.pos)
                or epoch > self._index.epoch):
            return "journal_head"
        while self._positions and self._positions[0][0] <= header.seq:
            self._positions.popleft()
        self._cursor.pos = head  # as open() has it: the checkpoint's rounded-up position
        self._used = used
        self._checkpoint_slot = slot
        return None

    def return_to(self, device: BlockDevice) -> bool:
        """Undo :meth:`adopt` after a failed promotion: serve reads from ``device`` (the
        reader's handle) again. False, with nothing changed, once :meth:`start_epoch` began
        to write (the state may hold an epoch record that is not durable): the caller then
        opens the volume again."""
        with self._leadership(), self._lock:
            if self._writer_epoch is not None or self._failed is not None:
                return False
            self._device = device
            return True

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """Whatever a hostile image makes the decoders or the index trip over becomes
        CorruptMetadata (a refused open, a failed refresh), never a bare exception that
        kills the agent or its tail thread."""
        try:
            yield
        except (ValueError, TypeError, KeyError, IndexError, struct.error, zlib.error,
                RecursionError, UnicodeDecodeError) as exc:
            raise CorruptMetadata(
                f"the image does not decode: {type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        """Stop the I/O threads (the device stays open: its owner closes it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- properties ----------------------------------------------------------------------

    @property
    def fleet(self) -> str:
        """Fleet name recorded at format time."""
        return self._sb.fleet

    @property
    def superblock(self) -> Superblock:
        """The image's geometry."""
        return self._sb

    @property
    def epoch(self) -> int:
        """Highest epoch seen in applied records."""
        return self._index.epoch

    @property
    def applied_seq(self) -> int:
        """Seq of the last applied record that is durable: on the writer, a group commit's
        records count once its journal write is flushed (the index holds them a moment
        earlier, for validation)."""
        return self._durable_seq

    @property
    def journal_head(self) -> int:
        """Ring offset just past the last applied record: the next record starts at one of
        ``journal.candidates(journal_head, ring)``."""
        return self._cursor.pos

    @property
    def writer_epoch(self) -> int | None:
        """The epoch this volume writes in, once :meth:`start_epoch` succeeded."""
        return self._writer_epoch

    # ---- journal following (caller holds self._lock) -------------------------------------

    def _load_checkpoint(self) -> None:
        """Replace the state by the newest valid checkpoint. A live writer may rewrite a
        slot, or recycle the pages of the root just read (this volume is not in sync yet,
        so nothing protects them), while it is read: a failure then is retried while the
        headers keep changing."""
        for _ in range(RELOADS - 1):
            headers = self._checkpoint_headers()
            try:
                self._load_from(headers)
                return
            except FormatError:
                if self._checkpoint_headers() == headers:
                    raise
        self._load_from(self._checkpoint_headers())

    def _load_from(self, headers: builtins.list[ckpt.CheckpointHeader | None]) -> None:
        errors: builtins.list[FormatError] = []
        for slot in ckpt.choose(headers):
            try:
                loaded = self._read_checkpoint(slot, headers)
                allocator = Allocator.from_free(self._sb.data_offset,
                                                self._sb.data_offset + self._sb.data_bytes,
                                                loaded.free, loaded.quarantine)
                self._tree.snapshot(loaded.root).height()  # the root is a page of the tree
            except FormatError as exc:
                errors.append(exc)
                continue
            header = loaded.header
            self._index = TreeIndex(self._tree, loaded.root, header.seq, header.epoch)
            self._allocator = allocator
            self._effects.clear()
            self._announced = header.seq == 0  # format's: every reader starts from it
            self._cursor = journal.Cursor(header.journal_pos, header.seq + 1, header.epoch)
            self._durable_seq = header.seq
            self._used = 0
            self._checkpoint_slot = slot
            self._positions.clear()
            return
        if errors:
            raise errors[0]
        raise ChecksumMismatch("no valid checkpoint on the image")

    def _read_checkpoint(self, slot: int,
                         headers: builtins.list[ckpt.CheckpointHeader | None]) -> ckpt.Checkpoint:
        """The checkpoint in ``slot`` (whose header is valid); FormatError if it is not."""
        header = headers[slot]
        assert header is not None
        if header.total > self._sb.checkpoint_bytes:
            raise ChecksumMismatch("checkpoint larger than its slot", slot=slot)
        if header.journal_pos > self._ring:  # == ring: the last record ended at its end
            raise CorruptMetadata("checkpoint journal position past the ring", slot=slot)
        off = self._sb.checkpoint_offsets[slot]
        body = self._device.read_at(off + ALIGN, header.total - ALIGN)
        try:
            return ckpt.decode(header, body)
        except (ValueError, KeyError) as exc:
            raise ChecksumMismatch(str(exc), slot=slot) from exc

    def _rebuild_allocator(self) -> None:
        """The writer's free map: the one saved with the index's root, plus what the records
        applied since claimed and freed (a reader cannot follow the tree pages a writer
        allocates, so its own map is not the writer's). If the newest valid checkpoint is
        not the one of the index's root (a writer crashed between a checkpoint and its
        record), the state is loaded from it again, as :meth:`open` would."""
        loaded = self._checkpoint_of_root()
        if loaded is None:
            self._load_checkpoint()
            self._settle_end()
            loaded = self._checkpoint_of_root()
            if loaded is None:
                raise ChecksumMismatch("the newest checkpoint changed while it was loaded")
        allocator = Allocator.from_free(self._sb.data_offset,
                                        self._sb.data_offset + self._sb.data_bytes,
                                        loaded.free, loaded.quarantine)
        for seq, claimed, freed in self._effects:
            allocator.claim(claimed)
            allocator.quarantine(seq, freed)
        self._allocator = allocator

    def _checkpoint_of_root(self) -> ckpt.Checkpoint | None:
        """The newest valid checkpoint if it is the one the index's root came from."""
        headers = self._checkpoint_headers()
        for slot in ckpt.choose(headers):
            try:
                loaded = self._read_checkpoint(slot, headers)
            except FormatError:
                continue  # torn: the other slot is the newest valid one
            if (loaded.header.seq, loaded.root) == (self._index.root_seq, self._index.root):
                return loaded
            if loaded.header.seq != self._index.root_seq:
                return None
        return None

    def _follow(self, view: _JournalView) -> builtins.list[Record]:
        """Apply the valid chain from the cursor on; returns what was applied."""
        applied: builtins.list[Record] = []
        while True:
            for start in journal.candidates(self._cursor.pos, self._ring):
                found = view.record_at(start)
                if found is not None and self._cursor.accepts(found[0]):
                    break
            else:
                return applied
            record, nbytes = found
            self._apply_at(record, start, nbytes)
            applied.append(record)

    def _apply_at(self, record: Record, start: int, nbytes: int, *, own: bool = False) -> None:
        """Apply ``record`` stored at ring offset ``start``; account the ring bytes. ``own``:
        the writer's record, whose extents its allocator handed out."""
        freed = self._index.apply(record)
        claimed = [Extent(o, n) for o, n in record.payload.get("extents") or ()] \
            if record.op == "put" else []
        if not own:
            self._allocator.forget_quarantined(claimed)
        self._allocator.quarantine(record.seq, freed)
        if record.op == "checkpoint":  # what came before is in that root's saved map
            self._effects.clear()
            self._announced = True
        elif claimed or freed:
            self._effects.append((record.seq, claimed, freed))
        self._note_position(record.seq, self._cursor.pos, start, nbytes)
        self._cursor.advance(start, nbytes)
        self._cursor.epoch = self._index.epoch

    def _note_position(self, seq: int, head: int, start: int, nbytes: int) -> None:
        """Remember where ``seq`` lives; forget records the new bytes overwrote."""
        self._used += journal.consumed(head, start, nbytes, self._ring)
        spans = [(start, start + nbytes)]
        if start == 0 and head != 0:
            spans.append((head, self._ring))
        while self._positions:
            _, old_start, _ = self._positions[0]
            if any(lo <= old_start < hi for lo, hi in spans):
                self._positions.popleft()
            else:
                break
        self._positions.append((seq, start, nbytes))

    def _settle_end(self) -> None:
        """Follow the chain to its end and refuse a proven corruption there (ChecksumMismatch).
        Witnesses are read before the walk: a writer may be live (see agents.core.journal,
        "Reading order")."""
        witnesses = self._scan_witnesses(
            _JournalView(self._device, self._sb), self._index.applied_seq
        )
        self._refresh_locked()
        self._check_end(witnesses)

    def _scan_witnesses(self, view: _JournalView, after: int) -> dict[int, journal.Witness]:
        """Per epoch, the valid record of the ring with the highest commit_seq above ``after``
        (the seq the chain starts from: no other record can witness for a seq it misses)."""
        best: dict[int, journal.Witness] = {}
        for start in self._record_starts(view):
            numbers = Record.peek_numbers(view.read(start, HEADER.size))
            if numbers is None:
                continue
            _, epoch, commit_seq, tag = numbers  # unverified: a cheap filter
            held = best.get(epoch)
            if commit_seq <= after or tag != self._sb.volume_tag or (
                held is not None and held.commit_seq >= commit_seq
            ):
                continue
            witness = view.witness_at(start)
            if witness is not None:
                best[epoch] = witness
        return best

    def _record_starts(self, view: _JournalView) -> Iterator[int]:
        """Every ring offset where a whole record header could start: records are packed,
        so a witness may lie at any byte, not only where a batch starts."""
        step = JOURNAL_WINDOW
        for base in range(0, self._ring, step):
            # the window, plus enough of the next to hold a header starting in this one
            window = bytes(view.read(base, min(step + HEADER.size, self._ring - base)))
            hit = window.find(MAGIC)
            while 0 <= hit < step and base + hit + HEADER.size <= self._ring:
                yield base + hit
                hit = window.find(MAGIC, hit + 1)

    def _check_end(self, witnesses: dict[int, journal.Witness]) -> None:
        """Raise ChecksumMismatch when one of ``witnesses`` (read before the chain was walked)
        proves the chain's end was committed. Not when a checkpoint reaches the missing seq:
        then a live writer wrapped over it during the walk (the next refresh reloads)."""
        missing = self._cursor.next_seq
        proofs = [
            w
            for w in witnesses.values()
            if journal.proves_corruption(w, missing, self._cursor.epoch)
        ]
        if not proofs or self._newest_checkpoint_seq() >= missing:
            return
        proof = max(proofs, key=lambda w: w.commit_seq)
        raise ChecksumMismatch(
            f"journal record seq {missing} is corrupt or missing although record seq "
            f"{proof.seq} (at journal offset {proof.start}, epoch {proof.epoch}) shows that "
            f"seq {proof.commit_seq} was committed",
            seq=missing,
            journal_offset=self._cursor.pos,
        )

    def _checkpoint_headers(self) -> builtins.list[ckpt.CheckpointHeader | None]:
        """Each slot's header (None when it does not decode)."""
        headers: builtins.list[ckpt.CheckpointHeader | None] = []
        for off in self._sb.checkpoint_offsets:
            try:
                headers.append(ckpt.decode_header(self._device.read_at(off, ALIGN)))
            except FormatError:
                headers.append(None)
        return headers

    def _newest_checkpoint_seq(self) -> int:
        return max((h.seq for h in self._checkpoint_headers() if h is not None), default=-1)

    def _refresh_locked(self) -> builtins.list[Record]:
        applied: builtins.list[Record] = []
        for _ in range(RELOADS):
            # the newest checkpoint BEFORE the walk: every record up to it was on disk then,
            # so a walk that stops below it met an overwritten record (the writer wrapped
            # past us). One written during the walk proves nothing: a live writer checkpoints
            # as it goes, and reloading then would only chase it.
            newest = self._newest_checkpoint_seq()
            try:
                applied += self._follow(_JournalView(self._device, self._sb))
            except FormatError:
                # a tree page of this volume's root that does not decode, with a newer
                # checkpoint on the image: the writer freed and reused it (this volume was
                # not in sync, so nothing held it back). The newest checkpoint has a root
                # that is whole; anything else is corruption.
                if self._newest_checkpoint_seq() <= self._index.root_seq:
                    raise
                self._load_checkpoint()
                applied.clear()
                continue
            self._durable_seq = self._index.applied_seq
            if self._index.applied_seq >= newest:
                return applied
            self._load_checkpoint()
            applied.clear()
        raise CatchingUp(
            "the journal moves faster than this reader can follow it",
            applied=self._index.applied_seq,
        )

    # ---- reader side ---------------------------------------------------------------------

    def refresh(self) -> builtins.list[Record]:
        """Read and apply new valid records from the on-disk journal. If the writer wrapped
        past this reader, reload the newest checkpoint (then only the records after it are
        returned). A writer's own index is the journal's truth: there it returns []."""
        if self._writer_epoch is not None:
            return []
        with self._lock, self._decoding():
            return self._refresh_locked()

    def apply(self, record: Record, start: int | None = None, nbytes: int | None = None) -> None:
        """Apply a pushed record that lies at ring offset ``start`` (``nbytes`` long), which
        must be one of the places the record after the cursor may start (BadRequest if not);
        None: the record began its own group commit. Records of an epoch below the highest
        seen and records already applied are ignored; a record beyond ``applied_seq + 1``
        raises SequenceGap."""
        with self._lock, self._decoding():
            if record.volume_tag != self._sb.volume_tag:
                raise FormatError(
                    "pushed record belongs to another volume (journal tag mismatch)",
                    seq=record.seq,
                )
            if record.epoch < self._index.epoch or record.seq <= self._index.applied_seq:
                return
            if record.seq != self._index.applied_seq + 1:
                raise SequenceGap(
                    f"record {record.seq} does not follow {self._index.applied_seq}",
                    applied=self._index.applied_seq,
                    got=record.seq,
                )
            if nbytes is None:
                nbytes = record.encoded_length()
            if start is None:
                start = journal.place_batch(self._cursor.pos, journal.align_up(nbytes),
                                            self._ring)
            if start not in journal.candidates(self._cursor.pos, self._ring) or (
                    start + nbytes > self._ring):
                raise BadRequest(
                    f"pushed record {record.seq} at journal offset {start} cannot follow the "
                    f"record that ended at {self._cursor.pos}",
                    seq=record.seq, journal_offset=start)
            self._apply_at(record, start, nbytes)
            self._durable_seq = record.seq

    def journal_position(self, seq: int) -> int:
        """Ring offset where applied record ``seq`` starts; JournalWrapped once overwritten."""
        with self._lock:
            for s, start, _ in self._positions:
                if s == seq:
                    return start
        raise JournalWrapped(f"record {seq} is no longer in the journal", wanted=seq,
                             oldest=self._positions[0][0] if self._positions else seq)

    def records_since(self, seq: int) -> builtins.list[Record]:
        """Records ``seq + 1 .. applied_seq`` read back from disk; JournalWrapped if the
        journal no longer holds them (the reader must then refresh from the checkpoint)."""
        with self._lock:
            if seq >= self._durable_seq:
                return []
            wanted = {s: (start, n) for s, start, n in self._positions if s > seq}
            if seq + 1 not in wanted:
                oldest = self._positions[0][0] if self._positions else self._index.applied_seq
                raise JournalWrapped(
                    f"records after {seq} are no longer in the journal",
                    wanted=seq + 1,
                    oldest=oldest,
                )
            view = _JournalView(self._device, self._sb)
            out: builtins.list[Record] = []
            for s in range(seq + 1, self._durable_seq + 1):
                start, _ = wanted[s]
                found = view.record_at(start)
                if found is None or found[0].seq != s:
                    raise JournalWrapped(
                        f"record {s} was overwritten in the journal", wanted=s, oldest=s
                    )
                out.append(found[0])
            return out

    # ---- queries -------------------------------------------------------------------------

    def stat(self, path: str) -> Entry:
        """The entry at ``path``; NotFound if absent."""
        path = normalize_path(path)
        with self._lock:
            return self._index.get(path).entry

    def list(self, path: str) -> builtins.list[Entry]:
        """Entries of directory ``path``, sorted."""
        path = normalize_path(path)
        with self._lock:
            return self._index.listdir(path)

    def list_page(self, path: str, *, after: str | None = None,
                  limit: int) -> tuple[builtins.list[Entry], str | None]:
        """Up to ``limit`` entries of directory ``path`` whose names sort after the name
        ``after`` (from the start when None), sorted, and the name to resume after (None
        when the directory has no more). A page costs a bisect and a slice of the directory's
        sorted children: resuming never repeats an entry nor skips one that existed
        throughout (see Index.listdir_page)."""
        path = normalize_path(path)
        if limit < 1:
            raise BadRequest("a page holds at least one entry", limit=limit)
        if after is not None:
            full = normalize_path(posixpath.join(path, after)) if after else path
            if full == path or posixpath.dirname(full) != path:
                raise BadPath("the cursor must be one name in the directory",
                              after=after[:300])
            after = posixpath.basename(full)  # the normalized (NFC) spelling
        with self._lock:
            entries, more = self._index.listdir_page(path, after, limit)
        return entries, posixpath.basename(entries[-1].path) if more else None

    def read(self, path: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Stream ``[offset, offset+length)`` of the version current now, verified chunk by
        chunk (ChecksumMismatch, never wrong bytes). The version stays pinned (its extents
        are not reused, see :meth:`safe_seq`) until the iterator is exhausted or closed."""
        # without pooled buffers the stream yields the bytes read_at returned (or a slice)
        return cast(Iterator[bytes], self._stream(path, offset, length, reuse=False))

    def read_views(self, path: str, offset: int = 0,
                   length: int | None = None) -> Iterator[memoryview]:
        """:meth:`read` into pooled page-aligned buffers (``readinto``, no fresh buffer per
        unit): each yielded view is valid only until the next ``next()`` or ``close()`` on
        the iterator, which hands its buffer back for reuse. Send or copy it before that."""
        return cast(Iterator[memoryview], self._stream(path, offset, length, reuse=True))

    def _stream(self, path: str, offset: int, length: int | None, *,
                reuse: bool) -> _ReadStream:
        path = normalize_path(path)
        with self._lock:
            node = self._index.get(path)
            if node.entry.kind != "file":
                raise WrongKind(f"is a directory: {path}", path=path)
            if offset < 0 or (length is not None and length < 0):
                raise BadRequest("negative offset or length")
            end = node.entry.size if length is None else min(node.entry.size, offset + length)
            pin = self._index.applied_seq
            self._pins[pin] += 1
        return _ReadStream(self, node, offset, max(offset, end), pin,
                           self._buffers if reuse else None)

    def _unpin(self, pin: int) -> None:
        with self._lock:
            self._pins[pin] -= 1
            if self._pins[pin] <= 0:
                del self._pins[pin]

    def safe_seq(self) -> int:
        """min(applied_seq, oldest seq pinned by an open read): what a reader reports."""
        with self._lock:
            pins = [s for s, n in self._pins.items() if n > 0]
            return min([self._durable_seq, *pins])

    # ---- inspection (fsck) ----------------------------------------------------------------

    def load(self) -> None:
        """Load the newest valid checkpoint, nothing more (FormatError if none is)."""
        with self._lock, self._decoding():
            self._load_checkpoint()

    def replay(self) -> tuple[int, int, str] | None:
        """Follow the journal from the loaded checkpoint to its end (witnesses read first, as
        :meth:`open` does) and rebuild the free map a new writer would start from, reporting
        instead of raising: None when the chain ends at a torn tail, else (the seq that does
        not apply or is proven missing, its ring offset, why)."""
        with self._lock:
            witnesses = self._scan_witnesses(_JournalView(self._device, self._sb),
                                             self._index.applied_seq)
            problem: tuple[int, int, str] | None = None
            try:
                with self._decoding():
                    self._follow(_JournalView(self._device, self._sb))
                self._check_end(witnesses)
            except AgentError as exc:
                why = str(exc) if isinstance(exc, ChecksumMismatch) else \
                    f"record does not apply: {exc}"
                problem = (self._cursor.next_seq, self._cursor.pos, why)
            self._durable_seq = self._index.applied_seq
            try:
                with self._decoding():
                    self._rebuild_allocator()
            except AgentError as exc:
                problem = problem or (self._cursor.next_seq, self._cursor.pos,
                                      f"free map does not rebuild: {exc}")
            return problem

    def walk(self) -> Iterator[Node]:
        """Every node, parents before children (reads the whole tree: fsck, tests)."""
        with self._lock, self._decoding():
            yield from self._index.walk()

    def check_tree(self, reached: set[int]) -> builtins.list[btree.TreeProblem]:
        """The tree of the loaded checkpoint checked page by page (``btree.check``); the
        pages it reaches are added to ``reached``."""
        with self._lock:
            return btree.check(self._index.root, self._pages, layout=LAYOUT, reached=reached)

    def space(self) -> tuple[builtins.list[Extent], builtins.list[tuple[int, Extent]]]:
        """The allocator's free extents and its quarantine ((freeing seq, extent))."""
        with self._lock:
            return self._allocator.free_extents(), self._allocator.quarantined()

    def fsck(self) -> builtins.list[Any]:
        """Check the device read-only (see agents.fsck.check)."""
        from agents import fsck  # fsck builds on Volume; imported here to keep one direction

        return fsck.check(self._device)

    # ---- writer side ---------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="volume-io")
            return self._pool

    def _check_writer(self, epoch: int) -> None:
        if self._failed is not None:
            raise DeviceError(
                f"volume failed earlier: {self._failed.message}", **self._failed.fields
            )
        if self._writer_epoch is None:
            raise NotWriter("this volume is not the writer (no start_epoch yet)")
        if epoch != self._writer_epoch:
            raise StaleEpoch(
                f"epoch {epoch} is not the writer's epoch {self._writer_epoch}",
                current=self._writer_epoch,
                got=epoch,
            )

    def start_epoch(self, epoch: int) -> Record:
        """Become the writer for ``epoch`` (> every epoch seen): follow the journal to its
        valid end (dropping a torn tail), then write the epoch-start record there."""
        if self._device.read_only:
            raise DeviceError("the device is read-only", op="write", errno=errno.EROFS)
        if self._failed is not None:
            raise DeviceError(
                "this volume failed a write (its index may hold records that are not durable): "
                "open the volume again",
                **self._failed.fields,
            )
        with self._leadership():
            with self._lock:
                self._settle_end()
                if self._writer_epoch is None:
                    # a writer's own map also holds extents of puts in flight: keep it
                    self._rebuild_allocator()
                    self._pages.drop_reserve()
                    self._pages.refill_reserve()
                if epoch <= self._index.epoch:
                    raise StaleEpoch(
                        f"epoch {epoch} is not above the highest seen ({self._index.epoch})",
                        current=self._index.epoch,
                        got=epoch,
                    )
                self._writer_epoch = epoch
                announce = not self._announced
            ticket = self._ticket("epoch-start", {"epoch": epoch}, epoch)
            self._write_batch([ticket], checkpoint=announce)
        if ticket.error is not None:
            raise ticket.error
        assert ticket.record is not None
        return ticket.record

    def put(
        self, path: str, chunks: Iterable[bytes], size: int, *, epoch: int, mtime: float
    ) -> Record:
        """Store a file: data to fresh extents (pipelined, flushed), then one record that
        joins a group commit. Returns once the record is durable."""
        path = normalize_path(path)
        self._check_writer(epoch)
        if size < 0:
            raise BadRequest("negative size")
        if size <= self._sb.inline_max:
            self._check_room(size)
            data = b"".join(_bounded(chunks, size))
            if len(data) != size:
                raise BadRequest(f"got {len(data)} bytes, announced {size}", size=size)
            payload = put_payload(
                path,
                size=size,
                mtime=mtime,
                crc=zlib.crc32(data),
                chunk=0,
                extents=[],
                sums=[],
                inline=data,
            )
            return self._commit(self._ticket("put", payload, epoch))
        self._check_room(size)  # refused before any byte is read; nothing held up front
        # reserved unit by unit as the data arrives (_write_data): a body that trickles in
        # holds only the space of what it sent, never its announced size
        extents: builtins.list[Extent] = []
        with self._lock:
            self._outside[id(extents)] = extents
        committed = False
        try:
            crc, sums = self._write_data(extents, chunks, size)
            payload = put_payload(
                path,
                size=size,
                mtime=mtime,
                crc=crc,
                chunk=self._sb.chunk_size,
                extents=extents,
                sums=sums,
                inline=None,
            )
            ticket = self._ticket("put", payload, epoch)
            ticket.outside = id(extents)
            record = self._commit(ticket)
            committed = True
            return record
        finally:
            if not committed:
                with self._lock:
                    if self._outside.pop(id(extents), None) is not None and not self._failed:
                        self._allocator.give_back(extents)

    def _write_data(
        self, extents: builtins.list[Extent], chunks: Iterable[bytes], size: int
    ) -> tuple[int, builtins.list[int]]:
        """Stream ``chunks`` to the device: WRITE_UNIT pieces, IN_FLIGHT at once, each
        allocated just before it is written and appended to ``extents`` (adjacent ones
        merged), which the caller gives back if the put fails.

        A chunk that is exactly one unit is written from as it is; smaller ones are copied
        once into a pooled aligned buffer (and the last unit's padding zeroed there), which
        goes back to the pool when its write is done."""
        chunk = self._sb.chunk_size
        unit = max(WRITE_UNIT // chunk, 1) * chunk
        pool = self._executor() if size > unit else None
        buffers = self._buffers
        inflight: collections.deque[Future[None]] = collections.deque()
        sums: builtins.list[int] = []
        logical = 0

        def store(block: memoryview, length: int, pieces: builtins.list[tuple[int, int]],
                  first: int) -> None:
            # on an I/O thread: chunk checksums (zlib releases the GIL) then the writes, each
            # extent piece straight from its slice of ``block`` (``length`` bytes + padding)
            for k, i in enumerate(range(0, length, chunk)):
                sums[first + k] = zlib.crc32(block[i : min(i + chunk, length)])
            done = 0
            for dev_off, n in pieces:
                self._io.writev(dev_off, [block[done : done + n]])
                done += n

        def emit(block: memoryview, length: int, owned: mmap.mmap | None) -> None:
            # ``block`` is ``length`` bytes padded to ALIGN; ``owned`` (its pooled buffer)
            # goes back once the write is done, failed or cancelled
            nonlocal logical
            with self._lock:
                self._check_room(block.nbytes)  # concurrent puts passed the first check
                got = self._allocator.allocate(block.nbytes)
            for x in got:
                if extents and extents[-1].end == x.offset:
                    extents[-1] = Extent(extents[-1].offset, extents[-1].length + x.length)
                else:
                    extents.append(x)
            pieces = locate(extents, logical, block.nbytes)
            first = len(sums)
            sums.extend([0] * -(-length // chunk))
            logical += length
            if pool is None:  # one write: do it here, a thread hop costs more than it hides
                try:
                    store(block, length, pieces, first)
                finally:
                    if owned is not None:
                        buffers.give(owned)
                return
            while len(inflight) >= IN_FLIGHT:
                inflight.popleft().result()
            fut = pool.submit(store, block, length, pieces, first)
            if owned is not None:
                fut.add_done_callback(lambda _: buffers.give(owned))
            inflight.append(fut)

        filling: mmap.mmap | None = None
        filled = 0
        try:
            for piece in _bounded(chunks, size):
                if not filled and len(piece) == unit and isinstance(piece, bytes):
                    emit(memoryview(piece), unit, None)  # the common streaming case: no copy
                    continue
                view = byte_view(piece)
                while view.nbytes:
                    if filling is None:
                        filling = buffers.take(unit)
                    take = min(unit - filled, view.nbytes)
                    filling[filled : filled + take] = view[:take]
                    filled += take
                    view = view[take:]
                    if filled == unit:
                        owned, filling, filled = filling, None, 0
                        emit(memoryview(owned), unit, owned)
            if logical + filled != size:
                raise BadRequest(f"got {logical + filled} bytes, announced {size}", size=size)
            if filling is not None:
                padded = filled + -filled % ALIGN
                filling[filled:padded] = bytes(padded - filled)
                owned, filling = filling, None
                emit(memoryview(owned)[:padded], filled, owned)
            while inflight:
                inflight.popleft().result()
        finally:
            if filling is not None:
                buffers.give(filling)
            for fut in inflight:
                fut.cancel()
            for fut in inflight:
                if not fut.cancelled():
                    fut.exception()
        return file_crc(sums, size, chunk), sums

    def delete(self, path: str, *, epoch: int) -> Record:
        """Remove a file or an empty directory (its extents go to quarantine)."""
        path = normalize_path(path)
        self._check_writer(epoch)
        return self._commit(self._ticket("delete", {"path": path}, epoch))

    def mkdir(self, path: str, *, epoch: int, parents: bool = False) -> Record:
        """Create a directory (and its missing parents with ``parents=True``)."""
        path = normalize_path(path)
        self._check_writer(epoch)
        self._check_room(0)
        payload = {"path": path, "parents": parents, "mtime": time.time()}
        return self._commit(self._ticket("mkdir", payload, epoch))

    def rename(self, src: str, dst: str, *, epoch: int) -> Record:
        """Move a file or directory; a file replaces an existing destination file."""
        src, dst = normalize_path(src), normalize_path(dst)
        self._check_writer(epoch)
        return self._commit(self._ticket("rename", {"src": src, "dst": dst}, epoch))

    def release_through(self, seq: int) -> None:
        """Extents freed by records with seq <= ``seq`` may be reused from now on. The writer
        first discards them (widened to whole DISCARD_UNITs where free space allows), outside
        the lock but before the allocator can hand them out: see docs/format.md, "Discards".
        A discard that fails is logged; the extents are freed all the same."""
        with self._lock:
            seq = min(seq, self._index.applied_seq)
            allocator = self._allocator
            if self._writer_epoch is None or self._device.read_only:
                # a reader's free map is not the writer's (it cannot follow the tree pages
                # the writer allocates; promotion rebuilds it): only its quarantine shrinks
                allocator.take_released(seq)
                return
            held = [allocator.claim_around(e, DISCARD_UNIT)
                    for e in allocator.take_released(seq)]
            if not held:
                return
            self._outside[id(held)] = held
            self._discarding += 1
        try:
            self._discard(held)
        finally:
            with self._lock:
                del self._outside[id(held)]
                allocator.give_back(held)
                self._discarding -= 1
                self._discarded.notify_all()

    def _discard(self, extents: builtins.list[Extent]) -> None:
        done = 0
        try:
            for extent in extents:
                if not self._device.discard(extent.offset, extent.length):
                    break
                done += extent.length
        except DeviceError as exc:
            # the space stays allocated on the medium until reused; a fenced writer's next
            # journal write fails and stops it, so nothing more is done here
            LOG.warning("event=discard_failed errno=%s error=%s", exc.fields.get("errno"),
                        exc.message)
        listener = self._on_discard
        if done and listener is not None:
            listener(done)

    def set_discard_listener(self, listener: Callable[[int], None] | None) -> None:
        """Call ``listener`` with the bytes of each successful round of discards (metrics)."""
        self._on_discard = listener

    def checkpoint(self) -> None:
        """Commit the changed metadata to the tree and checkpoint its root (frees the
        journal); its record is durable on return."""
        if self._device.read_only or self._writer_epoch is None:
            raise NotWriter("only the writer checkpoints")
        with self._leadership():
            self._write_batch([], checkpoint=True)

    def set_commit_listener(self, listener: Callable[[Commit], None] | None) -> None:
        """Call ``listener`` with each group commit (its records in seq order and their
        packed bytes) once it is durable, before its puts return; None removes it. Calls
        come one at a time in seq order (the journal leader makes them), so the listener must
        be quick: the writer encodes the commit's push once and queues it for every reader."""
        self._on_commit = listener

    def free_bytes(self) -> int:
        """Free bytes of the data area in this volume's map, the metadata reserve included
        (a reader's map does not follow the writer's tree pages: only the writer's is exact)."""
        with self._lock:
            return self._allocator.free_bytes() + self._pages.reserve_bytes()

    def _check_room(self, nbytes: int) -> None:
        """NoSpace unless ``nbytes`` are free for new data and the metadata reserve is whole
        (once no discard in flight holds space back). Deletes and renames skip this: they
        are how a full store gets its space back."""
        with self._lock:
            while True:
                full = self._pages.refill_reserve()
                free = self._allocator.free_bytes()
                if (free >= nbytes and full) or not self._discarding:
                    break
                self._discarded.wait(DISCARD_WAIT)
        if free < nbytes or not full:
            raise NoSpace(f"no space for {nbytes} bytes ({free} free; the metadata reserve "
                          f"{'is whole' if full else 'is short'})", needed=nbytes)

    # ---- group commit --------------------------------------------------------------------

    def _ticket(self, op: str, payload: dict[str, Any], epoch: int) -> _Ticket:
        nbytes = Record(0, epoch, op, payload).encoded_length()
        if nbytes > self._ring // 4:
            raise BadRequest(
                f"metadata record of {nbytes} bytes exceeds a quarter of the journal",
                size=nbytes,
            )
        return _Ticket(op, payload, epoch, nbytes)

    @contextlib.contextmanager
    def _leadership(self) -> Iterator[None]:
        """Be the only thread writing the journal (or a checkpoint) for the block's duration
        (checkpoints, promotion: rare, so these waiters share one condition)."""
        with self._cond:
            self._exclusive += 1
            while self._leading:
                self._cond.wait()
            self._exclusive -= 1
            self._leading = True
        try:
            yield
        finally:
            with self._cond:
                self._pass_leadership()

    def _pass_leadership(self) -> None:
        """Caller holds ``_cond`` and leads: hand the journal on. A thread waiting in
        :meth:`_leadership` goes first (it would starve behind a steady stream of puts),
        else the oldest queued ticket leads the next batch (woken alone), else nobody."""
        if self._exclusive:
            self._leading = False
            self._cond.notify_all()
        elif self._queue:
            head = self._queue[0]
            head.leads = True
            head.wake.set()
        else:
            self._leading = False

    def _commit(self, ticket: _Ticket) -> Record:
        budget = self._ring // 4
        with self._cond:
            self._queue.append(ticket)
            if not self._leading:
                self._leading = ticket.leads = True
        while not ticket.leads:
            ticket.wake.wait()
            with self._cond:
                if ticket.done:
                    break
                if not self._leading:  # a _leadership() holder let go with nobody named
                    self._leading = ticket.leads = True
                else:
                    ticket.wake.clear()
        if not ticket.done:
            with self._cond:
                batch: builtins.list[_Ticket] = []
                total = 0
                while self._queue and (not batch or total + self._queue[0].nbytes <= budget):
                    total += self._queue[0].nbytes
                    batch.append(self._queue.popleft())
            try:
                self._write_batch(batch)
            except BaseException as exc:
                for t in batch:
                    if t.error is None:
                        t.error = exc
                        t.record = None
                raise
            finally:
                with self._cond:
                    for t in batch:
                        t.done = True
                        t.wake.set()
                    self._pass_leadership()
        if ticket.error is not None:
            raise ticket.error
        assert ticket.record is not None
        return ticket.record

    def _write_batch(self, batch: builtins.list[_Ticket], *, checkpoint: bool = False) -> None:
        """Leader only: number, apply and write a batch of records; flush data before and
        the journal after. First a checkpoint when asked, when the ring would pass
        CHECKPOINT_AT or the overlay OVERLAY_MAX paths: its record leads the batch."""
        parts: builtins.list[bytes] = []
        with self._lock:
            if self._failed is not None:
                raise DeviceError(f"volume failed earlier: {self._failed.message}")
            # placed for all of its tickets (a refused one only leaves the batch shorter):
            # the padded batch, plus at most as much skipped at the end of the ring
            room = journal.align_up(sum(t.nbytes for t in batch))
            # the overlay's pages must fit in half the free space (the other half holds the
            # pages the last commit replaced until readers pass them): near full, often
            pages = self._index.overlay_size * PAGES_PER_PATH * TREE_PAGE
            room_for_pages = self._allocator.free_bytes() + self._pages.reserve_bytes()
            if (checkpoint or self._used + 2 * room > self._ring * CHECKPOINT_AT
                    or self._index.overlay_size >= OVERLAY_MAX
                    or pages > room_for_pages // 2):
                batch = [self._checkpoint_locked(), *batch]
                room = journal.align_up(sum(t.nbytes for t in batch))
            start = at = journal.place_batch(self._cursor.pos, room, self._ring)
            durable = self._index.applied_seq
            for t in batch:
                if t.epoch != self._writer_epoch:
                    t.error = StaleEpoch(
                        f"epoch {t.epoch} is not the writer's epoch {self._writer_epoch}",
                        current=self._writer_epoch,
                        got=t.epoch,
                    )
                    continue
                record = Record(
                    self._index.applied_seq + 1,
                    t.epoch,
                    t.op,
                    t.payload,
                    commit_seq=durable,
                    volume_tag=self._sb.volume_tag,
                )
                data = record.encode(self._sb.record_key)
                try:
                    self._apply_at(record, at, len(data), own=True)
                except AgentError as exc:
                    t.error = exc
                    continue
                if t.outside is not None:
                    del self._outside[t.outside]  # named by the record from now on
                t.record = record
                parts.append(data)
                at += len(data)
        if not parts:
            return
        # the records packed back to back, the batch padded to the boundary O_DIRECT needs
        packed = b"".join([*parts, bytes(journal.align_up(at) - at)])
        try:
            if any(t.record is not None and t.record.payload.get("extents") for t in batch):
                self._device.flush()  # the batch's file data is durable before its records
            self._device.write_at(self._sb.journal_offset + start, packed)
            self._device.flush()
        except DeviceError as exc:
            self._failed = exc
            raise
        committed = [t.record for t in batch if t.record is not None]
        with self._lock:
            self._durable_seq = committed[-1].seq
        listener = self._on_commit
        if listener is not None:
            listener(Commit(committed, start, memoryview(packed)[: at - start]))

    def _checkpoint_locked(self) -> _Ticket:
        """Commit the overlay to the tree (only changed pages, flushed), then the root, the
        free map and the quarantine to the older slot (flushed); returns the ticket of the
        checkpoint record that must come next in the journal (seq ``applied_seq + 1``).
        Pages the commit freed are quarantined under that record's seq: a reader still on
        the old root has not acknowledged it."""
        index = self._index
        seq = index.applied_seq
        base = index.root.generation if index.root is not None else 0
        slot = 1 - self._checkpoint_slot
        try:
            try:
                commit = index.commit(max(seq + 1, base + 1))
                self._pages.write_out()
            finally:
                self._pages.give_back_spare()
                self._pages.refill_reserve()
            self._device.flush()  # the tree is durable before a checkpoint names its root
            # pages the previous commit freed join the quarantine now, under this record's
            # seq: a root stays whole for a whole checkpoint interval after it is replaced,
            # which a reader that is not in sync (opening, catching up: the quarantine does
            # not wait for it) needs to load it and follow the journal from it
            self._allocator.quarantine(seq + 1, self._retired)
            self._retired = _coalesce(Extent(p * ALIGN, TREE_PAGE) for p in commit.freed)
            free = _coalesce([*self._allocator.free_extents(), *self._pages.reserve_extents(),
                              *(x for xs in self._outside.values() for x in xs)])
            quarantine = sorted([*self._allocator.quarantined(),
                                 *((seq + 1, x) for x in self._retired)],
                                key=lambda q: (q[0], q[1].offset))
            # the next batch starts on a 4 KiB boundary at or after the cursor (or at 0)
            data = ckpt.encode(seq, index.epoch, commit.root, free, quarantine,
                               journal.align_up(self._cursor.pos), self._sb.checkpoint_bytes)
            self._device.write_at(self._sb.checkpoint_offsets[slot], data)
            self._device.flush()
        except DeviceError as exc:
            self._failed = exc
            raise
        index.switch(commit.root, seq)
        self._effects.clear()
        self._checkpoint_slot = slot
        self._used = 0
        payload = {"root": None if commit.root is None else list(commit.root), "seq": seq}
        assert self._writer_epoch is not None
        return self._ticket("checkpoint", payload, self._writer_epoch)


def _bounded(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Pass chunks through; BadRequest as soon as they exceed ``size`` bytes."""
    total = 0
    for piece in chunks:
        total += len(piece)
        if total > size:
            raise BadRequest(f"more bytes than the announced {size}", size=size)
        yield piece


Piece = bytes | memoryview
Slot = tuple[Piece, mmap.mmap | None, ChecksumMismatch | None]  # data, its buffer, error


class _ReadStream(Iterator[Piece]):
    """Verified reads of one pinned version: READ_UNIT pieces, READ_AHEAD in flight. With
    ``buffers``, each unit is read into a pooled buffer and yielded as a view of it, which
    stays valid until the next ``next()`` or ``close()`` (the buffer then goes back);
    without, each unit is the ``bytes`` the device returned."""

    def __init__(self, vol: Volume, node: Node, start: int, end: int, pin: int,
                 buffers: _Buffers | None) -> None:
        self._vol = vol
        self._node = node
        self._start = start
        self._end = end
        self._pin: int | None = pin
        self._buffers = buffers
        self._held: mmap.mmap | None = None  # the buffer of the view last yielded
        self._ahead: collections.deque[Future[Slot]] = collections.deque()
        self._error: ChecksumMismatch | None = None
        self._inline_done = False
        chunk = node.chunk
        self._next_chunk = start // chunk if chunk else 0
        self._last_chunk = (end - 1) // chunk if chunk and end > start else -1
        self._per_task = max(READ_UNIT // chunk, 1) if chunk else 1

    def __iter__(self) -> _ReadStream:
        return self

    def __next__(self) -> Piece:
        self._give_back()
        try:
            return self._next()
        except BaseException:
            self.close()
            raise

    def _give_back(self) -> None:
        held, self._held = self._held, None
        if held is not None and self._buffers is not None:
            self._buffers.give(held)

    def _next(self) -> Piece:
        node = self._node
        if self._error is not None:
            raise self._error
        if node.inline is not None:
            if self._inline_done or self._start >= self._end:
                self.close()
                raise StopIteration
            self._inline_done = True
            if zlib.crc32(node.inline) != node.entry.crc:
                raise ChecksumMismatch(
                    f"inline data of {node.entry.path} does not match its checksum",
                    path=node.entry.path,
                )
            inline = node.inline[self._start : self._end]
            return inline if self._buffers is None else memoryview(inline)
        pool = self._vol._executor()
        while self._next_chunk <= self._last_chunk and len(self._ahead) < READ_AHEAD:
            last = min(self._next_chunk + self._per_task - 1, self._last_chunk)
            self._ahead.append(pool.submit(self._read_chunks, self._next_chunk, last))
            self._next_chunk = last + 1
        if not self._ahead:
            self.close()
            raise StopIteration
        data, self._held, self._error = self._ahead.popleft().result()
        if self._error is not None:
            self._stop()  # the good bytes before the bad chunk keep their buffer
            if not data:
                raise self._error
        return data

    def _fill(self, pieces: builtins.list[tuple[int, int]],
              nbytes: int) -> tuple[Piece, mmap.mmap | None]:
        """The bytes of ``pieces`` (``nbytes`` in all): read_at's own bytes, or read into a
        pooled buffer (handed back here if the read fails)."""
        device = self._vol._io
        if self._buffers is None:
            if len(pieces) == 1:
                return device.read_at(*pieces[0]), None
            return b"".join(device.read_at(off, ln) for off, ln in pieces), None
        buf = self._buffers.take(self._per_task * self._node.chunk)
        try:
            view = memoryview(buf)
            at = 0
            for off, ln in pieces:
                device.readinto(off, view[at : at + ln])
                at += ln
        except BaseException:
            self._buffers.give(buf)
            raise
        return view[:nbytes], buf

    def _read_chunks(self, first: int, last: int) -> Slot:
        """Chunks ``first..last`` (one device read per extent piece), verified, cut to the
        requested range. A bad chunk ends the data there and comes back as the error (served
        after the good bytes before it)."""
        node = self._node
        chunk = node.chunk
        lo = first * chunk
        hi = min((last + 1) * chunk, node.entry.size)
        span = hi - lo
        pieces = node.locate(lo, span + (-span % ALIGN))
        data, buf = self._fill(pieces, span + (-span % ALIGN))
        view = memoryview(data)
        error: ChecksumMismatch | None = None
        for i in range(first, last + 1):
            a = (i - first) * chunk
            b = min(a + chunk, span)
            if zlib.crc32(view[a:b]) != node.sums[i]:
                where = node.locate(i * chunk, ALIGN)[0][0]
                error = ChecksumMismatch(
                    f"data of {node.entry.path} chunk {i} (device offset {where}) does not "
                    f"match its checksum",
                    path=node.entry.path,
                    chunk=i,
                    device_offset=where,
                )
                hi = lo + a
                break
        view.release()
        a = max(self._start, lo) - lo
        b = max(min(self._end, hi) - lo, a)
        return (data if (a, b) == (0, len(data)) else data[a:b]), buf, error

    def close(self) -> None:
        """Stop reading ahead, hand the buffers back and unpin the version."""
        self._give_back()
        self._stop()

    def _stop(self) -> None:
        """Stop reading ahead (their buffers go back) and unpin the version."""
        while self._ahead:
            fut = self._ahead.popleft()
            if not fut.cancel() and fut.exception() is None and self._buffers is not None:
                held = fut.result()[1]
                if held is not None:
                    self._buffers.give(held)
        if self._pin is not None:
            pin, self._pin = self._pin, None
            self._vol._unpin(pin)

    def __del__(self) -> None:
        self.close()
