"""Counters, gauges and histograms rendered in the Prometheus text exposition format (0.0.4).

Small on purpose: the server needs labelled counters, a few gauges and one latency histogram, and a
device install should not need another dependency for that. Thread-safe (one lock per family).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

__all__ = ["Counter", "Gauge", "Histogram", "Registry", "CONTENT_TYPE", "LATENCY_BUCKETS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; from a tiny pack on a desktop core to a big base on a Raspberry Pi.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Family):
    """A value read when scraped (``source`` returns {label values tuple: value})."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = (),
                 source: Callable[[], dict] | None = None):
        super().__init__(name, help_text, labels)
        self.source = source or (lambda: {})

    def render(self) -> list[str]:
        items = sorted(self.source().items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Histogram(_Family):
    """Observations counted into cumulative ``le`` buckets, with _sum and _count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list] = {}  # key -> [bucket counts..., sum]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0] * len(self.buckets) + [0.0])
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    series[index] += 1
            series[-1] += value

    def count(self, **labels) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return int(series[len(self.buckets) - 1]) if series else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        lines = self.header()
        for key, series in items:
            for bound, count in zip(self.buckets, series):
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {count}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-1])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {series[len(self.buckets) - 1]}")
        return lines


class Registry:
    """The families one server exposes, rendered in registration order."""

    def __init__(self):
        self.families: list[_Family] = []

    def add(self, family):
        self.families.append(family)
        return family

    def render(self) -> str:
        return "\n".join(line for family in self.families for line in family.render()) + "\n"
