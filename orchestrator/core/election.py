"""Writer election and reader routing: ``step(state, event) -> (state, [Action])``. Pure.

The state says what the fleet *should* look like and which steps towards it are confirmed
done; :func:`plan` derives the remaining actions from it, so re-running a half-finished
failover (after a failed fence, or on a new coordinator that loaded the persisted map) emits
exactly the missing steps again.

Invariants (the laws; tests check them over random event sequences):

* Actions come out in law order: ``PersistEpoch`` -> ``FenceNode`` -> ``GrantWritePath`` ->
  ``PromoteNode`` -> ``PublishMap`` (then ``AttachSpare``, and the background steps
  ``ReleaseWritePath`` / ``DemoteNode``). The executor runs them in that order and stops at
  the first failure.
* The critical path of a failover (:data:`CRITICAL_PATH`) is only what a new writer needs
  before clients may be sent to it: the new epoch, the old writer fenced in Ceph, a
  write-capable disk for the candidate, its promotion, the map. The old writer's read-write
  disk is released (re-attached ``<readonly/>``) by ``ReleaseWritePath`` only once that map
  is published, off the critical path (:data:`BACKGROUND`): the blocklist already keeps it
  from writing. A failed release never undoes the failover; it is retried after a backoff
  that doubles per failure (``release_backoff`` up to ``release_backoff_max``) and shows in
  ``release_retry`` until it succeeds.
* A writer is never promoted before every node that held the write grant at an older epoch and
  was not confirmed fenced is fenced; the new epoch is persisted before anything else.
* A map naming a new writer is published only after that writer's promotion succeeded.
* Exactly one writer per epoch; the epoch only grows.
* After a failure the plan is held back until ``retry_at`` (a :class:`Tick` past it resumes).
* Only the candidate's own failure to promote is its fault (it is fenced and the next one
  tried); a failed infrastructure step (hypervisor role switch) keeps the candidate and is
  retried, so a broken hypervisor never fences healthy readers one by one.
* A node that is ``out`` comes back only when it reports itself a reader of the current
  epoch with no failed self-test (it was demoted or restarted); an agent still at an older
  epoch (a fenced writer that came back, paused or partitioned) is demoted first. A fenced
  writer whose device fails therefore stays out instead of flapping in and out of sync.
* A node that keeps failing does not flap: confirmed dead ``flap_limit`` times within
  ``flap_window``, it may rejoin only after a hold that doubles with each further death
  (``last_error`` says so, and the service reports it).
* A demotion that failed is not retried on the next heartbeat but after a backoff that doubles
  per failure (``ElectionConfig.demote_backoff`` up to ``demote_backoff_max``): every probe
  answer of a stale writer used to re-queue it, and a refusing hypervisor then saw 7-14
  demotions in 0.6 s.
* A reader is handed to clients (``in_sync``) only on the writer's word that it waits for
  that reader (:class:`WriterSyncObserved`), never on the reader's own applied seq: the map
  must never promise a reader the writer may acknowledge writes without. The writer's word is
  ordered by its ``sync_revision``; a report older than a lagging report already folded in
  changes nothing. A reader this coordinator took out on its own (confirmed dead, fenced) is
  admitted again only on a word *newer* than the newest it had seen then
  (``sync_floor``): the writer keeps repeating its last in-sync set until it learns of the
  removal, and that stale word had re-admitted a quickly restarted reader just before the
  writer retired its link and acknowledged writes without it (stale reads, seen with
  readers confirmed dead on refused probes). A coordinator taking over has not seen its
  predecessor's floor: for every node out in the map it loads, the first word it sees is
  the floor (``floor_at_first_word``).

What a holder of this state may assume (kazoo's habit): ``map`` is the intended map; when
``map.phase == "failover"``, clients must not be sent to ``map.writer`` yet, and nodes in
``to_fence`` may still be writing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from orchestrator.core.fleetmap import FleetMap, Member
from orchestrator.errors import IllegalFleetTransition

# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class ElectionConfig:
    """``retry_delay``: seconds to hold a failed plan before trying again;
    ``demote_backoff``/``demote_backoff_max``: first and longest wait after a failed
    demotion of a node; ``release_backoff``/``release_backoff_max``: the same for a failed
    release of a fenced node's read-write disk; a node confirmed dead ``flap_limit`` times
    within ``flap_window`` seconds is kept out for ``rejoin_hold`` seconds, doubled at each
    further death (up to ``rejoin_hold_max``), before it may rejoin."""

    retry_delay: float = 0.3
    demote_backoff: float = 0.5
    demote_backoff_max: float = 8.0
    release_backoff: float = 1.0
    release_backoff_max: float = 30.0
    flap_limit: int = 3
    flap_window: float = 120.0
    rejoin_hold: float = 10.0
    rejoin_hold_max: float = 600.0


# -- actions (imperative) ---------------------------------------------------------------


@dataclass(frozen=True)
class PersistEpoch:
    """Guarded write of ``map`` (a new epoch) to the state store before anything else."""

    map: FleetMap


@dataclass(frozen=True)
class FenceNode:
    """Cut ``node`` from the shared image (blocklist / power off); must succeed before promote."""

    node: str
    epoch: int


@dataclass(frozen=True)
class GrantWritePath:
    """Give ``node`` a write-capable disk (hypervisor: its disk read-write) for ``epoch``;
    every node that held one before is fenced in Ceph already, so theirs may stay for now."""

    node: str
    epoch: int


@dataclass(frozen=True)
class PromoteNode:
    """Make ``node`` the writer at ``epoch`` (the agent reopens its disk read-write, replays
    the journal's tail and accepts writes)."""

    node: str
    epoch: int
    address: str


@dataclass(frozen=True)
class PublishMap:
    """Persist (guarded) and announce ``map`` to watchers and clients."""

    map: FleetMap


@dataclass(frozen=True)
class AttachSpare:
    """Attach the image read-only to spare ``node`` and start its agent (it then catches up)."""

    node: str
    epoch: int
    address: str


@dataclass(frozen=True)
class ReleaseWritePath:
    """Background: re-attach fenced ``node``'s disk ``<readonly/>`` (its read-write one goes),
    after the map naming the new writer is published."""

    node: str
    epoch: int


@dataclass(frozen=True)
class DemoteNode:
    """Tell a stale writer (older epoch) to step down; best effort, it is fenced already."""

    node: str
    epoch: int
    address: str


Action = (PersistEpoch | FenceNode | GrantWritePath | PromoteNode | PublishMap | AttachSpare
          | ReleaseWritePath | DemoteNode)

ACTION_ORDER: tuple[type, ...] = (
    PersistEpoch,
    FenceNode,
    GrantWritePath,
    PromoteNode,
    PublishMap,
    AttachSpare,
    ReleaseWritePath,
    DemoteNode,
)
# what a failover waits for before clients may be sent to the new writer
CRITICAL_PATH: tuple[type, ...] = (PersistEpoch, FenceNode, GrantWritePath, PromoteNode,
                                   PublishMap)
# run aside (the service's side threads), never holding up the loop or a failover
BACKGROUND: tuple[type, ...] = (ReleaseWritePath, DemoteNode)


def is_background(action: Action) -> bool:
    """Whether ``action`` runs aside, off the critical path (:data:`BACKGROUND`)."""
    return isinstance(action, BACKGROUND)


# -- events (past tense) --------------------------------------------------------------------


@dataclass(frozen=True)
class NodeFailed:
    """The liveness detector confirmed ``node`` dead."""

    node: str
    at: float


@dataclass(frozen=True)
class HeartbeatObserved:
    """An agent told its role, epoch and last applied seq (heartbeat or probe answer)."""

    node: str
    role: str
    epoch: int
    applied_seq: int
    at: float
    selftest: str = "ok"  # "ok" | "failed" | "pending", as the agent reports it


@dataclass(frozen=True)
class ReaderLagging:
    """The writer reports ``node`` did not ack in time: stop handing it out.

    ``epoch``/``sync_revision``: the writer's epoch and the revision of its in-sync set after
    it dropped ``node`` (0 when unknown)."""

    node: str
    at: float
    epoch: int = 0
    sync_revision: int = 0


@dataclass(frozen=True)
class WriterSyncObserved:
    """The writer of ``epoch`` waits for the acks of exactly ``in_sync`` (its heartbeat or
    probe answer), as of its in-sync set's ``sync_revision``."""

    writer: str
    epoch: int
    sync_revision: int
    in_sync: frozenset[str]
    at: float


@dataclass(frozen=True)
class FailoverRequested:
    """Operator: move the write grant to ``to`` (None: the best in-sync reader)."""

    to: str | None
    at: float


@dataclass(frozen=True)
class FenceRequested:
    """Operator: fence ``node`` (a writer is replaced, a reader is taken out)."""

    node: str
    at: float


@dataclass(frozen=True)
class BatchExecuted:
    """The executor ran a batch: ``done`` succeeded in order, ``failed`` (if any) stopped it.

    ``infrastructure``: the failed step is the hypervisor's or Ceph's (a role switch that
    could not re-attach a disk), not the node's own answer: nobody is to blame for it.
    """

    done: tuple[Action, ...]
    failed: Action | None
    reason: str
    at: float
    infrastructure: bool = False


@dataclass(frozen=True)
class Tick:
    """Time passed; resumes a held-back plan."""

    now: float


Event = (
    NodeFailed
    | HeartbeatObserved
    | ReaderLagging
    | WriterSyncObserved
    | FailoverRequested
    | FenceRequested
    | BatchExecuted
    | Tick
)

# -- state ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElectionState:
    """Intended map + which steps towards it are confirmed (see module docstring)."""

    map: FleetMap
    persisted_epoch: int
    published_revision: int
    promoted: bool = True
    path_granted: bool = True  # the named candidate has its write-capable disk
    to_fence: frozenset[str] = frozenset()
    to_attach: frozenset[str] = frozenset()
    to_demote: frozenset[str] = frozenset()
    # fenced nodes whose read-write disk is still to be released (background)
    to_release: frozenset[str] = frozenset()
    retry_at: float | None = None
    last_error: str = ""
    config: ElectionConfig = field(default_factory=ElectionConfig)
    # node -> (not before, last delay): demotions held back after a failure
    demote_hold: tuple[tuple[str, float, float], ...] = ()
    # failed releases: node -> (not before, last delay, attempts, last reason)
    release_retry: tuple[tuple[str, float, float, int, str], ...] = ()
    # node -> epoch it was last demoted to: answers of that node from an older epoch were on
    # the wire before it stepped down and ask for nothing more
    demoted: tuple[tuple[str, int], ...] = ()
    # (epoch, revision) of the newest writer word on its in-sync set folded in
    sync_seen: tuple[int, int] = (0, 0)
    # node -> the writer's (epoch, revision) newest seen when this coordinator took the node
    # out of the in-sync set itself: no word up to that one may put it back
    sync_floor: tuple[tuple[str, tuple[int, int]], ...] = ()
    # nodes out when this coordinator took over: the predecessor's floor is lost, so the first
    # writer word this one sees becomes their floor (that word may predate their removal)
    floor_at_first_word: frozenset[str] = frozenset()
    # node -> times it was confirmed dead within the flap window
    deaths: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # node -> time before which it may not rejoin (it keeps failing)
    held_out: tuple[tuple[str, float], ...] = ()


def resume(persisted: FleetMap, config: ElectionConfig | None = None) -> ElectionState:
    """State of a coordinator that just became active with ``persisted`` loaded from the store.

    A map persisted mid-failover is resumed from the fence: the predecessor coordinator may
    have fenced and promoted already, but fencing and promotion are idempotent and the new
    coordinator cannot know, so it does both again before publishing.
    """
    cfg = config or ElectionConfig()
    # The predecessor may have died before releasing a fenced writer's disk: every out node
    # is released again (a no-op for one that holds it read-only already).
    out = frozenset(m.name for m in persisted.members if m.role == "out")
    if persisted.phase == "failover":
        return ElectionState(
            map=persisted,
            persisted_epoch=persisted.epoch,
            published_revision=persisted.revision,
            promoted=persisted.writer is None,
            path_granted=persisted.writer is None,
            to_fence=out,
            to_release=out,
            floor_at_first_word=out,
            config=cfg,
        )
    return ElectionState(
        map=persisted,
        persisted_epoch=persisted.epoch,
        published_revision=persisted.revision,
        to_release=out,
        floor_at_first_word=out,
        config=cfg,
    )


def target_map(state: ElectionState) -> FleetMap:
    """The map to publish once every pending step is done."""
    m = state.map
    if m.phase == "failover" and m.writer is not None:
        return m.complete_failover()
    return m


def critical_path(state: ElectionState) -> list[Action]:
    """The steps still needed before clients may be sent to the new writer, in law order."""
    m = state.map
    actions: list[Action] = []
    if m.epoch > state.persisted_epoch:
        actions.append(PersistEpoch(m))
    actions.extend(FenceNode(n, m.epoch) for n in sorted(state.to_fence))
    if m.phase == "failover" and m.writer is not None and not state.promoted:
        if not state.path_granted:
            actions.append(GrantWritePath(m.writer, m.epoch))
        actions.append(PromoteNode(m.writer, m.epoch, m.member(m.writer).address))
    final = target_map(state)
    if final.revision > state.published_revision:
        actions.append(PublishMap(final))
    return actions


def plan(state: ElectionState, now: float | None = None) -> list[Action]:
    """The actions still needed to reach ``target_map(state)``, in law order.

    Releases wait until the critical path is done (the map published) and, after a failure,
    until their backoff is over at ``now`` (None: list them regardless, e.g. for status).
    """
    m = state.map
    critical = critical_path(state)
    actions = list(critical)
    for n in sorted(state.to_attach):
        actions.append(AttachSpare(n, m.epoch, m.member(n).address))
    if not critical:
        held = {n: nb for n, nb, *_ in state.release_retry}
        # a node being demoted is re-attached read-only by its demotion already
        actions.extend(ReleaseWritePath(n, m.epoch)
                       for n in sorted(state.to_release - state.to_demote)
                       if now is None or now >= held.get(n, now))
    for n in sorted(state.to_demote):
        actions.append(DemoteNode(n, m.epoch, m.member(n).address))
    return actions


def step(state: ElectionState, event: Event) -> tuple[ElectionState, list[Action]]:
    """Fold ``event`` in and return the new state and the actions to run now (maybe none)."""
    now = _time_of(event)
    if isinstance(event, NodeFailed):
        state = _node_failed(_count_death(state, event), event.node)
    elif isinstance(event, HeartbeatObserved):
        state = _heartbeat(state, event)
    elif isinstance(event, ReaderLagging):
        state = _reader_lagging(state, event)
    elif isinstance(event, WriterSyncObserved):
        state = _writer_sync(state, event)
    elif isinstance(event, FailoverRequested):
        state = _failover_requested(state, event.to)
    elif isinstance(event, FenceRequested):
        state = _fence_requested(state, event.node)
    elif isinstance(event, BatchExecuted):
        state = _batch_executed(state, event)
    state = _elect_if_writerless(state)
    if state.retry_at is not None and now < state.retry_at:
        return state, []
    if state.retry_at is not None:
        state = replace(state, retry_at=None)
    return state, plan(state, now)


# -- transitions ----------------------------------------------------------------------------


def _time_of(event: Event) -> float:
    return event.now if isinstance(event, Tick) else event.at


def _elect_if_writerless(state: ElectionState) -> ElectionState:
    """A fleet left without writer (no reader was in sync) elects one as soon as it can."""
    m = state.map
    if m.phase != "failover" or m.writer is not None or state.to_fence:
        return state
    if m.promotion_candidate() is None:
        return state
    return _fail_over(state, frozenset(), None)


def _fail_over(state: ElectionState, fence: frozenset[str], to: str | None) -> ElectionState:
    """Start a failover away from the current writer (if any), fencing ``fence`` first."""
    m = state.map
    to_fence = state.to_fence | fence
    # the fenced writer (or candidate) may hold a read-write disk: released once published
    to_release = state.to_release | (fence & {m.writer})
    if to is None:
        cand = m.promotion_candidate(exclude=to_fence)
        to = cand.name if cand is not None else None
    if to is None:
        if m.writer is None:
            return replace(state, to_fence=to_fence, to_release=to_release,
                           last_error="no eligible writer")
        new = m.remove_writer()
        return replace(state, map=new, to_fence=to_fence, to_release=to_release, promoted=True,
                       path_granted=True, last_error="no eligible writer")
    if to in to_fence:
        raise IllegalFleetTransition(to, "fenced", "writer", "a node being fenced cannot write")
    new = m.begin_failover(to)
    return replace(
        state,
        map=new,
        to_fence=to_fence,
        promoted=False,
        path_granted=False,
        to_demote=state.to_demote - {to},
        to_release=to_release - {to},
        release_retry=tuple(r for r in state.release_retry if r[0] != to),
        last_error="",
    )


def _count_death(state: ElectionState, ev: NodeFailed) -> ElectionState:
    """Remember ``ev``; a node that keeps dying is held out before it may rejoin."""
    cfg = state.config
    if not state.map.has(ev.node) or state.map.member(ev.node).role == "out":
        return state
    recent = dict(state.deaths).get(ev.node, ())
    times = (*(t for t in recent if ev.at - t < cfg.flap_window), ev.at)
    deaths = (*(d for d in state.deaths if d[0] != ev.node), (ev.node, times))
    state = replace(state, deaths=deaths)
    if len(times) < cfg.flap_limit:
        return state
    hold = min(cfg.rejoin_hold * 2 ** (len(times) - cfg.flap_limit), cfg.rejoin_hold_max)
    held = (*(h for h in state.held_out if h[0] != ev.node), (ev.node, ev.at + hold))
    return replace(state, held_out=held, last_error=(
        f"{ev.node} confirmed dead {len(times)} times in {cfg.flap_window:.0f} s: kept out "
        f"for {hold:.0f} s"))


def _node_failed(state: ElectionState, node: str) -> ElectionState:
    m = state.map
    if not m.has(node):
        return state
    member = m.member(node)
    if member.role == "out":
        return state
    if member.role == "writer":
        return _fail_over(state, frozenset({node}), None)
    if member.role == "spare":
        return replace(state, map=m.set_role(node, "out"), to_attach=state.to_attach - {node})
    return _reader_out(state, node)


def _reader_out(state: ElectionState, node: str) -> ElectionState:
    """Route clients around reader ``node`` at once; replace it with a spare if there is one.
    Only a word of the writer newer than the newest seen now may admit it again."""
    floor = (*(f for f in state.sync_floor if f[0] != node), (node, state.sync_seen))
    state = replace(state, sync_floor=floor)
    new = state.map.set_role(node, "out")
    to_attach = state.to_attach - {node}
    spare = next((s for s in new.members if s.role == "spare"), None)
    if spare is not None:
        new = new.set_role(spare.name, "reader", in_sync=False)
        to_attach = to_attach | {spare.name}
    return replace(state, map=new, to_attach=to_attach)


def _heartbeat(state: ElectionState, hb: HeartbeatObserved) -> ElectionState:
    m = state.map
    if not m.has(hb.node):
        return state
    member = m.member(hb.node)
    if hb.role == "writer" and member.role != "writer":
        # A writer of an older epoch is alive: it is (or will be) fenced; make it step down.
        return _demote_later(state, hb, hb.at)
    if member.role == "writer":
        if m.phase == "stable" and hb.epoch == m.epoch:
            return replace(state, map=_with_seq(m, member, hb.applied_seq))
        return state
    if member.role == "out":
        if hb.node in state.to_fence:
            return state
        if hb.epoch < m.epoch:
            # Stale (a fenced writer that came back steps down by itself, at its old epoch):
            # demote it to this epoch (read-only disk, reader role) before it may rejoin.
            return _demote_later(state, hb, hb.at)
        if hb.role != "reader" or hb.selftest == "failed":
            return state
        if hb.at < dict(state.held_out).get(hb.node, 0.0):
            return state  # it keeps failing: no rejoin before its hold is over
        m = m.set_role(hb.node, "reader", in_sync=False)
        member = m.member(hb.node)
    if member.role != "reader" or hb.role != "reader":
        return replace(state, map=m)
    if m.writer is None and not member.in_sync \
            and hb.applied_seq >= max((r.applied_seq for r in m.in_sync_readers()), default=0):
        # No writer can vouch for anyone, and none acknowledges writes meanwhile: a reader as
        # far along the journal as any in-sync one may be handed out (and elected).
        m = m.set_progress(hb.node, hb.applied_seq, True)
    else:
        m = _with_seq(m, member, hb.applied_seq)
    return replace(state, map=m, to_attach=state.to_attach - {hb.node})


def _demote_later(state: ElectionState, hb: HeartbeatObserved, at: float) -> ElectionState:
    """Queue a demotion of ``hb.node`` unless a failed one holds it back until later, or it
    was demoted past the epoch it speaks from already."""
    held = {n: nb for n, nb, _ in state.demote_hold}
    if hb.node in held and at < held[hb.node]:
        return state
    if hb.epoch < dict(state.demoted).get(hb.node, 0):
        return state
    return replace(state, to_demote=state.to_demote | {hb.node})


def _demote_failed(state: ElectionState, node: str, at: float) -> ElectionState:
    cfg = state.config
    last = {n: delay for n, _, delay in state.demote_hold}.get(node)
    delay = cfg.demote_backoff if last is None else min(last * 2, cfg.demote_backoff_max)
    hold = (*(h for h in state.demote_hold if h[0] != node), (node, at + delay, delay))
    return replace(state, to_demote=state.to_demote - {node}, demote_hold=hold)


def _release_failed(state: ElectionState, node: str, at: float, reason: str) -> ElectionState:
    """Keep ``node`` to release; try again after a backoff that doubles per failure."""
    cfg = state.config
    last = {r[0]: r for r in state.release_retry}.get(node)
    delay = cfg.release_backoff if last is None else min(last[2] * 2, cfg.release_backoff_max)
    attempts = 1 if last is None else last[3] + 1
    retry = (*(r for r in state.release_retry if r[0] != node),
             (node, at + delay, delay, attempts, reason))
    return replace(state, release_retry=retry)


def _released(state: ElectionState, node: str) -> ElectionState:
    return replace(state, to_release=state.to_release - {node},
                   release_retry=tuple(r for r in state.release_retry if r[0] != node))


def _with_seq(m: FleetMap, member: Member, seq: int) -> FleetMap:
    """Record an advisory applied seq without a new revision (not worth announcing)."""
    if member.applied_seq == seq:
        return m
    members = tuple(replace(x, applied_seq=seq) if x.name == member.name else x for x in m.members)
    return replace(m, members=members)


def _reader_lagging(state: ElectionState, ev: ReaderLagging) -> ElectionState:
    if ev.epoch:
        state = replace(state, sync_seen=max(state.sync_seen, (ev.epoch, ev.sync_revision)))
    m = state.map
    if not m.has(ev.node) or m.member(ev.node).role != "reader" or not m.member(ev.node).in_sync:
        return state
    member = m.member(ev.node)
    return replace(state, map=m.set_progress(ev.node, member.applied_seq, False))


def _writer_sync(state: ElectionState, ev: WriterSyncObserved) -> ElectionState:
    """Make the map's in-sync readers exactly those the current writer waits for."""
    m = state.map
    if m.phase != "stable" or m.writer != ev.writer or m.epoch != ev.epoch:
        return state
    if (ev.epoch, ev.sync_revision) < state.sync_seen:
        return state  # older than a lagging report already folded in
    if state.floor_at_first_word:
        word = (ev.epoch, ev.sync_revision)
        state = replace(state, floor_at_first_word=frozenset(), sync_floor=(
            *(f for f in state.sync_floor if f[0] not in state.floor_at_first_word),
            *((n, word) for n in sorted(state.floor_at_first_word))))
    state = replace(state, sync_seen=(ev.epoch, ev.sync_revision))
    floor = dict(state.sync_floor)
    for member in m.members:
        vouched = member.name in ev.in_sync \
            and (ev.epoch, ev.sync_revision) > floor.get(member.name, (0, 0))
        if member.role == "reader" and member.in_sync != vouched:
            m = m.set_progress(member.name, member.applied_seq, vouched)
    return replace(state, map=m, to_attach=state.to_attach - ev.in_sync)


def _failover_requested(state: ElectionState, to: str | None) -> ElectionState:
    m = state.map
    if m.phase != "stable" or state.to_fence:
        raise IllegalFleetTransition(m.fleet, m.phase, "failover", "a failover is in progress")
    if m.writer is None:
        raise IllegalFleetTransition(m.fleet, "no writer", "failover")
    if to is not None and not m.has(to):
        raise IllegalFleetTransition(to, "absent", "writer", "not a member")
    if to is not None and m.member(to).role == "writer":
        raise IllegalFleetTransition(to, "writer", "writer", "already the writer")
    return _fail_over(state, frozenset({m.writer}), to)


def _fence_requested(state: ElectionState, node: str) -> ElectionState:
    m = state.map
    if not m.has(node):
        raise IllegalFleetTransition(node, "absent", "fenced", "not a member")
    member = m.member(node)
    if member.role == "writer":
        # The writer (or, mid-failover, the named candidate) is cut: another one is chosen.
        return _fail_over(state, frozenset({node}), None)
    state = replace(state, to_fence=state.to_fence | {node})
    if member.role == "reader":
        return _reader_out(state, node)
    if member.role == "spare":
        return replace(state, map=m.set_role(node, "out"), to_attach=state.to_attach - {node})
    return state


def _batch_executed(state: ElectionState, ev: BatchExecuted) -> ElectionState:
    for action in ev.done:
        if isinstance(action, PersistEpoch):
            state = replace(state, persisted_epoch=max(state.persisted_epoch, action.map.epoch))
        elif isinstance(action, FenceNode):
            state = replace(state, to_fence=state.to_fence - {action.node})
        elif isinstance(action, GrantWritePath):
            if state.map.writer == action.node and state.map.epoch == action.epoch:
                state = replace(state, path_granted=True)
        elif isinstance(action, PromoteNode):
            if state.map.writer == action.node and state.map.epoch == action.epoch:
                state = replace(state, promoted=True)
        elif isinstance(action, PublishMap):
            published = action.map
            state = replace(
                state,
                published_revision=max(state.published_revision, published.revision),
                persisted_epoch=max(state.persisted_epoch, published.epoch),
            )
            if state.map.phase == "failover" and target_map(state) == published:
                state = replace(state, map=published)
        elif isinstance(action, AttachSpare):
            state = replace(state, to_attach=state.to_attach - {action.node})
        elif isinstance(action, ReleaseWritePath):
            state = _released(state, action.node)
        else:
            # a demotion re-attached the disk read-only too: nothing left to release
            state = replace(_released(state, action.node),
                            to_demote=state.to_demote - {action.node},
                            demote_hold=tuple(h for h in state.demote_hold
                                              if h[0] != action.node),
                            demoted=(*(d for d in state.demoted if d[0] != action.node),
                                     (action.node, action.epoch)))
    failed = ev.failed
    if failed is None:
        return replace(state, last_error="")
    if isinstance(failed, ReleaseWritePath):
        # Background: the failover stands; only this release waits for its backoff.
        return replace(_release_failed(state, failed.node, ev.at, ev.reason),
                       last_error=f"release of {failed.node}'s read-write disk: {ev.reason}")
    state = replace(state, retry_at=ev.at + state.config.retry_delay, last_error=ev.reason)
    if isinstance(failed, PromoteNode) and state.map.writer == failed.node \
            and not ev.infrastructure:
        # The candidate could not take the grant: it may have started promoting, so it is
        # fenced too and another in-sync reader gets the next epoch. (When the hypervisor
        # could not switch the disks instead, the candidate never got the grant and did
        # nothing wrong: it is kept and the step retried; another would meet the same.)
        state = _fail_over(state, frozenset({failed.node}), None)
    elif isinstance(failed, DemoteNode):
        # Best effort: a fenced stale writer that cannot be reached needs no demotion now; it
        # is tried again once it is heard from after the backoff.
        state = replace(_demote_failed(state, failed.node, ev.at), retry_at=None)
    return state


def assert_law_order(actions: list[Action]) -> None:
    """Raise IllegalFleetTransition when ``actions`` break the law order (tests, executor)."""
    for first, then in itertools.pairwise(actions):
        if ACTION_ORDER.index(type(then)) < ACTION_ORDER.index(type(first)):
            raise IllegalFleetTransition(
                "actions", type(first).__name__, type(then).__name__, "out of law order"
            )


__all__ = [
    "ACTION_ORDER",
    "BACKGROUND",
    "CRITICAL_PATH",
    "Action",
    "AttachSpare",
    "BatchExecuted",
    "DemoteNode",
    "ElectionConfig",
    "ElectionState",
    "Event",
    "FailoverRequested",
    "FenceNode",
    "FenceRequested",
    "GrantWritePath",
    "HeartbeatObserved",
    "NodeFailed",
    "PersistEpoch",
    "PromoteNode",
    "PublishMap",
    "ReaderLagging",
    "ReleaseWritePath",
    "Tick",
    "WriterSyncObserved",
    "assert_law_order",
    "critical_path",
    "is_background",
    "plan",
    "resume",
    "step",
    "target_map",
]
