"""How much a remote peer may make an instance hold, counted in requests and in bytes.

A :class:`Budget` is a pair of limits (requests, bytes) and what is held
against them now. The server keeps one for the whole instance, one per
connection for the calls it is serving, and one per connection for the
pushes waiting for their handler; a request is admitted only if it fits in
every budget it would be charged to, and is answered ``overloaded``
otherwise. What a request costs is :func:`request_cost`: its frames plus a
fixed allowance for the task, context and bookkeeping that serving it takes,
plus what the body's arrays and maps may take once decoded (MessagePack's
worst expansion: one byte, an empty array, becomes a 64-byte object).

An empty budget admits one request whatever its size, so that a limit set
below ``max_message_size`` slows a peer down instead of refusing its large
messages for ever.
"""

from __future__ import annotations

from .wire import CONTAINER_COST

__all__ = ["REQUEST_OVERHEAD", "Budget", "request_cost"]

# Bytes charged per request on top of its frames: an asyncio task, its
# coroutine, a CallContext and a trace context. Measured: 100,000 calls held
# by one instance took 339 MiB, about 3.4 KiB each with ~100-byte frames.
REQUEST_OVERHEAD = 3 * 1024


def request_cost(header: bytes, body: bytes, containers: int) -> int:
    """What holding a request is charged, in bytes.

    ``containers`` is how many arrays and maps its body decoded to (counted
    by :func:`~meshkit.wire.unpack_body`); each is charged as the empty list
    it may be.
    """
    return REQUEST_OVERHEAD + len(header) + len(body) + CONTAINER_COST * containers


class Budget:
    """At most ``max_count`` requests and ``max_bytes`` bytes held at once.

    :meth:`fits` asks, :meth:`take` charges and :meth:`give` returns; the
    caller gives back exactly what it took, once.
    """

    __slots__ = ("bytes", "count", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0

    def fits(self, cost: int) -> bool:
        """Whether one more request of ``cost`` bytes may be held (always, when empty)."""
        return not self.count or (self.count < self.max_count and self.bytes + cost <= self.max_bytes)

    def take(self, cost: int) -> None:
        self.count += 1
        self.bytes += cost

    def give(self, cost: int) -> None:
        self.count -= 1
        self.bytes -= cost

    def __repr__(self) -> str:
        return f"<Budget {self.count}/{self.max_count} requests, {self.bytes}/{self.max_bytes} bytes>"
