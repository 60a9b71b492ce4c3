"""The rolling upgrade's pure plan (orchestrator/core/upgrade.py): one table of fleets, what
the plan does from each, and the fleets it refuses to start from."""

from __future__ import annotations

import re

import pytest

from orchestrator.core.fleetmap import FleetMap, Member, Role
from orchestrator.core.upgrade import (
    Handover,
    Observation,
    Step,
    Upgrade,
    UpgradeSpare,
    next_step,
    plan,
)
from orchestrator.errors import UpgradeRefused

pytestmark = pytest.mark.unit

NEW, OLD = "new0000000000000", "old0000000000000"


def fleet(*members: tuple[str, Role, bool, str | None], seqs: dict[str, int] | None = None,
          phase: str = "stable", installed: dict[str, str | None] | None = None) -> Observation:
    """``(name, role, in_sync, version)`` per member; ``installed``: packages found on disk."""
    seqs = seqs or {}
    writer = next((n for n, r, _, _ in members if r == "writer"), None)
    m = FleetMap("f", 3, 10, writer, tuple(
        Member(n, f"{n}:7480", r, s, seqs.get(n, 5)) for n, r, s, _ in members),
        phase="failover" if phase == "failover" else "stable")
    return Observation(m, {n: v for n, _, _, v in members}, installed or {})


HEALTHY_OLD = fleet(("w", "writer", False, OLD), ("r1", "reader", True, OLD),
                    ("r2", "reader", True, OLD), ("s", "spare", False, OLD))

PLANS: list[tuple[str, Observation, list[Step]]] = [
    ("fresh fleet: the spare first, readers by name, handover, old writer", HEALTHY_OLD,
     [UpgradeSpare("s"), Upgrade("r1"), Upgrade("r2"), Handover("w", "r1"), Upgrade("w")]),
    ("a spare that does not answer is left to deploy",
     fleet(("w", "writer", False, OLD), ("r1", "reader", True, NEW), ("s", "spare", False, None)),
     [Handover("w", "r1"), Upgrade("w")]),
    ("handover goes to the upgraded reader furthest ahead",
     fleet(("w", "writer", False, OLD), ("r1", "reader", True, NEW), ("r2", "reader", True, NEW),
           seqs={"r1": 4, "r2": 9}),
     [Handover("w", "r2"), Upgrade("w")]),
    ("interrupted after r1: r1 skipped",
     fleet(("w", "writer", False, OLD), ("r1", "reader", True, NEW), ("r2", "reader", True, OLD)),
     [Upgrade("r2"), Handover("w", "r1"), Upgrade("w")]),
    ("interrupted while r1 caught up: waited for again first",
     fleet(("w", "writer", False, OLD), ("r1", "reader", False, NEW), ("r2", "reader", True, OLD)),
     [Upgrade("r1"), Upgrade("r2"), Handover("w", "r1"), Upgrade("w")]),
    ("interrupted after the handover: the fenced old writer is next",
     fleet(("w", "out", False, OLD), ("r1", "writer", False, NEW), ("r2", "reader", True, NEW)),
     [Upgrade("w")]),
    ("old writer restarted, not yet answering: waited for again",
     fleet(("w", "out", False, None), ("r1", "writer", False, NEW), ("r2", "reader", True, NEW)),
     [Upgrade("w")]),
    ("a reader not answering is upgraded (it is restarted anyway)",
     fleet(("w", "writer", False, OLD), ("r1", "reader", True, None), ("r2", "reader", True, NEW)),
     [Upgrade("r1"), Handover("w", "r1"), Upgrade("w")]),
    ("stalled on a bad package: r1 down with it installed, upgraded again first",
     fleet(("w", "writer", False, OLD), ("r1", "out", False, None), ("r2", "reader", True, OLD),
           installed={"r1": "bad0000000000000"}),
     [Upgrade("r1"), Upgrade("r2"), Handover("w", "r1"), Upgrade("w")]),
    ("all done: nothing", fleet(("w", "writer", False, NEW), ("r1", "reader", True, NEW)), []),
    ("a writer alone already upgraded: nothing", fleet(("w", "writer", False, NEW)), []),
    ("the writer upgraded by hand first: readers only",
     fleet(("w", "writer", False, NEW), ("r1", "reader", True, OLD), ("r2", "reader", True, OLD)),
     [Upgrade("r1"), Upgrade("r2")]),
]


@pytest.mark.parametrize(("obs", "expected"), [(o, e) for _, o, e in PLANS],
                         ids=[name for name, _, _ in PLANS])
def test_plan(obs: Observation, expected: list[Step]) -> None:
    assert plan(obs, NEW) == expected
    assert next_step(obs, NEW) == (expected[0] if expected else None)


REFUSED: list[tuple[str, Observation, str]] = [
    ("no writer", fleet(("w", "out", False, OLD), ("r1", "reader", True, OLD)), "no writer"),
    ("failover under way",
     fleet(("w", "out", False, OLD), ("r1", "writer", False, OLD), ("r2", "reader", True, OLD),
           phase="failover"), "a failover is under way"),
    ("a reader out of sync before anything was upgraded",
     fleet(("w", "writer", False, OLD), ("r1", "reader", False, OLD), ("r2", "reader", True, OLD)),
     "out of sync: r1 (reader)"),
    ("a dead reader (out) on the old version",
     fleet(("w", "writer", False, OLD), ("r1", "out", False, None), ("r2", "reader", True, OLD)),
     "out of sync: r1 (out)"),
    ("a dead reader with the writer's package installed",
     fleet(("w", "writer", False, OLD), ("r1", "out", False, None), ("r2", "reader", True, OLD),
           installed={"r1": OLD}), "out of sync: r1 (out)"),
    ("a writer that does not answer",
     fleet(("w", "writer", False, None), ("r1", "reader", True, OLD)),
     "its writer w does not answer"),
    ("two nodes out of sync, even upgraded ones",
     fleet(("w", "writer", False, NEW), ("r1", "reader", False, NEW), ("r2", "out", False, OLD)),
     "out of sync: r1 (reader), r2 (out)"),
    ("a writer alone cannot hand over", fleet(("w", "writer", False, OLD)),
     "no upgraded in-sync reader to hand the writer role of w to"),
]


@pytest.mark.parametrize(("obs", "why"), [(o, w) for _, o, w in REFUSED],
                         ids=[name for name, _, _ in REFUSED])
def test_refused(obs: Observation, why: str) -> None:
    with pytest.raises(UpgradeRefused, match=re.escape(why)):
        plan(obs, NEW)


def test_a_writer_with_only_old_readers_left_refuses_the_handover_not_the_readers() -> None:
    """Handover is asked only once every reader runs the new version: the readers come first."""
    obs = fleet(("w", "writer", False, OLD), ("r1", "reader", True, OLD))
    assert next_step(obs, NEW) == Upgrade("r1")
