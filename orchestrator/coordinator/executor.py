"""Runs the election's actions in the order given and stops at the first failure.

The order is the law (persist -> fence -> write path -> promote -> publish, then the
background steps the service runs aside: release a fenced writer's read-write disk, demote a
stale writer): this module never reorders,
skips or retries; it reports which actions succeeded and which one failed, and the election
decides what comes next. Before every action other than a store write the lease is renewed,
so a coordinator that lost its lease (paused, partitioned) stops before touching a node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from agents.core.grants import DEMOTE, PROMOTE, READERS
from agents.core.protocol import DemoteRequest, PromoteRequest, ReaderAddress, ReaderSet
from agents.errors import RbdfleetError
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.core import election as el
from orchestrator.core.fleetmap import FleetMap
from orchestrator.errors import (
    LeaseLost,
    NoSpareProvisioner,
    RoleSwitchFailed,
    StaleMap,
)
from orchestrator.ports import CoordinatorPorts

LOG = logging.getLogger(__name__)

CONTROL_GRANT_TTL = 10.0


@runtime_checkable
class PreparesWritePath(Protocol):
    """A role switch that can start a candidate's write path before the fence is done,
    without giving it one (write_path.FencedWriterRoles: its read-only disk goes)."""

    def prepare_writer(self, node: str) -> None: ...


class _Preparation:
    """``prepare_writer(node)`` on a thread of its own, beside the fence; its failure is
    only logged (``make_writer`` then does the whole switch itself)."""

    def __init__(self, switch: PreparesWritePath, node: str) -> None:
        self.node = node
        self._switch = switch
        self._thread = threading.Thread(target=self._run, name=f"prepare-{node}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._switch.prepare_writer(self.node)
        except RbdfleetError as exc:
            LOG.warning("event=write_path_prepare_failed node=%s reason=%s", self.node, exc)
            return
        LOG.info("event=write_path_prepared node=%s seconds=%.3f", self.node,
                 time.monotonic() - started)

    def join(self) -> None:
        self._thread.join()


@dataclass(frozen=True)
class BatchResult:
    """Actions that succeeded (in order), the one that failed (or None) and why."""

    done: tuple[el.Action, ...]
    failed: el.Action | None
    reason: str
    lease_lost: bool = False
    infrastructure: bool = False  # the failure is the hypervisor's, not the node's


class Executor:
    """Executes actions of one fleet against the ports; one instance per active term."""

    def __init__(
        self,
        ports: CoordinatorPorts,
        *,
        keys: FleetKeys,
        announce: Callable[[FleetMap], None],
        persisted: FleetMap,
        on_done: Callable[[el.Action], None] | None = None,
    ) -> None:
        """``ports``: the store, fencer, agents and optional role switch, spares and reader-set
        sender the actions run through (its clocks are not used here)."""
        self.ports = ports
        self.keys = keys
        self.announce = announce
        self.persisted = persisted
        self.on_done = on_done

    def control_grant(self, node: str, purpose: str, epoch: int) -> str:
        """A grant for ``node`` to act on one control request (promote, demote, readers)."""
        return self.keys.grant(node, purpose, epoch, CONTROL_GRANT_TTL)

    def run(self, actions: list[el.Action]) -> BatchResult:
        """Run ``actions`` in order; stop at the first failure.

        A batch that fences and then grants a write path starts the candidate's preparation
        (:class:`PreparesWritePath`) beside its first fence, once the new epoch is persisted
        and the lease renewed; the grant waits for it, and so does the end of the batch (a
        batch stopped at a failed fence leaves no hot-plug running behind it)."""
        el.assert_law_order(actions)
        # this batch's own (side threads run batches of background steps on this executor)
        preparation: list[_Preparation] = []
        try:
            return self._run_all(actions, preparation)
        finally:
            for started in preparation:
                started.join()

    def _run_all(self, actions: list[el.Action], preparation: list[_Preparation]
                 ) -> BatchResult:
        done: list[el.Action] = []
        for action in actions:
            try:
                if not isinstance(action, el.PersistEpoch | el.PublishMap):
                    self.ports.store.acquire()  # renew; LeaseLost if it ran out: touch nothing
                switch = self.ports.role_switch
                grant = next((a for a in actions if isinstance(a, el.GrantWritePath)), None)
                if isinstance(action, el.FenceNode) and grant is not None and not preparation \
                        and isinstance(switch, PreparesWritePath):
                    preparation.append(_Preparation(switch, grant.node))
                elif isinstance(action, el.GrantWritePath):
                    for started in preparation:  # its read-only disk is on its way out
                        started.join()
                self._run_one(action)
            except (LeaseLost, StaleMap) as exc:
                LOG.error("event=action_refused action=%s reason=%s", _name(action), exc)
                return BatchResult(tuple(done), action, str(exc), lease_lost=True)
            except RoleSwitchFailed as exc:
                LOG.warning("event=action_failed action=%s infrastructure=true reason=%s",
                            _name(action), exc)
                return BatchResult(tuple(done), action, str(exc), infrastructure=True)
            except RbdfleetError as exc:
                LOG.warning("event=action_failed action=%s reason=%s", _name(action), exc)
                return BatchResult(tuple(done), action, str(exc))
            LOG.info("event=action_done action=%s", _name(action))
            done.append(action)
            if self.on_done is not None:
                self.on_done(action)
        return BatchResult(tuple(done), None, "")

    def _save(self, new: FleetMap) -> None:
        if new.revision == self.persisted.revision and new == self.persisted:
            return
        self.ports.store.save(new, self.persisted.revision)
        self.persisted = new

    def _run_one(self, action: el.Action) -> None:
        fleet = self.ports.store.fleet
        if isinstance(action, el.PersistEpoch):
            self._save(action.map)
        elif isinstance(action, el.FenceNode):
            self.ports.fencer.fence(action.node)
        elif isinstance(action, el.GrantWritePath):
            if self.ports.role_switch is not None:
                try:
                    self.ports.role_switch.make_writer(action.node)
                except RbdfleetError as exc:
                    raise RoleSwitchFailed(f"role switch to {action.node}: {exc}") from exc
        elif isinstance(action, el.PromoteNode):
            m = self.persisted
            readers = [r for r in m.members if r.role == "reader" and r.name != action.node]
            promote = PromoteRequest(
                fleet=fleet, node=action.node, epoch=action.epoch,
                readers=tuple(ReaderAddress(r.name, r.address) for r in readers),
                in_sync=tuple(r.name for r in readers if r.in_sync),
                push_grants=self.keys.push_grants(m, writer=action.node, epoch=action.epoch))
            grant = self.control_grant(action.node, PROMOTE, action.epoch)
            self.ports.agents.promote(action.address, promote, grant)
        elif isinstance(action, el.PublishMap):
            self._save(action.map)
            self.announce(action.map)
            self._tell_writer(action.map)
        elif isinstance(action, el.AttachSpare):
            if self.ports.spares is None:
                raise NoSpareProvisioner(f"no spare provisioner to attach {action.node}")
            self.ports.spares.attach_spare(action.node)
        elif isinstance(action, el.ReleaseWritePath):
            if self.ports.role_switch is not None:
                try:
                    self.ports.role_switch.make_reader(action.node)
                except RbdfleetError as exc:
                    raise RoleSwitchFailed(f"read-only re-attach of {action.node}: {exc}") \
                        from exc
        else:
            self._demote(action)

    def _demote(self, action: el.DemoteNode) -> None:
        """Hypervisor first (the fenced read-write disk goes, a ``<readonly/>`` one comes, so
        the agent reopens a disk it can read), then the agent; both best effort."""
        switch_error: RbdfleetError | None = None
        if self.ports.role_switch is not None:
            try:
                self.ports.role_switch.make_reader(action.node)
            except RbdfleetError as exc:  # e.g. still paused: its disk stays fenced meanwhile
                switch_error = exc
        m = self.persisted
        writer_address = m.member(m.writer).address if m.writer else None
        request = DemoteRequest(fleet=self.ports.store.fleet, node=action.node,
                                epoch=action.epoch, writer=m.writer,
                                writer_address=writer_address)
        self.ports.agents.demote(action.address, request,
                                 self.control_grant(action.node, DEMOTE, action.epoch))
        if switch_error is not None:
            raise RoleSwitchFailed(f"read-only re-attach of {action.node}: {switch_error}") \
                from switch_error

    def _tell_writer(self, m: FleetMap) -> None:
        """Best effort: the writer learns the readers to push to (it also gets them per put)."""
        if self.ports.send_reader_set is None or m.writer is None or m.phase != "stable":
            return
        readers = tuple(ReaderAddress(r.name, r.address) for r in m.members if r.role == "reader")
        request = ReaderSet(fleet=m.fleet, epoch=m.epoch, readers=readers,
                            push_grants=self.keys.push_grants(m))
        try:
            self.ports.send_reader_set(
                m.member(m.writer).address, request,
                self.control_grant(m.writer, READERS, m.epoch),
            )
        except RbdfleetError as exc:
            LOG.warning("event=reader_set_not_sent writer=%s reason=%s", m.writer, exc)


def _name(action: el.Action) -> str:
    node = getattr(action, "node", None)
    epoch = getattr(action, "epoch", None)
    if node is None:
        m = action.map  # type: ignore[union-attr]
        return f"{type(action).__name__}(epoch={m.epoch},rev={m.revision},writer={m.writer})"
    return f"{type(action).__name__}({node},epoch={epoch})"


__all__ = ["BatchResult", "Executor"]
