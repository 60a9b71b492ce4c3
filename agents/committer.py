"""The committer: what the writer adds to a followed volume (docs/format.md).

:class:`Committer` is a :class:`agents.follower.Follower` that, after
:meth:`Committer.start_epoch`, stores data copy-on-write, group-commits journal records,
checkpoints the metadata tree (its pages from :class:`_PageStore`, which holds back a reserve
so a full store can still checkpoint), and discards and frees what readers have passed
(:meth:`Committer.release_through`). A reader's volume becomes the writer in place: it is a
Committer from the start, and :meth:`Committer.adopt` moves it onto a writable handle.

Concurrency: one *leader* at a time numbers the queued records (group commit), then hands
the journal on and writes them; up to COMMITS_IN_FLIGHT group commits are written at once,
and acknowledged in seq order. Puts that arrive while that many are in flight queue, and the
next leader takes all of them. A device error during a journal write fails the volume for
good (``DeviceError`` on every later write, and on the commits in flight after it): after a
fence that is the point. What this layer does not guarantee: durability of a
record whose put() raised.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import errno
import logging
import mmap
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from agents.core import checkpoint as ckpt
from agents.core import journal
from agents.core.allocator import Allocator, Extent, coalesce
from agents.core.index import Node, file_crc, locate, normalize_path, put_payload
from agents.core.record import HEADER, Record
from agents.core.superblock import RING_ALIGN, SLOTS, Superblock, choose
from agents.device import ALIGN, BlockDevice, aligned_buffer, byte_view
from agents.errors import (
    AgentError,
    BadRequest,
    DeviceError,
    FormatError,
    NoSpace,
    NotWriter,
    StaleEpoch,
)
from agents.follower import TREE_PAGE, Follower, JournalView, TreePages

__all__ = ["DISCARD_UNIT", "WRITE_UNIT", "Commit", "Committer", "reserve_pages"]

LOG = logging.getLogger(__name__)

WRITE_UNIT = 4 << 20  # bytes per data write submitted to the device
IN_FLIGHT = 8  # data writes in flight per put (measured: 4 -> 0.89, 8 -> 0.98 of rbd bench)
CHECKPOINT_AT = 0.5  # checkpoint once this fraction of the journal ring is in use
# group commits written at once: the next leader numbers and writes its batch while the
# journal write before it is in flight; acknowledgements still come in seq order. More is
# not better on a host where the agents' CPU is the limit: each commit costs a journal write
# and its push, and commits overlap only by being smaller (4 measured 8-15 % fewer 4 KiB
# puts/s than 1 here, 2 the same as 1 within the noise, with or without OSD latency added)
COMMITS_IN_FLIGHT = 2
# RBD's default object size: librbd deletes an object (its space goes back to the pool) only
# when a discard covers all of it, and merely zeroes the part another discard covers
DISCARD_UNIT = 4 << 20
# librbd skips a discard, or the part of one, that does not cover whole pieces of this size
# (rbd_discard_granularity_bytes, with rbd_skip_partial_discard on: Pacific's defaults)
DISCARD_GRANULE = RING_ALIGN
DISCARD_WAIT = 5.0  # seconds between looks at space held by discards in flight
PAGE_RUN = 32  # tree pages allocated at once by a checkpoint (written as one run)
# paths changed since the last checkpoint kept in memory: past this the writer checkpoints
# (and readers switch roots when they apply its record), so memory stays bounded
OVERLAY_MAX = 4096
# bytes of inline files in the overlay (memory on every agent until they move home): past
# this the writer checkpoints. Every put waits while a checkpoint is written, and its tree
# commit grows with the paths changed since the last one: 4 MiB (~1,000 4 KiB puts) keeps that
# stall near 25 ms (measured: 8 MiB, ~50 ms), at the same tree-commit work per put
OVERLAY_DATA_MAX = 4 << 20
# a file up to this size stays in its tree leaf after a checkpoint (a 32 KiB page's cell
# holds it, and a leaf shares its page); a bigger inline one moves to data extents there
LEAF_DATA_MAX = 3072
# pages a checkpoint writes per changed path at worst: its leaf, split once (a branch page
# holds hundreds of children, so the branches above are a few pages for the whole overlay)
PAGES_PER_PATH = 2


def _widen(allocator: Allocator, held: Extent) -> Extent:
    """``held`` widened through free space to whole DISCARD_UNITs (objects deleted whole),
    else to whole DISCARD_GRANULEs (a part librbd does not skip)."""
    return allocator.claim_around(allocator.claim_around(held, DISCARD_UNIT), DISCARD_GRANULE)


def reserve_pages(data_bytes: int) -> int:
    """Tree pages the writer holds back from data (1/64 of the data area, 4 to 2048 pages):
    a full store can still checkpoint, so deletes go through and give the space back. Held
    as whole pages because a full data area is fragmented below a page's size."""
    return max(4, min(data_bytes // 64, 64 << 20) // TREE_PAGE)


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
class _Staged:
    """A small file of the overlay written to its home ahead of the checkpoint: ``home`` is
    ``source`` (the overlay's node when it was written) with its bytes in data extents that
    no record names yet. The next checkpoint names ``home`` if the file is still ``source``,
    else gives its extents back."""

    source: Node
    home: Node


@dataclass(frozen=True)
class Commit:
    """One durable group commit as readers get it: its records (seq order) and their bytes as
    they lie in the journal ring from offset ``start`` (packed, without the batch's
    padding). ``data`` is read-only and stays valid: it is not reused."""

    records: builtins.list[Record]
    start: int
    data: memoryview


@dataclass
class _Flight:
    """A numbered group commit on its way to the journal: its tickets (its records in seq
    order: those with a ``record``), the packed bytes padded to 4 KiB, their ring offset, and
    its place in the order commits are acknowledged in (``order``, from 1)."""

    tickets: builtins.list[_Ticket]
    start: int
    packed: bytes
    nbytes: int  # the records' bytes, without the padding
    order: int


class _PageStore(TreePages):
    """The writer's tree pages (:class:`agents.follower.TreePages`): it allocates them from
    the volume's allocator PAGE_RUN at a time, buffers a commit's writes and writes them out
    sorted, in contiguous runs (:meth:`write_out`); pages a commit frees are quarantined by
    the volume like data extents. The writer also holds a reserve of pages
    (:func:`reserve_pages`) that no data may take; they are free in every checkpoint, so a
    crash leaks none."""

    _vol: Committer

    def __init__(self, vol: Committer) -> None:
        super().__init__(vol)
        self._spare: builtins.list[int] = []
        self._reserve: builtins.list[int] = []
        self._writes: dict[int, bytes] = {}
        # next fit: a page freed by a checkpoint is reused only after the pages are laid
        # over the rest of the free space, so a reader that is not in sync (not protected
        # by the quarantine: opening, catching up) rarely meets its root's pages reused
        self._cursor = vol._sb.data_offset

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


class Committer(Follower):
    """A followed volume that can become the writer (see the module docstring)."""

    _pages: _PageStore

    def __init__(self, device: BlockDevice, sb: Superblock) -> None:
        super().__init__(device, sb)
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
        # the order of the last group commit numbered and of the last acknowledged (under
        # _cond): the ones between are in flight
        self._numbered = 0
        self._landed = 0
        # extents out of the allocator's map that no durable record names: puts in flight,
        # discards in flight. A checkpoint saves them as free (after a crash they are).
        self._outside: dict[int, builtins.list[Extent]] = {}
        # small files already written home (stage_homes), by path, and the bytes of small
        # files put since the last staging pass or checkpoint (what the next pass would write)
        self._staged: dict[str, _Staged] = {}
        self._unstaged = 0
        # tree pages the writer's last checkpoint freed, quarantined at its next one
        self._retired: builtins.list[Extent] = []
        self._on_commit: Callable[[Commit], None] | None = None
        self._on_discard: Callable[[int], None] | None = None
        # the journal ring given back at rest (docs/format.md, "Discards"): the newest
        # checkpoint's position and the older slot's; per checkpoint not yet passed by every
        # in-sync reader, its record's seq and the position the ring must be kept from once
        # it is; the position due (every reader passed its checkpoint); where the bytes not
        # yet given back start (None: unknown, the whole rest of the ring)
        self._checkpoint_pos = 0
        self._previous_pos = 0
        self._ring_marks: collections.deque[tuple[int, int]] = collections.deque()
        self._ring_keep: int | None = None
        self._ring_dirty: int | None = None
        self._ring_clean_end = 0  # self._consumed at which the head reaches _ring_dirty
        # when the last group commit holding more than a checkpoint became durable
        self._last_write = time.monotonic()

    def _tree_pages(self) -> _PageStore:
        return _PageStore(self)

    @property
    def writer_epoch(self) -> int | None:
        """The epoch this volume writes in, once :meth:`start_epoch` succeeded."""
        return self._writer_epoch

    # ---- warm promotion ------------------------------------------------------------------

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
        view = JournalView(self._device, self._sb)
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

    def refresh(self) -> builtins.list[Record]:
        """:meth:`Follower.refresh`; a writer's own index is the journal's truth: there it
        returns []."""
        if self._writer_epoch is not None:
            return []
        return super().refresh()

    # ---- writer side ---------------------------------------------------------------------

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
                    headers = self._checkpoint_headers()
                    newest = ckpt.choose(headers)
                    header = headers[newest[0]] if newest else None
                    self._checkpoint_pos = 0 if header is None else header.journal_pos
                    older = headers[newest[1]] if len(newest) > 1 else None
                    self._previous_pos = self._checkpoint_pos if older is None \
                        else older.journal_pos
                    self._ring_marks.clear()
                    self._ring_keep = None
                    self._ring_dirty = None  # what earlier writers left is not known
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
        first discards them (widened through free space to whole DISCARD_UNITs, else to whole
        DISCARD_GRANULEs: librbd skips what a discard does not cover whole), outside
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
            while self._ring_marks and self._ring_marks[0][0] <= seq:
                self._ring_keep = self._ring_marks.popleft()[1]
            held = [_widen(allocator, e) for e in allocator.take_released(seq)]
        self._discard_held(held)

    def _discard_held(self, held: builtins.list[Extent]) -> None:
        """Discard extents taken out of the free map (caller: under the lock it took them,
        now released), then give them back: no put can be handed them meanwhile."""
        if not held:
            return
        with self._lock:
            self._outside[id(held)] = held
            self._discarding += 1
        try:
            self._discard(held)
        finally:
            with self._lock:
                del self._outside[id(held)]
                self._allocator.give_back(held)
                self._discarding -= 1
                self._discarded.notify_all()

    def give_back_ring(self, idle: float) -> bool:
        """Once no write came for ``idle`` seconds, discard the journal ring outside what
        recovery and readers may still read: from the checkpoint before the newest one every
        in-sync reader has passed, to the head. At rest only: under load the head rewrites
        the ring within a ring's worth of records anyway, and a reader opening meanwhile
        keeps all the history the ring holds. As the journal's leader, so no batch is
        written meanwhile (docs/format.md, "Discards"). True when it discarded."""
        if self._device.read_only or self._writer_epoch is None:
            return False
        with self._lock:
            if self._ring_keep is None or time.monotonic() - self._last_write < idle:
                return False
        with self._leadership():
            with self._lock:
                keep, self._ring_keep = self._ring_keep, None
                if keep is None or self._failed is not None or self._writer_epoch is None:
                    return False
                head = journal.align_up(self._cursor.pos)
                dirty = self._ring_dirty
                if dirty is None or self._consumed >= self._ring_clean_end:
                    dirty = head  # the head went round since: all but the live span
                spans = journal.stale_spans(dirty, keep, head, self._ring)
                # clean now: from the head forward to keep, until the head has gone that far
                self._ring_dirty = keep
                self._ring_clean_end = self._consumed + (keep - head) % self._ring
                gone = [(start, start + length) for start, length in spans]
                while self._positions and any(lo <= self._positions[0][1] < hi
                                              for lo, hi in gone):
                    self._positions.popleft()
            self._discard([Extent(self._sb.journal_offset + start, length)
                           for start, length in spans])
        return bool(spans)

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

    def checkpoint_if_idle(self, idle: float) -> bool:
        """Checkpoint when no group commit was written for ``idle`` seconds and a checkpoint
        would change something: the overlay holds changes (small files go home, readers'
        overlays empty), or records lie between the two checkpoints the ring is kept from (a
        checkpoint lets them go: two in a row leave the ring holding little more than the
        last one's record). True when it checkpointed."""
        if self._device.read_only or self._writer_epoch is None or self._failed is not None:
            return False  # a failed (fenced) writer: its self-test gets it replaced
        with self._lock:
            quiet = time.monotonic() - self._last_write >= idle
            useful = self._checkpoint_would_change()
        if not (quiet and useful):
            return False
        self.checkpoint()
        LOG.info("event=idle_checkpoint seq=%d", self._index.applied_seq)
        return True

    def _checkpoint_would_change(self) -> bool:
        between = (self._checkpoint_pos - self._previous_pos) % self._ring
        return self._index.overlay_size > 0 or between > ALIGN

    def settled(self) -> bool:
        """True when the writer has nothing left to do at rest: no change waiting for a
        checkpoint, nothing an idle checkpoint or a ring give-back would still write. An
        image whose writer is settled changes only with the next write (a snapshot taken
        then is a quiesced backup; a check that nobody else wrote can start then). A
        volume that is not the writer is settled."""
        return not self.unsettled()

    def unsettled(self) -> tuple[str, ...]:
        """What keeps the writer from being settled (:meth:`settled`): ``checkpoint`` (changes
        an idle checkpoint would write), ``readers`` (a checkpoint not every in-sync reader
        has acknowledged yet: the ring is kept until they have), ``ring`` (journal space to
        give back), ``discards`` (in flight)."""
        if self._writer_epoch is None or self._device.read_only:
            return ()
        with self._lock:
            pending = {"checkpoint": self._checkpoint_would_change(),
                       "readers": bool(self._ring_marks),
                       "ring": self._ring_keep is not None,
                       "discards": bool(self._discarding)}
        return tuple(name for name, due in pending.items() if due)

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
        """Be the only thread writing the journal (or a checkpoint) for the block's duration,
        once every group commit in flight has landed (checkpoints, promotion: rare, so these
        waiters share one condition)."""
        with self._cond:
            self._exclusive += 1
            while self._leading:
                self._cond.wait()
            self._exclusive -= 1
            self._leading = True
            self._drain()
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
            self._lead(budget)
        if ticket.error is not None:
            raise ticket.error
        assert ticket.record is not None
        return ticket.record

    def _lead(self, budget: int) -> None:
        """As the leader: take the queued tickets (once fewer than COMMITS_IN_FLIGHT group
        commits are in flight: the queue grows meanwhile), number them, hand the journal on,
        then write them and acknowledge them in their turn."""
        batch: builtins.list[_Ticket] = []
        try:
            with self._cond:
                while self._in_flight() >= COMMITS_IN_FLIGHT:
                    self._cond.wait()
                total = 0
                while self._queue and (not batch or total + self._queue[0].nbytes <= budget):
                    total += self._queue[0].nbytes
                    batch.append(self._queue.popleft())
            flight = self._number(batch)
        except BaseException as exc:
            for t in batch:
                if t.error is None:
                    t.error = exc
                    t.record = None
            self._finish(batch)
            with self._cond:
                self._pass_leadership()
            raise
        with self._cond:
            self._pass_leadership()  # the next batch is numbered while this one is written
        if flight is None:
            self._finish(batch)
        else:
            self._land(flight)

    def _in_flight(self) -> int:
        """Group commits numbered and not yet acknowledged."""
        return self._numbered - self._landed

    def _drain(self) -> None:
        """Caller holds ``_cond`` and leads (so none starts): wait until none is in flight."""
        while self._in_flight():
            self._cond.wait()

    def _finish(self, tickets: builtins.list[_Ticket]) -> None:
        with self._cond:
            for t in tickets:
                t.done = True
                t.wake.set()

    def _write_batch(self, batch: builtins.list[_Ticket], *, checkpoint: bool = False) -> None:
        """As the only leader (:meth:`_leadership`: nothing in flight): number, write and
        acknowledge ``batch``, first a checkpoint when asked or due; raises what failed the
        journal write."""
        flight = self._number(batch, checkpoint=checkpoint)
        if flight is not None:
            error = self._land(flight)
            if error is not None:
                raise error

    def _number(self, batch: builtins.list[_Ticket], *,
                checkpoint: bool = False) -> _Flight | None:
        """Leader only: place, number and apply a batch of records and pack them (None: every
        ticket was refused). First a checkpoint when asked, when the ring would pass
        CHECKPOINT_AT, the overlay OVERLAY_MAX paths or OVERLAY_DATA_MAX bytes, or its pages
        would not fit: its record leads the batch, and it waits until nothing is in flight
        (its root covers every record applied, which must be durable first)."""
        while True:
            with self._lock:
                if self._failed is not None:
                    raise DeviceError(f"volume failed earlier: {self._failed.message}")
                # placed for all of its tickets (a refused one only leaves the batch shorter):
                # the padded batch, plus at most as much skipped at the end of the ring
                room = journal.align_up(sum(t.nbytes for t in batch))
                # the overlay's worst case must fit in what is free for pages, the reserve
                # included: near full, the writer checkpoints often (a delete's checkpoint
                # always fits) rather than once the ring or the overlay fills
                pages = self._checkpoint_pages()
                room_for_pages = self._allocator.free_bytes() + self._pages.reserve_bytes()
                due = (checkpoint or self._used + 2 * room > self._ring * CHECKPOINT_AT
                       or self._index.overlay_size >= OVERLAY_MAX
                       or self._index.overlay_data >= OVERLAY_DATA_MAX
                       or pages > room_for_pages)
                if not due or not self._in_flight():  # none starts meanwhile: it leads
                    if due:
                        batch = [self._checkpoint_locked(), *batch]
                        room = journal.align_up(sum(t.nbytes for t in batch))
                    start, parts = self._pack(batch, room)
                    break
            with self._cond:
                self._drain()
        if not parts:
            return None
        with self._cond:
            self._numbered += 1
            order = self._numbered
        nbytes = sum(len(part) for part in parts)
        # the records packed back to back, the batch padded to the boundary O_DIRECT needs
        packed = b"".join([*parts, bytes(journal.align_up(nbytes) - nbytes)])
        return _Flight(batch, start, packed, nbytes, order)

    def _pack(self, batch: builtins.list[_Ticket], room: int
              ) -> tuple[int, builtins.list[bytes]]:
        """Under the lock: number and apply ``batch``'s records where a batch of ``room``
        bytes goes; its ring offset and each record's bytes (those refused left out, with
        their ticket's error set)."""
        parts: builtins.list[bytes] = []
        start = at = journal.place_batch(self._cursor.pos, room, self._ring)
        # what is durable now (the commits in flight are not, whatever they hold)
        durable = self._durable_seq
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
            inline = t.payload.get("data") if t.op == "put" else None
            if inline is not None and len(inline) > LEAF_DATA_MAX:
                self._unstaged += journal.align_up(len(inline))
            t.record = record
            parts.append(data)
            at += len(data)
        return start, parts

    def _land(self, flight: _Flight) -> DeviceError | None:
        """Write ``flight`` (its data flushed first when it names any, then the journal write
        and a flush), then, once every commit numbered before it was acknowledged, acknowledge
        it: the durable seq, the commit listener, its tickets woken. A failed write fails the
        volume, and with it every commit after (numbered, maybe even written: the chain on
        the image ends before them). Returns the error its tickets got, if any."""
        error: DeviceError | None = None
        try:
            if any(t.record is not None and t.record.payload.get("extents")
                   for t in flight.tickets):
                self._device.flush()  # the batch's file data is durable before its records
            self._device.write_at(self._sb.journal_offset + flight.start, flight.packed)
            self._device.flush()
        except DeviceError as exc:
            error = exc
        except BaseException as exc:  # the index holds records the journal may not: fail it
            error = DeviceError(f"journal write failed: {exc!r}", op="write")
        if error is not None:
            with self._lock:
                if self._failed is None:
                    self._failed = error
        with self._cond:
            while self._landed != flight.order - 1:
                self._cond.wait()
        committed = [t.record for t in flight.tickets if t.record is not None]
        try:
            if error is None and self._failed is not None:
                error = DeviceError(f"volume failed earlier: {self._failed.message}",
                                    **self._failed.fields)
            if error is None:
                with self._lock:
                    self._durable_seq = committed[-1].seq
                    if any(r.op != "checkpoint" for r in committed):
                        self._last_write = time.monotonic()
                listener = self._on_commit
                if listener is not None:
                    listener(Commit(committed, flight.start,
                                    memoryview(flight.packed)[: flight.nbytes]))
        finally:
            if error is not None:
                for t in flight.tickets:
                    if t.record is not None:
                        t.error, t.record = error, None
            self._finish(flight.tickets)
            with self._cond:
                self._landed = flight.order
                self._cond.notify_all()
        return error

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
            homes = self._move_home()
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
            self._retired = coalesce(Extent(p * ALIGN, TREE_PAGE) for p in commit.freed)
            free = coalesce([*self._allocator.free_extents(), *self._pages.reserve_extents(),
                              *(x for xs in self._outside.values() for x in xs)])
            quarantine = sorted([*self._allocator.quarantined(),
                                 *((seq + 1, x) for x in self._retired)],
                                key=lambda q: (q[0], q[1].offset))
            # the next batch starts on a 4 KiB boundary at or after the cursor (or at 0)
            position = journal.align_up(self._cursor.pos)
            data = ckpt.encode(seq, index.epoch, commit.root, free, quarantine, position,
                               self._sb.checkpoint_bytes)
            self._device.write_at(self._sb.checkpoint_offsets[slot], data)
            self._device.flush()
        except DeviceError as exc:
            self._failed = exc
            raise
        index.switch(commit.root, seq)
        self._effects.clear()
        self._unstaged = 0
        self._checkpoint_slot = slot
        self._used = 0
        # the older slot now holds the previous checkpoint: the ring is kept from its
        # position until every in-sync reader has passed this one's record
        self._ring_marks.append((seq + 1, self._checkpoint_pos))
        self._previous_pos, self._checkpoint_pos = self._checkpoint_pos, position
        payload: dict[str, Any] = {
            "root": None if commit.root is None else list(commit.root), "seq": seq}
        if homes:  # followers learn the space is in use, as from a put naming it
            payload["extents"] = [[x.offset, x.length] for x in homes]
        assert self._writer_epoch is not None
        return self._ticket("checkpoint", payload, self._writer_epoch)

    def _checkpoint_pages(self) -> int:
        """Bytes of tree pages the next checkpoint writes at worst."""
        return (self._index.overlay_size * PAGES_PER_PATH + 4) * TREE_PAGE

    def stage_homes(self, at_least: int) -> int:
        """Writer, between checkpoints: once ``at_least`` bytes of small files were put since
        the last pass, write the overlay's small files that the next checkpoint would move
        to data extents (:meth:`_move_home`) to their homes now, in one sequential run,
        outside the journal's leader: puts go on meanwhile, and the checkpoint, during which
        every put waits, only names them. Their extents are out of the free map and named by
        no record until then (a checkpoint taken meanwhile saves them as free: after a crash
        they are, and the files' bytes are still in their records). Returns the bytes written
        (0: below ``at_least``, nothing to move, or too little room, which the checkpoint
        handles as it always does); DeviceError if the write fails. See docs/format.md, "Small
        files"."""
        if self._device.read_only:
            return 0
        with self._lock:
            if (self._writer_epoch is None or self._failed is not None
                    or self._unstaged < at_least):
                return 0
            self._unstaged = 0
            moving = [(path, node) for path, node in self._index.inline_files(LEAF_DATA_MAX)
                      if (staged := self._staged.get(path)) is None or staged.source is not node]
            need = sum(_home_sizes(moving))
            if not moving or self._allocator.free_bytes() < need + self._checkpoint_pages():
                return 0
            got = self._allocator.allocate(need)
            self._outside[id(got)] = got
        try:
            homes = self._write_home(moving, got)
        except DeviceError:
            # nothing names the space: back to the free map (a fenced writer's next journal
            # write fails and stops it; the caller logs this one)
            with self._lock:
                del self._outside[id(got)]
                self._allocator.give_back(got)
            raise
        with self._lock:
            del self._outside[id(got)]
            for path, source, home in homes:
                # a checkpoint (which moved it itself) or a newer put may have come meanwhile
                if self._index.lookup(path) is not source:
                    self._allocator.give_back(builtins.list(home.extents))
                    continue
                older = self._staged.get(path)
                if older is not None:
                    self._allocator.give_back(builtins.list(older.home.extents))
                self._staged[path] = _Staged(source, home)
        return need

    def _write_home(self, moving: builtins.list[tuple[str, Node]],
                    got: builtins.list[Extent]) -> builtins.list[tuple[str, Node, Node]]:
        """Write the bytes of ``moving`` (inline files) back to back into ``got`` (as many
        bytes as their 4 KiB-padded sizes) as one run; each file's (path, inline node, node
        with the same entry and its bytes in its part of ``got``)."""
        padded = _home_sizes(moving)
        run = aligned_buffer(sum(padded))  # O_DIRECT writes it as it is
        homes: builtins.list[tuple[str, Node, Node]] = []
        at = 0
        chunk = self._sb.chunk_size
        for (path, node), length in zip(moving, padded, strict=True):
            data = node.inline or b""
            run[at : at + len(data)] = data
            extents = tuple(Extent(o, n) for o, n in locate(got, at, length))
            sums = tuple(zlib.crc32(data[i : i + chunk]) for i in range(0, len(data), chunk))
            homes.append((path, node, Node(node.entry, extents=extents, sums=sums, chunk=chunk)))
            at += length
        # not closed here: a failed write's traceback may still hold a view of it, and the
        # mmap goes with the last one
        view = memoryview(run)
        done = 0
        for extent in got:
            self._io.writev(extent.offset, [view[done : done + extent.length]])
            done += extent.length
        return homes

    def _move_home(self) -> builtins.list[Extent]:
        """Checkpoint leader, under the lock: the overlay's files that travelled inside their
        put records and are too big to share a leaf go to data extents (flushed with the
        tree's pages before the checkpoint names them): those :meth:`stage_homes` wrote
        ahead are only named; the rest are written here, packed back to back in one
        sequential run. A put of a small file is thus one journal write when it is
        acknowledged, and its bytes cost one 4 KiB block once home. With too little room left
        for them and the tree's pages, they stay inline (in overflow pages): nothing fails.
        Returns the extents of every file moved."""
        staged, self._staged = self._staged, {}
        moved: builtins.list[Extent] = []
        rest: builtins.list[tuple[str, Node]] = []
        for path, node in self._index.inline_files(LEAF_DATA_MAX):
            ahead = staged.pop(path, None)
            if ahead is not None and ahead.source is node:
                self._index.move_home(path, ahead.home)
                moved.extend(ahead.home.extents)
            else:
                if ahead is not None:
                    staged[path] = ahead  # an older version's home: given back below
                rest.append((path, node))
        for stale in staged.values():  # overwritten or deleted since they were written
            self._allocator.give_back(builtins.list(stale.home.extents))
        if not rest:
            return moved
        need = sum(_home_sizes(rest))
        if self._allocator.free_bytes() < need + self._checkpoint_pages():
            LOG.info("event=move_home_skipped files=%d bytes=%d", len(rest), need)
            return moved
        got = self._allocator.allocate(need)
        for path, _, home in self._write_home(rest, got):
            self._index.move_home(path, home)
        return [*moved, *got]


def _home_sizes(files: Iterable[tuple[str, Node]]) -> builtins.list[int]:
    """Bytes each inline file takes once home (padded to whole 4 KiB blocks)."""
    return [journal.align_up(len(node.inline or b"")) for _, node in files]


def _bounded(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Pass chunks through; BadRequest as soon as they exceed ``size`` bytes."""
    total = 0
    for piece in chunks:
        total += len(piece)
        if total > size:
            raise BadRequest(f"more bytes than the announced {size}", size=size)
        yield piece

