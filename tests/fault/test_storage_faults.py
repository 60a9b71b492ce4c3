"""Storage faults: power cut at every stage of a put (and of checkpoints), corrupted data,
records and superblocks. Acknowledged writes survive; nothing partial is ever visible;
corruption is reported with its location, by reads and by fsck."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import pytest

from agents import fsck
from agents.backends.file import FileDevice
from agents.errors import ChecksumMismatch, DeviceError, NotFound
from agents.testing import MemoryDevice
from agents.volume import Volume

pytestmark = pytest.mark.fault

SIZE = 8 << 20


def _writer(dev: MemoryDevice, epoch: int = 1, **fmt: int) -> Volume:
    Volume.format(dev, fleet="faults", **fmt)
    vol = Volume.open(dev)
    vol.start_epoch(epoch)
    return vol


def _content(vol: Volume, path: str) -> bytes:
    return b"".join(vol.read(path))


def _cuts() -> list[int]:
    data = 200 * 1024 + 4096  # the new version's data, padded
    edges = [data - 1, data, data + 1, data + 100, data + 4095, data + 4096, data + 9000]
    return [*range(0, data, 24 * 1024), *edges]


@pytest.mark.parametrize("cut", _cuts())
def test_power_cut_during_an_overwrite(cut: int) -> None:
    dev = MemoryDevice(SIZE)
    vol = _writer(dev)
    keep = os.urandom(50_000)
    old, new = os.urandom(200 * 1024), os.urandom(200 * 1024 + 10)
    vol.put("/keep", [keep], len(keep), epoch=1, mtime=1)
    vol.put("/f", [old], len(old), epoch=1, mtime=1)
    dev.crash_after(cut)
    try:
        vol.put("/f", [new[:1000], new[1000:]], len(new), epoch=1, mtime=2)
        acked = True
    except DeviceError:
        acked = False
    dev.heal()
    after = Volume.open(dev.reopen(read_only=True))
    got = _content(after, "/f")
    assert got == new if acked else got in (old, new), "a partial version became visible"
    assert _content(after, "/keep") == keep
    assert fsck.check(dev.reopen(read_only=True)) == []
    # the next writer takes over at the valid end of the journal and carries on
    successor = Volume.open(dev.reopen())
    successor.start_epoch(2)
    successor.put("/g", [b"after"], 5, epoch=2, mtime=3)
    successor.put("/f", [keep], len(keep), epoch=2, mtime=3)
    final = Volume.open(dev.reopen(read_only=True))
    assert _content(final, "/g") == b"after" and _content(final, "/f") == keep
    assert fsck.check(dev.reopen(read_only=True)) == []


@pytest.mark.parametrize("seed", range(24))
def test_acknowledged_puts_survive_a_power_cut_anywhere(seed: int) -> None:
    """Many small puts through a tiny journal (checkpoints and wraps all the time), power cut
    at a random byte: every acknowledged put is there after restart."""
    rng = random.Random(seed)
    dev = MemoryDevice(SIZE)
    vol = _writer(dev, journal_bytes=64 << 10)
    acked: dict[str, bytes] = {}
    in_flight: tuple[str, bytes] | None = None
    dev.crash_after(rng.randrange(0, 3 << 20))
    try:
        for i in range(400):
            path = f"/d{i % 5}/f{i % 23}"
            data = rng.randbytes(rng.choice([10, 3000, 5000, 70_000]))
            in_flight = (path, data)
            vol.put(path, [data], len(data), epoch=1, mtime=i)
            acked[path] = data
            if i % 17 == 0:
                vol.release_through(vol.applied_seq)
    except DeviceError:
        pass
    else:
        pytest.fail(f"seed {seed}: the power cut never happened")
    assert in_flight is not None
    dev.heal()
    after = Volume.open(dev.reopen(read_only=True))
    for path, data in acked.items():
        if path != in_flight[0]:
            assert _content(after, path) == data, f"seed {seed}: lost the acknowledged {path}"
    path, data = in_flight
    landed = {data, acked[path]} if path in acked else {data}
    try:
        assert _content(after, path) in landed, f"seed {seed}: {path} is neither version"
    except NotFound:
        assert path not in acked, f"seed {seed}: lost the acknowledged {path}"
    assert fsck.check(dev.reopen(read_only=True)) == [], f"seed {seed}"


def test_corrupt_data_is_reported_by_read_and_fsck() -> None:
    dev = MemoryDevice(SIZE)
    vol = _writer(dev)
    data = os.urandom(3 << 20)
    vol.put("/f", [data], len(data), epoch=1, mtime=1)
    node = vol._index.get("/f")
    (offset, _), *_ = node.locate(1 << 20, 4096)  # first block of chunk 1
    dev.corrupt(offset + 100, b"\xff\x00\xff")
    stream = vol.read("/f")
    assert next(stream) == data[: 1 << 20]  # chunk 0 is fine and is served
    with pytest.raises(ChecksumMismatch) as err:
        next(stream)
    assert err.value.fields["chunk"] == 1 and err.value.fields["device_offset"] == offset
    assert vol.safe_seq() == vol.applied_seq, "a failed stream must unpin its version"
    problems = fsck.check(dev.reopen(read_only=True))
    assert [(p.kind, p.location) for p in problems] == [
        ("checksum", f"file /f chunk 1 (device offset {offset})")
    ]


def test_corrupt_record_inside_the_journal_is_not_mistaken_for_a_torn_tail() -> None:
    dev = MemoryDevice(SIZE)
    vol = _writer(dev)
    for i in range(6):
        vol.put(f"/f{i}", [b"x" * 5000], 5000, epoch=1, mtime=i)
    seq, start, _ = next(p for p in vol._positions if p[0] == 4)
    dev.corrupt(vol.superblock.journal_offset + start + 60, b"\x13\x37")
    with pytest.raises(ChecksumMismatch) as err:
        Volume.open(dev.reopen(read_only=True))
    assert err.value.fields["seq"] == seq
    problems = fsck.check(dev.reopen(read_only=True))
    assert [p.kind for p in problems] == ["journal"]
    assert problems[0].location.startswith(f"journal record seq {seq} ")
    # a promotion must not silently drop the committed records after the corrupt one
    with pytest.raises(ChecksumMismatch):
        Volume.open(dev.reopen()).start_epoch(2)


def test_a_torn_tail_is_dropped_silently() -> None:
    dev = MemoryDevice(SIZE)
    vol = _writer(dev)
    vol.put("/a", [b"1"], 1, epoch=1, mtime=0)
    rec = vol.put("/b", [b"2"], 1, epoch=1, mtime=0)
    _, start, _ = vol._positions[-1]
    dev.corrupt(vol.superblock.journal_offset + start + 70, b"\x00\x01")
    after = Volume.open(dev.reopen(read_only=True))
    assert after.applied_seq == rec.seq - 1
    assert fsck.check(dev.reopen(read_only=True)) == []


def test_one_bad_superblock_copy_is_survived_and_reported() -> None:
    dev = MemoryDevice(SIZE)
    vol = _writer(dev)
    vol.put("/a", [b"1"], 1, epoch=1, mtime=0)
    dev.corrupt(4096 + 20, b"\xde\xad")
    assert _content(Volume.open(dev.reopen(read_only=True)), "/a") == b"1"
    problems = fsck.check(dev.reopen(read_only=True))
    assert [(p.kind, p.location) for p in problems] == [
        ("superblock", "superblock B (offset 4096)")
    ]


def test_fsck_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "image"
    with image.open("wb") as f:
        f.truncate(SIZE)
    dev = FileDevice(image)
    Volume.format(dev, fleet="cli")
    vol = Volume.open(dev)
    vol.start_epoch(1)
    vol.put("/big", [b"q" * 300_000], 300_000, epoch=1, mtime=0)
    assert fsck.main([str(image)]) == 0
    assert "clean" in capsys.readouterr().out
    offset = vol._index.get("/big").extents[0].offset
    dev.write_at(offset, b"\x01" * 4096)
    dev.close()
    assert fsck.main([str(image)]) == 1
    out = capsys.readouterr().out
    assert f"file /big chunk 0 (device offset {offset}): checksum" in out
    assert fsck.main([str(tmp_path / "missing")]) == 2


WRITER_SCRIPT = """
import os, sys, zlib
from agents.backends.file import FileDevice
from agents.volume import Volume
dev = FileDevice(sys.argv[1])
vol = Volume.open(dev)
vol.start_epoch(int(sys.argv[2]))
rng = __import__("random").Random(int(sys.argv[2]))
print("READY", flush=True)
i = 0
while True:
    size = rng.choice([100, 5000, 300_000, 2_500_000])
    data = rng.randbytes(size)
    path = f"/k/{i % 37}"
    print("BEGIN", path, zlib.crc32(data), flush=True)
    vol.put(path, [data[j:j + 65536] for j in range(0, size, 65536)], size,
            epoch=int(sys.argv[2]), mtime=i)
    print("ACK", path, zlib.crc32(data), flush=True)
    if i % 11 == 0:
        vol.release_through(vol.applied_seq)
    i += 1
"""


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_kill_9_of_a_writer_process_loses_no_acknowledged_put(tmp_path: Path, epoch: int) -> None:
    """A real writer process on an O_DIRECT file image, SIGKILLed mid-stream (by its pid)."""
    import signal
    import subprocess
    import sys
    import zlib

    image = tmp_path / "image"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    dev = FileDevice(image)
    Volume.format(dev, fleet="kill", journal_bytes=256 << 10)
    dev.close()
    acked: dict[str, int] = {}

    def note(line: str, begun: list[tuple[str, int]]) -> None:
        kind, path, crc = line.split()
        if kind == "BEGIN":
            begun[:] = [(path, int(crc))]
        else:
            acked[path] = int(crc)
            begun.clear()

    for run in range(1, epoch + 1):  # each run is a new writer epoch on the same image
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(image), str(run)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "READY"
            begun: list[tuple[str, int]] = []
            for _ in range(80 + 27 * run):  # kill after a number of lines, mid-put
                note(proc.stdout.readline(), begun)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        # acks already written to the pipe before the kill count too
        for line in proc.stdout:
            note(line, begun)
        proc.stdout.close()
        reader_dev = FileDevice(image, read_only=True)
        after = Volume.open(reader_dev)
        for path, crc in acked.items():
            got = zlib.crc32(b"".join(after.read(path)))
            # the put in flight at the kill may have become durable without its ack
            assert got == crc or (path, got) in begun, f"run {run}: lost {path}"
        for path, crc in begun:
            # and if it did, the next writer must carry on from it: the test's truth follows
            try:
                if zlib.crc32(b"".join(after.read(path))) == crc:
                    acked[path] = crc
            except NotFound:
                assert path not in acked
        assert fsck.check(reader_dev) == []
        reader_dev.close()


def test_fenced_librbd_writer_stops_and_a_successor_carries_on(
    rbd_image: tuple[Any, str], rados_admin: Any
) -> None:
    """Real Ceph: the writer is blocklisted mid-stream; its next put fails, the volume refuses
    every later write; a new writer (next epoch) takes the lock over and the reader, which
    never stopped serving, follows it. No acknowledged put is lost."""
    import errno
    import json

    from agents.backends.librbd import RbdDevice

    cluster, image = rbd_image

    def device(read_only: bool) -> RbdDevice:
        return RbdDevice(
            str(cluster.conf),
            cluster.pool,
            image,
            "admin",
            keyring=str(cluster.keyring),
            read_only=read_only,
        )

    first = device(False)
    reader_dev = device(True)
    addr = first.client_address
    try:
        Volume.format(first, fleet="fence")
        old = Volume.open(first)
        old.start_epoch(1)
        reader = Volume.open(reader_dev)
        acked: dict[str, bytes] = {}
        for i in range(5):
            data = os.urandom(200_000 + i)
            reader.apply(old.put(f"/f{i}", [data], len(data), epoch=1, mtime=i))
            acked[f"/f{i}"] = data
        cmd = {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr, "expire": 60.0}
        assert rados_admin.mon_command(json.dumps(cmd), b"")[0] == 0
        rados_admin.wait_for_latest_osdmap()
        with pytest.raises(DeviceError) as err:
            for i in range(20):  # the fence lands within a few ms (notes G3)
                old.put(f"/late{i}", [b"x" * 5000], 5000, epoch=1, mtime=0)
        assert err.value.fields["errno"] == errno.ESHUTDOWN
        with pytest.raises(DeviceError):
            old.put("/after", [b"y"], 1, epoch=1, mtime=0)
        # readers keep serving meanwhile
        assert b"".join(reader.read("/f3")) == acked["/f3"]
        second = device(False)
        try:
            new = Volume.open(second)
            start = new.start_epoch(2)
            rec = new.put("/f0", [b"new"], 3, epoch=2, mtime=9)
            got = reader.refresh()
            assert got[-1] == rec and start in got
            assert b"".join(reader.read("/f0")) == b"new"
            for path in ("/f1", "/f2", "/f3", "/f4"):
                assert b"".join(reader.read(path)) == acked[path]
            assert fsck.check(reader_dev) == []
            new.close()
        finally:
            second.close()
        old.close()
    finally:
        reader_dev.close()
        first.close()
        cmd = {"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}
        rados_admin.mon_command(json.dumps(cmd), b"")


def test_concurrent_writers_readers_and_wraps_stay_consistent() -> None:
    """Threads overwrite, delete and read the same paths through a tiny journal while a reader
    volume follows from disk: every read is one whole version ever written, never a mix."""
    import threading
    import zlib

    dev = MemoryDevice(32 << 20)
    vol = _writer(dev, journal_bytes=128 << 10)
    follower = Volume.open(dev.reopen(read_only=True))
    versions: dict[str, set[int]] = {f"/c/{i}": set() for i in range(6)}
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer_thread(k: int) -> None:
        rng = random.Random(k)
        try:
            for i in range(60):
                path = rng.choice(sorted(versions))
                if rng.random() < 0.15:
                    with contextlib.suppress(NotFound):
                        vol.delete(path, epoch=1)
                    continue
                data = rng.randbytes(rng.choice([100, 9000, 1_200_000]))
                with lock:
                    versions[path].add(zlib.crc32(data))
                vol.put(path, [data], len(data), epoch=1, mtime=i)
                if i % 7 == 0:
                    vol.release_through(min(vol.safe_seq(), follower.safe_seq()))
        except BaseException as exc:
            errors.append(exc)

    def reader_thread(v: Volume, follow: bool) -> None:
        rng = random.Random(99)
        try:
            while not stop.is_set():
                if follow:
                    v.refresh()
                path = rng.choice(sorted(versions))
                try:
                    data = b"".join(v.read(path))
                except NotFound:
                    continue
                with lock:
                    assert zlib.crc32(data) in versions[path], f"mixed version of {path}"
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer_thread, args=(k,)) for k in range(4)]
    readers = [
        threading.Thread(target=reader_thread, args=(vol, False)),
        threading.Thread(target=reader_thread, args=(follower, True)),
    ]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[0]
    follower.refresh()
    assert follower._index.snapshot() == vol._index.snapshot()
    assert fsck.check(dev.reopen(read_only=True)) == []
