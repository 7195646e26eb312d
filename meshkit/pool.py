"""This process's connections to other instances, kept in step with the registry view.

A :class:`PeerPool` makes a :class:`~meshkit.peer.Peer` the first time an
instance is chosen, routes every answer to the request waiting for it, closes
peers whose instance left the registry once nothing is in flight on them, and
keeps a failed instance out of choice for :data:`RETRY_FAILED_AFTER` seconds
while the registry still lists it. Choosing reads only memory.

Instance choice is load-aware: of the available instances, two are drawn at
random and the one with fewer requests in flight from this process wins
("power of two choices"); instances with a live connection are preferred over
ones still connecting.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time

import zmq

from . import wire
from .config import Settings
from .errors import ClientClosedError, ProtocolError
from .peer import CONNECTED, FAILED, Peer
from .record import InstanceRecord
from .registry import Registry
from .timing import wait_event
from .untrusted import LogThrottle

log = logging.getLogger("meshkit.pool")

# How long a failed instance is left alone before we try connecting again
# (while the registry still lists it).
RETRY_FAILED_AFTER = 2.0


class PeerPool:
    """Peers of one client, chosen from ``registry``; sockets made in ``ctx``."""

    def __init__(self, settings: Settings, registry: Registry, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.settings = settings
        self.registry = registry
        self._ctx = ctx
        self._peers: dict[str, Peer] = {}
        self._failed_at: dict[str, float] = {}
        self._ids = itertools.count(random.getrandbits(32) + 1)
        self._pid = os.getpid()
        self._available = asyncio.Event()
        self._throttle = LogThrottle(log, settings.log_repeat_interval)
        self.dropped = 0  # answers that matched nothing or could not be read
        self.closed = False

    def start(self) -> None:
        self.registry.add_listener(self._on_registry_change)

    def close(self) -> None:
        """Close every peer; what waits on them is failed (callers see ``closed``)."""
        if self.closed:
            return
        self.closed = True
        self.registry.remove_listener(self._on_registry_change)
        for peer in list(self._peers.values()):
            peer.fail(lost=True, reason="closed by its client")
        self._peers.clear()
        self._available.set()

    def next_id(self) -> int:
        return next(self._ids)

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
        a, b = random.sample(candidates, 2)
        return a if a.load <= b.load else b

    def peer_for(self, record: InstanceRecord) -> Peer | None:
        """The peer of ``record``, connecting if needed; ``None`` while it is left alone after a failure."""
        peer = self._peers.get(record.key)
        if peer is not None:
            return peer
        if self.closed:
            raise ClientClosedError("client is closed")
        failed = self._failed_at.get(record.key)
        if failed is not None and time.monotonic() - failed < RETRY_FAILED_AFTER:
            return None
        if os.getpid() != self._pid:
            raise ClientClosedError("a client cannot be used across fork(); make a new one")
        peer = Peer(record, self._ctx, self.settings, self._on_peer_message, self._on_peer_state)
        self._peers[record.key] = peer
        return peer

    def next_retry(self, service: str) -> float | None:
        """When (monotonic) the earliest failed instance of ``service`` may be tried again."""
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

    def _on_peer_state(self, peer: Peer) -> None:
        if peer.state == FAILED:
            if self._peers.get(peer.key) is peer:
                del self._peers[peer.key]
            self._failed_at[peer.key] = peer.failed_at
        self.notify()

    def _on_registry_change(self) -> None:
        for key, peer in list(self._peers.items()):
            record = self.registry.get(key)
            if record is None:
                # Gone from the registry: finish what is in flight, then close.
                if not peer.pending:
                    peer.close()
                    del self._peers[key]
                else:
                    peer.draining = True
            else:
                peer.update(record)
        self._failed_at = {k: t for k, t in self._failed_at.items() if self.registry.get(k) is not None}
        self.notify()

    def _on_peer_message(self, peer: Peer, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.dropped += 1
            self._throttle.log("frames", logging.WARNING, "dropping %d-frame message from %s", len(frames), peer.key)
            return
        try:
            header = wire.decode_header(frames[0])
        except ProtocolError as exc:
            self.dropped += 1
            self._throttle.log(exc.code, logging.WARNING, "dropping malformed answer from %s: %s", peer.key, exc)
            return
        pending = peer.pending.pop(header.id, None)
        if pending is not None:
            pending.on_answer(header.kind, frames[1])
        if peer.draining and not peer.pending and self.registry.get(peer.key) is None:
            peer.close()
            self._peers.pop(peer.key, None)
