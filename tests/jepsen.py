"""The fault tier's generator and checks: client threads over a real fleet, a history, a verdict.

Generator (:class:`Workload`): writer threads put values of 100 B to 3 MiB (mostly small, some
over 64 KiB so data extents are exercised, not only inline records) to a few keys, delete
them, write a file of their own and rename it over a key, and make (``-p``) and remove
directories; reader threads get files and stat directories back. Each thread draws from its
own stream, ``random.Random(f"{seed}-{thread}")``, ``seed`` from :data:`SEED`
(``RBDFLEET_TEST_SEED`` to replay a run, else random). Every op is recorded in a
:class:`~orchestrator.testing.history.History`: invoke, then ok (with the epoch, node and seq
that acknowledged a write, or the node and seq that served a read), fail (a definite refusal:
a 4xx such as 409 not_writer / stale_epoch or 404 on a delete, a 503, a 507, or a request that
never reached a writer) or unknown (:class:`RequestOutcomeUnknown` — the connection broke
after the request left — or another 5xx); see :func:`outcome_of`. Values are recorded as
SHA-256 digests. A client thread that raises anything else fails the test: :meth:`finish`
re-raises it.

:func:`assert_history_clean` reads every written key from every node that serves reads
(:func:`final_state`), runs every checker over the history and that final state, and names the
seed in any failure. It then feeds the checkers mutated copies of the same history — an
acknowledged write lost on one node, a stale read, a new-to-old read inversion, a write
acknowledged at an older epoch, a second writer in one epoch, a forged value, a refused write
made visible — and fails unless the checker concerned notices each: a checker that cannot
fail proves nothing.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import math
import os
import random
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Literal

from agents.core.protocol import AUTH_HEADER, BEARER
from agents.errors import AgentError, NotFound, WrongKind
from orchestrator.client import (
    CoordinatorClient,
    FleetClient,
    RetryPolicy,
    Target,
    Targets,
    WriteResult,
)
from orchestrator.errors import AgentUnreachable, RequestOutcomeUnknown
from orchestrator.testing.history import (
    DIR,
    Final,
    History,
    Op,
    Value,
    check_all,
    value_hash,
)
from orchestrator.transport import CHUNK, Response, Transport
from tests.fixtures.agents import TEST_CA, TEST_CLIENT, TEST_CLIENT_SECRET

SEED = int(os.environ.get("RBDFLEET_TEST_SEED") or random.SystemRandom().randrange(100000))
KEYS = tuple(f"/k{i}" for i in range(4))  # files: put, deleted, renamed over
DIRS = ("/d0", "/d1")  # always-empty directories: made and removed
TMP = "/tmp"  # each writer's own files live here until renamed over a key
JOIN_TIMEOUT = 60.0

# (probability, smallest, largest) of a value's size, drawn log-uniformly inside its band
SIZES = ((0.75, 100, 3 << 10), (0.15, 3 << 10, 64 << 10), (0.08, 64 << 10, 256 << 10),
         (0.02, 256 << 10, 3 << 20))


class EpochSeen(CoordinatorClient):
    """A CoordinatorClient that remembers, per thread, the epoch of the last targets it got."""

    def __init__(self, urls: list[str], fleet: str, secret: bytes, client: str,
                 ca_file: str = TEST_CA) -> None:
        super().__init__(urls, fleet, secret, client=client,
                         transport=Transport(tls=True, ca_file=ca_file))
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


class NodeSeen(Transport):
    """A Transport that remembers, per thread, the node it last sent a request to (the one
    that answered NotFound, when the client raises it)."""

    def __init__(self, ca_file: str = TEST_CA) -> None:
        super().__init__(tls=True, ca_file=ca_file)  # agents serve TLS (the fixtures' CA)
        self._seen = threading.local()

    def request(self, node: str, address: str, method: str, path: str, **kwargs: Any) -> Response:
        """The request, noting its node for this thread."""
        self._seen.node = node
        return super().request(node, address, method, path, **kwargs)

    def last_node(self) -> str | None:
        """The node of the last request this thread sent (None before any)."""
        node: str | None = getattr(self._seen, "node", None)
        return node


def recording_client(
    urls: list[str],
    fleet: str,
    secret: bytes = TEST_CLIENT_SECRET,
    *,
    client: str = TEST_CLIENT,
    io_timeout: float = 10.0,
    retry_timeout: float = 30.0,
    ca_file: str = TEST_CA,
) -> FleetClient:
    """A client for :class:`Workload`: follows the map for ``retry_timeout`` seconds, notes
    the epoch each op used and the node each request went to; verifies coordinators and agents
    against ``ca_file`` (a sandbox fleet's own CA on VMs)."""
    retry = RetryPolicy(timeout=retry_timeout)
    return FleetClient(EpochSeen(urls, fleet, secret, client, ca_file), retry=retry,
                       io_timeout=io_timeout, transport=NodeSeen(ca_file))


def _status(exc: AgentError) -> int:
    """The HTTP status: an unregistered wire code keeps it in its fields."""
    status = exc.fields.get("status") if type(exc) is AgentError else None
    return status if isinstance(status, int) else exc.status


def outcome_of(exc: AgentError | AgentUnreachable) -> Literal["fail", "unknown"]:
    """Whether a write that raised ``exc`` certainly did not happen (``fail``) or may have.

    The client resends only what certainly did not happen and raises
    :class:`RequestOutcomeUnknown` at once when a sent request lost its answer, so the error
    it ends with speaks for every attempt: unreachable before sending, a 4xx, a 503 (not
    serving) or a 507 (no space, refused before writing) are refusals unless the answer itself
    says ``outcome: unknown`` (a writer that lost its device or could not get a lagging reader
    out of the map: its record may be durable); any other 5xx (a device error mid-write, an
    internal error) leaves the outcome unknown.
    """
    if isinstance(exc, RequestOutcomeUnknown):
        return "unknown"
    if isinstance(exc, AgentUnreachable):
        return "fail"
    if exc.fields.get("outcome") == "unknown":  # the writer says it cannot tell
        return "unknown"
    status = _status(exc)
    return "fail" if status < 500 or status in (503, 507) else "unknown"


def make_value(rng: random.Random, tag: str) -> bytes:
    """Bytes of a drawn size starting with ``tag`` (unique per value, so per key)."""
    _, low, high = rng.choices(SIZES, weights=[chance for chance, _, _ in SIZES])[0]
    size = max(round(math.exp(rng.uniform(math.log(low), math.log(high)))), len(tag) + 1)
    head = f"{tag}:".encode()
    return head + rng.randbytes(size - len(head))


class Workload:
    """Writers and readers over :data:`KEYS`, :data:`DIRS` and their own files, recording a
    history until :meth:`finish`. ``root`` puts them all under one directory, so a second
    workload on the same fleet starts from keys nobody wrote (the checkers assume every key
    starts absent)."""

    def __init__(self, client: FleetClient, history: History, seed: int, root: str = "") -> None:
        self.client = client
        self.keys = tuple(root + k for k in KEYS)
        self.dirs = tuple(root + d for d in DIRS)
        self.tmp = root + TMP
        self.history = history
        self.seed = seed
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[tuple[str, BaseException]] = []  # (thread, what it raised)
        self.acks: list[tuple[float, str, int]] = []  # (monotonic time, node, epoch)
        self._files = list(self.keys)  # what readers get: the keys and the writers' own files
        seen, sent = client.coordinator, client.transport
        self._epoch = seen.last_epoch if isinstance(seen, EpochSeen) else lambda: None
        self._node = sent.last_node if isinstance(sent, NodeSeen) else lambda: None

    def start(self, writers: int = 2, readers: int = 2) -> None:
        """Start the client threads."""
        for name, loop in itertools.chain(
            ((f"w{i}", self._writer) for i in range(writers)),
            ((f"r{i}", self._reader) for i in range(readers)),
        ):
            # daemon: a test that fails before finish() must not keep pytest from exiting
            thread = threading.Thread(target=self._run, args=(name, loop), name=name,
                                      daemon=True)
            self.threads.append(thread)
        for t in self.threads:
            t.start()

    def finish(self, min_puts: int = 10, patience: float = 60.0) -> None:
        """Stop the threads after their op in flight; re-raise what a thread raised.

        The threads first run on until ``min_puts`` puts were acknowledged (at most
        ``patience`` seconds more): a scenario's fixed sleeps give a handful of puts on a
        loaded 2-core host, and :func:`assert_history_clean` rightly refuses a history too
        thin to prove anything. Waiting for the count instead of failing on it keeps the
        check and drops the flakiness; a fleet that acknowledges nothing still fails there."""
        deadline = time.monotonic() + patience
        while (not self.errors and self._acked_puts() < min_puts
               and time.monotonic() < deadline):
            time.sleep(0.05)
        self.stop.set()
        for t in self.threads:
            t.join(JOIN_TIMEOUT)
        if self.errors:
            name, exc = self.errors[0]
            others = [n for n, _ in self.errors[1:]]
            exc.add_note(f"seed {self.seed}: client thread {name} raised this"
                         + (f"; threads {others} raised too" if others else ""))
            raise exc
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"seed {self.seed}: client threads still running: {stuck}"

    def _acked_puts(self) -> int:
        return sum(1 for o in self.history.ops() if o.kind == "put" and o.outcome == "ok")

    def acked_at(self, epoch: int) -> bool:
        """Whether some write was acknowledged at ``epoch``."""
        return any(e == epoch for _, _, e in self.acks)

    def _run(self, name: str, loop: Callable[[str, random.Random], None]) -> None:
        try:
            loop(name, random.Random(f"{self.seed}-{name}"))
        except BaseException as exc:  # every kind: a thread that dies must fail the test
            self.errors.append((name, exc))

    def _write(self, op: int, call: Callable[..., WriteResult], *args: object) -> str:
        """Run one recorded write, ``call(*args)``; returns its outcome."""
        try:
            ack = call(*args)
        except (AgentError, AgentUnreachable) as exc:
            outcome = outcome_of(exc)
            (self.history.fail if outcome == "fail" else self.history.unknown)(op, self._epoch())
            return outcome
        self.history.ok(op, epoch=ack.epoch, node=ack.node, seq=ack.seq if ack.seq >= 0 else None)
        self.acks.append((time.monotonic(), ack.node, ack.epoch))
        return "ok"

    def _writer(self, name: str, rng: random.Random) -> None:
        h, client = self.history, self.client
        counter = itertools.count()
        generation = itertools.count()
        own = ""  # this thread's file; a new one after an unknown outcome, which may land late
        while not self.stop.is_set():
            if not own:
                own = f"{self.tmp}/{name}-{next(generation)}"
                self._files.append(own)
            roll = rng.random()
            key = rng.choice(self.keys)
            if roll < 0.5:
                data = make_value(rng, f"{name}-{next(counter)}")
                op = h.invoke(name, "put", key, value_hash(data))
                self._write(op, client.put_bytes, data, key)
            elif roll < 0.62:
                op = h.invoke(name, "delete", key)
                self._write(op, client.delete, key)
            elif roll < 0.8:
                data = make_value(rng, f"{name}-{next(counter)}")
                value = value_hash(data)
                src = own
                done = self._write(h.invoke(name, "put", src, value), client.put_bytes, data, src)
                if done == "ok":
                    op = h.invoke_rename(name, src, key, value)
                    done = self._write(op, client.rename, src, key)
                if done == "unknown":
                    own = ""
            else:
                folder = rng.choice(self.dirs)
                if roll < 0.9:  # -p: idempotent (the client retries a 409 already_exists)
                    op = h.invoke(name, "mkdir", folder)
                    self._write(op, client.mkdir, folder, True)
                else:
                    op = h.invoke(name, "delete", folder)
                    self._write(op, client.delete, folder)
            time.sleep(0.01)

    def _read(self, key: str) -> tuple[Value, int | None, str | None]:
        """(value, seq served, node) of one read through the client; NotFound propagates."""
        if key in self.dirs:  # a get of a directory is refused: stat it
            info = self.client.stat(key)
            value = DIR if info["kind"] == "dir" else f"<{info['kind']}>"
            return value, int(info["version"]), self._node()
        data, seq, node = self.client.get_with_version(key)
        return value_hash(data), (seq if seq >= 0 else None), node

    def _reader(self, name: str, rng: random.Random) -> None:
        while not self.stop.is_set():
            key = rng.choice(self.dirs) if rng.random() < 0.15 else rng.choice(self._files)
            op = self.history.invoke(name, "get", key)
            try:
                value, seq, node = self._read(key)
            except NotFound:
                self.history.ok(op, None, epoch=self._epoch(), node=self._node())
            except (AgentError, AgentUnreachable):
                self.history.fail(op, self._epoch())
            else:
                self.history.ok(op, value, epoch=self._epoch(), node=node, seq=seq)
            time.sleep(0.005)


def read_value(client: FleetClient, key: str) -> Value:
    """A key's value through the client (its digest; None when absent)."""
    try:
        return value_hash(client.get_bytes(key))
    except NotFound:
        return None


NO_ANSWER = "<no answer: "  # what a node that could not answer "holds": no write wrote it


def _read_at(client: FleetClient, target: Target, key: str) -> Value:
    """``key``'s value on one node: its digest, None, DIR, or :data:`NO_ANSWER` and why."""
    digest = hashlib.sha256()
    got = [0]

    def consume(resp: http.client.HTTPResponse) -> None:
        while chunk := resp.read(CHUNK):
            digest.update(chunk)
            got[0] += len(chunk)
        if int(resp.getheader("Content-Length") or got[0]) != got[0]:
            raise AgentUnreachable(target.node, target.address, "body cut short")

    route = "/v1/files/" + urllib.parse.quote(key.lstrip("/"), safe="/")
    try:
        client.transport.request(target.node, target.address, "GET", route,
                                 headers={AUTH_HEADER: BEARER + target.grant},
                                 timeout=client.io_timeout, sink=consume)
    except NotFound:
        return None
    except WrongKind:  # "is a directory"
        return DIR
    except AgentError as exc:
        return f"{NO_ANSWER}{exc.code}>"
    except AgentUnreachable as exc:
        return f"{NO_ANSWER}{exc}>"
    return digest.hexdigest()


def _settled(held: dict[str, Value]) -> bool:
    values = set(held.values())
    return len(values) == 1 and not str(values.pop()).startswith(NO_ANSWER)


def final_state(client: FleetClient, ops: Iterable[Op]) -> dict[str, dict[str, Value]]:
    """node -> key -> value of every key some op wrote, read on every node the coordinator
    hands out for reading.

    A key is read again while the nodes disagree or one cannot answer (a write that timed out
    may still be on its way to a reader), until the client's retry timeout (for all keys
    together) has passed: then the last round counts, and the checkers judge it."""
    retry = client.retry
    deadline = retry.clock() + retry.timeout
    out: dict[str, dict[str, Value]] = {}
    for key in sorted({o.key for o in ops if o.is_write}):
        held: dict[str, Value] = {}
        while True:
            try:
                targets = client.coordinator.targets("read", key)
            except retry.retryable:
                pass
            else:
                held = {t.node: _read_at(client, t, key) for t in targets.ordered}
            if _settled(held) or retry.clock() > deadline:
                break
            retry.sleep(0.2)
        for node, value in held.items():
            out.setdefault(node, {})[key] = value
    return _complete(client, out)


def _complete(client: FleetClient, out: dict[str, dict[str, Value]]
              ) -> dict[str, dict[str, Value]]:
    """The set of nodes handed out may change while the keys are read one by one (a reader
    dropped for lagging under load, then admitted again): read every key on every node handed
    out at the end, and leave out nodes no client is sent to any more."""
    keys = sorted({k for values in out.values() for k in values})
    if not keys:
        return out
    try:
        final = client.coordinator.targets("read", keys[0]).ordered
    except client.retry.retryable:
        return out
    complete: dict[str, dict[str, Value]] = {}
    for target in final:
        values = dict(out.get(target.node, {}))
        for key in keys:
            if key not in values:
                values[key] = _read_at(client, target, key)
        complete[target.node] = values
    return complete


# -- the self-check: mutated copies of a real history the checkers must reject ----------------


def _after(ops: list[Op]) -> float:
    return 1 + max((t for o in ops for t in (o.invoke, o.complete) if math.isfinite(t)),
                   default=0)


def _injected_read(ops: list[Op], key: str, value: Value) -> Op:
    """An ok read of ``key`` by process ``self-check`` appended after everything in ``ops``."""
    at = _after(ops)
    return Op(len(ops), "self-check", "get", key, value, at, at + 1, "ok", node="self-check")


def _superseded_pair(ops: list[Op]) -> tuple[Op, Op] | None:
    """(old, new): two acknowledged puts of one key, the second invoked after the first
    completed (their values are unique: each names its put)."""
    puts = sorted((o for o in ops if o.kind == "put" and o.outcome == "ok"),
                  key=lambda o: o.invoke)
    for old, new in itertools.combinations(puts, 2):
        if old.key == new.key and old.complete < new.invoke:
            return old, new
    return None


def _acked_once(ops: list[Op]) -> list[Op]:
    """Acknowledged writes with an epoch, a rename counted once (its put), by completion."""
    return sorted((o for o in ops if o.is_write and o.outcome == "ok" and o.epoch is not None
                   and not (o.kind == "delete" and o.joint is not None)),
                  key=lambda o: o.complete)


def mutations(ops: list[Op], final: Final) -> Iterator[tuple[str, list[Op], Final]]:
    """(checker, mutated ops, mutated final state) that checker must reject, for each property
    this history makes it possible to break."""
    pair = _superseded_pair(ops)
    if pair:
        old, new = pair
        for node in sorted(final)[:1]:  # one node lost the later put
            yield "final-state", ops, {**final, node: {**final[node], old.key: old.value}}
        yield "stale-read", [*ops, _injected_read(ops, old.key, old.value)], final
        first = _injected_read(ops, old.key, new.value)
        yield "monotonic-reads", [*ops, first, _injected_read([*ops, first], old.key,
                                                              old.value)], final
    acked = _acked_once(ops)
    later = [b for b in acked if b.invoke > acked[0].complete] if acked else []
    if later:
        a, b = acked[0], later[-1]
        assert a.epoch is not None
        yield "epoch-order", [replace(o, epoch=a.epoch - 1) if o.id == b.id else o
                              for o in ops], final
    per_epoch = Counter(o.epoch for o in acked)
    twins = [b for b in acked if per_epoch[b.epoch] >= 2]
    if twins:
        b = twins[-1]
        yield "one-writer-per-epoch", [replace(o, node="intruder") if o.id in (b.id, b.joint)
                                       else o for o in ops], final
    if ops:
        yield "torn-or-forged", [*ops, _injected_read(ops, ops[-1].key,
                                                      value_hash(b"forged"))], final
    puts = [o for o in ops if o.kind == "put" and o.outcome == "ok"]
    if puts:
        p = puts[-1]
        refused = [replace(o, outcome="fail") if o.id in (p.id, p.joint) else o for o in ops]
        yield "refused-write-visible", [*refused, _injected_read(refused, p.key, p.value)], final


def _summary(anomalies: list[object]) -> str:
    kinds = Counter(str(a).split(":", 1)[0] for a in anomalies)
    shown = "\n  ".join(map(str, anomalies[:12]))
    return f"{len(anomalies)} anomalies {dict(kinds)}:\n  {shown}"


def assert_history_clean(
    history: History, client: FleetClient, seed: int, *, min_acked: int = 10
) -> list[Op]:
    """Run every checker over the history and the final state read on every serving node; no
    failed read; at least ``min_acked`` acknowledged puts; every checker rejects a mutated
    copy that breaks its property; the seed is in every failure message. Returns the ops (for
    scenario-specific checks)."""
    ops = history.ops()
    final = final_state(client, ops)
    anomalies = check_all(ops, final)
    assert not anomalies, f"seed {seed}: {_summary(list(anomalies))}"
    failed_reads = [o for o in ops if o.kind == "get" and o.outcome == "fail"]
    assert not failed_reads, f"seed {seed}: {len(failed_reads)} failed reads"
    unseen = [o.id for o in ops if o.outcome == "ok" and o.epoch is None]
    assert not unseen, f"seed {seed}: ops completed without the epoch they saw: {unseen[:10]}"
    acked = sum(1 for o in ops if o.kind == "put" and o.outcome == "ok")
    assert acked >= min_acked, f"seed {seed}: only {acked} acknowledged puts"
    shown = set()
    for checker, bad_ops, bad_final in mutations(ops, final):
        found = [a.checker for a in check_all(bad_ops, bad_final)]
        assert checker in found, (
            f"seed {seed}: the {checker} checker accepts a history mutated to break it "
            f"(found only {found})"
        )
        shown.add(checker)
    assert {"final-state", "stale-read", "torn-or-forged"} <= shown, (
        f"seed {seed}: the history allowed too few self-checks: {sorted(shown)}"
    )
    return ops


__all__ = [
    "DIRS",
    "KEYS",
    "SEED",
    "EpochSeen",
    "NodeSeen",
    "Workload",
    "assert_history_clean",
    "final_state",
    "make_value",
    "mutations",
    "outcome_of",
    "read_value",
    "recording_client",
]
