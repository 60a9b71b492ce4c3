"""A jepsen-style history of client operations and the checkers run over it afterwards.

Each operation is recorded at invocation and at completion (``ok``, ``fail`` or ``unknown``:
a timeout or a lost connection after the request left). Time is a logical counter taken under
one lock, so "A completed before B was invoked" is exactly the real-time order the recorder
observed, on any machine speed.

Checkers (each returns a list of :class:`Anomaly`, empty when the history is valid):

* :func:`check_one_writer_per_epoch` — acknowledged writes of one epoch all came from one node.
* :func:`check_reads` — every ok read returned the latest acknowledged version or the version
  of a write concurrent with the read (a regular register per key; deletes write ``None``).
* :func:`check_final_state` — every acknowledged write is readable afterwards: the final value
  of a key is that of an acknowledged or unknown write no acknowledged write superseded.

Values written must be unique per key (the generator's job), so a read names its write.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["put", "delete", "get"]
Outcome = Literal["pending", "ok", "fail", "unknown"]


@dataclass(frozen=True)
class Op:
    """One client operation; ``value`` is the value written (put) or read (get, ok only)."""

    id: int
    process: str
    kind: Kind
    key: str
    value: str | None
    invoke: int
    complete: float = math.inf
    outcome: Outcome = "pending"
    epoch: int | None = None
    node: str | None = None

    @property
    def is_write(self) -> bool:
        """Puts and deletes."""
        return self.kind in ("put", "delete")


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

    def invoke(self, process: str, kind: Kind, key: str, value: str | None = None) -> int:
        """Record an invocation; returns the op id to complete later."""
        with self._lock:
            op_id = len(self._ops)
            self._ops[op_id] = Op(op_id, process, kind, key, value, invoke=self._tick())
            return op_id

    def _complete(self, op_id: int, outcome: Outcome, **fields: object) -> None:
        with self._lock:
            op = self._ops[op_id]
            if op.outcome != "pending":
                raise ValueError(f"op {op_id} already completed as {op.outcome}")
            done = math.inf if outcome == "unknown" else float(self._tick())
            self._ops[op_id] = replace(op, outcome=outcome, complete=done, **fields)  # type: ignore[arg-type]

    def ok(
        self,
        op_id: int,
        value: str | None = None,
        epoch: int | None = None,
        node: str | None = None,
    ) -> None:
        """The op succeeded: a get passes the value read (and the epoch of the map it used and
        the node that served it), a write the epoch and node that acknowledged it."""
        op = self._ops[op_id]
        read_value = value if op.kind == "get" else op.value
        self._complete(op_id, "ok", value=read_value, epoch=epoch, node=node)

    def fail(self, op_id: int, epoch: int | None = None) -> None:
        """The op certainly did not take effect (refused before anything was written);
        ``epoch``: the map epoch the client was using."""
        self._complete(op_id, "fail", epoch=epoch)

    def unknown(self, op_id: int, epoch: int | None = None) -> None:
        """The op may or may not have taken effect (timeout, connection lost mid-request);
        ``epoch``: the map epoch the client was using."""
        self._complete(op_id, "unknown", epoch=epoch)

    def ops(self) -> list[Op]:
        """All ops so far; pending ones count as unknown for the checkers."""
        with self._lock:
            return [
                replace(o, outcome="unknown") if o.outcome == "pending" else o
                for o in self._ops.values()
            ]


def _acked_writes(ops: Iterable[Op], key: str) -> list[Op]:
    return [o for o in ops if o.key == key and o.is_write and o.outcome == "ok"]


def _possible_writes(ops: Iterable[Op], key: str) -> list[Op]:
    return [o for o in ops if o.key == key and o.is_write and o.outcome in ("ok", "unknown")]


def _written(op: Op) -> str | None:
    return None if op.kind == "delete" else op.value


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


def _admissible(ops: list[Op], key: str, start: float, end: float) -> set[str | None]:
    """Values a read invoked at ``start`` and completed at ``end`` may return for ``key``."""
    acked = _acked_writes(ops, key)
    values: set[str | None] = set()
    # The initial state (absent) is admissible until some ack completed before the read began.
    if not any(q.complete < start for q in acked):
        values.add(None)
    for p in _possible_writes(ops, key):
        if p.invoke > end:
            continue  # began after the read finished
        superseded = any(q.complete < start and q.invoke > p.complete for q in acked)
        if not superseded:
            values.add(_written(p))
    return values


def check_reads(ops: Iterable[Op]) -> list[Anomaly]:
    """Every ok read returns the latest acknowledged version or a concurrent one."""
    all_ops = list(ops)
    out = []
    for r in all_ops:
        if r.kind != "get" or r.outcome != "ok":
            continue
        allowed = _admissible(all_ops, r.key, r.invoke, r.complete)
        if r.value not in allowed:
            out.append(
                Anomaly(
                    "reads",
                    f"read of {r.key!r} by {r.process} returned {r.value!r}, "
                    f"admissible {sorted(map(str, allowed))}",
                    (r.id,),
                )
            )
    return out


def check_final_state(ops: Iterable[Op], final: Mapping[str, str | None]) -> list[Anomaly]:
    """Every acknowledged write is readable afterwards: ``final`` maps key -> value read at the end.

    Keys never written may be absent from ``final``. A key written by some op must be in it.
    """
    all_ops = list(ops)
    out = []
    keys = {o.key for o in all_ops if o.is_write}
    for key in sorted(keys):
        if key not in final:
            out.append(Anomaly("final-state", f"no final read of {key!r}"))
            continue
        allowed = _admissible(all_ops, key, math.inf, math.inf)
        if final[key] not in allowed:
            acked = [o.id for o in _acked_writes(all_ops, key)]
            out.append(
                Anomaly(
                    "final-state",
                    f"{key!r} reads {final[key]!r} at the end: an acknowledged write was lost",
                    tuple(acked),
                )
            )
    return out


def check_all(ops: Iterable[Op], final: Mapping[str, str | None]) -> list[Anomaly]:
    """Every checker of this module over one history."""
    all_ops = list(ops)
    return [
        *check_one_writer_per_epoch(all_ops),
        *check_reads(all_ops),
        *check_final_state(all_ops, final),
    ]


__all__ = [
    "Anomaly",
    "History",
    "Op",
    "check_all",
    "check_final_state",
    "check_one_writer_per_epoch",
    "check_reads",
]
