"""extranonce1: unique per live connection, across every gateway instance of a pool.

Two connections given the same extranonce1 (with the same job) search the
same space and submit each other's shares as duplicates; worse, one
connection's accepted share would read as a duplicate on the other. So
extranonce1 must be unique among live connections of the whole pool, with
no lock taken per connection.

The scheme: ``extranonce1 = prefix || counter``, big-endian.

* ``prefix`` (``prefix_size`` bytes, 2 by default: 65,536 instances) is
  unique per live *instance*. An instance claims one when it starts, in the
  registry's Redis, with ``SET <ns>:stratum:en1:<prefix> <instance-id> NX``
  and the same TTL and heartbeat as its registry record, trying the
  candidates of :func:`prefix_candidates` in order; it releases it when it
  stops. (That claim is I/O and lives with the gateway; this module only
  says which prefixes to try and what an owned prefix yields.)
* ``counter`` (the rest, 2 bytes by default) is unique among the
  instance's own live connections: :class:`ExtranonceAllocator` hands out
  the next free value and takes it back when the connection closes.

The pair is unique across instances because prefixes are, and within an
instance because live counters are. A value is reused only after its
connection has gone, which is harmless: the new connection's shares are new
work unless it resubmits the old one's, and then "duplicate" is the truth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator


class ExtranonceExhaustedError(RuntimeError):
    """Every counter value under this instance's prefix is held by a live connection."""


def prefix_candidates(instance_id: str, prefix_size: int = 2) -> Iterator[int]:
    """Every prefix, in an order that starts at a hash of ``instance_id``.

    Instances starting together then try different prefixes first, so the
    ``SET NX`` claims rarely collide; the walk still covers all of them.
    """
    space = 1 << (8 * prefix_size)
    start = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:8], "big") % space
    for step in range(space):
        yield (start + step) % space


class ExtranonceAllocator:
    """extranonce1 values under one instance prefix, each held by at most one live connection.

    ``size`` is extranonce1's length in bytes (sent in ``mining.subscribe``'s
    answer), ``prefix_size`` of it being the instance prefix. Allocation is
    O(1) unless nearly every counter value is in use (then it walks to the
    next free one; at most ``2**(8*(size-prefix_size))`` steps).
    """

    def __init__(self, prefix: int, *, size: int = 4, prefix_size: int = 2) -> None:
        if not 0 < prefix_size < size <= 8:
            raise ValueError("0 < prefix_size < size <= 8")
        if not 0 <= prefix < 1 << (8 * prefix_size):
            raise ValueError(f"prefix {prefix} does not fit in {prefix_size} bytes")
        self.size = size
        self.prefix = prefix
        self._prefix_bytes = prefix.to_bytes(prefix_size, "big")
        self._counter_size = size - prefix_size
        self._capacity = 1 << (8 * self._counter_size)
        self._next = 0
        self._live: set[int] = set()

    @property
    def live(self) -> int:
        """How many extranonce1 values are held now."""
        return len(self._live)

    def allocate(self) -> bytes:
        """A value no live connection holds; :class:`ExtranonceExhaustedError` if none is left."""
        if len(self._live) >= self._capacity:
            raise ExtranonceExhaustedError(f"all {self._capacity} extranonce1 values of prefix {self.prefix} in use")
        while self._next in self._live:
            self._next = (self._next + 1) % self._capacity
        counter = self._next
        self._next = (self._next + 1) % self._capacity
        self._live.add(counter)
        return self._prefix_bytes + counter.to_bytes(self._counter_size, "big")

    def owns(self, extranonce1: bytes) -> bool:
        """True if ``extranonce1`` has this allocator's size and prefix."""
        return len(extranonce1) == self.size and extranonce1.startswith(self._prefix_bytes)

    def release(self, extranonce1: bytes) -> None:
        """Give a value back when its connection closes; a value not held is ignored."""
        if self.owns(extranonce1):
            self._live.discard(int.from_bytes(extranonce1[len(self._prefix_bytes) :], "big"))
