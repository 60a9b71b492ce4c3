"""An in-process simulated fleet for the coordinator's pure core (raft_test.go's ``network``).

Nodes are plain records (alive, paused, fenced, role, epoch, applied seq); the coordinator is
:mod:`orchestrator.core.election` + :mod:`orchestrator.core.liveness` driven by a fake time;
an executor runs each batch against the nodes, with injectable failures. Nemesis hooks:
``kill``, ``pause``/``resume``, ``drop_probes``, ``fail_fences``, ``fail_promotions``.
Clients write through ``client_write`` using the last *published* map, like real clients.

Everything observable lands in ``trace`` (one line per step) and in ``acks`` (each accepted
write: epoch, node, time), so tests assert laws over whole runs and print the transcript.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.core import election as el
from orchestrator.core.fleetmap import FleetMap, Role, initial_map
from orchestrator.core.liveness import (
    Liveness,
    LivenessConfig,
    ProbeFailed,
    ProbeSucceeded,
    Verdict,
)


@dataclass
class SimNode:
    """One simulated agent."""

    name: str
    role: str = "reader"
    epoch: int = 1
    applied_seq: int = 0
    alive: bool = True
    paused: bool = False
    fenced: bool = False

    @property
    def answers(self) -> bool:
        """Whether a probe or request gets an answer."""
        return self.alive and not self.paused


@dataclass
class SimFleet:
    """Coordinator + nodes + nemesis; ``run(seconds)`` advances the simulation."""

    nodes: dict[str, SimNode]
    state: el.ElectionState
    liveness: Liveness
    now: float = 0.0
    published: list[FleetMap] = field(default_factory=list)
    acks: list[tuple[int, str, float]] = field(default_factory=list)
    batches: list[list[el.Action]] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    dropped_probes: dict[str, int] = field(default_factory=dict)
    fence_failures: int = 0
    promote_failures: int = 0
    fenced_log: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def build(
        cls, names: list[str], spares: int = 0, config: LivenessConfig | None = None
    ) -> SimFleet:
        """Fleet with ``names[0]`` as writer, the rest readers (in sync), then ``spares``."""
        spec: dict[str, tuple[str, Role]] = {n: (f"{n}:7480", "reader") for n in names}
        spec[names[0]] = (f"{names[0]}:7480", "writer")
        spare_names = [f"spare{i}" for i in range(spares)]
        for s in spare_names:
            spec[s] = (f"{s}:7480", "spare")
        m = initial_map("sim", names[0], spec)
        for n in names[1:]:
            m = m.set_progress(n, 0, True)
        nodes = {n: SimNode(n) for n in [*names, *spare_names]}
        nodes[names[0]].role = "writer"
        for s in spare_names:
            nodes[s].alive = False  # not attached yet
        live = Liveness(config or LivenessConfig())
        for n in names:
            live = live.watch(n, 0.0)
        state = el.ElectionState(map=m, persisted_epoch=1, published_revision=m.revision)
        fleet = cls(nodes=nodes, state=state, liveness=live)
        fleet.published.append(m)
        return fleet

    # -- nemesis -------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """kill -9."""
        self.nodes[name].alive = False
        self.trace.append(f"{self.now:.2f} nemesis kill {name}")

    def pause(self, name: str) -> None:
        """SIGSTOP."""
        self.nodes[name].paused = True
        self.trace.append(f"{self.now:.2f} nemesis pause {name}")

    def resume(self, name: str) -> None:
        """SIGCONT: the node still believes what it believed before."""
        self.nodes[name].paused = False
        self.trace.append(f"{self.now:.2f} nemesis resume {name}")

    def drop_probes(self, name: str, count: int) -> None:
        """The next ``count`` probes of ``name`` are lost (the node is fine)."""
        self.dropped_probes[name] = self.dropped_probes.get(name, 0) + count

    # -- clients ---------------------------------------------------------------------------

    def client_write(self) -> bool:
        """A client writes to the writer of the last published map; True when acknowledged."""
        m = self.published[-1]
        if m.writer is None or m.phase != "stable":
            return False
        node = self.nodes[m.writer]
        if not node.answers or node.fenced or node.role != "writer" or node.epoch != m.epoch:
            return False
        node.applied_seq += 1
        for r in m.in_sync_readers():
            peer = self.nodes[r.name]
            if peer.answers and not peer.fenced:
                peer.applied_seq = node.applied_seq
        self.acks.append((node.epoch, node.name, self.now))
        return True

    def stale_write(self, name: str) -> bool:
        """A resumed node writes on its own belief (a stale client still talking to it)."""
        node = self.nodes[name]
        if not node.answers or node.fenced or node.role != "writer":
            return False
        node.applied_seq += 1
        self.acks.append((node.epoch, node.name, self.now))
        return True

    # -- the coordinator loop ------------------------------------------------------------------

    def feed(self, event: el.Event) -> None:
        """Step the election with ``event`` and run what it returns (executor semantics)."""
        self.state, actions = el.step(self.state, event)
        while actions:
            self.batches.append(actions)
            el.assert_law_order(actions)
            done, failed, reason = self._execute(actions)
            self.state, actions = el.step(
                self.state, el.BatchExecuted(tuple(done), failed, reason, self.now)
            )

    def run(self, seconds: float, step: float = 0.1) -> None:
        """Advance time: probe every node each ``step`` (heartbeats carry seqs), then tick."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = round(self.now + step, 6)
            for name, node in sorted(self.nodes.items()):
                member = self.state.map.member(name) if self.state.map.has(name) else None
                if member is None or member.role == "spare":
                    continue
                if node.answers and not self.dropped_probes.get(name):
                    self.liveness = self.liveness.observe(ProbeSucceeded(name, self.now))
                    beat = el.HeartbeatObserved(
                        name, node.role, node.epoch, node.applied_seq, self.now
                    )
                    self.feed(beat)
                else:
                    if self.dropped_probes.get(name):
                        self.dropped_probes[name] -= 1
                    self.liveness = self.liveness.observe(ProbeFailed(name, self.now))
            for name, verdict in self.liveness.verdicts(self.now).items():
                if verdict is Verdict.DEAD and self.state.map.has(name):
                    if self.state.map.member(name).role != "out":
                        self.trace.append(f"{self.now:.2f} liveness confirms {name} dead")
                        self.feed(el.NodeFailed(name, self.now))
                    self.liveness = self.liveness.forget(name)
            self.feed(el.Tick(self.now))

    def _execute(self, actions: list[el.Action]) -> tuple[list[el.Action], el.Action | None, str]:
        done: list[el.Action] = []
        for action in actions:
            error = self._run_one(action)
            outcome = f" FAILED {error}" if error else ""
            self.trace.append(f"{self.now:.2f} {_describe(action)}{outcome}")
            if error:
                return done, action, error
            done.append(action)
        return done, None, ""

    def _run_one(self, action: el.Action) -> str:
        if isinstance(action, el.PersistEpoch | el.GrantWritePath | el.ReleaseWritePath):
            return ""  # no disks to switch in the simulation
        if isinstance(action, el.FenceNode):
            if self.fence_failures:
                self.fence_failures -= 1
                return "fence refused"
            self.nodes[action.node].fenced = True
            self.fenced_log.append((action.node, self.now))
            return ""
        if isinstance(action, el.PromoteNode):
            node = self.nodes[action.node]
            if self.promote_failures:
                self.promote_failures -= 1
                return "promotion refused"
            if not node.answers or node.fenced:
                return "unreachable"
            node.role, node.epoch = "writer", action.epoch
            return ""
        if isinstance(action, el.PublishMap):
            self.published.append(action.map)
            for m in action.map.members:
                node = self.nodes[m.name]
                if node.answers and m.role == "reader" and node.role == "reader":
                    node.epoch = max(node.epoch, action.map.epoch)
            return ""
        if isinstance(action, el.AttachSpare):
            node = self.nodes[action.node]
            node.alive, node.role, node.epoch = True, "reader", action.epoch
            return ""
        node = self.nodes[action.node]
        if not node.answers:
            return "unreachable"
        node.role = "reader"
        return ""

    def set_fail_fences(self, count: int) -> None:
        """The next ``count`` fences fail."""
        self.fence_failures = count

    def set_fail_promotions(self, count: int) -> None:
        """The next ``count`` promotions fail."""
        self.promote_failures = count


def _describe(action: el.Action) -> str:
    if isinstance(action, el.PersistEpoch | el.PublishMap):
        m = action.map
        return f"{type(action).__name__} epoch={m.epoch} writer={m.writer} phase={m.phase}"
    return f"{type(action).__name__} {action.node} epoch={action.epoch}"


__all__ = ["SimFleet", "SimNode"]
