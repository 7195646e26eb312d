"""Per-connection state in Redis, shared by the gateway and every backend.

Each client connection a gateway holds has a hash and a membership (the
key names are :class:`meshkit.keys.Keys`'s)::

    <ns>:conn:<conn_id>          hash: the application's fields, plus the gateway's
                                 own ``_gateway`` (instance id), ``_peer`` (client
                                 address) and ``_opened`` (unix time)
    <ns>:gwconns:<gateway_id>    set: the ids of the connections that gateway holds

The gateway creates both before a connection's first mesh call (and
restores them should Redis lose them while the connection is open) and
deletes them when the connection closes. State of a gateway that died
without cleaning up is removed by any other gateway: each one sweeps on
start and every ``ttl`` seconds, and deletes the connections of a gateway
absent from the registry for 3 record TTLs (:mod:`.keeper`: a late
heartbeat, or a gateway starting and not yet registered, is not death).

Backends use it like this (the connection id comes with every call a
gateway makes, see :func:`meshkit.current_call`)::

    self.connections = ConnectionStore(self.settings)      # once, in __init__
    state = self.connections.current()                     # in a handler
    accepted = await state.incr("accepted")

Writes (:meth:`ConnectionState.set`, :meth:`ConnectionState.incr`) only
apply while the connection is open: after it closed they raise
:class:`ConnectionGoneError` instead of leaving orphaned keys behind. Values
are strings (numbers are stored as their decimal text).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis

from ..codes import GatewayCode
from ..config import Settings
from ..context import current_call
from ..errors import MeshError, RefusedError, register_error_code
from ..keys import Keys
from ..redisconn import async_client
from ..untrusted import clip

log = logging.getLogger("meshkit.gateway.state")

RESERVED_PREFIX = "_"

# Writes go through scripts so that "is the connection still open?" and the
# write are one atomic step: a late write must not resurrect a deleted hash.
_HSET_IF_OPEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
_HINCRBY_IF_OPEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""
# KEYS[1]: the gateway's set, KEYS[2..]: connection hashes.
# ARGV[1]: gateway id, ARGV[2]: time, then (conn id, peer) per hash.
# Checked and recreated in one step, so a hash is never overwritten.
_RESTORE = """
local restored = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local conn_id = ARGV[2 * i - 1]
    redis.call('HSET', KEYS[i], '_gateway', ARGV[1], '_peer', ARGV[2 * i], '_opened', ARGV[2])
    redis.call('SADD', KEYS[1], conn_id)
    restored[#restored + 1] = conn_id
  end
end
return restored
"""

Value = str | int | float


@register_error_code
class ConnectionGoneError(RefusedError):
    """The client connection closed (or never had state): its state cannot be written.

    Raised in a backend and not caught, it reaches the gateway as code
    ``connection_gone`` (the gateway then restores the state of an open connection).
    """

    code = GatewayCode.CONNECTION_GONE


class NoConnectionError(MeshError):
    """The call being served did not come through a gateway, so it has no connection."""


# Seconds a command may wait for a free pooled connection: a burst of held calls after a gap with no
# backend (the restart proof's kill-all) kept all 64 busy for over the 2 s socket timeout.
POOL_WAIT = 5.0


def pooled_redis(settings: Settings, max_connections: int = 64) -> aioredis.Redis:
    """An asyncio Redis client whose pool makes callers wait for a free connection.

    redis-py's default asyncio pool *fails* a command (``MaxConnectionsError``)
    once 100 are in use, which is exactly what a burst of requests does after
    a gap with no backend. Here the 65th concurrent command waits its turn, up
    to :data:`POOL_WAIT` seconds (each reply still within the 2 s socket timeout).
    """
    # Made by meshkit.redisconn like every Redis client (TLS, ACL user, Sentinel, READONLY).
    return async_client(settings.redis_url, timeout=2.0, max_connections=max_connections, blocking=True,
                        wait=POOL_WAIT)


class ConnectionStore:
    """Access to per-connection state in one namespace; shares one Redis pool.

    Making one does no I/O. Close it with :meth:`aclose` (a service: in
    ``on_stop``). Without ``redis`` it makes a :func:`pooled_redis` client,
    which other code of the same service may share through :attr:`redis`.
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None) -> None:
        self.namespace = settings.namespace
        self.keys = Keys(settings.namespace)
        self._settings = settings
        self._own = redis is None
        self._redis = redis
        self._hset_script: Any = None
        self._hincr_script: Any = None
        self._restore_script: Any = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = pooled_redis(self._settings)
        return self._redis

    def key(self, conn_id: str) -> str:
        """The Redis hash of ``conn_id``'s state (:meth:`meshkit.keys.Keys.connection`)."""
        return self.keys.connection(conn_id)

    def gateway_key(self, gateway_id: str) -> str:
        """The Redis set of ``gateway_id``'s connections (:meth:`meshkit.keys.Keys.gateway_connections`)."""
        return self.keys.gateway_connections(gateway_id)

    def state(self, conn_id: str) -> ConnectionState:
        """The state of connection ``conn_id``."""
        return ConnectionState(self, conn_id)

    def current(self) -> ConnectionState:
        """The state of the connection the call being served came from.

        Raises :class:`NoConnectionError` outside a call made by a gateway.
        """
        ctx = current_call()
        conn_id = ctx.connection_id if ctx is not None else None
        if not conn_id:
            raise NoConnectionError("this call did not come through a gateway connection")
        return ConnectionState(self, conn_id)

    async def aclose(self) -> None:
        """Close the Redis pool if this store made it."""
        if self._own and self._redis is not None:
            await self._redis.aclose()
        self._redis = None

    # -- writes, used by ConnectionState ------------------------------------

    async def _hset_if_open(self, conn_id: str, mapping: Mapping[str, Value]) -> None:
        if self._hset_script is None:
            self._hset_script = self.redis.register_script(_HSET_IF_OPEN)
        args: list[Any] = []
        for field, value in mapping.items():
            args.extend((field, _text(value)))
        if await self._hset_script(keys=[self.key(conn_id)], args=args) is None:
            raise ConnectionGoneError(f"connection {clip(conn_id)} is closed")

    async def _hincr_if_open(self, conn_id: str, field: str, amount: int) -> int:
        if self._hincr_script is None:
            self._hincr_script = self.redis.register_script(_HINCRBY_IF_OPEN)
        value = await self._hincr_script(keys=[self.key(conn_id)], args=[field, amount])
        if value is None:
            raise ConnectionGoneError(f"connection {clip(conn_id)} is closed")
        return int(value)

    # -- the gateway's side ---------------------------------------------------

    async def open(self, conn_id: str, gateway_id: str, peer: str) -> None:
        """Create the state of a new connection held by ``gateway_id``."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(conn_id), mapping={
                "_gateway": gateway_id, "_peer": peer, "_opened": f"{time.time():.3f}"})
            pipe.sadd(self.gateway_key(gateway_id), conn_id)
            await pipe.execute()

    async def restore(self, gateway_id: str, peers: Mapping[str, str]) -> list[str]:
        """Create again the state of those connections of ``peers`` (id -> peer) that have none.

        For open connections whose state Redis lost (a restart keeps
        nothing): their ``_opened`` becomes now, application fields start
        empty. State that exists is left alone. Returns the restored ids.
        """
        if self._restore_script is None:
            self._restore_script = self.redis.register_script(_RESTORE)
        now = f"{time.time():.3f}"
        ids = sorted(peers)
        restored: list[str] = []
        for start in range(0, len(ids), 500):  # bounded work per script: Redis runs it alone
            chunk = ids[start:start + 500]
            args: list[str] = [gateway_id, now]
            for conn_id in chunk:
                args.extend((conn_id, peers[conn_id]))
            keys = [self.gateway_key(gateway_id), *(self.key(c) for c in chunk)]
            restored.extend(_str(c) for c in await self._restore_script(keys=keys, args=args))
        return restored

    async def close(self, conn_id: str, gateway_id: str) -> None:
        """Delete the state of a connection that closed."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(conn_id))
            pipe.srem(self.gateway_key(gateway_id), conn_id)
            await pipe.execute()

    async def reconcile(self, gateway_id: str, open_ids: Iterable[str]) -> int:
        """Delete ``gateway_id``'s entries for connections not in ``open_ids``.

        Catches closes whose delete failed (Redis was unreachable). Take
        ``open_ids`` *after* this is awaited from a live view (a set the
        caller keeps current), so a connection opening meanwhile is kept.
        Returns how many were removed.
        """
        members = {_str(m) for m in await self.redis.smembers(self.gateway_key(gateway_id))}
        stale = members - set(open_ids)
        if stale:
            await self._delete(gateway_id, stale, drop_set=False)
        return len(stale)

    async def gateways(self) -> set[str]:
        """Ids of every gateway that has connection state in this namespace."""
        prefix = self.keys.gateway_prefix
        return {_str(key)[len(prefix):]
                async for key in self.redis.scan_iter(match=self.keys.gateways_match(), count=500)}

    async def drop_gateway(self, gateway_id: str) -> int:
        """Delete all connection state of ``gateway_id`` (a dead gateway); return the count."""
        members = {_str(m) for m in await self.redis.smembers(self.gateway_key(gateway_id))}
        await self._delete(gateway_id, members, drop_set=True)
        return len(members)

    async def _delete(self, gateway_id: str, conn_ids: set[str], drop_set: bool) -> None:
        ids = sorted(conn_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(*[self.key(c) for c in chunk])
                pipe.srem(self.gateway_key(gateway_id), *chunk)
                await pipe.execute()
        if drop_set:
            await self.redis.delete(self.gateway_key(gateway_id))


class ConnectionState:
    """The state of one client connection: a small string-valued map.

    Field names starting with ``_`` are the gateway's; :meth:`all` leaves them
    out and :meth:`set` refuses them.
    """

    def __init__(self, store: ConnectionStore, conn_id: str) -> None:
        if not conn_id:
            raise ValueError("conn_id must not be empty")
        self.store = store
        self.conn_id = conn_id

    async def get(self, field: str, default: str | None = None) -> str | None:
        """The value of ``field``, or ``default`` if unset (or the connection is gone)."""
        value = await self.store.redis.hget(self.store.key(self.conn_id), field)
        return default if value is None else _str(value)

    async def all(self) -> dict[str, str]:
        """Every application field (``{}`` once the connection is gone)."""
        raw = await self.store.redis.hgetall(self.store.key(self.conn_id))
        items = ((_str(k), _str(v)) for k, v in raw.items())
        return {k: v for k, v in items if not k.startswith(RESERVED_PREFIX)}

    async def exists(self) -> bool:
        """Whether the connection is open (its state exists)."""
        return bool(await self.store.redis.exists(self.store.key(self.conn_id)))

    async def set(self, field: str | Mapping[str, Value], value: Value | None = None) -> None:
        """Set one field (``set("worker", "w1")``) or several (``set({...})``).

        Raises :class:`ConnectionGoneError` if the connection has closed.
        """
        mapping: Mapping[str, Value]
        if isinstance(field, str):
            if value is None:
                raise TypeError("set(field, value) needs a value")
            mapping = {field: value}
        else:
            mapping = field
        if not mapping:
            return
        for name in mapping:
            _check_field(name)
        await self.store._hset_if_open(self.conn_id, mapping)

    async def incr(self, field: str, amount: int = 1) -> int:
        """Add ``amount`` to an integer field (0 if unset); return the new value.

        Raises :class:`ConnectionGoneError` if the connection has closed.
        """
        _check_field(field)
        return await self.store._hincr_if_open(self.conn_id, field, amount)

    async def delete(self, *fields: str) -> None:
        """Remove fields (a no-op for fields or connections that do not exist)."""
        for name in fields:
            _check_field(name)
        if fields:
            await self.store.redis.hdel(self.store.key(self.conn_id), *fields)

    def __repr__(self) -> str:
        return f"<ConnectionState {self.conn_id}>"


def _check_field(name: str) -> None:
    if not name or name.startswith(RESERVED_PREFIX):
        raise ValueError(f"field names must be non-empty and not start with '_': {clip(name)!r}")


def _text(value: Value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"state values are str, int or float, got {type(value).__name__}")
    return str(value)


def _str(value: bytes | str) -> str:
    # Whatever else wrote into Redis, a key or member that is not UTF-8 must
    # not make a sweep fail on every round.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
