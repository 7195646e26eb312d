"""Per-method counters of one instance: calls, errors by code, the last error, a latency histogram.

``_mesh.stats`` answers :meth:`Stats.to_dict`::

    {"bucket_bounds_us": [0, 10, 100, 1000, 10000, 100000, 1000000, 10000000],
     "methods": {name: {"calls", "errors": {code: n}, "last_error", "buckets": [n, ...], "in_flight"}},
     "pushes": {topic: {...the same...}}}

``buckets[i]`` counts the calls whose latency fell in ``[bounds[i], bounds[i+1])``
(the last one is open). :func:`quantile` reads p50/p99 back from buckets
(summed across instances by :mod:`meshkit.observe.query`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .spans import BUCKET_BOUNDS_US

MAX_NAMES = 1024  # methods or topics counted per instance; a peer cannot grow this without bound


class Counter:
    """The counters of one method or topic."""

    __slots__ = ("buckets", "calls", "errors", "in_flight", "last_error")

    def __init__(self) -> None:
        self.calls = 0
        self.errors: dict[str, int] = {}
        self.last_error: dict[str, Any] | None = None
        self.buckets = [0] * len(BUCKET_BOUNDS_US)
        self.in_flight = 0

    def finish(self, bucket: int, code: str | None, message: str = "") -> None:
        """One call ended, its latency in bucket ``bucket`` (:func:`~.spans.bucket_of`).

        (:meth:`meshkit.observe.observer.Observer.finished` does the same inline.)
        """
        self.calls += 1
        self.in_flight -= 1
        self.buckets[bucket] += 1
        if code is not None:
            self.failed(code, message)

    def failed(self, code: str, message: str) -> None:
        """Count an error ``code`` and remember it as the last one."""
        self.errors[code] = self.errors.get(code, 0) + 1
        self.last_error = {"code": code, "message": message, "unix": time.time()}

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "errors": dict(self.errors), "last_error": self.last_error,
                "buckets": list(self.buckets), "in_flight": self.in_flight}


class Stats:
    """Counters per method and per topic; names beyond :data:`MAX_NAMES` are counted as ``"(other)"``."""

    def __init__(self) -> None:
        self.methods: dict[str, Counter] = {}
        self.pushes: dict[str, Counter] = {}

    def counter(self, push: bool, name: str) -> Counter:
        table = self.pushes if push else self.methods
        found = table.get(name)
        if found is None:
            if len(table) >= MAX_NAMES:
                name = "(other)"
                found = table.get(name)
            if found is None:
                found = table[name] = Counter()
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"bucket_bounds_us": list(BUCKET_BOUNDS_US),
                "methods": {k: v.to_dict() for k, v in self.methods.items()},
                "pushes": {k: v.to_dict() for k, v in self.pushes.items()}}


def quantile(buckets: Sequence[int], q: float, bounds: Sequence[int] = BUCKET_BOUNDS_US) -> float | None:
    """The ``q`` quantile (0..1) in µs read from a histogram: the upper bound of its bucket.

    The last bucket is open, so a quantile landing there is reported as ten times
    its lower bound. ``None`` for an empty histogram.
    """
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return float(bounds[i + 1] if i + 1 < len(bounds) else bounds[i] * 10)
    return float(bounds[-1] * 10)
