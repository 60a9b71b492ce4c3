"""The fleet map: who writes, who reads, at which epoch. Pure values, no I/O.

Invariants kept by every constructor and transition in this module:

* ``epoch`` only grows; it is bumped exactly when the writer changes (or is removed).
* At most one member has role ``writer``, and it is the map's ``writer``.
* ``revision`` grows by one at every change of the map (epoch or not); clients and the watch
  endpoint long-poll on it, so a reader dropping out is announced as fast as a new writer.
* A member with role ``out`` is never handed to clients; a reader that is not ``in_sync`` is
  never handed to clients either.

The map is also the record persisted in RADOS (``encode``/``decode``, versioned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agents.errors import DecodeError, UnsupportedVersion
from orchestrator.errors import IllegalFleetTransition

MAP_FORMAT_VERSION = 1  # Bump when the stored/wire form changes.

Role = Literal["writer", "reader", "spare", "out"]
Phase = Literal["stable", "failover"]
ROLES: tuple[Role, ...] = ("writer", "reader", "spare", "out")

# Legal role changes of one member (from, to). Anything else is refused, naming the pair.
LEGAL_ROLE_CHANGES: frozenset[tuple[Role, Role]] = frozenset(
    {
        ("reader", "writer"),  # promotion
        ("writer", "out"),  # writer lost or fenced
        ("reader", "out"),  # reader lost
        ("spare", "reader"),  # spare attached read-only, catching up
        ("spare", "out"),
        ("out", "reader"),  # a lost reader is back (it catches up before being handed out)
        ("out", "spare"),
    }
)





@dataclass(frozen=True)
class Member:
    """One VM/agent of the fleet as the coordinator sees it."""

    name: str
    address: str
    role: Role
    in_sync: bool = False
    applied_seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON form (also used inside the persisted map)."""
        return {
            "name": self.name,
            "address": self.address,
            "role": self.role,
            "in_sync": self.in_sync,
            "applied_seq": self.applied_seq,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        """Inverse of :meth:`to_json`; malformed input raises DecodeError."""
        try:
            role = str(data["role"])
            if role not in ROLES:
                raise DecodeError(f"unknown role {role!r}")
            return cls(
                name=str(data["name"]),
                address=str(data["address"]),
                role=role,
                in_sync=bool(data.get("in_sync", False)),
                applied_seq=int(data.get("applied_seq", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"malformed member: {exc}") from exc


@dataclass(frozen=True)
class FleetMap:
    """A fleet's state. ``members`` is kept sorted by name, so equal maps compare equal."""

    fleet: str
    epoch: int
    revision: int
    writer: str | None
    members: tuple[Member, ...] = field(default=())
    phase: Phase = "stable"

    def __post_init__(self) -> None:
        writers = [m.name for m in self.members if m.role == "writer"]
        if self.writer is None and writers:
            raise IllegalFleetTransition(self.fleet, "no writer", writers[0], "writer not in map")
        if self.writer is not None and writers != [self.writer]:
            raise IllegalFleetTransition(
                self.fleet, "writers", ",".join(writers) or "none", f"map writer is {self.writer}"
            )
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise IllegalFleetTransition(self.fleet, "members", "duplicate", ",".join(names))

    # -- lookups ---------------------------------------------------------------------------

    def member(self, name: str) -> Member:
        """The member called ``name``; KeyError if unknown."""
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def has(self, name: str) -> bool:
        """Whether ``name`` is a member (any role)."""
        return any(m.name == name for m in self.members)

    def in_sync_readers(self) -> list[Member]:
        """Readers clients may be sent to, by name."""
        return [m for m in self.members if m.role == "reader" and m.in_sync]

    def write_targets(self) -> list[Member]:
        """The patent's ordered form for a write: the writer first, then the in-sync readers."""
        if self.writer is None or self.phase != "stable":
            return []
        return [self.member(self.writer), *self.in_sync_readers()]

    def read_targets(self) -> list[Member]:
        """Where a read may go: the in-sync readers, then the writer (always current)."""
        out = self.in_sync_readers()
        if self.writer is not None and self.phase == "stable":
            out.append(self.member(self.writer))
        return out

    def promotion_candidate(self, exclude: frozenset[str] = frozenset()) -> Member | None:
        """The in-sync reader with the highest applied seq (name breaks ties), or None."""
        pool = [m for m in self.in_sync_readers() if m.name not in exclude]
        if not pool:
            return None
        return min(pool, key=lambda m: (-m.applied_seq, m.name))

    # -- transitions (each returns a new map with revision + 1) -------------------------------

    def with_member(self, member: Member) -> FleetMap:
        """Add or replace one member (role changes are checked against the law table)."""
        if self.has(member.name):
            old = self.member(member.name)
            if old.role != member.role and (old.role, member.role) not in LEGAL_ROLE_CHANGES:
                raise IllegalFleetTransition(member.name, old.role, member.role)
            if member.role == "writer" and old.role != "writer":
                raise IllegalFleetTransition(member.name, old.role, "writer", "use promote()")
        elif member.role == "writer":
            raise IllegalFleetTransition(member.name, "absent", "writer", "use promote()")
        rest = [m for m in self.members if m.name != member.name]
        return replace(self, members=_sorted((*rest, member)), revision=self.revision + 1)

    def set_role(self, name: str, role: Role, *, in_sync: bool | None = None) -> FleetMap:
        """Change one member's role (``writer`` excepted: see :meth:`promote`)."""
        old = self.member(name)
        if old.role == "writer" and role != "writer":
            if role not in ("out",):
                raise IllegalFleetTransition(name, "writer", role)
            return self.remove_writer()
        new = replace(old, role=role, in_sync=old.in_sync if in_sync is None else in_sync)
        if role in ("out", "spare"):
            new = replace(new, in_sync=False)
        return self.with_member(new)

    def set_progress(self, name: str, applied_seq: int, in_sync: bool) -> FleetMap:
        """Record a member's applied seq and sync state (readers only; others keep False)."""
        old = self.member(name)
        in_sync = in_sync and old.role == "reader"
        if old.applied_seq == applied_seq and old.in_sync == in_sync:
            return self
        return self.with_member(replace(old, applied_seq=applied_seq, in_sync=in_sync))

    def remove_writer(self) -> FleetMap:
        """The writer is lost: it becomes ``out``, no writer, epoch + 1, phase failover."""
        if self.writer is None:
            raise IllegalFleetTransition(self.fleet, "no writer", "out")
        old = self.member(self.writer)
        rest = [m for m in self.members if m.name != old.name]
        return replace(
            self,
            writer=None,
            epoch=self.epoch + 1,
            revision=self.revision + 1,
            phase="failover",
            members=_sorted((*rest, replace(old, role="out", in_sync=False))),
        )

    def begin_failover(self, candidate: str) -> FleetMap:
        """Epoch + 1 with ``candidate`` named the next writer; phase ``failover`` until promoted.

        The old writer (if any) becomes ``out``. ``candidate`` must be an in-sync reader.
        """
        cand = self.member(candidate)
        if cand.role != "reader" or not cand.in_sync:
            state = cand.role if cand.role != "reader" else "catching-up reader"
            raise IllegalFleetTransition(candidate, state, "writer", "only an in-sync reader")
        members = []
        for m in self.members:
            if m.name == candidate:
                members.append(replace(m, role="writer", in_sync=False))
            elif m.role == "writer":
                members.append(replace(m, role="out", in_sync=False))
            else:
                members.append(m)
        return replace(
            self,
            writer=candidate,
            epoch=self.epoch + 1,
            revision=self.revision + 1,
            phase="failover",
            members=_sorted(members),
        )

    def complete_failover(self) -> FleetMap:
        """The candidate is promoted: phase ``stable``, clients may be sent to it."""
        if self.phase != "failover" or self.writer is None:
            raise IllegalFleetTransition(self.fleet, self.phase, "stable",
                                         "no promotion in progress")
        return replace(self, phase="stable", revision=self.revision + 1)

    # -- encoding --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Versioned JSON form (the watch endpoint and the RADOS record use it)."""
        return {
            "v": MAP_FORMAT_VERSION,
            "fleet": self.fleet,
            "epoch": self.epoch,
            "revision": self.revision,
            "writer": self.writer,
            "phase": self.phase,
            "members": [m.to_json() for m in self.members],
        }

    def encode(self) -> bytes:
        """Canonical bytes of :meth:`to_json`."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FleetMap:
        """Inverse of :meth:`to_json`; refuses unknown versions and malformed input."""
        if not isinstance(data, dict):
            raise DecodeError("fleet map is not an object")
        if data.get("v") != MAP_FORMAT_VERSION:
            raise UnsupportedVersion(
                f"fleet map version {data.get('v')!r} unsupported",
                got=data.get("v"),
                supported=[MAP_FORMAT_VERSION],
            )
        try:
            phase = str(data.get("phase", "stable"))
            if phase not in ("stable", "failover"):
                raise DecodeError(f"unknown phase {phase!r}")
            writer = data.get("writer")
            return cls(
                fleet=str(data["fleet"]),
                epoch=int(data["epoch"]),
                revision=int(data["revision"]),
                writer=None if writer is None else str(writer),
                phase=phase,  # type: ignore[arg-type]
                members=_sorted(Member.from_json(m) for m in data["members"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"malformed fleet map: {exc}") from exc

    @classmethod
    def decode(cls, raw: bytes) -> FleetMap:
        """Inverse of :meth:`encode`."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise DecodeError(f"fleet map is not JSON: {exc}") from exc
        return cls.from_json(data)


def initial_map(fleet: str, writer: str, members: dict[str, tuple[str, Role]]) -> FleetMap:
    """Epoch 1 map: ``members`` maps name -> (address, role); ``writer`` must be among them.

    Readers start not in sync: they are handed out once their first heartbeat shows them
    caught up.
    """
    if writer not in members:
        raise IllegalFleetTransition(writer, "absent", "writer", "writer is not a member")
    out = []
    for name, (address, role) in members.items():
        if name == writer:
            out.append(Member(name, address, "writer"))
        else:
            if role == "writer":
                raise IllegalFleetTransition(name, "config", "writer", f"the writer is {writer}")
            out.append(Member(name, address, role))
    return FleetMap(fleet=fleet, epoch=1, revision=1, writer=writer, members=_sorted(out))


def _sorted(members: Any) -> tuple[Member, ...]:
    return tuple(sorted(members, key=lambda m: m.name))


@dataclass(frozen=True)
class Target:
    """One node handed to a client (the patent's address + permission identifier): its
    address, its role label and the grant the client presents there. The coordinator
    encodes it, the client decodes it: one type on both sides of the wire."""

    node: str
    address: str
    role: str
    grant: str

    def to_json(self) -> dict[str, str]:
        """Wire form."""
        return {"node": self.node, "address": self.address, "role": self.role, "grant": self.grant}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        """Parse the wire form."""
        return cls(str(data["node"]), str(data["address"]), str(data["role"]), str(data["grant"]))


__all__ = [
    "LEGAL_ROLE_CHANGES",
    "MAP_FORMAT_VERSION",
    "FleetMap",
    "IllegalFleetTransition",
    "Member",
    "Phase",
    "Role",
    "Target",
    "initial_map",
]
