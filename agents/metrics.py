"""Prometheus text exposition (format 0.0.4), stdlib only: the agent's and the coordinator's.

Every family renders as ``# HELP``, ``# TYPE`` and then all its samples, so a parser keeps
each sample under its family. Counters, and histograms whose label sets are declared in
advance, expose 0 from the start: ``rate()`` and ``increase()`` then see the first event
instead of a series that appears with it. Every update takes the metric's lock: the agent's
hot paths update a handful of series per request, so contention is small.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["DEFAULT_BUCKETS", "Counter", "Gauge", "Histogram", "Registry"]

LabelValues = tuple[str, ...]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Suffixes a histogram's own samples use: a family named so would be read as one of them.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(eq=False)
class _Metric:
    name: str
    help: str
    labelnames: tuple[str, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    kind = "untyped"

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        for label in self.labelnames:
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"{self.name}: invalid label name {label!r}")
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"{self.name}: duplicate label names {self.labelnames}")

    def _check(self, values: LabelValues) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        """The exposition lines of this metric (HELP, TYPE, samples)."""
        text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {text}", f"# TYPE {self.name} {self.kind}",
                *self.samples()]


@dataclass(eq=False)
class Counter(_Metric):
    """A monotonically growing count per label set; declared label sets start at 0."""

    labelsets: Iterable[LabelValues] = ()
    _values: dict[LabelValues, float] = field(default_factory=dict)
    kind = "counter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must be named *_total")
        # An unlabelled counter has exactly one series: it exists from the start.
        for labels in (self.labelsets if self.labelnames else [()]):
            self.declare(*labels)

    def declare(self, *labels: str) -> None:
        """Expose the series of ``labels`` at 0 until its first increment."""
        self.inc(*labels, amount=0.0)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (≥ 0) to the series of ``labels``."""
        self._check(labels)
        if not amount >= 0:
            raise ValueError(f"{self.name}: a counter only grows (amount {amount})")
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


@dataclass(eq=False)
class Gauge(_Metric):
    """A value that goes up and down.

    Unlabelled gauges read their value at scrape time from ``read`` (so it is never stale);
    labelled ones are given their whole set of series at once by :meth:`replace` (so a series
    whose subject went away disappears instead of keeping its last value).
    """

    read: Callable[[], float] | None = None
    _values: dict[LabelValues, float] = field(default_factory=dict)
    kind = "gauge"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.read is None) == (not self.labelnames):
            raise ValueError(f"gauge {self.name}: a read callback xor label names")

    def replace(self, values: Mapping[LabelValues, float]) -> None:
        """Make ``values`` (label values -> value) the gauge's only series."""
        for labels in values:
            self._check(labels)
        with self._lock:
            self._values = dict(values)

    def samples(self) -> Iterable[str]:
        if self.read is not None:
            return [f"{self.name} {_number(self.read())}"]
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


@dataclass(eq=False)
class Histogram(_Metric):
    """Observations in cumulative buckets (``le``, with +Inf), plus sum and count, per label
    set; an unlabelled histogram and declared label sets expose empty buckets from the start."""

    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    labelsets: Iterable[LabelValues] = ()
    _counts: dict[LabelValues, list[int]] = field(default_factory=dict)
    _sums: dict[LabelValues, float] = field(default_factory=dict)
    kind = "histogram"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name.endswith(_HISTOGRAM_SUFFIXES):
            raise ValueError(f"histogram {self.name} must not end in {_HISTOGRAM_SUFFIXES}")
        if "le" in self.labelnames:
            raise ValueError(f"histogram {self.name}: 'le' is the bucket label")
        bounds = list(self.buckets)
        if not bounds or bounds != sorted(set(bounds)) or not all(map(math.isfinite, bounds)):
            raise ValueError(f"histogram {self.name}: buckets must be finite and increasing")
        for labels in (self.labelsets if self.labelnames else [()]):
            self.declare(*labels)

    def declare(self, *labels: str) -> None:
        """Expose the series of ``labels`` with empty buckets until its first observation."""
        self._check(labels)
        with self._lock:
            self._series(labels)

    def _series(self, labels: LabelValues) -> list[int]:
        self._sums.setdefault(labels, 0.0)
        return self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation (seconds, bytes...)."""
        self._check(labels)
        with self._lock:
            self._series(labels)[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[labels] += value

    def samples(self) -> Iterable[str]:
        lines = []
        with self._lock:
            items = sorted((k, list(v), self._sums[k]) for k, v in self._counts.items())
        for key, counts, total in items:
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return lines


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """A process's metrics; :meth:`render` gives the /metrics body."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def counter(self, name: str, help: str, labelnames: tuple[str, ...] = (),
                labelsets: Iterable[LabelValues] = ()) -> Counter:
        """Register and return a counter (``labelsets``: the series known in advance)."""
        return self._add(Counter(name, help, labelnames, labelsets=tuple(labelsets)))

    def gauge(self, name: str, help: str, read: Callable[[], float] | None = None,
              labelnames: tuple[str, ...] = ()) -> Gauge:
        """Register a gauge: unlabelled with ``read()`` giving its value at scrape time, or
        labelled and given its series by :meth:`Gauge.replace`."""
        return self._add(Gauge(name, help, labelnames, read=read))

    def histogram(self, name: str, help: str, labelnames: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = DEFAULT_BUCKETS,
                  labelsets: Iterable[LabelValues] = ()) -> Histogram:
        """Register and return a histogram (default buckets: request durations in seconds)."""
        return self._add(Histogram(name, help, labelnames, buckets=buckets,
                                   labelsets=tuple(labelsets)))

    def _add(self, metric: _M) -> _M:
        taken = {m.name for m in self._metrics}
        # A histogram's samples take its name plus suffixes: no other family may use those.
        taken |= {m.name + s for m in self._metrics if isinstance(m, Histogram)
                  for s in _HISTOGRAM_SUFFIXES}
        mine = {metric.name}
        if isinstance(metric, Histogram):
            mine |= {metric.name + s for s in _HISTOGRAM_SUFFIXES}
        if taken & mine:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """Prometheus text format of every registered metric."""
        return "\n".join(line for m in self._metrics for line in m.render()) + "\n"
