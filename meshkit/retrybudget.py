"""The retry budget: how many retries one client may make, as a share of its recent calls.

Linkerd's shape: over the last ``Settings.retry_window`` seconds a client
may retry ``retry_ratio`` (default 0.2) times as many calls as it made, plus
``retry_min_per_second`` x the window (default 10 per second), so that a
client making few calls can still fail over, and a failing service costs at
most 20% more traffic, never a retry storm. It limits every retry the client
makes: of calls that cannot have run (no connection, ``draining``,
``overloaded``) and of idempotent calls lost in flight.

Time is counted in one-second buckets (a ring of ``retry_window`` of them),
so a call or a retry costs an increment, and the window slides a second at a
time. (Not :mod:`meshkit.budget`, which bounds the bytes a server holds.)
"""

from __future__ import annotations

import math
import time

from .clock import SYSTEM_CLOCK, Clock
from .config import Settings


class RetryBudget:
    """Calls and retries of one client over a sliding window (see the module doc)."""

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._ratio = settings.retry_ratio
        self._window = max(1, math.ceil(settings.retry_window))
        self._floor = settings.retry_min_per_second * self._window
        self._clock = clock
        self._now = time.monotonic if clock is SYSTEM_CLOCK else clock.now  # read on every call
        self._calls = [0] * self._window
        self._retries = [0] * self._window
        self._second = int(self._now())
        self.retried = 0  # retries allowed, ever (a metric)
        self.refused = 0  # retries refused for want of budget, ever (a metric)

    def _advance(self) -> int:
        second = int(self._now())
        if second != self._second:
            if second - self._second >= self._window:
                self._calls = [0] * self._window
                self._retries = [0] * self._window
            else:
                for s in range(self._second + 1, second + 1):
                    self._calls[s % self._window] = 0
                    self._retries[s % self._window] = 0
            self._second = second
        return second % self._window

    def called(self) -> None:
        """A call was made (its first attempt): the budget grows by ``retry_ratio``."""
        self._calls[self._advance()] += 1

    def allows(self) -> bool:
        """Take one retry from the budget if there is one; False (counted) if it is spent."""
        slot = self._advance()
        if sum(self._retries) < self._ratio * sum(self._calls) + self._floor:
            self._retries[slot] += 1
            self.retried += 1
            return True
        self.refused += 1
        return False

    @property
    def available(self) -> float:
        """Retries left in the window now (may be fractional)."""
        self._advance()
        return max(0.0, self._ratio * sum(self._calls) + self._floor - sum(self._retries))
