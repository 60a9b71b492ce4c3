"""Crash recovery of the journal: what a crashed or a still-running writer leaves on the image
is always openable, the torn tail is dropped, and no acknowledged put is ever lost.

- In-flight writes land in any order: a device that, at a random crash point, keeps an
  arbitrary subset of the 4 KiB blocks written since the last flush (what RBD does with a
  write spanning objects, or two journal writes of one group commit without a flush between).
- A writer that keeps committing while another node opens the image (a killed agent
  restarting as a reader under load): open must neither accuse the journal of corruption nor
  give up, and the reader then follows the writer exactly.
- Real processes: kill -9 of the writer agent under concurrent small puts, a reader promoted,
  the victim restarted as a reader while the new writer is under load; every time.
"""

from __future__ import annotations

import errno
import http.client
import itertools
import math
import random
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from agents import fsck
from agents.backends.file import FileDevice
from agents.device import ALIGN
from agents.errors import DeviceError
from agents.testing import MemoryDevice
from agents.volume import Volume
from tests.fixtures.agents import AgentFleet, FleetFactory

pytestmark = pytest.mark.fault

SIZE = 8 << 20


class ReorderingDevice:
    """A writable handle whose writes since the last flush are *in flight*: they are visible
    at once, but a power cut (at flush number ``crash_at``, or :meth:`crash`) keeps only a
    random subset of their 4 KiB blocks (each block lands or not, independently: any
    completion order) and fails every later I/O."""

    def __init__(self, medium: MemoryDevice, rng: random.Random, crash_at: int) -> None:
        self.read_only = False
        self._medium = medium
        self._rng = rng
        self._flushes_left = crash_at
        self._pending: dict[int, bytes] = {}  # block offset -> bytes before the first write
        self._lock = threading.Lock()
        self.crashed = False

    def size(self) -> int:
        """Bytes on the medium."""
        return self._medium.size()

    def _tick(self, op: str) -> None:
        # caller holds self._lock; the power fails at a flush (the moment the most writes
        # are in flight: a group commit's journal blocks, or data of the puts joining it)
        if self.crashed:
            raise DeviceError("power cut (simulated)", op=op, errno=errno.EIO)
        if op == "flush":
            self._flushes_left -= 1
            if self._flushes_left < 0:
                self._crash_locked()
                raise DeviceError("power cut (simulated)", op=op, errno=errno.EIO)

    def _crash_locked(self) -> None:
        for offset, before in self._pending.items():
            if self._rng.random() < 0.5:
                self._medium.corrupt(offset, before)  # this in-flight block never landed
        self._pending.clear()
        self.crashed = True

    def crash(self) -> None:
        """Power cut now (if it has not happened yet)."""
        with self._lock:
            if not self.crashed:
                self._crash_locked()

    def read_at(self, offset: int, length: int) -> bytes:
        """What the writer sees (its own in-flight writes included)."""
        with self._lock:
            self._tick("read")
            return self._medium.read_at(offset, length)

    def write_at(self, offset: int, data: bytes) -> None:
        """Block by block, each one in flight until the next flush (any offset and length:
        a block the write covers only in part is in flight as a whole)."""
        with self._lock:
            self._tick("write")
            # every block the write touches, a partly covered first or last one included
            for block in range(offset // ALIGN * ALIGN, offset + len(data), ALIGN):
                if block not in self._pending:
                    self._pending[block] = self._medium.read_at(block, ALIGN)
            self._medium.write_at(offset, data)

    def discard(self, offset: int, length: int) -> bool:
        """Zeroes, in flight until the next flush like any write."""
        self.write_at(offset, bytes(length))
        return True

    def flush(self) -> None:
        """Everything written so far is durable (after a moment: other puts queue up
        meanwhile, so group commits hold several records)."""
        time.sleep(0.0005)
        with self._lock:
            self._tick("flush")
            self._pending.clear()

    def close(self) -> None:
        """Nothing to release."""


class Attempts:
    """Every put attempted per path with its logical invoke and ack times, to tell which
    values a path may hold after a crash: a put acknowledged, or one that may have landed
    after it, never a value an acknowledged put had superseded (a rollback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clock = itertools.count()
        self._puts: dict[str, list[list[float]]] = {}  # path -> [crc, invoked, acked or inf]

    def begin(self, path: str, crc: int) -> list[float]:
        """Record an attempt; the token to :meth:`ack` it with."""
        with self._lock:
            attempt = [float(crc), float(next(self._clock)), math.inf]
            self._puts.setdefault(path, []).append(attempt)
            return attempt

    def ack(self, attempt: list[float]) -> None:
        """The attempt was acknowledged."""
        with self._lock:
            attempt[2] = float(next(self._clock))

    def allowed(self, path: str) -> set[int]:
        """CRCs ``path`` may hold: those of attempts no acknowledged attempt began after the
        acknowledgement of (still in flight, or acknowledged last)."""
        with self._lock:
            puts = self._puts.get(path, [])
            newest = max((invoked for _, invoked, acked in puts if acked < math.inf),
                         default=-1.0)
            return {int(crc) for crc, _, acked in puts if acked > newest}


def _acked_puts_survive(seed: int, threads: int) -> None:
    rng = random.Random(seed)
    medium = MemoryDevice(SIZE)
    Volume.format(medium, fleet="crash", journal_bytes=64 << 10)  # wraps every 16 records
    dev = ReorderingDevice(medium, random.Random(seed * 7 + 1), crash_at=rng.randrange(2, 400))
    acked: dict[str, int] = {}
    attempts = Attempts()
    lock = threading.Lock()
    vol = Volume.open(dev)
    try:
        vol.start_epoch(1)
    except DeviceError:
        dev.crash()

    def putter(k: int) -> None:
        local = random.Random(seed * 100 + k)
        for n in range(400):
            path = f"/p/{local.randrange(12)}"
            data = local.randbytes(local.choice([300, 2000, 4000, 9000, 70_000]))
            attempt = attempts.begin(path, zlib.crc32(data))
            try:
                vol.put(path, [data], len(data), epoch=1, mtime=n)
            except DeviceError:
                return
            attempts.ack(attempt)
            with lock:
                acked[path] = zlib.crc32(data)
            if n % 5 == 0:
                try:
                    vol.release_through(vol.safe_seq())
                except DeviceError:
                    return

    if not dev.crashed:
        workers = [threading.Thread(target=putter, args=(k,)) for k in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    dev.crash()
    vol.close()
    after = Volume.open(medium.reopen(read_only=True))
    for path in acked:
        # a put in flight at the crash on the same path may have landed after the last ack;
        # an older acknowledged value would be a rollback
        got = zlib.crc32(b"".join(after.read(path)))
        assert got in attempts.allowed(path), f"seed {seed}: acknowledged {path} lost"
    assert fsck.check(medium.reopen(read_only=True)) == []
    successor = Volume.open(medium.reopen())
    successor.start_epoch(2)
    successor.put("/after", [b"next"], 4, epoch=2, mtime=0)
    final = Volume.open(medium.reopen(read_only=True))
    assert b"".join(final.read("/after")) == b"next"
    for path in acked:
        final.stat(path)
    assert fsck.check(medium.reopen(read_only=True)) == []


@pytest.mark.parametrize("seed", range(40))
def test_in_flight_writes_landing_in_any_order_lose_no_acknowledged_put(seed: int) -> None:
    """Power cut at a random I/O with a random subset of the in-flight blocks on disk: the
    image opens, fsck is clean, every acknowledged put is there, a successor carries on."""
    _acked_puts_survive(seed, threads=1 + seed % 4)


class LiveWriterView:
    """A read-only handle on a medium that another node's writer keeps changing: ``step()``
    (the writer committing something) runs before every read, as a writer process would
    between any two reads of a restarting reader."""

    def __init__(self, medium: MemoryDevice, step: Callable[[], None]) -> None:
        self.read_only = True
        self._inner = medium.reopen(read_only=True)
        self._step = step
        self.live = True

    def size(self) -> int:
        """Bytes on the medium."""
        return self._inner.size()

    def read_at(self, offset: int, length: int) -> bytes:
        """Let the writer move on (while it is live), then read."""
        if self.live:
            self._step()
        return self._inner.read_at(offset, length)

    def write_at(self, offset: int, data: bytes) -> None:
        """Refused: a reader's handle."""
        raise DeviceError("read-only handle", op="write", errno=errno.EROFS)

    def discard(self, offset: int, length: int) -> bool:
        """Refused: a reader's handle."""
        raise DeviceError("read-only handle", op="discard", errno=errno.EROFS)

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Close the inner handle."""
        self._inner.close()


def _same_places(reader: Volume, writer: Volume) -> None:
    """Every record the reader placed lies where the writer wrote it (seq, ring offset,
    length): a reader a byte off the writer's chain refuses every push after (make bench
    caught one that a window read a lap earlier had misled)."""
    written = {seq: (start, nbytes) for seq, start, nbytes in writer._positions}
    for seq, start, nbytes in reader._positions:
        if seq in written:
            assert (start, nbytes) == written[seq], (
                f"record {seq}: the reader has it at {start} ({nbytes} bytes), the writer "
                f"wrote it at {written[seq][0]} ({written[seq][1]} bytes)")


@pytest.mark.parametrize("journal_kib", [128, 256, 1024])
@pytest.mark.parametrize("puts_per_read", [1, 2, 3])
def test_open_while_the_writer_keeps_committing(journal_kib: int, puts_per_read: int) -> None:
    """A killed agent restarts as a reader while the new writer is under load: the writer
    commits between every two reads of the opening reader (checkpoints and ring wraps
    included). Open must succeed (no false corruption, no giving up), and the reader then
    follows the writer exactly."""
    medium = MemoryDevice(SIZE)
    Volume.format(medium, fleet="live", journal_bytes=journal_kib << 10)
    writer = Volume.open(medium.reopen())
    writer.start_epoch(1)
    count = 0

    def commit() -> None:
        nonlocal count
        for _ in range(puts_per_read):
            count += 1
            size = 512 + count * 37 % 3500
            writer.put(f"/live/{count % 16}", [bytes([count % 251]) * size], size, epoch=1,
                       mtime=count)
            writer.release_through(writer.applied_seq)

    for _ in range(40):
        commit()
    live = LiveWriterView(medium, commit)
    reader = Volume.open(live)
    assert 0 < reader.applied_seq <= writer.applied_seq
    for _ in range(30):
        reader.refresh()
        _same_places(reader, writer)
    reader.refresh()
    live.live = False  # the writer stops: the reader catches up with it exactly
    stop = writer.applied_seq
    assert Volume.open(medium.reopen(read_only=True)).applied_seq == stop
    reader.refresh()
    assert reader.applied_seq == stop
    assert reader._index.snapshot() == writer._index.snapshot()
    assert fsck.check(medium.reopen(read_only=True)) == []


# ---- real processes -------------------------------------------------------------------------


def _promote(fleet: AgentFleet, node: str, epoch: int, readers: tuple[str, ...]) -> None:
    c = fleet.client
    resp = c.call(fleet[node].address, "POST", "/v1/promote", fleet.grant(node, "promote", epoch),
                  {"fleet": fleet.name, "node": node, "epoch": epoch})
    assert resp.status == 200, resp.body
    resp = c.call(fleet[node].address, "POST", "/v1/readers", fleet.grant(node, "readers", epoch),
                  {"fleet": fleet.name, "epoch": epoch,
                   "readers": [{"node": n, "address": fleet[n].address} for n in readers],
                   "push_grants": fleet.push_grants(node, readers, epoch)})
    assert resp.status == 200, resp.body


class _Load:
    """Client threads putting 512 B - 4 KiB values to whoever is the writer right now."""

    def __init__(self, fleet: AgentFleet, threads: int) -> None:
        self.fleet = fleet
        self.writer = "w"
        self.epoch = 1
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, tuple[int, int]] = {}  # path -> (crc, epoch) of the last ack
        self.attempts = Attempts()
        self.count = 0
        self.threads = [threading.Thread(target=self._put, args=(k,)) for k in range(threads)]

    def _put(self, k: int) -> None:
        rng = random.Random(k)
        n = 0
        while not self.stop.is_set():
            n += 1
            path = f"/load/{k}/{n % 8}"
            data = rng.randbytes(rng.randint(512, 4096))
            with self.lock:
                writer, epoch = self.writer, self.epoch
            attempt = self.attempts.begin(path, zlib.crc32(data))
            try:
                resp = self.fleet.client.put(self.fleet[writer].address, path, data,
                                             self.fleet.grant(writer, "writer", epoch))
            except (OSError, http.client.HTTPException):  # the writer was just killed
                time.sleep(0.02)
                continue
            if resp.status == 201:
                self.attempts.ack(attempt)
                with self.lock:
                    self.acked[path] = (zlib.crc32(data), epoch)
                    self.count += 1
            else:
                time.sleep(0.02)


def _at_least(fleet: AgentFleet, node: str, seq: int) -> Callable[[], bool]:
    return lambda: int(fleet.health(node)["applied_seq"]) >= seq


def test_writer_killed_under_small_puts_victim_restarts_and_catches_up(
        fleet_factory: FleetFactory, tmp_path: Path) -> None:
    """kill -9 of the writer under 4 client threads of small puts, 6 times: a reader is
    promoted (epoch + 1) and the victim restarts as a reader while the new writer is under
    load. It must come up every time and get back in sync; at the end every acknowledged put
    is on the writer and on both readers, and fsck is clean."""
    image = tmp_path / "image.raw"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    fleet = fleet_factory(f"file:{image}", start=False)
    # a 16 MiB ring: reading it for witnesses takes long enough that the writer commits
    # several batches meanwhile (the race window of the end-of-journal check, widened)
    device = FileDevice(image)
    Volume.format(device, fleet=fleet.name, journal_bytes=16 << 20)
    device.close()
    nodes = ["w", "r1", "r2"]
    for node in nodes[1:]:
        fleet.add(node)
    fleet.add("w", role="writer", readers={n: fleet[n].address for n in nodes[1:]})
    load = _Load(fleet, threads=4)
    for t in load.threads:
        t.start()
    try:
        for kill in range(6):
            time.sleep(0.8)
            victim = load.writer
            successor = nodes[(nodes.index(victim) + 1) % 3]
            others = tuple(n for n in nodes if n != successor)
            fleet[victim].kill()
            epoch = load.epoch + 1
            _promote(fleet, successor, epoch, readers=others)
            with load.lock:
                load.writer, load.epoch = successor, epoch
            agent = fleet[victim]
            agent.config.update(role="reader", readers={})
            agent.start()  # raises (with the log's tail) if the agent refuses to start
            time.sleep(0.5)  # under load
            target = int(fleet.health(successor)["applied_seq"])
            fleet.wait_for(_at_least(fleet, victim, target), 30,
                           f"{victim} back in sync after kill {kill + 1}")
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(60)
    assert load.count > 0
    writer = load.writer
    final = int(fleet.health(writer)["applied_seq"])
    for node in nodes:
        fleet.wait_for(_at_least(fleet, node, final), 30, f"{node} at seq {final}")
        for path in load.acked:
            role = "writer" if node == writer else "reader"
            got = fleet.client.get(fleet[node].address, path,
                                   fleet.grant(node, role, load.epoch))
            assert got.status == 200, (node, path, got.body)
            # a put in flight at a kill may have become durable after the last ack; an older
            # acknowledged value would be a rollback
            assert zlib.crc32(got.body) in load.attempts.allowed(path), \
                f"{node}: acknowledged {path} lost"
    check = FileDevice(image, read_only=True)
    try:
        assert fsck.check(check) == []
    finally:
        check.close()
