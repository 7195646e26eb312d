"""Per-connection variable difficulty: hold each miner near a configured share rate.

A miner ten thousand times faster than another would send ten thousand
times the shares at one difficulty; vardiff raises its difficulty instead,
so every connection sends about one share per ``share_interval`` seconds
whatever its hash rate, and the pool's share traffic (and the memory of
accepted hashes kept for duplicate checks) stays proportional to the number
of connections.

:class:`Vardiff` is pure: the caller passes ``now`` (a monotonic clock's
reading) with every event, so tests drive time instead of sleeping.

The rule, checked at each share and at each :meth:`Vardiff.tick`:

* a *window* starts at the last retarget; once it is ``retarget_interval``
  seconds old (or already holds ``burst_shares`` shares, so that a fast
  miner starting at the minimum is corrected within seconds, not minutes),
  the observed interval is ``window age / shares in it``;
* within ``variance`` (a fraction) of ``share_interval``, nothing changes;
* else the new difficulty is ``difficulty * share_interval / observed``,
  by at most a factor ``max_step`` either way, clamped to
  ``[min_difficulty, max_difficulty]``;
* a window with no share at all counts as one share at its age, so a miner
  that went quiet (too high a difficulty) is brought down step by step.

A new difficulty is announced with ``mining.set_difficulty`` and applies to
the next job; shares at the previous difficulty are still in flight, so
:attr:`Vardiff.judged_difficulty` is the lower of the two until the caller
says with :meth:`Vardiff.job_sent` that a job went out after the change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class VardiffConfig:
    """The knobs of :class:`Vardiff`; the defaults suit a pool serving CPU and ASIC miners alike."""

    share_interval: float = 10.0
    min_difficulty: float = 1.0
    max_difficulty: float = float(2**32)
    retarget_interval: float = 60.0
    variance: float = 0.3
    max_step: float = 4.0
    burst_shares: int = 24

    def __post_init__(self) -> None:
        numbers = (self.share_interval, self.min_difficulty, self.max_difficulty, self.retarget_interval)
        if not all(math.isfinite(x) and x > 0 for x in numbers):
            raise ValueError("share_interval, difficulties and retarget_interval must be positive and finite")
        if self.min_difficulty > self.max_difficulty:
            raise ValueError("min_difficulty is above max_difficulty")
        if not 0 <= self.variance < 1 or not self.max_step > 1 or self.burst_shares < 1:
            raise ValueError("variance is in [0, 1), max_step above 1, burst_shares at least 1")


@dataclass(frozen=True)
class VardiffState:
    """A :class:`Vardiff` as plain numbers, to keep in a connection's shared state between shares.

    ``window_start`` is on whatever clock the caller passes as ``now``; a
    pool whose shares land on several processes must use a clock they share
    (wall time), not each one's monotonic clock.
    """

    difficulty: float
    previous: float
    window_start: float
    shares: int


class Vardiff:
    """One connection's difficulty, retargeted from the shares it sends.

    :meth:`record_share` and :meth:`tick` return the new difficulty when
    they changed it (the caller then sends ``mining.set_difficulty``), else
    ``None``.
    """

    def __init__(self, config: VardiffConfig, now: float, difficulty: float | None = None) -> None:
        self.config = config
        start = config.min_difficulty if difficulty is None else difficulty
        self._difficulty = self._clamp(start)
        self._previous = self._difficulty  # what shares in flight may still be worked at
        self._window_start = now
        self._shares = 0

    @classmethod
    def restore(cls, config: VardiffConfig, state: VardiffState) -> Vardiff:
        """The vardiff :meth:`state` described (its difficulties clamped to ``config``)."""
        vd = cls(config, state.window_start, state.difficulty)
        vd._previous = vd._clamp(state.previous)
        vd._shares = max(0, int(state.shares))
        return vd

    def state(self) -> VardiffState:
        """Everything needed to :meth:`restore` this vardiff elsewhere."""
        return VardiffState(self._difficulty, self._previous, self._window_start, self._shares)

    @property
    def difficulty(self) -> float:
        """The difficulty currently asked of the connection."""
        return self._difficulty

    @property
    def judged_difficulty(self) -> float:
        """The difficulty to judge the connection's shares at: the lower of the old and new until a job is sent."""
        return min(self._previous, self._difficulty)

    def job_sent(self) -> None:
        """A job went to the connection after the last change: from now on only the new difficulty counts."""
        self._previous = self._difficulty

    def record_share(self, now: float) -> float | None:
        """Count one accepted share at ``now``; retarget if the window is due."""
        self._shares += 1
        return self._check(now)

    def tick(self, now: float) -> float | None:
        """Retarget if the window is due although no share came (call it every few seconds)."""
        return self._check(now)

    def _check(self, now: float) -> float | None:
        cfg = self.config
        age = max(now - self._window_start, 0.0)
        if age < cfg.retarget_interval and self._shares < cfg.burst_shares:
            return None
        if self._shares == 0 and age < cfg.share_interval * (1 + cfg.variance):
            return None  # no share yet, but not yet overdue either
        observed = age / max(self._shares, 1)
        self._window_start, self._shares = now, 0
        if observed > 0 and abs(observed / cfg.share_interval - 1) <= cfg.variance:
            return None
        # A zero age (a burst within one clock tick) is as fast as it gets:
        # take the largest step up.
        factor = cfg.share_interval / observed if observed > 0 else cfg.max_step
        factor = min(max(factor, 1 / cfg.max_step), cfg.max_step)
        new = self._clamp(self._difficulty * factor)
        if new == self._difficulty:
            return None
        self._previous = min(self._previous, self._difficulty)  # two changes before a job: keep the lowest
        self._difficulty = new
        return new

    def _clamp(self, value: float) -> float:
        return min(max(value, self.config.min_difficulty), self.config.max_difficulty)
