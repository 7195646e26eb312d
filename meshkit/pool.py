"""This process's connections to other instances, kept in step with the registry view.

A :class:`PeerPool` chooses instances and owns the lives of their
:class:`~meshkit.peer.Peer` connections: it makes a peer the first time an
instance is chosen, hands every message a peer receives to its
:class:`~meshkit.exchange.Exchange` (which owns what is in flight), closes
peers whose instance left the registry once nothing is in flight on them,
and keeps a failed instance out of choice for :data:`RETRY_FAILED_AFTER`
seconds while the registry still lists it. Choosing reads only memory.

Instance choice is load-aware: of the available instances, two are drawn at
random and the one with fewer requests in flight from this process wins
("power of two choices"); instances with a live connection are preferred over
ones still connecting. The random draws come from ``rng`` and the time from
``clock``, both given to the constructor, so tests can replay them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable

import zmq

from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .errors import ClientClosedError
from .exchange import Exchange
from .peer import CONNECTED, FAILED, Peer
from .record import InstanceRecord
from .registry import Registry
from .timing import wait_event

log = logging.getLogger("meshkit.pool")

# How long a failed instance is left alone before we try connecting again
# (while the registry still lists it).
RETRY_FAILED_AFTER = 2.0

Connect = Callable[["PeerPool", InstanceRecord], Peer]


def connect_zmq(pool: PeerPool, record: InstanceRecord) -> Peer:
    """The production ``connect``: a :class:`Peer` over a ZeroMQ DEALER in the pool's context."""
    return Peer(record, pool.ctx, pool.settings, pool.peer_message, pool.peer_changed, clock=pool.clock)


class PeerPool:
    """Peers of one client, chosen from ``registry``; sockets made in ``ctx``.

    ``connect(pool, record)`` makes the peer of a newly chosen instance
    (default :func:`connect_zmq`); the peer must report its messages to
    :meth:`peer_message` and its changes to :meth:`peer_changed`.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        connect: Connect = connect_zmq,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ctx = ctx
        self.clock = clock
        self._rng = rng or random.Random()
        self._connect = connect
        self.exchange = Exchange(settings, clock=clock, rng=self._rng, on_idle=self._on_peer_idle)
        self._peers: dict[str, Peer] = {}
        self._failed_at: dict[str, float] = {}
        self._pid = os.getpid()
        self._available = asyncio.Event()
        self.closed = False

    def start(self) -> None:
        self.registry.add_listener(self._on_registry_change)

    def close(self) -> None:
        """Retire every peer; what waits on them is settled (callers see ``closed``)."""
        if self.closed:
            return
        self.closed = True
        self.registry.remove_listener(self._on_registry_change)
        for peer in list(self._peers.values()):
            peer.retire("closed by its client")
        self._peers.clear()
        self._available.set()

    # -- choosing -------------------------------------------------------------

    def pick(self, service: str, exclude: set[str]) -> Peer | None:
        """An available instance of ``service`` not in ``exclude``, or ``None``."""
        connected: list[Peer] = []
        connecting: list[Peer] = []
        for record in self.registry.instances(service):
            if record.key in exclude or not record.is_up:
                continue
            peer = self.peer_for(record)
            if peer is None or not peer.available:
                continue
            (connected if peer.state == CONNECTED else connecting).append(peer)
        candidates = connected or connecting
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        load = self.exchange.load
        return a if load(a) <= load(b) else b

    def peer_for(self, record: InstanceRecord) -> Peer | None:
        """The peer of ``record``, connecting if needed; ``None`` while it is left alone after a failure."""
        peer = self._peers.get(record.key)
        if peer is not None:
            return peer
        if self.closed:
            raise ClientClosedError("client is closed")
        failed = self._failed_at.get(record.key)
        if failed is not None and self.clock.now() - failed < RETRY_FAILED_AFTER:
            return None
        if os.getpid() != self._pid:
            raise ClientClosedError("a client cannot be used across fork(); make a new one")
        peer = self._connect(self, record)
        self._peers[record.key] = peer
        return peer

    def next_retry(self, service: str) -> float | None:
        """When (on the pool's clock) the earliest failed instance of ``service`` may be tried again."""
        times = [self._failed_at[r.key] + RETRY_FAILED_AFTER
                 for r in self.registry.instances(service) if r.key in self._failed_at]
        return min(times) if times else None

    async def wait_changed(self, timeout: float) -> bool:
        """Wait until an instance may have become available (or ``timeout`` passed)."""
        self._available.clear()
        return await wait_event(self._available, timeout)

    def notify(self) -> None:
        """Wake callers waiting for an instance."""
        self._available.set()

    # -- events from peers and the registry -------------------------------------

    def peer_message(self, peer: Peer, frames: list[bytes]) -> None:
        """A message from ``peer``: an answer, for the exchange."""
        self.exchange.receive(peer, frames)

    def peer_changed(self, peer: Peer) -> None:
        """``peer`` connected, was marked draining, or failed (then it is forgotten and its requests settled)."""
        if peer.state == FAILED:
            in_flight = self.exchange.load(peer)
            log.log(logging.WARNING if in_flight else logging.INFO, "peer %s at %s %s (%d in flight)",
                    peer.key, peer.record.endpoint, peer.reason, in_flight)
            if self._peers.get(peer.key) is peer:
                del self._peers[peer.key]
            self._failed_at[peer.key] = peer.failed_at
            self.exchange.abandon(peer, lost=peer.lost)
        self.notify()

    def _on_peer_idle(self, peer: Peer) -> None:
        # Nothing left in flight on a draining peer: close it if its instance left the registry.
        if self.registry.get(peer.key) is None and self._peers.get(peer.key) is peer:
            del self._peers[peer.key]
            peer.close()
            self.exchange.forget(peer)

    def _on_registry_change(self) -> None:
        for key, peer in list(self._peers.items()):
            record = self.registry.get(key)
            if record is None:
                # Gone from the registry: finish what is in flight, then close.
                if not self.exchange.load(peer):
                    peer.close()
                    del self._peers[key]
                    self.exchange.forget(peer)
                else:
                    peer.mark_draining()
            else:
                peer.update(record)
        self._failed_at = {k: t for k, t in self._failed_at.items() if self.registry.get(k) is not None}
        self.notify()
