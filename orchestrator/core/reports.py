"""Agents' reports the coordinator has accepted: the same report sent again, or one
overtaken by a newer one of its sender, is refused. Pure.

An agent's report (heartbeat, self-test, lagging reader) carries a ``report`` grant the agent
made with its own key, bound to the body by its digest (agents.core.grants): nobody else can
make one, but whoever captured one (no TLS) can send that same report again, byte for byte,
until its grant expires (the agents' ``grant_ttl``, 60 s). Each copy would count as news: a
heartbeat resets the node's silence and brings a node that went ``out`` back as a reader, a
failed self-test confirms a recovered node dead again, a lagging report takes a reader that
caught up out of the in-sync set again, a writer's heartbeat is answered with fresh push
grants.

:class:`ReplayGuard` remembers the nonce of each report it admitted (the grant's MAC: the
agent signs every report it sends, a re-sent lagging report too, so a legitimate report is
never a repeat) until its grant expires, when the grant alone refuses it. Memory is bounded
per node (``capacity``): past it the oldest nonce is forgotten and from then on every grant of
that node expiring no later than the forgotten one is refused, so a node flooding reports made
with its own key only gets its own reports refused. What the guard cannot have seen — reports
signed before it started watching — is refused the same way: every grant expiring before
``since + horizon``, ``horizon`` being the report lifetime agents use. A coordinator watches
from the later of its start and its taking of the lease (:func:`watch_from`): a standby that
takes over has not seen what its predecessor admitted, so it refuses every report signed
before it took the lease, plus :data:`TAKEOVER_SKEW` for the clocks of agents running ahead of
it.

A report about its sender's own state (a heartbeat, a self-test) must also not be older
than one admitted before it: a network cut lets TCP hold a written report back and deliver it
seconds after the cut healed, after the newer reports sent since. Admitted, such a late report
rolls the node's state back (seen on the sandbox VMs: a demoted writer, back in sync, was
confirmed dead again by its heartbeat from the cut, which still carried the failed self-test of
its fenced disk, and flapped out and in). The grant's expiry is when the agent signed it plus
the one lifetime agents use, so it orders one agent's reports: ``admit(..., ordered=True)``
refuses (:class:`ReportOutOfOrder`) a report expiring before the newest ordered one admitted
from that node. An agent whose clock steps back has its reports refused until its clock passes
its newest admitted signing, for at most one REPORT_TTL: a report that expires before that
one's expiry is refused as expired by then.
A lagging reader report is not ordered: the writer reports about others, and the in-sync
word it is weighed against has its own order (``sync_revision``).

Not thread-safe (the caller holds a lock); time is an input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.errors import ReportOutOfOrder, ReportReplayed

__all__ = ["CAPACITY", "REPORT_TTL", "TAKEOVER_SKEW", "ReplayGuard", "nonce", "watch_from"]

# The lifetime of an agent's report grant (agents.agent.AgentSettings.grant_ttl: its default,
# which the agent's config file does not change).
REPORT_TTL = 60.0
# Nonces remembered per node: a heartbeat a second, a self-test every few seconds and some
# lagging reports over one REPORT_TTL stay well below it.
CAPACITY = 1024
# How far an agent's clock may run ahead of a coordinator that takes over the lease while a
# report it signed "after" the takeover was still admitted by the predecessor: the new term
# refuses reports signed up to this long after its taking of the lease (agents report again
# every second; their probes keep answering meanwhile).
TAKEOVER_SKEW = 2.0


def watch_from(started: float, active_since: float | None) -> float:
    """Since when a coordinator started at ``started`` (wall time), holding the lease since
    ``active_since`` (None: never), has seen every report it may admit."""
    if active_since is None:
        return started
    return max(started, active_since + TAKEOVER_SKEW)


def nonce(token: str) -> str:
    """A report grant's nonce: its MAC (the part after the dot), new at every signing."""
    return token.rpartition(".")[2]


@dataclass
class ReplayGuard:
    """The nonces of the reports admitted since ``since`` (wall time), per node."""

    since: float
    horizon: float = REPORT_TTL
    capacity: int = CAPACITY
    # node -> nonce -> the grant's expiry, in the order admitted
    _seen: dict[str, dict[str, float]] = field(default_factory=dict)
    # node -> the latest expiry of a nonce forgotten to stay within ``capacity``
    _forgotten: dict[str, float] = field(default_factory=dict)
    # node -> the latest expiry of an ordered report admitted
    _newest: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {self.capacity}")

    def admit(self, node: str, nonce: str, expires: float, now: float, *,
              ordered: bool = False) -> None:
        """Remember the report of ``node`` whose grant (``nonce``, expiring at ``expires``)
        was just verified; :class:`ReportReplayed` if it was admitted before, or may have
        been without this guard knowing; :class:`ReportOutOfOrder` if it is ``ordered`` and
        signed before an ordered report of ``node`` admitted already."""
        if expires < self.since + self.horizon:
            raise ReportReplayed(f"report of {node} was signed before this coordinator "
                                 "started watching its reports (its start or its taking of "
                                 "the lease); send a new one", node)
        if expires <= self._forgotten.get(node, float("-inf")):
            raise ReportReplayed(f"report of {node} is older than the {self.capacity} "
                                 "remembered; send a new one", node)
        seen = self._seen.setdefault(node, {})
        if nonce in seen:
            raise ReportReplayed(f"report of {node} was received already (a replay)", node)
        newest = self._newest.get(node, float("-inf"))
        if ordered and expires < newest:
            raise ReportOutOfOrder(f"report of {node} was signed {newest - expires:.3f} s "
                                   "before one of its reports admitted already (delivered "
                                   "late): it would roll the node's state back", node)
        # nonces admitted first expire first (agents sign with one lifetime): drop those whose
        # grant is refused as expired by now anyway
        while seen and next(iter(seen.values())) <= now:
            del seen[next(iter(seen))]
        if len(seen) >= self.capacity:
            oldest = next(iter(seen))
            self._forgotten[node] = max(self._forgotten.get(node, float("-inf")),
                                        seen.pop(oldest))
        seen[nonce] = expires
        if ordered:
            self._newest[node] = max(newest, expires)

    def remembered(self, node: str) -> int:
        """How many nonces of ``node`` are held (bounded by ``capacity``)."""
        return len(self._seen.get(node, {}))
