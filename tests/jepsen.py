"""The fault tier's generator and checks: client threads over a real fleet, a history, a verdict.

Generator: writer threads put unique values to a few keys, reader threads get them back, the
key choices drawn from one seeded stream (:data:`SEED`, from ``RBDFLEET_TEST_SEED`` to replay a
run, else random). Every op is recorded in an :class:`~orchestrator.testing.history.History`:
invoke, then ok / fail / unknown, with the epoch seen: the epoch and node that acknowledged a
write; for a read, or a write that failed or whose outcome is unknown, the epoch of the map
the client last used (:class:`EpochSeen`) and the node that served the read.

:func:`assert_history_clean` runs every checker over the history plus a final read of each
key, and names the seed in any failure. It also feeds the checkers the same history with one
acknowledged write lost, and fails if they do not notice: a checker that cannot fail proves
nothing.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from dataclasses import replace

from agents.errors import AgentError, NotFound, RbdfleetError
from orchestrator.client import (
    CoordinatorClient,
    FleetClient,
    RequestOutcomeUnknown,
    RetryPolicy,
    Targets,
)
from orchestrator.testing.history import History, Op, check_all

SEED = int(os.environ.get("RBDFLEET_TEST_SEED") or random.SystemRandom().randrange(100000))
KEYS = tuple(f"/k{i}" for i in range(4))


class EpochSeen(CoordinatorClient):
    """A CoordinatorClient that remembers, per thread, the epoch of the last targets it got."""

    def __init__(self, urls: list[str], fleet: str, secret: bytes) -> None:
        super().__init__(urls, fleet, secret)
        self._seen = threading.local()

    def targets(self, kind: str, path: str) -> Targets:
        """The targets, noting their epoch for this thread."""
        found = super().targets(kind, path)
        self._seen.epoch = found.epoch
        return found

    def last_epoch(self) -> int | None:
        """The epoch of the last targets this thread got (None before any)."""
        epoch: int | None = getattr(self._seen, "epoch", None)
        return epoch


def recording_client(
    urls: list[str],
    fleet: str,
    secret: bytes,
    *,
    io_timeout: float = 10.0,
    retry_timeout: float = 30.0,
) -> FleetClient:
    """A client for :class:`Workload`: follows the map for ``retry_timeout`` seconds, notes
    the epoch each op used."""
    retry = RetryPolicy(timeout=retry_timeout)
    return FleetClient(EpochSeen(urls, fleet, secret), retry=retry, io_timeout=io_timeout)


class Workload:
    """Writers and readers over :data:`KEYS`, recording a history until :meth:`finish`."""

    def __init__(self, client: FleetClient, history: History, seed: int) -> None:
        self.client = client
        self.history = history
        self.seed = seed
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.counter = itertools.count()
        self.threads: list[threading.Thread] = []
        self.acks: list[tuple[float, str, int]] = []  # (monotonic time, node, epoch)
        seen = client.coordinator
        self._epoch = seen.last_epoch if isinstance(seen, EpochSeen) else lambda: None

    def start(self, writers: int = 2, readers: int = 2) -> None:
        """Start the client threads."""
        for i in range(writers):
            self.threads.append(threading.Thread(target=self._writer, args=(f"w{i}",)))
        for i in range(readers):
            self.threads.append(threading.Thread(target=self._reader, args=(f"r{i}",)))
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        """Stop the threads after their op in flight."""
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def acked_at(self, epoch: int) -> bool:
        """Whether some write was acknowledged at ``epoch``."""
        return any(e == epoch for _, _, e in self.acks)

    def _writer(self, name: str) -> None:
        while not self.stop.is_set():
            key = self.rng.choice(KEYS)
            value = f"{name}-{next(self.counter)}"
            op = self.history.invoke(name, "put", key, value)
            try:
                ack = self.client.put_bytes(value.encode(), key)
            except (RequestOutcomeUnknown, RbdfleetError):
                self.history.unknown(op, self._epoch())  # it may be durable all the same
            else:
                self.history.ok(op, epoch=ack.epoch, node=ack.node)
                self.acks.append((time.monotonic(), ack.node, ack.epoch))
            time.sleep(0.01)

    def _reader(self, name: str) -> None:
        while not self.stop.is_set():
            key = self.rng.choice(KEYS)
            op = self.history.invoke(name, "get", key)
            try:
                data, _, node = self.client.get_with_version(key)
            except NotFound:
                self.history.ok(op, None, epoch=self._epoch())
            except RbdfleetError:
                self.history.fail(op, self._epoch())
            else:
                self.history.ok(op, data.decode(), epoch=self._epoch(), node=node)
            time.sleep(0.005)


def final_state(client: FleetClient) -> dict[str, str | None]:
    """Each key's value read at the end (None: absent; ``<unreadable: CODE>`` when no node
    could serve it, which no write wrote: the final-state checker reports it)."""
    out: dict[str, str | None] = {}
    for key in KEYS:
        try:
            out[key] = client.get_bytes(key).decode()
        except NotFound:
            out[key] = None
        except AgentError as exc:
            out[key] = f"<unreadable: {exc.code}>"
    return out


def lost_write_variant(ops: list[Op], final: dict[str, str | None]) -> dict[str, str | None]:
    """``final`` with one key rolled back to a value an acknowledged later write superseded
    (or, without such a pair, to a value nobody wrote): a history the checkers must reject."""
    acked = sorted((o for o in ops if o.kind == "put" and o.outcome == "ok"), key=lambda o: o.id)
    for old, new in itertools.combinations(acked, 2):
        if old.key == new.key and old.complete < new.invoke:
            return {**final, old.key: old.value}
    key = acked[0].key if acked else KEYS[0]
    return {**final, key: "never-written"}


def assert_history_clean(
    history: History, client: FleetClient, seed: int, *, min_acked: int = 10
) -> list[Op]:
    """Run every checker; no failed read; at least ``min_acked`` acknowledged puts; the seed
    is in every failure message. Returns the ops (for scenario-specific checks)."""
    ops = history.ops()
    final = final_state(client)
    anomalies = check_all(ops, final)
    assert not anomalies, f"seed {seed}: " + "; ".join(map(str, anomalies[:5]))
    failed_reads = [o for o in ops if o.kind == "get" and o.outcome == "fail"]
    assert not failed_reads, f"seed {seed}: {len(failed_reads)} failed reads"
    unseen = [o.id for o in ops if o.outcome == "ok" and o.epoch is None]
    assert not unseen, f"seed {seed}: ops completed without the epoch they saw: {unseen[:10]}"
    acked = sum(1 for o in ops if o.kind == "put" and o.outcome == "ok")
    assert acked >= min_acked, f"seed {seed}: only {acked} acknowledged puts"
    assert check_all(ops, lost_write_variant(ops, final)), (
        f"seed {seed}: the checkers accept this history with an acknowledged write lost"
    )
    stale = [
        replace(o, value="never-written") if o.kind == "get" and o.outcome == "ok" else o
        for o in ops
    ]
    assert check_all(stale, final), f"seed {seed}: the checkers accept reads of unwritten values"
    return ops


__all__ = [
    "KEYS",
    "SEED",
    "EpochSeen",
    "Workload",
    "assert_history_clean",
    "final_state",
    "lost_write_variant",
    "recording_client",
]
