"""Read-only consistency check of an rbdfleet image: ``rbdfleet-agent fsck IMAGE``.

Checks both superblocks, the checkpoints, every page of the metadata tree (``btree.check``:
checksums, levels, key ranges, overflow chains, pages reached twice), every journal record of
the chain (and that its end is a torn tail, not a corrupt record), every file's layout and
data checksums, and that files, tree pages, quarantine and free space share no byte and cover
the data area exactly. It goes through Follower's public methods only. Normal after
a crash and not reported: a torn journal tail, and a torn checkpoint slot while the other
slot is valid (the writer was writing it).
A hostile or garbage image (bad geometry, lengths past the device, a compression bomb, a
malformed index) is reported as a problem at the structure that does not decode, never a
crash or a hang: every decoder bounds what it reads (docs/agent.md, "Limits").
Exit status: 0 clean, 1 problems found (each printed with its location), 2 not checkable.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from agents.core import superblock
from agents.core.allocator import Extent
from agents.core.checkpoint import decode_header
from agents.core.index import Node, file_crc
from agents.device import ALIGN, BlockDevice
from agents.errors import FormatError, RbdfleetError
from agents.follower import TREE_PAGE, Follower

__all__ = ["Problem", "check", "main"]


@dataclass(frozen=True)
class Problem:
    """One inconsistency: where it is, what kind, and the details."""

    location: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.location}: {self.kind}: {self.detail}"


CHECKS = 3  # tries on an image a live writer keeps changing


def check(device: BlockDevice) -> list[Problem]:
    """Every problem found on ``device`` (read-only; nothing is repaired).

    A running writer may checkpoint, reuse freed pages or append records while the check
    reads, which looks like damage to a reader that is not in sync (seen: pages of the loaded
    checkpoint rewritten, "bad magic"). So a check that found problems is trusted only if the
    image did not change under it: the superblocks, the checkpoint headers and the journal's
    end read the same after it. Otherwise it runs again, up to :data:`CHECKS` times.
    """
    return _checked(device)[0]


def _checked(device: BlockDevice) -> tuple[list[Problem], Follower | None]:
    """:func:`check`'s problems, and the volume state of the last check."""
    for _ in range(CHECKS):
        before = _stamp(device)
        problems, vol, ended = _check(device)
        if not problems or (_stamp(device) == before
                            and (vol is None or _ends_again(vol, ended))):
            return problems, vol
    return [*problems, Problem(
        "image", "live", f"a writer changed the image during each of {CHECKS} checks, so the "
        "problems above may be its changes: check again once the writer is stopped or idle",
    )], vol


def _stamp(device: BlockDevice) -> bytes:
    """What a checkpoint changes: both superblocks and the checkpoint headers they name."""
    raw = device.read_at(0, 2 * ALIGN)
    try:
        sb = superblock.choose([raw[s : s + ALIGN] for s in superblock.SLOTS])
    except FormatError:
        return raw
    if sb.device_size > device.size():
        return raw
    return raw + b"".join(device.read_at(off, ALIGN) for off in sb.checkpoint_offsets)


def _ends_again(vol: Follower, ended: tuple[int, int, str] | None) -> bool:
    """Whether following the journal on from where the check stopped ends there again: no
    record was appended (and nothing overwrote the chain) while it ran."""
    seq = vol.applied_seq
    return vol.replay() == ended and vol.applied_seq == seq


def _check(device: BlockDevice) -> tuple[list[Problem], Follower | None,
                                          tuple[int, int, str] | None]:
    """The problems, the volume state as far as it could be recovered, and how its journal
    ended (None: at a torn tail)."""
    problems: list[Problem] = []
    raw = device.read_at(0, 2 * ALIGN)
    names = ("A", "B")
    for name, slot in zip(names, superblock.SLOTS, strict=True):
        try:
            superblock.Superblock.decode(raw[slot : slot + ALIGN])
        except FormatError as exc:
            problems.append(Problem(f"superblock {name} (offset {slot})", "superblock", str(exc)))
    try:
        sb = superblock.choose([raw[s : s + ALIGN] for s in superblock.SLOTS])
    except FormatError:
        return problems, None, None
    if sb.device_size > device.size():
        problems.append(Problem("superblock", "superblock",
                                f"volume of {sb.device_size} bytes on a device of "
                                f"{device.size()}"))
        return problems, None, None
    vol = Follower(device, sb)
    try:
        vol.load()
    except FormatError as exc:
        for i, off in enumerate(sb.checkpoint_offsets):
            try:
                decode_header(device.read_at(off, ALIGN))
            except FormatError as err:
                problems.append(
                    Problem(f"checkpoint {names[i]} (offset {off})", "checkpoint", str(err))
                )
        problems.append(Problem("checkpoints", "checkpoint", f"no usable checkpoint: {exc}"))
        return problems, None, None
    reached: set[int] = set()
    problems += [Problem(f"metadata page {p.page} (device offset {p.page * ALIGN})"
                         if p.page is not None else "metadata tree", "tree", p.detail)
                 for p in vol.check_tree(reached)]
    broken = vol.replay()
    if broken is not None:
        seq, pos, why = broken
        problems.append(Problem(f"journal record seq {seq} (offset {sb.journal_offset + pos})",
                                "journal", str(why)))
    try:
        problems += _check_files(vol, device, reached)
    except FormatError as exc:  # a tree page that does not decode (reported above)
        problems.append(Problem("metadata tree", "tree", f"files not checked: {exc}"))
    return problems, vol, broken


def _check_files(vol: Follower, device: BlockDevice, pages: set[int]) -> list[Problem]:
    """Each file's layout and data; then that the files, the tree ``pages``, the quarantine
    and the free map share no byte and cover the data area exactly."""
    problems: list[Problem] = []
    sb = vol.superblock
    area = (sb.data_offset, sb.data_offset + sb.data_bytes)
    owners: list[tuple[Extent, str]] = []
    for node in vol.walk():
        entry = node.entry
        if entry.kind != "file":
            continue
        where = f"file {entry.path}"
        if node.inline is not None:  # its size was checked as it decoded
            continue
        # decoding checked the rest of the layout (aligned extents covering the file, one
        # checksum per chunk: agents.core.index); where the extents lie is checked here
        bad_extent = False
        for x in node.extents:
            owners.append((x, entry.path))
            if x.offset < area[0] or x.end > area[1]:
                problems.append(
                    Problem(
                        f"{where} extent {x.offset}+{x.length}",
                        "layout",
                        "outside the data area",
                    )
                )
                bad_extent = True
        if file_crc(node.sums, entry.size, node.chunk) != entry.crc:
            problems.append(Problem(where, "layout", "file checksum differs from its chunks'"))
        if not bad_extent:
            problems += _check_data(device, node)
    free, quarantined = vol.space()
    owners += [(x, f"quarantine (seq {seq})") for seq, x in quarantined]
    owners += [(Extent(p * ALIGN, TREE_PAGE), f"metadata page {p}") for p in pages]
    owners += [(x, "free space") for x in free]
    owners.sort(key=lambda p: p[0].offset)
    for (a, who_a), (b, who_b) in itertools.pairwise(owners):
        if b.offset < a.end:
            problems.append(
                Problem(f"device offset {b.offset}", "overlap", f"{who_a} and {who_b} share bytes")
            )
    if not any(p.kind == "overlap" for p in problems) and (
            sum(x.length for x, _ in owners) != sb.data_bytes):
        problems.append(Problem("data area", "allocator",
                                "free + used + quarantined + metadata pages != area"))
    return problems


def _check_data(device: BlockDevice, node: Node) -> list[Problem]:
    import zlib

    problems: list[Problem] = []
    entry = node.entry
    for i, want in enumerate(node.sums):
        lo = i * node.chunk
        n = min(node.chunk, entry.size - lo)
        pieces = node.locate(lo, n + (-n % ALIGN))
        try:
            data = b"".join(device.read_at(off, ln) for off, ln in pieces)[:n]
        except RbdfleetError as exc:
            problems.append(Problem(f"file {entry.path} chunk {i}", "io", str(exc)))
            continue
        if zlib.crc32(data) != want:
            problems.append(
                Problem(
                    f"file {entry.path} chunk {i} (device offset {pieces[0][0]})",
                    "checksum",
                    "data does not match its checksum",
                )
            )
    return problems


def open_image(image: str, *, conf: str | None, user: str, keyring: str | None) -> BlockDevice:
    """A read-only device for IMAGE: a path, or ``rbd:POOL/IMAGE``."""
    if image.startswith("rbd:"):
        pool, _, name = image[4:].partition("/")
        if not pool or not name or not conf:
            raise SystemExit("fsck: rbd images are named rbd:POOL/IMAGE and need --conf")
        from agents.backends.librbd import RbdDevice

        return RbdDevice(conf, pool, name, user, keyring=keyring, read_only=True)
    from agents.backends.file import FileDevice

    return FileDevice(image, read_only=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``rbdfleet-agent fsck IMAGE [--conf C --user U --keyring K]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="rbdfleet-agent fsck", description=__doc__)
    parser.add_argument("image", help="file, block device, or rbd:POOL/IMAGE")
    parser.add_argument("--conf", help="ceph.conf (rbd: images)")
    parser.add_argument("--user", default="admin", help="cephx id (rbd: images)")
    parser.add_argument("--keyring", help="keyring file of --user (rbd: images)")
    args = parser.parse_args(argv)
    try:
        device = open_image(args.image, conf=args.conf, user=args.user, keyring=args.keyring)
    except RbdfleetError as exc:
        print(f"fsck: cannot open {args.image}: {exc}", file=sys.stderr)
        return 2
    try:
        problems, vol = _checked(device)
    except RbdfleetError as exc:
        print(f"fsck: cannot check {args.image}: {exc}", file=sys.stderr)
        return 2
    finally:
        device.close()
    for problem in problems:
        print(problem)
    if vol is not None:
        kinds = [n.entry.kind for n in vol.walk()]
        print(
            f"fsck: {args.image}: fleet {vol.fleet}, seq {vol.applied_seq}, "
            f"epoch {vol.epoch}, {kinds.count('file')} files, {kinds.count('dir')} directories"
        )
    if not problems:
        print(f"fsck: {args.image}: clean")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
