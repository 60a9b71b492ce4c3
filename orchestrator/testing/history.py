"""A jepsen-style history of client operations and the checkers run over it afterwards.

Each operation is recorded at invocation and at completion: ``ok``; ``fail``, a definite
refusal (it did not take effect); or ``unknown``, a timeout or a lost connection after the
request left (it may take effect at any time after its invocation). Time is a logical counter
taken under one lock, so "A completed before B was invoked" is exactly the real-time order the
recorder observed, on any machine speed.

The model is one register per key. Values are SHA-256 hex digests of the bytes (so a read of a
large file costs one hash), :data:`DIR` for a directory, ``None`` for absent: a delete writes
``None``, a read answered NotFound read ``None``, and every key starts ``None``. A rename
``a -> b`` is recorded as two ops completed together (:meth:`History.invoke_rename`): a delete
of ``a`` and a put of ``b`` with ``a``'s value. The generator makes every put's value unique per
key, so a read names the write it saw; deletes and directories share values, and the checkers
then accept a read when *any* write of that value explains it.

A write ``p`` is *superseded* for a read invoked at ``t`` when some acknowledged write ``q`` was
invoked after ``p`` completed and completed before ``t``: ``q`` comes after ``p`` in every
order consistent with real time, and was durable before the read began. An unknown write never
completes, so it is never superseded and may be read from its invocation on; it supersedes
nothing while the run goes on (the client never learnt it happened), but once some read
returned its value it happened, and the final state must not lose it.

Checkers (each returns a list of :class:`Anomaly` naming op ids; empty when the history is
valid); :func:`check_all` runs them all:

* :func:`check_stale_reads` — a regular register per key: every ok read returned the value of a
  write that began before the read ended and was not superseded when the read began (or the
  initial absent state, until the first acknowledgement), whichever node served it.
* :func:`check_epoch_order` — no write acknowledged at epoch ``e`` was invoked after a write
  acknowledged at a higher epoch had completed.
* :func:`check_one_writer_per_epoch` — the acknowledged writes of one epoch came from one node.
* :func:`check_monotonic_reads` — within one process, a read of a key never returns a version
  older than one an earlier read of that key returned (older: its write completed before the
  other's was invoked, or the node served a lower seq), whichever nodes served them.
* :func:`check_torn_or_forged` — every value read is one some write to that key attempted.
* :func:`check_refused_writes_invisible` — no read returns a value only definitely refused
  writes wrote.
* :func:`check_final_state` — every node that serves reads at the end holds, for every key
  written, a value no acknowledged (or observed unknown) write superseded; they all agree.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["put", "delete", "mkdir", "get"]
Outcome = Literal["pending", "ok", "fail", "unknown"]
Value = str | None
Final = Mapping[str, Mapping[str, Value]]
"""What each node holds at the end: node -> key -> value (a key absent there: not read)."""

DIR = "<dir>"
"""The value of a key that is a directory (what ``mkdir`` writes)."""


def value_hash(data: bytes) -> str:
    """The value the history records for ``data`` (SHA-256, hex)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Op:
    """One client operation on one key.

    ``value``: what a write wrote (None for a delete, :data:`DIR` for a mkdir) or what an ok
    get read. ``epoch``, ``node``, ``seq``: for an acknowledged write, who acknowledged it at
    which seq; for a read, the epoch of the map the client used, the node that served it and
    the version (seq) it served; for a failed or unknown op, the epoch the client was using.
    ``joint``: the other half of a rename.
    """

    id: int
    process: str
    kind: Kind
    key: str
    value: Value
    invoke: float
    complete: float = math.inf
    outcome: Outcome = "pending"
    epoch: int | None = None
    node: str | None = None
    seq: int | None = None
    joint: int | None = None

    @property
    def is_write(self) -> bool:
        """Puts, deletes and mkdirs (renames are a delete and a put)."""
        return self.kind != "get"

    @property
    def possible(self) -> bool:
        """A write that took effect or may have: anything but a definite refusal."""
        return self.is_write and self.outcome != "fail"


@dataclass(frozen=True)
class Anomaly:
    """A violated property, with the ops that show it."""

    checker: str
    message: str
    ops: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.checker}: {self.message} (ops {list(self.ops)})"


class History:
    """Thread-safe recorder: ``invoke`` then exactly one of ``ok`` / ``fail`` / ``unknown``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clock = 0
        self._ops: dict[int, Op] = {}

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _add(self, process: str, kind: Kind, key: str, value: Value, at: int) -> int:
        op_id = len(self._ops)
        self._ops[op_id] = Op(op_id, process, kind, key, value, invoke=at)
        return op_id

    def invoke(self, process: str, kind: Kind, key: str, value: Value = None) -> int:
        """Record an invocation; returns the op id to complete later. A put names the value
        it writes; a delete writes None and a mkdir :data:`DIR` whatever ``value`` says."""
        written = {"delete": None, "mkdir": DIR}.get(kind, value)
        with self._lock:
            return self._add(process, kind, key, written, self._tick())

    def invoke_rename(self, process: str, src: str, dst: str, value: Value) -> int:
        """Record a rename of ``src`` (holding ``value``) to ``dst``: a delete of ``src`` and a
        put of ``dst``, invoked and completed together. Returns the id to complete."""
        with self._lock:
            at = self._tick()
            gone = self._add(process, "delete", src, None, at)
            moved = self._add(process, "put", dst, value, at)
            self._ops[gone] = replace(self._ops[gone], joint=moved)
            self._ops[moved] = replace(self._ops[moved], joint=gone)
            return moved

    def _complete(self, op_id: int, outcome: Outcome, value: Value = None,
                  epoch: int | None = None, node: str | None = None,
                  seq: int | None = None) -> None:
        with self._lock:
            op = self._ops[op_id]
            if op.outcome != "pending":
                raise ValueError(f"op {op_id} already completed as {op.outcome}")
            done = math.inf if outcome == "unknown" else float(self._tick())
            for half in (op_id, op.joint):
                if half is None:
                    continue
                was = self._ops[half]
                read = value if was.kind == "get" else was.value
                self._ops[half] = replace(was, outcome=outcome, complete=done, value=read,
                                          epoch=epoch, node=node, seq=seq)

    def ok(self, op_id: int, value: Value = None, epoch: int | None = None,
           node: str | None = None, seq: int | None = None) -> None:
        """The op succeeded: a get passes the value read, the epoch of the map it used, the
        node that served it and the seq it served; a write the epoch, node and seq of its
        acknowledgement."""
        self._complete(op_id, "ok", value, epoch, node, seq)

    def fail(self, op_id: int, epoch: int | None = None) -> None:
        """The op certainly did not take effect (a definite refusal); ``epoch``: the map
        epoch the client was using."""
        self._complete(op_id, "fail", epoch=epoch)

    def unknown(self, op_id: int, epoch: int | None = None) -> None:
        """The op may or may not take effect (timeout, connection lost after the request
        left); ``epoch``: the map epoch the client was using."""
        self._complete(op_id, "unknown", epoch=epoch)

    def ops(self) -> list[Op]:
        """All ops so far; pending ones count as unknown for the checkers."""
        with self._lock:
            return [
                replace(o, outcome="unknown") if o.outcome == "pending" else o
                for o in self._ops.values()
            ]


# -- one key's register --------------------------------------------------------------------


def _initial(key: str) -> Op:
    """The state every key starts in: absent, written before anything else."""
    return Op(-1, "initial", "delete", key, None, -math.inf, -math.inf, "ok")


class _Register:
    """One key's writes, indexed to answer "which writes may a read of this key return"."""

    def __init__(self, key: str, writes: Iterable[Op]) -> None:
        """``writes``: the ops on ``key`` (reads are skipped)."""
        own = [w for w in writes if w.is_write]
        self.attempted: set[Value] = {None, *(w.value for w in own)}
        self.writers: dict[Value, list[Op]] = defaultdict(list)  # possible writes by value
        for w in (_initial(key), *own):
            if w.possible:
                self.writers[w.value].append(w)
        acked = sorted((w for w in own if w.outcome == "ok"), key=lambda w: w.complete)
        self._completes = [w.complete for w in acked]
        self._latest: list[Op] = []  # [i]: of acked[:i + 1], the one invoked last
        for w in acked:
            last = self._latest[-1] if self._latest else w
            self._latest.append(w if w.invoke >= last.invoke else last)

    def superseder(self, start: float) -> Op | None:
        """Of the writes acknowledged before ``start``, the one invoked last: a write that
        completed before its invocation is superseded for a read invoked at ``start``."""
        i = bisect.bisect_left(self._completes, start)
        return self._latest[i - 1] if i else None

    def newest_done(self, value: Value) -> float:
        """When the last possible write of ``value`` completed (inf if none did or may)."""
        return max((w.complete for w in self.writers.get(value, ())), default=math.inf)

    def oldest_began(self, value: Value) -> float:
        """When the first possible write of ``value`` was invoked (-inf if there is none)."""
        return min((w.invoke for w in self.writers.get(value, ())), default=-math.inf)

    def explains(self, value: Value, start: float, end: float) -> tuple[list[Op], Op | None]:
        """(the writes of ``value`` a read over [start, end] may return, the superseder)."""
        q = self.superseder(start)
        began = [p for p in self.writers.get(value, ()) if p.invoke < end]
        return [p for p in began if q is None or not p.complete < q.invoke], q


def _registers(ops: Sequence[Op]) -> dict[str, _Register]:
    by_key: dict[str, list[Op]] = defaultdict(list)
    for o in ops:
        by_key[o.key].append(o)
    return {key: _Register(key, own) for key, own in by_key.items()}


def _show(value: Value) -> str:
    if value is None:
        return "absent"
    return value if value.startswith("<") else value[:12]


def _who(op: Op) -> str:
    """How an op went, for messages: who ran it, who acknowledged or served it, at what."""
    if op.id < 0:
        return "the initial state"
    rename = " (rename)" if op.joint is not None else ""
    done = {
        "ok": f"acked by {op.node or '?'} at epoch {op.epoch} seq {op.seq}",
        "unknown": "outcome unknown",
        "fail": "refused",
        "pending": "pending",
    }[op.outcome]
    return f"op {op.id} {op.kind}{rename} by {op.process}, {done}"


def _ok_reads(ops: Iterable[Op]) -> list[Op]:
    return [o for o in ops if o.kind == "get" and o.outcome == "ok"]


# -- checkers ------------------------------------------------------------------------------


def check_one_writer_per_epoch(ops: Iterable[Op]) -> list[Anomaly]:
    """Acknowledged writes carry (epoch, node): one node per epoch."""
    seen: dict[int, tuple[str, int]] = {}
    out = []
    for o in ops:
        if not (o.is_write and o.outcome == "ok") or o.epoch is None or o.node is None:
            continue
        first = seen.setdefault(o.epoch, (o.node, o.id))
        if first[0] != o.node:
            out.append(
                Anomaly(
                    "one-writer-per-epoch",
                    f"epoch {o.epoch} acknowledged by {first[0]} and {o.node}",
                    (first[1], o.id),
                )
            )
    return out


def check_epoch_order(ops: Iterable[Op]) -> list[Anomaly]:
    """No write acknowledged at epoch e was invoked after an ack at an epoch above e completed."""
    acked = sorted(
        ((o.epoch, o) for o in ops if o.is_write and o.outcome == "ok" and o.epoch is not None
         and not (o.kind == "delete" and o.joint is not None)),  # one per rename
        key=lambda eo: eo[1].complete,
    )
    completes = [o.complete for _, o in acked]
    highest: list[tuple[int, Op]] = []  # [i]: of acked[:i + 1], the one at the highest epoch
    for eo in acked:
        highest.append(max(eo, highest[-1], key=lambda x: x[0]) if highest else eo)
    out = []
    for epoch, b in acked:
        i = bisect.bisect_left(completes, b.invoke)
        if i and highest[i - 1][0] > epoch:
            above, a = highest[i - 1]
            out.append(
                Anomaly(
                    "epoch-order",
                    f"{_who(b)} on {b.key!r} was acknowledged at epoch {epoch} after "
                    f"{_who(a)} on {a.key!r} had been acknowledged at epoch {above}",
                    (a.id, b.id),
                )
            )
    return out


def check_stale_reads(ops: Iterable[Op]) -> list[Anomaly]:
    """Every ok read returned a write that began before it ended and was not superseded when
    it began (reads of values no possible write wrote are the next checkers' business)."""
    all_ops = list(ops)
    registers = _registers(all_ops)
    out = []
    for r in _ok_reads(all_ops):
        reg = registers[r.key]
        if r.value not in reg.attempted or not reg.writers.get(r.value):
            continue
        fits, q = reg.explains(r.value, r.invoke, r.complete)
        if fits:
            continue
        served = (f"{r.process}'s read of {r.key!r} (op {r.id}, served by {r.node or '?'} at "
                  f"seq {r.seq}) returned {_show(r.value)}")
        began = [p for p in reg.writers[r.value] if p.invoke < r.complete]
        if not began:
            first = min(reg.writers[r.value], key=lambda p: p.invoke)
            out.append(Anomaly("stale-read", f"{served}, written by {_who(first)}, which "
                                             "began after the read ended", (r.id, first.id)))
            continue
        assert q is not None  # something began in time, so only a superseder rules it out
        p = max(began, key=lambda p: p.complete)
        out.append(
            Anomaly(
                "stale-read",
                f"{served}, written by {_who(p)}; {_who(q)} superseded it before the read began",
                (r.id, p.id, q.id),
            )
        )
    return out


def check_monotonic_reads(ops: Iterable[Op]) -> list[Anomaly]:
    """Within one process, no read of a key returns a version older than an earlier read of it.

    ``u`` is older than ``v`` when every write of ``u`` completed before every write of ``v``
    was invoked, or when both reads carry the seq the node served and ``u``'s is lower.
    """
    all_ops = list(ops)
    registers = _registers(all_ops)
    streams: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for r in _ok_reads(all_ops):
        streams[(r.process, r.key)].append(r)
    out = []
    for (process, key), reads in sorted(streams.items()):
        reg = registers[key]
        by_end = sorted(reads, key=lambda r: r.complete)
        n = 0
        newest: Op | None = None  # earlier read whose writes began latest
        top: tuple[int, Op] | None = None  # earlier read with the highest seq
        for r in sorted(reads, key=lambda r: r.invoke):
            while n < len(by_end) and by_end[n].complete < r.invoke:
                e = by_end[n]
                if newest is None or reg.oldest_began(e.value) > reg.oldest_began(newest.value):
                    newest = e
                if e.seq is not None and (top is None or e.seq > top[0]):
                    top = (e.seq, e)
                n += 1
            if r.seq is not None and top is not None and r.seq < top[0]:
                earlier, why = top[1], f"seq {r.seq} < {top[0]}"
            elif newest is not None and reg.newest_done(r.value) < reg.oldest_began(newest.value):
                earlier, why = newest, "its writes completed before the earlier value's began"
            else:
                continue
            out.append(
                Anomaly(
                    "monotonic-reads",
                    f"{process} read {key!r} as {_show(earlier.value)} (op {earlier.id}, "
                    f"{earlier.node or '?'} seq {earlier.seq}) then as the older "
                    f"{_show(r.value)} (op {r.id}, {r.node or '?'} seq {r.seq}): {why}",
                    (earlier.id, r.id),
                )
            )
    return out


def check_torn_or_forged(ops: Iterable[Op]) -> list[Anomaly]:
    """Every ok read returned bytes identical to a value some write to that key attempted."""
    all_ops = list(ops)
    registers = _registers(all_ops)
    return [
        Anomaly(
            "torn-or-forged",
            f"{r.process}'s read of {r.key!r} (served by {r.node or '?'} at seq {r.seq}) "
            f"returned {_show(r.value)}, which no write to it wrote",
            (r.id,),
        )
        for r in _ok_reads(all_ops)
        if r.value not in registers[r.key].attempted
    ]


def check_refused_writes_invisible(ops: Iterable[Op]) -> list[Anomaly]:
    """No ok read returned a value that only definitely refused writes wrote."""
    all_ops = list(ops)
    registers = _registers(all_ops)
    out = []
    for r in _ok_reads(all_ops):
        reg = registers[r.key]
        if r.value in reg.attempted and not reg.writers.get(r.value):
            refused = [w.id for w in all_ops if w.is_write and w.key == r.key
                       and w.value == r.value]
            out.append(
                Anomaly(
                    "refused-write-visible",
                    f"{r.process}'s read of {r.key!r} (served by {r.node or '?'} at seq "
                    f"{r.seq}) returned {_show(r.value)}, written only by refused writes",
                    (r.id, *refused),
                )
            )
    return out


def _resolve(ops: Sequence[Op], final: Final) -> list[Op]:
    """``ops`` with each unknown write that was observed counted as acknowledged when first
    seen: by an ok read (at its completion) or at the end. Only a value one possible write
    wrote names its write; a rename's two halves resolve together."""
    end = 1 + max((t for o in ops for t in (o.invoke, o.complete) if math.isfinite(t)),
                  default=0)
    seen: dict[tuple[str, Value], float] = {}
    for r in _ok_reads(ops):
        seen[(r.key, r.value)] = min(seen.get((r.key, r.value), math.inf), r.complete)
    for held in final.values():
        for key, value in held.items():
            seen.setdefault((key, value), end)
    writers: dict[tuple[str, Value], list[Op]] = defaultdict(list)
    for w in ops:
        if w.possible and w.value is not None:
            writers[(w.key, w.value)].append(w)
    happened: dict[int, float] = {}
    for named, ws in writers.items():
        if len(ws) == 1 and ws[0].outcome != "ok" and named in seen:
            for half in (ws[0].id, ws[0].joint):
                if half is not None:
                    happened[half] = seen[named]
    return [replace(o, outcome="ok", complete=happened[o.id]) if o.id in happened else o
            for o in ops]


def check_final_state(ops: Iterable[Op], final: Final) -> list[Anomaly]:
    """Every acknowledged write is readable at the end on every serving node, and they agree.

    ``final`` maps node -> key -> value read at the end. Each key some op wrote must be read on
    every node; keys never written may be missing. An unknown write whose value was observed
    (during the run or at the end) happened: nothing it superseded may be the final value.
    """
    all_ops = _resolve(list(ops), final)
    registers = _registers(all_ops)
    keys = sorted({o.key for o in all_ops if o.is_write})
    if keys and not final:
        return [Anomaly("final-state", "no node served the final reads")]
    out = []
    for key in keys:
        reg = registers[key]
        held: dict[str, Value] = {}
        for node, values in sorted(final.items()):
            if key not in values:
                out.append(Anomaly("final-state", f"no final read of {key!r} on {node}"))
                continue
            held[node] = values[key]
            fits, q = reg.explains(values[key], math.inf, math.inf)
            if not fits:
                lost = (q.id,) if q is not None else ()
                out.append(
                    Anomaly(
                        "final-state",
                        f"{key!r} reads {_show(values[key])} on {node} at the end: "
                        + (f"an acknowledged write was lost ({_who(q)})" if q is not None
                           else "no write that took effect or may have wrote it"),
                        lost,
                    )
                )
        if len(set(held.values())) > 1:
            seen = ", ".join(f"{n}={_show(v)}" for n, v in held.items())
            out.append(Anomaly("final-state", f"the nodes disagree on {key!r}: {seen}"))
    return out


def check_all(ops: Iterable[Op], final: Final) -> list[Anomaly]:
    """Every checker of this module over one history and its final state."""
    all_ops = list(ops)
    return [
        *check_one_writer_per_epoch(all_ops),
        *check_epoch_order(all_ops),
        *check_stale_reads(all_ops),
        *check_monotonic_reads(all_ops),
        *check_torn_or_forged(all_ops),
        *check_refused_writes_invisible(all_ops),
        *check_final_state(all_ops, final),
    ]


__all__ = [
    "DIR",
    "Anomaly",
    "Final",
    "History",
    "Op",
    "Value",
    "check_all",
    "check_epoch_order",
    "check_final_state",
    "check_monotonic_reads",
    "check_one_writer_per_epoch",
    "check_refused_writes_invisible",
    "check_stale_reads",
    "check_torn_or_forged",
    "value_hash",
]
