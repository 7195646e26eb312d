"""What the calls a server is serving may hold: a budget per connection, and the instance's.

A call is charged to the :class:`~meshkit.budget.Budget` of the connection
it came on (``max_calls_per_peer``, ``max_call_bytes_per_peer``) and to the
instance's (``held``: ``max_inflight``, ``max_inflight_bytes``, which
pushes share) from admission until its answer is sent. A connection's
budget exists only while it holds a call, so what the table holds is
bounded by the calls in flight, not by how many peers ever connected.
"""

from __future__ import annotations

from .budget import Budget
from .config import Settings


class CallQuota:
    """The per-connection budgets of one server's calls, over the instance's ``held`` budget."""

    def __init__(self, settings: Settings, held: Budget) -> None:
        self.settings = settings
        self.held = held
        self._by_peer: dict[bytes, Budget] = {}

    @property
    def connections(self) -> int:
        """Connections holding at least one call."""
        return len(self._by_peer)

    def refusal(self, identity: bytes, cost: int) -> str | None:
        """Why a call of ``cost`` from ``identity`` does not fit now, or ``None`` if it does."""
        peer = self._by_peer.get(identity)  # none: it holds nothing, and an empty budget takes anything
        if peer is not None and not peer.fits(cost):
            return f"this connection has {peer.count} calls ({peer.bytes} bytes) in flight"
        if not self.held.fits(cost):
            return f"the instance holds {self.held.count} requests ({self.held.bytes} bytes)"
        return None

    def take(self, identity: bytes, cost: int) -> None:
        """Charge an admitted call (after :meth:`refusal` said it fits)."""
        peer = self._by_peer.get(identity)
        if peer is None:
            peer = self._by_peer[identity] = self._new_budget()
        peer.take(cost)
        self.held.take(cost)

    def give(self, identity: bytes, cost: int) -> None:
        """Give back what a finished call held."""
        self.held.give(cost)
        peer = self._by_peer.get(identity)
        if peer is not None:
            peer.give(cost)
            if not peer.count:
                del self._by_peer[identity]

    def _new_budget(self) -> Budget:
        return Budget(self.settings.max_calls_per_peer, self.settings.max_call_bytes_per_peer)
