"""This process's connections to other instances, kept in step with the registry view.

A :class:`PeerPool` chooses instances and owns the lives of their
:class:`~meshkit.peer.Peer` connections: it makes a peer the first time an
instance is chosen, hands every message a peer receives to its
:class:`~meshkit.exchange.Exchange` (which owns what is in flight), closes
peers whose instance left the registry once nothing is in flight on them,
and keeps a failed instance out of choice for :data:`RETRY_FAILED_AFTER`
seconds while the registry still lists it. Choosing reads only memory.

Instance choice is load-aware: of the available instances, two different ones
are drawn at random, each pair equally likely, and the less loaded one wins
("power of two choices"). An instance's
load is the larger of this process's requests in flight on it and what the
instance itself last reported: every ``Settings.load_report_interval``
seconds the pool PINGs each connected peer, and its PONG's in-flight count
(every caller's calls, queued ones included) is kept until the next one, so
many callers spread their load by what the instances hold, not only by what
each of them sent. A PONG saying ``draining`` marks the peer draining.
Instances with a live connection are preferred over ones still connecting. Instances this caller has ejected for failing
(:mod:`meshkit.ejection`, :attr:`PeerPool.ejector`) are left out of choice
until their probe; the pool's :attr:`PeerPool.retry_budget`
(:mod:`meshkit.retrybudget`) is what the client draws its retries from.
The random draws come from ``rng`` and the time from ``clock``, both given to the constructor, so tests can replay them.

The available instances of a service are worked out once and kept until
something they depend on changes: the registry view (a new list of the
service's records), a peer's state (every change reaches
:meth:`PeerPool.peer_changed`, as :class:`~meshkit.peer.Peer` promises), a
new or dropped peer, or the end of a failed instance's
:data:`RETRY_FAILED_AFTER`. A pick with exclusions, or while the ejector
holds any instance's record, works from the registry view as before (both
are rare: a retry, a failing instance). Building the lists per call, and
``random.sample`` for the draw, were 10% of a gateway's CPU under pipelined
load (py-spy, ``bench/edge.py --profile``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
from collections.abc import Callable, Collection
from typing import Any

import zmq

from . import wire
from .clock import SYSTEM_CLOCK, Clock, TimerHandle
from .codes import InstanceState
from .config import Settings
from .ejection import Ejector
from .errors import ClientClosedError
from .exchange import DeadlinePassed, Exchange, NotDelivered
from .peer import CONNECTED, CONNECTING, FAILED, Peer
from .record import InstanceRecord
from .registry import Registry
from .retrybudget import RetryBudget
from .timing import wait_event

log = logging.getLogger("meshkit.pool")

# How long a failed instance is left alone before we try connecting again
# (while the registry still lists it).
RETRY_FAILED_AFTER = 2.0

Connect = Callable[["PeerPool", InstanceRecord], Peer]


class _Choice:
    """The available peers of one service, connected ones and ones still connecting, in registry order.

    Valid while the registry's list of the service's records is ``records``
    (the registry makes a new list on every change) and, if ``until`` is not
    0, until then on the pool's clock (a failed instance may be tried again).
    """

    __slots__ = ("connected", "connecting", "records", "until")

    def __init__(self, records: list[InstanceRecord], connected: list[Peer], connecting: list[Peer],
                 until: float) -> None:
        self.records = records
        self.connected = connected
        self.connecting = connecting
        self.until = until


class _Ping:
    """A PING as the exchange sends it (asks an instance for its state and load)."""

    __slots__ = ()

    def frames(self, id: int, timeout_ms: int | None) -> list[bytes]:
        return wire.encode_ping(id)


_PING = _Ping()


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
        self.ejector = Ejector(settings, clock=clock, rng=self._rng)
        self.retry_budget = RetryBudget(settings, clock=clock)
        self._peers: dict[str, Peer] = {}
        self._failed_at: dict[str, float] = {}
        self._reported: dict[str, int] = {}  # instance key -> in-flight count of its last PONG
        self._pinging: set[str] = set()
        self._choices: dict[str, _Choice] = {}  # service -> its available peers (see the module doc)
        self._ping_timer: TimerHandle | None = None
        self._pid = os.getpid()
        self._available = asyncio.Event()
        self.closed = False

    def start(self) -> None:
        """Follow the registry; start asking connected peers for their load (in the running loop)."""
        self.registry.add_listener(self._on_registry_change)
        if self.settings.load_report_interval > 0 and self._ping_timer is None:
            self._ping_timer = self.clock.call_later(self.settings.load_report_interval, self._ping_all)

    def close(self) -> None:
        """Retire every peer; what waits on them is settled (callers see ``closed``)."""
        if self.closed:
            return
        self.closed = True
        self.registry.remove_listener(self._on_registry_change)
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        for peer in list(self._peers.values()):
            peer.retire("closed by its client")
        self._peers.clear()
        self._choices.clear()
        self._available.set()

    # -- choosing -------------------------------------------------------------

    def pick(self, service: str, exclude: set[str]) -> Peer | None:
        """An available instance of ``service`` not in ``exclude``, or ``None``."""
        records = self.registry.instances(service)
        if exclude or self.ejector.records:
            connected, connecting = self._available_peers(records, exclude)
        else:
            choice = self._choices.get(service)
            if (choice is None or choice.records is not records
                    or (choice.until and self.clock.now() >= choice.until)):
                choice = self._choose_among(service, records)
            connected, connecting = choice.connected, choice.connecting
        candidates = connected or connecting
        n = len(candidates)
        if not n:
            return None
        if n == 1:
            return candidates[0]
        # Two different candidates, every ordered pair equally likely, as random.sample(candidates, 2)
        # drew them: the second index is drawn among the n - 1 others. random() scaled, not randrange
        # (0.14 against 0.25 us a draw, sample 1.1 us for both; its bias, under 2**-50 for any n a
        # service has, is far below what a load comparison can tell apart).
        random = self._rng.random
        i = int(random() * n)
        if n == 2:
            a, b = candidates[i], candidates[1 - i]
        else:
            j = int(random() * (n - 1))
            a, b = candidates[i], candidates[j + (j >= i)]
        load = self.exchange.load
        if not self._reported:
            return a if load(a) <= load(b) else b
        reported = self._reported.get
        return a if max(load(a), reported(a.key, 0)) <= max(load(b), reported(b.key, 0)) else b

    def _choose_among(self, service: str, records: list[InstanceRecord]) -> _Choice:
        """Work out (and keep) the available peers of ``service``, whose records are ``records``."""
        connected, connecting = self._available_peers(records, ())
        until = 0.0
        if self._failed_at:
            # An instance left alone after a failure comes back into choice when its time is up.
            now = self.clock.now()
            failed = self._failed_at
            until = min((failed[r.key] + RETRY_FAILED_AFTER for r in records
                         if r.key in failed and r.key not in self._peers
                         and failed[r.key] + RETRY_FAILED_AFTER > now), default=0.0)
        choice = self._choices[service] = _Choice(records, connected, connecting, until)
        return choice

    def _available_peers(self, records: list[InstanceRecord],
                         exclude: Collection[str]) -> tuple[list[Peer], list[Peer]]:
        """The peers of ``records`` (not in ``exclude``, not ejected) that may take work: connected, connecting.

        Makes the peer of an instance chosen for the first time
        (:meth:`peer_for`); an excluded or ejected one is not connected.
        """
        connected: list[Peer] = []
        connecting: list[Peer] = []
        allows = self.ejector.allows if self.ejector.records else None
        for record in records:
            if not record.is_up or record.key in exclude or (allows is not None and not allows(record.key)):
                continue
            peer = self.peer_for(record)
            if peer is None or not peer.available:
                continue
            (connected if peer.state == CONNECTED else connecting).append(peer)
        return connected, connecting

    def failover_report(self) -> dict[str, Any]:
        """What this caller's failover machinery holds (served as ``_mesh.failover``, shown by ``meshkit ejections``).

        ``instances``: one row per instance with failures or ejections on
        record (``key``, ``service``, ``health``, ``failures`` in a row,
        ``ejections``, ``ejected_for`` seconds); ``retries``: the budget's
        ``allowed`` and ``refused`` counts and the retries ``available`` now.
        """
        budget = self.retry_budget
        return {
            "instances": [{"key": s.key, "service": s.service, "health": str(s.health), "failures": s.failures,
                           "ejections": s.ejections, "ejected_for": round(s.ejected_for, 3)}
                          for s in self.ejector.snapshot()],
            "retries": {"allowed": budget.retried, "refused": budget.refused,
                        "available": round(budget.available, 1)},
        }

    async def serve_failover_report(self) -> dict[str, Any]:
        """:meth:`failover_report` as a framework method: async, so it reads the pool on its own loop."""
        return self.failover_report()

    def reported_load(self, key: str) -> int | None:
        """The in-flight count instance ``key`` last reported (``None`` before its first PONG)."""
        return self._reported.get(key)

    def _ping_all(self) -> None:
        """Ask every connected, undrained peer for its load (one PING each, none while one is out)."""
        interval = self.settings.load_report_interval
        self._ping_timer = None
        if self.closed:
            return
        deadline = self.clock.now() + interval
        for key, peer in list(self._peers.items()):
            if peer.state != CONNECTED or peer.draining or key in self._pinging:
                continue
            try:
                future = self.exchange.start(peer, _PING, deadline)
            except (NotDelivered, DeadlinePassed):
                continue
            self._pinging.add(key)
            future.add_done_callback(functools.partial(self._ponged, peer))
        self._ping_timer = self.clock.call_later(interval, self._ping_all)

    def _ponged(self, peer: Peer, future: asyncio.Future[wire.Answer]) -> None:
        self._pinging.discard(peer.key)
        if future.cancelled() or future.exception() is not None:
            return  # lost, unreachable or late: the peer's own fate says what matters
        answer = future.result()
        value = answer.value
        if answer.kind != wire.PONG or not isinstance(value, list) or len(value) != 2:
            return
        state, inflight = value
        if type(inflight) is int and inflight >= 0 and self._peers.get(peer.key) is peer:
            self._reported[peer.key] = inflight
        if state == InstanceState.DRAINING:
            peer.mark_draining()

    def racing(self, service: str, exclude: set[str]) -> bool:
        """Whether several instances of ``service`` (not in ``exclude``) are still connecting, none connected.

        Then a caller waits for the first handshake (:meth:`wait_changed`)
        rather than queue its request behind one that may never complete.
        """
        connecting = 0
        for record in self.registry.instances(service):
            peer = self._peers.get(record.key)
            if (peer is None or record.key in exclude or not peer.available
                    or not self.ejector.allows(record.key)):
                continue
            if peer.state == CONNECTED:
                return False
            connecting += peer.state == CONNECTING
        return connecting > 1

    def instance_keys(self, service: str) -> list[str]:
        """The keys of ``service``'s instances in the registry view (what ejection shares are of)."""
        return [r.key for r in self.registry.instances(service)]

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
        self._choices.clear()
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
        self._choices.clear()
        if peer.state == FAILED:
            # A load-report PING (_ping_all) lost with its peer is nobody's request: no warning for it alone.
            pinging = peer.key in self._pinging
            in_flight = self.exchange.load(peer) - pinging
            log.log(logging.WARNING if in_flight else logging.INFO, "peer %s at %s %s (%d in flight%s)",
                    peer.key, peer.record.endpoint, peer.reason, in_flight,
                    ", and a load-report PING" if pinging else "")
            if self._peers.get(peer.key) is peer:
                del self._peers[peer.key]
            self._failed_at[peer.key] = peer.failed_at
            self._reported.pop(peer.key, None)
            self.exchange.abandon(peer, lost=peer.lost)
        self.notify()

    def _on_peer_idle(self, peer: Peer) -> None:
        # Nothing left in flight on a draining peer: close it if its instance left the registry.
        if self.registry.get(peer.key) is None and self._peers.get(peer.key) is peer:
            del self._peers[peer.key]
            self._choices.clear()
            peer.close()
            self.exchange.forget(peer)

    def _on_registry_change(self) -> None:
        self._choices.clear()  # peers' draining may change below (Peer.update reports nothing)
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
        if self._reported:
            self._reported = {k: n for k, n in self._reported.items() if k in self._peers}
        self.ejector.forget(r.key for r in self.registry.instances())
        self.notify()
