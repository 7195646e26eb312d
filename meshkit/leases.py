"""The lease arithmetic of cluster-wide resource limits, as pure functions of data and time.

An instance never asks Redis for each call: it leases a batch of a
resource's units and spends them locally (see :mod:`meshkit.resources` for
the Redis side and ``docs/limits.md`` for the accuracy this gives).

:class:`RateLease` holds tokens of one rate window. Windows are cut on
Redis's clock (``window`` seconds each, quota ``rate * window`` spread so that
any ``k`` consecutive windows grant at most ``ceil(k * rate * window)``). A
lease is valid until the end of its window *measured from when the request
was sent*: the request left before Redis read its clock, so the local expiry
is never later than the real end of the window, whatever the clocks say.
Tokens left at the end of a window lapse (under-use, never over-use); the
next batch asks for what this instance spent in its last window, so an idle
instance strands little.

:class:`SlotLease` holds concurrency slots. Redis keeps every instance's
holding with an expiry (``ttl``); the instance renews it every ``ttl / 3``
and, since the renewal left before Redis stamped it, stops taking new slots
at ``sent + ttl`` by its own clock if renewals fail. Idle slots go back: all
of them at a renewal, and down to one batch as soon as more than two
batches are idle (so at most one return per batch of calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RateLease", "SlotLease", "batch_size", "window_quota"]


def window_quota(rate: float, window: float, index: int) -> int:
    """Tokens window ``index`` grants: ``floor((i+1)·r·w) - floor(i·r·w)`` (the same in Redis's script).

    Summed over any ``k`` consecutive windows this is at most ``ceil(k·r·w)``,
    so a fractional per-window quota (2 per second in 100 ms windows) is met
    on average without ever being exceeded.
    """
    per = rate * window
    return math.floor((index + 1) * per + 1e-9) - math.floor(index * per + 1e-9)


def batch_size(limit_per_lease: float, fraction: float, want: int) -> int:
    """Units to ask for in one lease: ``fraction`` of the limit, at least ``want``, at least 1."""
    return max(want, 1, math.ceil(limit_per_lease * fraction))


@dataclass(slots=True)
class RateLease:
    """Tokens of one rate window, leased from the cluster (see the module doc)."""

    rate: float
    window: float
    fraction: float
    tokens: int = 0
    index: int = -1  # the Redis window the tokens belong to
    expires: float = 0.0  # local clock time the tokens lapse
    spent_in_window: int = 0  # spent from the current window's leases
    spent_last_window: int = 0

    def take(self, n: int, now: float) -> bool:
        """Spend ``n`` tokens if the lease holds them and has not lapsed."""
        if now >= self.expires:
            self._roll(-1)
            return False
        if self.tokens < n:
            return False
        self.tokens -= n
        self.spent_in_window += n
        return True

    def want(self, n: int) -> int:
        """How many tokens to ask for when ``n`` are needed: last window's spend, capped by one batch."""
        cap = batch_size(self.rate * self.window, self.fraction, n)
        return max(n, min(cap, self.spent_last_window))

    def grant(self, granted: int, index: int, left: float, sent: float) -> None:
        """Record Redis's answer: ``granted`` tokens of window ``index``, ``left`` seconds of it at Redis.

        ``sent`` is the local time the request left; the tokens lapse at
        ``sent + left``, never later than the window's real end.
        """
        if index != self.index:
            self._roll(index)
        self.tokens += granted
        self.expires = sent + left

    def _roll(self, index: int) -> None:
        if self.spent_in_window or index != -1:
            self.spent_last_window = self.spent_in_window
        self.spent_in_window = 0
        self.tokens = 0
        self.index = index


@dataclass(slots=True)
class SlotLease:
    """Concurrency slots leased from the cluster (see the module doc)."""

    limit: int
    fraction: float
    ttl: float
    leased: int = 0  # slots Redis counts as this instance's
    in_use: int = 0
    expires: float = 0.0  # local clock time the lease lapses unless renewed

    def take(self, n: int, now: float) -> bool:
        """Use ``n`` slots if the lease has them free and has not lapsed."""
        if now >= self.expires or self.leased - self.in_use < n:
            return False
        self.in_use += n
        return True

    def put(self, n: int) -> None:
        """Give back ``n`` slots taken by :meth:`take` (to the lease, not yet to Redis)."""
        self.in_use = max(0, self.in_use - n)

    @property
    def batch(self) -> int:
        return batch_size(self.limit, self.fraction, 1)

    def target_for(self, n: int) -> int:
        """The holding to ask Redis for when ``n`` more slots are needed now."""
        return self.in_use + max(n, self.batch)

    def target_to_return(self) -> int | None:
        """The holding to shrink to after a :meth:`put`, or ``None`` while few enough are idle."""
        idle = self.leased - self.in_use
        if idle > 2 * self.batch:
            return self.in_use + self.batch
        return None

    def target_at_renewal(self) -> int:
        """The holding to renew: only the slots in use (idle ones go back to the cluster)."""
        return self.in_use

    def grant(self, held: int, sent: float) -> None:
        """Record Redis's answer: this instance now holds ``held`` slots, until ``sent + ttl``."""
        self.leased = held
        self.expires = sent + self.ttl

    @property
    def over(self) -> int:
        """Slots in use beyond the lease (after a lapse or a shrunken limit): the slack in force now."""
        return max(0, self.in_use - self.leased)
