"""Reader role (shell): apply pushed records in seq order, fill gaps from the shared image's
journal, tail the journal on its own as a backstop, and say when it is catching up.

The device is opened read-only (the reader never writes). Reads themselves (stat, list, read)
go straight to the volume, which verifies checksums; this module decides only *whether* the
reader may serve (:meth:`ReaderRole.check_current`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agents.core.protocol import PushedRecord, RecordAck, RecordPush
from agents.core.record import Record
from agents.device import BlockDevice
from agents.errors import CatchingUp, SequenceGap
from agents.volume import Volume

__all__ = ["OpenVolume", "ReaderRole"]

LOG = logging.getLogger(__name__)

OpenVolume = Callable[[], tuple[BlockDevice, Volume]]


class ReaderRole:
    """The reader side of one agent. Thread-safe: pushes, the tail loop and reads may overlap.

    ``open_volume`` opens the device read-only and the volume on it.
    """

    def __init__(self, node: str, open_volume: OpenVolume) -> None:
        self.node = node
        self.device, self.volume = open_volume()
        self._lock = threading.Lock()
        self.known_commit_seq = self.volume.applied_seq
        self.synced = False
        self.writer: str | None = None

    # -- catching up ---------------------------------------------------------------------

    def _refresh_locked(self) -> list[Record]:
        # Volume.refresh reloads the newest checkpoint itself when the writer wrapped the
        # journal past this reader, and raises CatchingUp (503) if it cannot keep up.
        records = self.volume.refresh()
        self.synced = True
        self.known_commit_seq = max(self.known_commit_seq, self.volume.applied_seq)
        return records

    def catch_up(self) -> int:
        """Read and apply new records from the on-disk journal; the new applied seq."""
        with self._lock:
            records = self._refresh_locked()
            if records:
                LOG.debug("event=tail_applied node=%s count=%d applied_seq=%d", self.node,
                          len(records), self.volume.applied_seq)
            return self.volume.applied_seq

    def receive(self, push: RecordPush) -> RecordAck:
        """Apply pushed records (in seq order, each where it lies in the journal ring: checked
        by :attr:`RecordPush.records`); gaps are filled from the journal on the image."""
        with self._lock:
            self.writer = push.writer
            records = push.records  # DecodeError: nothing in this push is believed
            try:
                self._apply_pushed(records)
                if self.volume.applied_seq < push.commit_seq:
                    self._refresh_locked()
            finally:
                # Only now: a read arriving while this push is applied must not see the
                # reader "behind" a commit seq it is about to reach (it used to answer 503
                # for that). And a push refused still says what was committed: reads wait
                # for this reader to reach it (503), never answer from before it.
                self.known_commit_seq = max(self.known_commit_seq, push.commit_seq)
            return RecordAck(node=self.node, epoch=self.volume.epoch,
                             applied_seq=self.volume.applied_seq, safe_seq=self.volume.safe_seq())

    def _apply_pushed(self, records: tuple[PushedRecord, ...]) -> None:
        for pushed in records:
            record = pushed.record
            if record.seq <= self.volume.applied_seq:
                continue
            if record.seq > self.volume.applied_seq + 1:
                # Every pushed record is durable before it is sent, so the journal has the
                # missing ones.
                self._refresh_locked()
                if record.seq <= self.volume.applied_seq:
                    continue
            if record.seq != self.volume.applied_seq + 1:
                raise SequenceGap(
                    f"record {record.seq} does not follow {self.volume.applied_seq} and "
                    "the journal does not have the missing records yet",
                    applied=self.volume.applied_seq, got=record.seq)
            self.volume.apply(record, pushed.start, pushed.nbytes)

    def behind(self) -> bool:
        """Whether this reader is behind what it knows was committed."""
        return not self.synced or self.volume.applied_seq < self.known_commit_seq

    def check_current(self) -> None:
        """Raise CatchingUp (503) while this reader is behind what it knows was committed and
        the journal on the image cannot bring it there at once (every committed record is
        durable there before anyone learns its seq, so one read of the journal normally does)."""
        if self.behind():
            self.catch_up()
        applied, target = self.volume.applied_seq, self.known_commit_seq
        if not self.synced or applied < target:
            raise CatchingUp(f"reader {self.node} is catching up ({applied}/{target})",
                             applied=applied, target=target)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the volume's I/O threads and close the read-only handle."""
        with self._lock:
            self.volume.close()
            self.device.close()
