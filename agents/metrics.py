"""Prometheus text exposition (format 0.0.4) for the agent, stdlib only.

Counters and gauges are keyed by label values; histograms use fixed buckets. Every update takes
one lock: the agent's hot paths update a handful of series per request, so contention is small.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Counter", "Gauge", "Histogram", "Registry"]

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class _Metric:
    name: str
    help: str
    labelnames: tuple[str, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    kind = "untyped"

    def _check(self, values: LabelValues) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        """The exposition lines of this metric (HELP, TYPE, samples)."""
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}",
                *self.samples()]


@dataclass
class Counter(_Metric):
    """A monotonically growing count per label set."""

    _values: dict[LabelValues, float] = field(default_factory=dict)
    kind = "counter"

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (≥ 0) to the series of ``labels``."""
        self._check(labels)
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        """The current value of one series (0 when never incremented)."""
        with self._lock:
            return self._values.get(labels, 0.0)

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


@dataclass
class Gauge(_Metric):
    """A value read at scrape time from a callback (so it is never stale)."""

    read: Callable[[], float] = lambda: 0.0
    kind = "gauge"

    def samples(self) -> Iterable[str]:
        return [f"{self.name} {_number(self.read())}"]


DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


@dataclass
class Histogram(_Metric):
    """Observations in cumulative buckets, plus sum and count, per label set."""

    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    _counts: dict[LabelValues, list[int]] = field(default_factory=dict)
    _sums: dict[LabelValues, float] = field(default_factory=dict)
    kind = "histogram"

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation (seconds, bytes...)."""
        self._check(labels)
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[labels] = self._sums.get(labels, 0.0) + value

    def samples(self) -> Iterable[str]:
        lines = []
        with self._lock:
            items = sorted((k, list(v), self._sums[k]) for k, v in self._counts.items())
        for key, counts, total in items:
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                running += count
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return lines


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """The agent's metrics; :meth:`render` gives the /metrics body."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def counter(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Counter:
        """Register and return a counter."""
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        """Register a gauge whose value ``read()`` gives at scrape time."""
        return self._add(Gauge(name, help, read=read))

    def histogram(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Histogram:
        """Register and return a histogram with the default buckets (seconds)."""
        return self._add(Histogram(name, help, labelnames))

    def _add(self, metric: _M) -> _M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """Prometheus text format of every registered metric."""
        return "\n".join(line for m in self._metrics for line in m.render()) + "\n"
