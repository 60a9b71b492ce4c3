"""The agent's role state machine: ``step(state, event) -> (state, actions)``, pure.

States and what a holder may assume in each:

- ``starting``  : nothing is open; serve nothing.
- ``reader``    : the device is open read-only; serve reads; refuse writes (NotWriter).
- ``promoting`` : the device is being opened read-write and the journal tail replayed; writes
                  are still refused until the epoch record of ``epoch`` is durable.
- ``writer``    : the epoch record of ``epoch`` is durable; accept writes of ``epoch`` only.
- ``stopped``   : everything closed; no event is accepted.

Invariants (checked by tests/unit/test_roles.py over random event sequences):
- the epoch never decreases; a move to a lower epoch raises ``StaleEpoch``;
- ``AcceptWrites`` is only ever emitted right after the ``WriteEpochRecord`` of the same epoch
  completed (event ``EpochRecordWritten``), and each epoch gets at most one epoch record;
- leaving the writer role emits ``StopWrites`` first, then ``CloseReadWrite``: writes stop at
  once, then the read-write handle goes;
- a move the machine does not know raises ``IllegalTransition`` naming the state and the event.

Order lives in the output: the shell runs the actions in order and stops at the first failure,
reporting it back as ``PromotionFailed`` (while promoting) or ``DeviceFenced`` (while writing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal

from agents.errors import IllegalTransition, StaleEpoch

__all__ = [
    "AcceptWrites",
    "Action",
    "CloseDevice",
    "CloseReadWrite",
    "DemoteRequested",
    "DeviceFenced",
    "EpochRecordWritten",
    "Event",
    "NewerEpochSeen",
    "OpenReadOnly",
    "OpenReadWrite",
    "PromoteRequested",
    "PromotionFailed",
    "ReplayJournalTail",
    "RoleName",
    "RoleState",
    "Started",
    "StopRequested",
    "StopWrites",
    "WriteEpochRecord",
    "become_reader",
    "become_writer",
    "initial",
    "step",
]

RoleName = Literal["starting", "reader", "promoting", "writer", "stopped"]
HOLDS_READ_WRITE: Final = frozenset({"promoting", "writer"})


@dataclass(frozen=True)
class RoleState:
    """The role an agent holds and the highest epoch it knows."""

    role: RoleName
    epoch: int

    @property
    def accepts_writes(self) -> bool:
        """True only in ``writer``: the epoch record is durable."""
        return self.role == "writer"


def initial() -> RoleState:
    """The state of a freshly started agent."""
    return RoleState("starting", 0)


# Events (past tense: what happened) --------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The device opened read-only; ``epoch`` is the highest epoch found in the journal."""

    epoch: int


@dataclass(frozen=True)
class PromoteRequested:
    """A verified control grant asks this node to become the writer of ``epoch``."""

    epoch: int


@dataclass(frozen=True)
class EpochRecordWritten:
    """The epoch-start record of ``epoch`` is durable on the shared image."""

    epoch: int


@dataclass(frozen=True)
class PromotionFailed:
    """An action of the promotion failed (device, journal); ``reason`` says which."""

    reason: str


@dataclass(frozen=True)
class DemoteRequested:
    """A verified control grant makes this node a reader of ``epoch``."""

    epoch: int


@dataclass(frozen=True)
class NewerEpochSeen:
    """A record, push or grant carried ``epoch`` (higher ones depose a writer)."""

    epoch: int


@dataclass(frozen=True)
class DeviceFenced:
    """A write failed with ``errno`` (EIO after a blocklist, EPERM/EROFS on a read-only disk)."""

    errno: int


@dataclass(frozen=True)
class StopRequested:
    """SIGTERM or an operator asked the agent to stop."""


Event = (Started | PromoteRequested | EpochRecordWritten | PromotionFailed | DemoteRequested
         | NewerEpochSeen | DeviceFenced | StopRequested)


# Actions (imperative: what the shell must do, in order) ------------------------------------


@dataclass(frozen=True)
class OpenReadOnly:
    """Open (or keep) the device read-only and serve reads from it."""


@dataclass(frozen=True)
class OpenReadWrite:
    """Open the device read-write (librbd: take the managed exclusive lock)."""


@dataclass(frozen=True)
class ReplayJournalTail:
    """Read and apply every valid record after ``applied_seq``; drop a torn last record."""


@dataclass(frozen=True)
class WriteEpochRecord:
    """Append the epoch-start record of ``epoch`` and make it durable."""

    epoch: int


@dataclass(frozen=True)
class AcceptWrites:
    """Start accepting client writes of ``epoch``."""

    epoch: int


@dataclass(frozen=True)
class StopWrites:
    """Refuse new writes at once and fail the ones in flight."""


@dataclass(frozen=True)
class CloseReadWrite:
    """Close the read-write handle (librbd: release the exclusive lock)."""


@dataclass(frozen=True)
class CloseDevice:
    """Close every handle; the agent is stopping."""


Action = (OpenReadOnly | OpenReadWrite | ReplayJournalTail | WriteEpochRecord | AcceptWrites
          | StopWrites | CloseReadWrite | CloseDevice)

_PROMOTE: Final = (OpenReadWrite(), ReplayJournalTail())
_LEAVE_WRITER: Final = (StopWrites(), CloseReadWrite(), OpenReadOnly())


def _illegal(state: RoleState, event: Event) -> IllegalTransition:
    name = type(event).__name__
    return IllegalTransition(f"cannot handle {name} while {state.role}",
                             role=state.role, event=name, epoch=state.epoch)


def _not_older(state: RoleState, epoch: int) -> None:
    if epoch < state.epoch:
        raise StaleEpoch(f"epoch {epoch} is older than current epoch {state.epoch}",
                         current=state.epoch, got=epoch)


def become_writer(state: RoleState, epoch: int) -> tuple[RoleState, list[Action]]:
    """Start promotion to writer of ``epoch`` (must be newer than every epoch seen).

    Promoting again to the epoch already held is a no-op (a retried request).
    """
    if state.role == "writer" and epoch == state.epoch:
        return state, []
    if state.role not in ("reader", "writer"):
        raise _illegal(state, PromoteRequested(epoch))
    if epoch <= state.epoch:
        raise StaleEpoch(f"a new writer needs an epoch above {state.epoch}, got {epoch}",
                         current=state.epoch, got=epoch)
    if state.role == "writer":  # re-elected: keep the handle, stop writes of the old epoch
        return RoleState("promoting", epoch), [StopWrites(), ReplayJournalTail(),
                                               WriteEpochRecord(epoch)]
    return RoleState("promoting", epoch), [*_PROMOTE, WriteEpochRecord(epoch)]


def become_reader(state: RoleState, epoch: int) -> tuple[RoleState, list[Action]]:
    """Become a reader of ``epoch`` (not older than the current one): writes stop at once."""
    _not_older(state, epoch)
    if state.role in HOLDS_READ_WRITE:
        return RoleState("reader", epoch), list(_LEAVE_WRITER)
    if state.role == "reader":
        return replace(state, epoch=epoch), []
    raise _illegal(state, DemoteRequested(epoch))


def step(state: RoleState, event: Event) -> tuple[RoleState, list[Action]]:
    """The next state and the actions to run, in order; raises for refused moves."""
    if state.role == "stopped":
        raise _illegal(state, event)
    match event:
        case StopRequested():
            actions: list[Action] = []
            if state.role in HOLDS_READ_WRITE:
                actions += [StopWrites(), CloseReadWrite()]
            return RoleState("stopped", state.epoch), [*actions, CloseDevice()]
        case Started(epoch=epoch):
            if state.role != "starting":
                raise _illegal(state, event)
            return RoleState("reader", max(epoch, state.epoch)), [OpenReadOnly()]
        case PromoteRequested(epoch=epoch):
            return become_writer(state, epoch)
        case EpochRecordWritten(epoch=epoch):
            if state.role != "promoting" or epoch != state.epoch:
                raise _illegal(state, event)
            return RoleState("writer", epoch), [AcceptWrites(epoch)]
        case PromotionFailed():
            if state.role != "promoting":
                raise _illegal(state, event)
            return RoleState("reader", state.epoch), [CloseReadWrite(), OpenReadOnly()]
        case DemoteRequested(epoch=epoch):
            return become_reader(state, epoch)
        case NewerEpochSeen(epoch=epoch):
            if epoch <= state.epoch or state.role == "starting":
                return RoleState(state.role, max(epoch, state.epoch)), []
            return become_reader(state, epoch)
        case DeviceFenced():
            if state.role not in HOLDS_READ_WRITE:
                raise _illegal(state, event)
            return RoleState("reader", state.epoch), list(_LEAVE_WRITER)
    raise _illegal(state, event)  # pragma: no cover - match above is exhaustive
