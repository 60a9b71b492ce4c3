"""The journal follower: an rbdfleet volume (docs/format.md) as readers and fsck see it.

A :class:`Follower` opens a volume on a BlockDevice without writing to it, applies the
records the writer pushes (:meth:`Follower.apply`) or follows the journal on disk
(:meth:`Follower.refresh`), and serves verified reads of a consistent version (a read pins
its version until it is done: :meth:`Follower.safe_seq`). It keeps what a reader needs to
become the writer in place (the free map's changes since the index's root, where each record
lies in the ring); the writer's additions are :class:`agents.committer.Committer`'s.

Concurrency: any number of threads may read, stat and list at once; the state (index,
allocator, cursor, pins) is guarded by one lock.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import logging
import mmap
import posixpath
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Self, cast

from agents.core import btree, journal
from agents.core import checkpoint as ckpt
from agents.core.allocator import Allocator, Extent
from agents.core.index import Entry, Node, normalize_path
from agents.core.pages import Layout
from agents.core.record import HEADER, MAGIC, Record
from agents.core.superblock import SLOTS, Superblock, choose
from agents.core.treeindex import TreeIndex
from agents.device import ALIGN, BlockDevice, VectoredDevice, aligned_buffer, vectored
from agents.errors import (
    AgentError,
    BadPath,
    BadRequest,
    CatchingUp,
    ChecksumMismatch,
    CorruptMetadata,
    FormatError,
    JournalWrapped,
    NotWriter,
    SequenceGap,
    TornRecord,
    WrongKind,
)

__all__ = ["CACHE_PAGES", "LAYOUT", "TREE_PAGE", "Follower", "JournalView", "TreePages"]

LOG = logging.getLogger(__name__)

# read units in flight per read stream: 3 -> 8 raised Volume.read's median from 519 to 577
# and 529 to 603 MiB/s in same-run sweeps against rbd bench (12 was worse)
READ_AHEAD = 8
IO_THREADS = 8  # per volume, shared by all streams (reads, and the writer's data writes)
READ_UNIT = 4 << 20  # bytes per read task (whole chunks)
JOURNAL_WINDOW = 256 << 10  # bytes read at once when following the journal
# metadata tree pages: 32 KiB, so that a key holds any path (4096 bytes: pages.py) and a
# leaf a few hundred entries; a page number is its device offset in 4 KiB blocks
TREE_PAGE = 32 << 10
LAYOUT = Layout(TREE_PAGE)
CACHE_PAGES = 128  # decoded tree pages kept per volume (a reader's metadata memory)
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



class TreePages:
    """The metadata tree's pages in the data area (``btree.PageStore``): page ``n`` is the
    TREE_PAGE bytes at device offset ``n * 4096``, read through the volume's current handle.
    A follower only reads them: the writer's store
    (:class:`agents.committer.Committer`'s) allocates and writes."""

    def __init__(self, vol: Follower) -> None:
        self._vol = vol

    def read_page(self, page_no: int) -> bytes:
        sb = self._vol._sb
        offset = page_no * ALIGN
        if offset < sb.data_offset or offset + TREE_PAGE > sb.data_offset + sb.data_bytes:
            raise CorruptMetadata(f"metadata page {page_no} is outside the data area",
                                  page=page_no)
        return self._vol._device.read_at(offset, TREE_PAGE)

    def allocate(self) -> int:
        raise NotWriter("a follower writes no metadata pages")

    def write_page(self, page_no: int, data: bytes) -> None:
        raise NotWriter("a follower writes no metadata pages")

    def free(self, page_no: int) -> None:
        raise NotWriter("a follower writes no metadata pages")


class JournalView:
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

    def _record_bytes(self, start: int) -> memoryview | None:
        """The bytes of the record of this volume whose header lies at ``start``, as many as
        that header announces, taken from one read of the ring (unverified), or None.

        The header alone may come from a window read before the writer's latest batch: an
        older record's, one lap earlier, at the same place. When the bytes up to the
        announced length need another read, that read may hold the new record, of another
        length; the header is then taken again from it. Whatever the writer does meanwhile,
        the bytes returned start with the header that gives their length."""
        for _ in range(2):
            nbytes = self._ours(start)
            if nbytes is None:
                return None
            data = self.read(start, nbytes)
            if Record.peek_length(data) == nbytes:
                return data
        return None  # rewritten under both reads: the record is being written, not there yet

    def record_at(self, start: int) -> tuple[Record, int] | None:
        """The valid record starting at ``start`` and its length, or None (torn, corrupt, no
        record or another volume's). A record of this volume in a format this agent does not
        read raises UnsupportedFormat."""
        data = self._record_bytes(start)
        if data is None:
            return None
        try:
            return Record.decode(data, self._key), len(data)
        except (TornRecord, ChecksumMismatch):
            return None

    def witness_at(self, start: int) -> journal.Witness | None:
        """Like :meth:`record_at` (seal checked) without parsing the payload."""
        data = self._record_bytes(start)
        if data is None:
            return None
        try:
            seq, epoch, commit_seq, _ = Record.verify(data, self._key)
        except (TornRecord, ChecksumMismatch):
            return None
        return journal.Witness(start, seq, epoch, commit_seq)



class Follower:
    """An rbdfleet volume on one BlockDevice, followed (see the module docstring)."""

    def __init__(self, device: BlockDevice, sb: Superblock) -> None:
        self._device = device
        self._sb = sb
        self._buffers = _Buffers(KEEP_BUFFERS)
        self._ring = sb.journal_bytes
        self._lock = threading.RLock()  # index, allocator, cursor, pins
        self._pages = self._tree_pages()
        self._tree = btree.Tree(self._pages, layout=LAYOUT,
                                cache=btree.PageCache(CACHE_PAGES))
        self._index = TreeIndex(self._tree, None, 0, 0)
        self._allocator = Allocator(sb.data_offset, sb.data_offset + sb.data_bytes)
        # per record applied since the index's root: (seq, extents it claimed, extents it
        # freed), so a promoted reader rebuilds the writer's map from the checkpoint of that
        # root (a reader cannot follow the tree pages the writer allocates and frees)
        self._effects: builtins.list[tuple[int, builtins.list[Extent],
                                           builtins.list[Extent]]] = []
        # whether a checkpoint record for the index's root is in the journal: readers on an
        # older root switch only when they apply one (a writer that crashed between the
        # checkpoint and its record left none, and its successor writes one first)
        self._announced = True
        self._cursor = journal.Cursor(0, 1, 0)
        self._used = 0  # ring bytes consumed since the newest checkpoint
        self._consumed = 0  # ring bytes consumed since this volume was made (never reset)
        self._checkpoint_slot = 0  # the newest checkpoint's (the writer writes the other)
        self._positions: collections.deque[tuple[int, int, int]] = collections.deque()
        self._pins: collections.Counter[int] = collections.Counter()
        self._pool: ThreadPoolExecutor | None = None
        self._durable_seq = 0
        # how the last record came ("journal" or "push"): named when a push is refused
        self._last_from = "journal"

    def _tree_pages(self) -> TreePages:
        """The tree's page store (built once, by the constructor)."""
        return TreePages(self)


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

    @classmethod
    def open(cls, device: BlockDevice) -> Self:
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

    def _follow(self, view: JournalView) -> builtins.list[Record]:
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
            self._last_from = "journal"
            applied.append(record)

    def _apply_at(self, record: Record, start: int, nbytes: int, *, own: bool = False) -> None:
        """Apply ``record`` stored at ring offset ``start``; account the ring bytes. ``own``:
        the writer's record, whose extents its allocator handed out."""
        freed = self._index.apply(record)
        # a put's data, or the files a checkpoint moved home (agents/committer.py)
        claimed = [Extent(o, n) for o, n in record.payload.get("extents") or ()] \
            if record.op in ("put", "checkpoint") else []
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
        step = journal.consumed(head, start, nbytes, self._ring)
        self._used += step
        self._consumed += step
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
            JournalView(self._device, self._sb), self._index.applied_seq
        )
        self._refresh_locked()
        self._check_end(witnesses)

    def _scan_witnesses(self, view: JournalView, after: int) -> dict[int, journal.Witness]:
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

    def _record_starts(self, view: JournalView) -> Iterator[int]:
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
                applied += self._follow(JournalView(self._device, self._sb))
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
        returned)."""
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
                last = self._positions[-1] if self._positions else None
                raise BadRequest(
                    f"pushed record {record.seq} at journal offset {start} ({nbytes} bytes) "
                    f"cannot follow the record that ended at {self._cursor.pos} (seq, start, "
                    f"length: {last}, read from the {self._last_from})",
                    seq=record.seq, journal_offset=start)
            self._apply_at(record, start, nbytes)
            self._last_from = "push"
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
            view = JournalView(self._device, self._sb)
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
            witnesses = self._scan_witnesses(JournalView(self._device, self._sb),
                                             self._index.applied_seq)
            problem: tuple[int, int, str] | None = None
            try:
                with self._decoding():
                    self._follow(JournalView(self._device, self._sb))
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

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="volume-io")
            return self._pool



Piece = bytes | memoryview
Slot = tuple[Piece, mmap.mmap | None, ChecksumMismatch | None]  # data, its buffer, error


class _ReadStream(Iterator[Piece]):
    """Verified reads of one pinned version: READ_UNIT pieces, READ_AHEAD in flight. With
    ``buffers``, each unit is read into a pooled buffer and yielded as a view of it, which
    stays valid until the next ``next()`` or ``close()`` (the buffer then goes back);
    without, each unit is the ``bytes`` the device returned."""

    def __init__(self, vol: Follower, node: Node, start: int, end: int, pin: int,
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
