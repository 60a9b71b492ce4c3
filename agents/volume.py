"""The storage engine: an rbdfleet volume (docs/format.md) over a BlockDevice.

One ``Volume`` per agent, in two layers: :class:`agents.follower.Follower` opens the volume
read-only, follows the journal (pushed records or the ring on disk) and serves verified reads
of a consistent version: what a reader and fsck need. :class:`agents.committer.Committer`
adds what the writer does after :meth:`Volume.start_epoch`: copy-on-write puts, group
commit, checkpoints, discards. A Volume is both from the start, so a reader becomes the
writer in place (warm promotion: :meth:`Volume.adopt`, then :meth:`Volume.start_epoch`).
This module adds the life cycle around them: formatting an image and checking it.
"""

from __future__ import annotations

import errno
import uuid

from agents.committer import Committer
from agents.core import checkpoint as ckpt
from agents.core.allocator import Extent
from agents.core.superblock import Superblock, layout
from agents.device import ALIGN, BlockDevice
from agents.errors import DeviceError
from agents.fsck import Problem, check

__all__ = ["Volume"]


class Volume(Committer):
    """An rbdfleet volume on one BlockDevice (see the module docstring)."""

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

    def fsck(self) -> list[Problem]:
        """Check the device read-only (see agents.fsck.check)."""
        return check(self._device)
