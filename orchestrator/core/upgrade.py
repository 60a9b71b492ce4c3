"""The rolling upgrade's plan: which node next, and when the writer role moves. Pure.

A fleet is upgraded one node at a time so that it keeps serving throughout:

0. the spares whose agents answer (no disk, nothing served: restarted on the new package and
   waited for until they answer on it; a spare that does not answer is left to ``deploy``);
1. the readers, one at a time (each one restarted on the new package, then waited for until
   the coordinator hands it out again: an in-sync reader running the new version);
2. a planned handover of the writer role to an upgraded in-sync reader (the coordinator's
   failover: epoch+1, the old writer fenced, the reader promoted warm, the map published);
3. the old writer, now ``out``, restarted on the new package: it rejoins as a reader.

:func:`next_step` looks at what is true now (the coordinator's map and the version each agent
reports) and names one step, so a run that was interrupted anywhere continues where it
stopped: a node already running the new version and in sync is skipped, one restarted but
still catching up is waited for again, one a stalled run left down on another package (the
package installed there is not the writer's) is upgraded again, an old writer the handover
left ``out`` is upgraded.
:func:`plan` folds the steps in as if each succeeded: what ``--dry-run`` prints.

Refused (:class:`~orchestrator.errors.UpgradeRefused`), before anything is touched: a fleet
without a writer, whose writer does not answer, or in a failover; a reader out of sync that
an upgrade did not leave so (more than one node out of sync, or one that runs or has
installed the writer's old package while the writer still runs it: the fleet is not
healthy); a writer to hand over with no upgraded in-sync reader to take it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.core.fleetmap import FleetMap, Member
from orchestrator.errors import UpgradeRefused

__all__ = ["Handover", "Observation", "Step", "Upgrade", "UpgradeSpare", "next_step", "plan"]


@dataclass(frozen=True)
class Observation:
    """What the upgrade sees: the coordinator's map, the package version each agent runs
    (``None``: its agent did not answer) and, for nodes out of sync, the package version
    installed on them (``None``: none)."""

    map: FleetMap
    versions: Mapping[str, str | None]
    installed: Mapping[str, str | None] = field(default_factory=dict)

    def version(self, node: str) -> str | None:
        return self.versions.get(node)


@dataclass(frozen=True)
class Upgrade:
    """Install the new package on ``node``, restart its agent, wait until it is an in-sync
    reader running the new version."""

    node: str

    def __str__(self) -> str:
        return f"upgrade {self.node}"


@dataclass(frozen=True)
class UpgradeSpare:
    """Install the new package on spare ``node`` and restart its agent; done once it answers
    on the new version (it has no disk: nothing to catch up)."""

    node: str

    def __str__(self) -> str:
        return f"upgrade spare {self.node}"


@dataclass(frozen=True)
class Handover:
    """Planned failover of the writer role from ``writer`` to the upgraded reader ``to``."""

    writer: str
    to: str

    def __str__(self) -> str:
        return f"hand the writer role over from {self.writer} to {self.to}"


Step = Upgrade | UpgradeSpare | Handover


def _done(obs: Observation, member: Member, target: str) -> bool:
    """Upgraded and serving: the new version, and the writer or an in-sync reader."""
    serving = member.role == "writer" or (member.role == "reader" and member.in_sync)
    return serving and obs.version(member.name) == target


def next_step(obs: Observation, target: str) -> Step | None:
    """The one step to take now towards every agent running ``target``; None: done."""
    m = obs.map
    if m.writer is None or m.phase != "stable":
        raise UpgradeRefused(f"fleet {m.fleet} is not healthy: "
                             + ("no writer" if m.writer is None else "a failover is under way"))
    writer = m.member(m.writer)
    writer_version = obs.version(writer.name)
    if writer_version is None:
        raise UpgradeRefused(f"fleet {m.fleet} is not healthy: its writer {writer.name} does "
                             "not answer")
    deployed = [x for x in m.members if x.role in ("writer", "reader", "out")]
    lagging = [x for x in deployed if x.role != "writer" and not x.in_sync]
    writer_upgraded = writer_version == target
    # left out of sync by an interrupted or stalled run: restarted on the new version and
    # catching up; given a package other than the writer's (a stalled run's, maybe a bad one);
    # or the old writer the handover fenced (the handover comes after every reader, so the
    # writer runs the new version then)
    resumable = [x for x in lagging if obs.version(x.name) == target or writer_upgraded
                 or obs.installed.get(x.name, writer_version) != writer_version]
    if len(lagging) > 1 or lagging != resumable:
        raise UpgradeRefused(f"fleet {m.fleet} is not healthy: out of sync: "
                             + ", ".join(f"{x.name} ({x.role})" for x in lagging))
    for spare in (x for x in m.members if x.role == "spare"):
        if obs.version(spare.name) not in (None, target):
            return UpgradeSpare(spare.name)
    if lagging:
        return Upgrade(lagging[0].name)
    for reader in m.in_sync_readers():
        if not _done(obs, reader, target):
            return Upgrade(reader.name)
    if writer_upgraded:
        return None
    upgraded = [r for r in m.in_sync_readers() if obs.version(r.name) == target]
    if not upgraded:
        raise UpgradeRefused(f"fleet {m.fleet}: no upgraded in-sync reader to hand the writer "
                             f"role of {writer.name} to")
    to = min(upgraded, key=lambda r: (-r.applied_seq, r.name))
    return Handover(writer.name, to.name)


def _assume(obs: Observation, step: Step, target: str) -> Observation:
    """``obs`` after ``step`` succeeded."""
    m = obs.map
    if isinstance(step, Handover):
        m = m.begin_failover(step.to).complete_failover()
        return Observation(m, obs.versions, obs.installed)
    if isinstance(step, UpgradeSpare):
        return Observation(m, {**obs.versions, step.node: target}, obs.installed)
    member = m.member(step.node)
    m = m.set_role(step.node, "reader", in_sync=True) if member.role == "out" \
        else m.set_progress(step.node, member.applied_seq, True)
    return Observation(m, {**obs.versions, step.node: target}, obs.installed)


def plan(obs: Observation, target: str) -> list[Step]:
    """Every step :func:`next_step` would take from ``obs`` if each one succeeded."""
    steps: list[Step] = []
    while (step := next_step(obs, target)) is not None:
        steps.append(step)
        obs = _assume(obs, step, target)
    return steps
