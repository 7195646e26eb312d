"""Statsd figures gathered in process between two flushes, bounded in names and memory.

A :class:`Tally` holds what one flush interval recorded: counters summed,
gauges as their last value (or the sum of their deltas), and timers as a
uniform sample of at most ``samples`` values per name plus how many values
there were. :meth:`Tally.lines` turns that into statsd lines that mean to a
statsd server what one datagram per event would have meant:

- a counter is one ``name:N|c`` line, the sum;
- a gauge is its last absolute value (``0|g`` then ``-v|g`` for a negative
  one, since a leading sign means a delta in statsd), or ``+d|g``/``-d|g``
  when the interval only moved it;
- a timer stays a timer: every sampled value is one ``name:v|ms`` line, and
  when values had to be left out each line carries ``|@rate`` with ``rate =
  kept / seen``, so the server's count (and counts per second) are the true
  ones and its mean, upper and percentiles come from a uniform sample. Timers
  are not pre-aggregated into gauges because percentiles cannot be merged
  across instances or flush intervals; samples can.

The number of distinct names held is capped: a name first seen when the cap
is reached is not kept, and :attr:`Tally.names_dropped` counts the figures
lost that way. Not thread-safe: the owner serialises access.
"""

from __future__ import annotations

import random

__all__ = ["Tally"]


class _Timer:
    __slots__ = ("samples", "seen")

    def __init__(self) -> None:
        self.seen = 0
        self.samples: list[float] = []


class Tally:
    """One flush interval's counters, timers and gauges; at most ``max_names`` names."""

    def __init__(self, max_names: int, samples: int) -> None:
        if max_names < 1 or samples < 1:
            raise ValueError("a tally needs room for at least one name and one sample")
        self.max_names = max_names
        self.samples = samples
        self.counts: dict[str, int] = {}
        self.timers: dict[str, _Timer] = {}
        self.gauges: dict[str, tuple[bool, float]] = {}  # name -> (absolute, value)
        self.names_dropped = 0
        self._random = random.Random().random

    def __len__(self) -> int:
        return len(self.counts) + len(self.timers) + len(self.gauges)

    def _full(self) -> bool:
        if len(self) >= self.max_names:
            self.names_dropped += 1
            return True
        return False

    def count(self, name: str, n: int) -> None:
        """Add ``n`` to counter ``name``."""
        counts = self.counts
        old = counts.get(name)
        if old is not None:
            counts[name] = old + n
        elif not self._full():
            counts[name] = n

    def time(self, name: str, ms: float) -> None:
        """Record one duration of ``ms`` milliseconds in timer ``name`` (reservoir sampling)."""
        timer = self.timers.get(name)
        if timer is None:
            if self._full():
                return
            timer = self.timers[name] = _Timer()
        timer.seen += 1
        if len(timer.samples) < self.samples:
            timer.samples.append(ms)
        else:
            # Algorithm R: every value seen so far stays in the sample with equal chance.
            slot = int(self._random() * timer.seen)  # randrange costs 5x more, per call
            if slot < self.samples:
                timer.samples[slot] = ms

    def gauge(self, name: str, value: float, delta: bool = False) -> None:
        """Set gauge ``name`` to ``value``, or move it by ``value`` when ``delta``."""
        gauges = self.gauges
        old = gauges.get(name)
        if old is None:
            if not self._full():
                gauges[name] = (not delta, value)
        elif delta:
            gauges[name] = (old[0], old[1] + value)
        else:
            gauges[name] = (True, value)

    def lines(self) -> list[str]:
        """The statsd lines for everything held (see the module doc for their meaning)."""
        out = [f"{name}:{n}|c" for name, n in self.counts.items()]
        for name, timer in self.timers.items():
            kept = len(timer.samples)
            tail = "|ms" if kept == timer.seen else f"|ms|@{kept / timer.seen:.6g}"
            out.extend(f"{name}:{ms:0.6f}{tail}" for ms in timer.samples)
        for name, (absolute, value) in self.gauges.items():
            shown = int(value) if float(value).is_integer() else value
            if not absolute:
                out.append(f"{name}:{'+' if value >= 0 else ''}{shown}|g")
            elif value < 0:
                out.extend((f"{name}:0|g", f"{name}:{shown}|g"))
            else:
                out.append(f"{name}:{shown}|g")
        return out
