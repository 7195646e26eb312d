"""``StateKeeper``: the life of each client connection's Redis state, for one gateway.

The gateway calls four verbs; the keeper owns everything in between:

* :meth:`StateKeeper.ensure` before a connection's mesh call: create its
  state unless it exists. Not at accept: HAProxy's health checks connect
  every half second and never send a request, and they should cost no Redis
  writes. A create that failed (Redis away) is not remembered as done: the
  connection's next request tries again. Never raises: the call goes ahead
  without state, and a backend that needs it gets ``ConnectionGoneError``.
* :meth:`StateKeeper.lost` when a backend found no state for an open
  connection (Redis restarted, or a sweep took this gateway for dead):
  create it again now, without waiting for the sweep. The failed request is
  not retried (it may not be idempotent).
* :meth:`StateKeeper.closed` when a connection has gone: delete its state in
  the background, after any create in flight has landed.
* :meth:`StateKeeper.sweep` every ``ttl`` seconds: restore the lost state of
  open connections; delete the state of dead gateways and of this gateway's
  closed connections.

A gateway is dead when it has been missing from the registry for
``dead_after`` seconds, measured on the clock from the first sweep that
missed it (the gateway sets that well past the record TTL), not after a
number of sweeps: an overloaded gateway whose heartbeat ran late loses its
record for a moment, and its live connections must keep their state. A
gateway that finds its own record missing says so in a log line and keeps
(restores, every sweep) its connections' state, whoever deleted it.

Every Redis operation is bounded in time and logged (throttled) on failure,
never raised: a gateway keeps serving while Redis is away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..untrusted import LogThrottle, clip
from .session import Session
from .state import ConnectionStore

log = logging.getLogger("meshkit.gateway")

CREATE_TIMEOUT = 1.0  # seconds a request waits, at most, for its connection's state to be created
BACKGROUND_TIMEOUT = 2.0  # seconds a background state operation (a delete) may take


class StateKeeper:
    """Creates, restores and deletes the Redis state of one gateway's connections (see the module doc)."""

    def __init__(self, store: ConnectionStore, instance_id: str, throttle: LogThrottle,
                 live_gateways: Callable[[], Awaitable[set[str]]], *, dead_after: float,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if dead_after <= 0:
            raise ValueError("dead_after must be positive")
        self.store = store
        self.dead_after = dead_after
        self._clock = clock
        self.instance_id = instance_id
        self._throttle = throttle
        self._live_gateways = live_gateways
        # conn id -> the latest task creating its state (True once created).
        # An entry means "this connection has state": closing deletes it, the
        # sweep restores it. Connections that never made a mesh call have none.
        self._opening: dict[str, asyncio.Task[bool]] = {}
        self._missing_since: dict[str, float] = {}  # gateway id -> when a sweep first missed it
        self._own_record_missing = False
        self._own_record_seen = False
        self._background: set[asyncio.Task[None]] = set()

    async def ensure(self, conn: Session) -> None:
        """Create ``conn``'s state before its mesh call, unless that was done (never raises)."""
        opening = self._opening.get(conn.id)
        if opening is None or _failed(opening):
            if conn.closed:
                return  # its state would outlive it
            opening = self._open(conn)
        if not opening.done():
            await asyncio.shield(opening)  # a cancelled request must not cancel the write

    def lost(self, conn: Session) -> None:
        """A backend found no state for open ``conn``: create it again now."""
        opening = self._opening.get(conn.id)
        if conn.closed or (opening is not None and not opening.done()):
            return  # closing, or being created already
        self._throttle.log("state_lost", logging.WARNING,
                           "connection %s lost its state; creating it again", conn.id)
        self._open(conn)

    def closed(self, conn_id: str) -> None:
        """``conn_id`` has gone: delete its state in the background, if it has any."""
        opening = self._opening.pop(conn_id, None)
        if opening is not None:
            self.spawn(self._delete(conn_id, opening), "deleting connection state")

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        """Run a Redis operation in the background, bounded and logged; :meth:`wait` waits for them."""
        task = asyncio.create_task(_logged(coro, what, self._throttle))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait(self, timeout: float = BACKGROUND_TIMEOUT) -> None:
        """Wait (at most ``timeout`` s) for the background operations started so far."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)

    async def sweep(self, connections: Mapping[str, Session]) -> int:
        """One sweep (see the module doc); returns how many connections' state was deleted."""
        await self._restore(connections)
        live = await self._live_gateways()
        self._note_own_record(self.instance_id in live)
        live.add(self.instance_id)
        removed = 0
        missing = await self.store.gateways() - live
        now = self._clock.now()
        # Forget gateways that came back; start the clock for newly missing ones.
        self._missing_since = {g: self._missing_since.get(g, now) for g in missing}
        for gateway_id, since in list(self._missing_since.items()):
            if now - since < self.dead_after:
                continue
            count = await self.store.drop_gateway(gateway_id)
            removed += count
            del self._missing_since[gateway_id]
            log.info("removed state of %d connections of gateway %s, missing from the registry "
                     "for %.0fs", count, clip(gateway_id), now - since)
        # After the restore: a connection that closed meanwhile may have had
        # its state restored after its delete; this removes it again.
        removed += await self.store.reconcile(self.instance_id, connections)
        return removed

    def _note_own_record(self, present: bool) -> None:
        self._own_record_seen |= present
        if not self._own_record_seen:
            return  # not registered yet (the first sweep may run before the first heartbeat)
        if not present and not self._own_record_missing:
            log.warning("this gateway's registry record %s had lapsed (heartbeat late?); keeping "
                        "its connections' state, restored every sweep", self.instance_id)
        elif present and self._own_record_missing:
            log.info("this gateway's registry record %s is back", self.instance_id)
        self._own_record_missing = not present

    def _open(self, conn: Session) -> asyncio.Task[bool]:
        """Start creating ``conn``'s state (idempotent) and make that its latest task."""
        task = asyncio.create_task(self._create(conn.id, conn.peer), name=f"gateway-state-{conn.id}")
        self._opening[conn.id] = task
        return task

    async def _create(self, conn_id: str, peer: str) -> bool:
        try:
            # Bounded: with Redis away, a request waits at most this long for it.
            await asyncio.wait_for(self.store.open(conn_id, self.instance_id, peer), CREATE_TIMEOUT)
        except Exception as exc:
            self._throttle.log("state_create_failed", logging.WARNING,
                               "creating the state of connection %s failed (tried again on its "
                               "next request): %s", conn_id, clip(str(exc)))
            return False
        return True

    async def _delete(self, conn_id: str, opening: asyncio.Task[bool]) -> None:
        # Even after a failed create: a create that timed out may still have landed.
        await opening  # never deletes before the create landed
        await self.store.close(conn_id, self.instance_id)

    async def _restore(self, connections: Mapping[str, Session]) -> None:
        peers: dict[str, str] = {}
        for conn_id, opening in self._opening.items():
            conn = connections.get(conn_id)
            # A create in progress will land by itself.
            if opening.done() and conn is not None and not conn.closed:
                peers[conn_id] = conn.peer
        if not peers:
            return
        restored = await self.store.restore(self.instance_id, peers)
        if restored:
            log.warning("restored the state of %d open connections (Redis had lost it)", len(restored))


def _failed(task: asyncio.Task[bool]) -> bool:
    """Whether a state-creating task ended without creating the state."""
    return task.done() and (task.cancelled() or not task.result())


async def _logged(coro: Coroutine[Any, Any, Any], what: str, throttle: LogThrottle,
                  timeout: float = BACKGROUND_TIMEOUT) -> None:
    """Await a Redis state operation, bounded; failures are logged, never raised."""
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as exc:
        throttle.log(what, logging.WARNING, "%s failed: %s", what, clip(str(exc)))
