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
holding and demand (slots in use plus calls waiting) with an expiry
(``ttl``); the instance renews it every ``ttl / 3`` and, since the renewal
left before Redis stamped it, stops taking new slots at ``sent + ttl`` by its
own clock if renewals fail. Idle slots go back: all of them at a renewal,
and down to one batch as soon as more than two batches are idle (so at most
one return per batch of calls). Under contention every instance with demand
has a fair *share* of the limit (``limit // d`` each, the remainder
rotating every ``ttl``): an instance over its share takes no new slot and
returns each one a finished call frees, so a busy instance cannot starve
the others by reusing its own slots forever.
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
    drained: bool = False  # the cluster had no more tokens in window ``index``
    next_window: float = 0.0  # local clock time by which the next window has surely begun at Redis

    def take(self, n: int, now: float) -> bool:
        """Spend ``n`` tokens if the lease holds them and has not lapsed."""
        if now >= self.expires or self.tokens < n:  # lapsed tokens stay until the next grant rolls them
            return False
        self.tokens -= n
        self.spent_in_window += n
        return True

    def want(self, n: int) -> int:
        """How many tokens to ask for when ``n`` are needed: last window's spend, capped by one batch."""
        cap = batch_size(self.rate * self.window, self.fraction, n)
        return max(n, min(cap, self.spent_last_window))

    def grant(self, granted: int, wanted: int, index: int, left: float, sent: float, received: float) -> None:
        """Record Redis's answer: ``granted`` of ``wanted`` tokens of window ``index``, ``left`` s of it at Redis.

        ``sent`` and ``received`` are the local times the request left and its
        answer came. The tokens lapse at ``sent + left``, never later than the
        window's real end; the next window has surely begun by ``received + left``.
        """
        if index != self.index:
            self._roll(index)
        self.tokens += granted
        self.expires = sent + left
        self.next_window = received + left
        self.drained = granted < wanted

    def should_ask(self, now: float) -> bool:
        """Whether asking Redis can help now: not while the cluster is known drained until the next window."""
        return not (self.drained and now < self.next_window)

    def _roll(self, index: int) -> None:
        self.spent_last_window = self.spent_in_window
        self.spent_in_window = 0
        self.tokens = 0
        self.index = index
        self.drained = False


@dataclass(slots=True)
class SlotLease:
    """Concurrency slots leased from the cluster (see the module doc)."""

    limit: int
    fraction: float
    ttl: float
    leased: int = 0  # slots Redis counts as this instance's
    in_use: int = 0
    expires: float = 0.0  # local clock time the lease lapses unless renewed
    share: int = 0  # this instance's fair share, as Redis last said (set by grant)
    waiting: int = 0  # calls on this instance waiting for a slot (told to Redis as demand)

    def take(self, n: int, now: float) -> bool:
        """Use ``n`` slots if the lease has them free, within the share, and has not lapsed."""
        if now >= self.expires or self.in_use + n > min(self.leased, self.share):
            return False
        self.in_use += n
        return True

    @property
    def demand(self) -> int:
        """Slots this instance would use now: in use plus waited for."""
        return self.in_use + self.waiting

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
        """The holding to shrink to after a :meth:`put`, or ``None`` while it may be kept.

        Down to one spare batch when more than two batches are idle, and never
        above the share (nor below what is in use).
        """
        keep = self.leased
        if self.leased - self.in_use > 2 * self.batch:
            keep = self.in_use + self.batch
        keep = min(keep, max(self.in_use, self.share))
        return keep if keep < self.leased else None

    def target_at_renewal(self) -> int:
        """The holding to renew: only the slots in use (idle ones go back to the cluster)."""
        return self.in_use

    def grant(self, held: int, share: int, sent: float) -> None:
        """Record Redis's answer: ``held`` slots until ``sent + ttl``, and a fair share of ``share``."""
        self.leased = held
        self.share = share
        self.expires = sent + self.ttl

    @property
    def over(self) -> int:
        """Slots in use beyond the lease (after a lapse or a shrunken limit): the slack in force now."""
        return max(0, self.in_use - self.leased)
