"""The fleet's master key(s), held by the coordinator alone, and every grant made from them.

Each node's key is derived from the master (:func:`agents.core.grants.agent_key`); a grant a
node checks is MACed with that node's key, a report a node sends with it too. During a
rotation (docs/security.md) the coordinator holds two masters: it makes grants with the
first and accepts reports made under either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from agents.core.grants import (
    COORDINATOR,
    PUSH,
    REPORT,
    Grant,
    agent_key,
    sign,
    verify,
)
from agents.keyfile import read_key_lines
from orchestrator.core.fleetmap import FleetMap

# A writer's push grants are renewed in the answer to each of its heartbeats; this long a
# coordinator outage leaves the writer pushing before its readers turn lagging.
PUSH_GRANT_TTL = 300.0


class FleetKeys:
    """Grants of one fleet from its master key(s) (current first, then a previous one)."""

    def __init__(self, fleet: str, masters: Sequence[bytes], wall: Callable[[], float]) -> None:
        if not masters or not all(masters):
            raise ValueError("a fleet needs at least one non-empty master key")
        self.fleet = fleet
        self._masters = tuple(masters)
        self.wall = wall

    def node_keys(self, node: str) -> tuple[bytes, ...]:
        """``node``'s key under each master (the one to sign with first)."""
        return tuple(agent_key(master, self.fleet, node) for master in self._masters)

    def node_key_file(self, node: str) -> bytes:
        """The content of ``node``'s key file (one hex key per line, current first)."""
        return "".join(key.hex() + "\n" for key in self.node_keys(node)).encode()

    def grant(self, node: str, purpose: str, epoch: int, ttl: float, subject: str = "") -> str:
        """A grant ``node`` accepts for ``purpose`` at ``epoch`` for ``ttl`` seconds."""
        grant = Grant(self.fleet, node, purpose, epoch, self.wall() + ttl, subject=subject)
        return sign(grant, self.node_keys(node)[0])

    def push_grants(self, m: FleetMap, writer: str | None = None,
                    epoch: int | None = None) -> dict[str, str]:
        """For the writer (default: the map's) at ``epoch`` (default: the map's): one push
        grant per reader of the map, each MACed with that reader's key."""
        writer = m.writer if writer is None else writer
        if writer is None:
            return {}
        readers = [r.name for r in m.members if r.role == "reader"]
        return self.push_grants_to(writer, readers, m.epoch if epoch is None else epoch)

    def push_grants_to(self, writer: str, readers: Sequence[str], epoch: int) -> dict[str, str]:
        """One push grant per reader for ``writer`` at ``epoch``, each MACed with that
        reader's key (the writer itself skipped)."""
        return {r: self.grant(r, PUSH, epoch, PUSH_GRANT_TTL, subject=writer)
                for r in readers if r != writer}

    def verify_report(self, token: str, node: str, body: bytes) -> Grant:
        """The report grant of ``node`` for this ``body``, made with ``node``'s own key."""
        return verify(token, self.node_keys(node), now=self.wall(), fleet=self.fleet,
                      audience=COORDINATOR, purposes={REPORT}, epoch=None, subject=node,
                      body=body)


def read_master_keys(path: Path, what: str = "fleet.secret_file") -> tuple[bytes, ...]:
    """The master key file (:func:`agents.keyfile.read_key_lines`): the current master first,
    a second line the previous one during a rotation; refused when group/other may read it."""
    return read_key_lines(path, what)


__all__ = ["PUSH_GRANT_TTL", "FleetKeys", "read_master_keys"]
