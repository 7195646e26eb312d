"""Cluster-wide limits on named resources, enforced through Redis without a round trip per call.

A method declares what it consumes (``@rpc(uses={"payments_api": 1})``) and
settings give the limit (``[resources.payments_api] rate = 100``,
``concurrency = 10``). :class:`ResourcePool` (one per instance) spends
units from leases (:mod:`meshkit.leases`) and goes to Redis only to refill a
spent lease, to renew or give back concurrency slots, and while a caller
waits for units the whole cluster has used up. Two Lua scripts do the
cluster's arithmetic atomically, on Redis's own clock:

``RATE``  ``KEYS[1]`` = ``<ns>:res:<name>:rate``; ``ARGV`` = rate, window (ms),
          wanted. Grants ``min(wanted, quota - used)`` of the current window
          (its counter ``<KEYS[1]>:<index>`` expires after three windows) and
          returns ``[granted, index, ms left in the window, used]``.
``SLOTS`` ``KEYS`` = ``<ns>:res:<name>:held`` (hash instance → slots),
          ``<ns>:res:<name>:until`` (sorted set instance → expiry ms) and
          ``<ns>:res:<name>:want`` (hash instance → demand); ``ARGV`` =
          limit, instance id, target holding, ttl (ms), slots the instance
          may be using while the request travels (its current lease), demand.
          Drops lapsed instances, records the demand, computes this
          instance's fair share among those with demand, sets its holding to
          ``min(target, room, max(share, in use))`` and returns
          ``[held, total held, share]``. Requests of one instance and resource
          go one at a time, and a shrinking holding shrinks locally before
          the request leaves, so Redis never counts fewer slots than the
          instance may be using.

A Redis failure counts as "no units": the call waits (up to its deadline)
or fails ``resource_exhausted`` saying the limit could not be checked, and
the failure is logged (throttled). A limit enforced across the cluster
cannot be checked without the cluster's shared state; the calls of methods
that declare no resources never touch Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .clock import SYSTEM_CLOCK, Clock
from .config import ResourceLimit, Settings
from .errors import ConfigError, ResourceExhaustedError
from .keys import Keys
from .leases import RateLease, SlotLease
from .metrics import Metrics
from .untrusted import LogThrottle, clip

__all__ = ["RATE_SCRIPT", "SLOTS_SCRIPT", "USAGE_SCRIPT", "ResourcePool", "ResourceUse", "cluster_usage"]

log = logging.getLogger("meshkit.resources")

RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, w, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local idx = math.floor(now / w)
local per = rate * w / 1000
local quota = math.floor((idx + 1) * per + 1e-9) - math.floor(idx * per + 1e-9)
local key = KEYS[1] .. ':' .. idx
local used = tonumber(redis.call('GET', key) or '0')
local grant = math.max(0, math.min(want, quota - used))
if grant > 0 then
  redis.call('INCRBY', key, grant)
  redis.call('PEXPIRE', key, w * 3)
end
return {grant, idx, (idx + 1) * w - now, used + grant}
"""

SLOTS_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, me, target, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local in_use, want = tonumber(ARGV[5]), tonumber(ARGV[6])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], gone)
  redis.call('HDEL', KEYS[3], gone)
  redis.call('ZREM', KEYS[2], gone)
end
if want > 0 then redis.call('HSET', KEYS[3], me, want) else redis.call('HDEL', KEYS[3], me) end
local names = redis.call('HKEYS', KEYS[3])
table.sort(names)
local d = #names
local share = limit
if d > 0 then
  share = 0
  for i, name in ipairs(names) do
    if name == me then
      local extra = limit % d
      local rot = math.floor(now / ttl) % d
      share = math.floor(limit / d)
      if (i - 1 - rot) % d < extra then share = share + 1 end
    end
  end
end
local mine = tonumber(redis.call('HGET', KEYS[1], me) or '0')
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
local held = math.max(0, math.min(target, limit - (total - mine), math.max(share, in_use)))
if held > 0 then redis.call('HSET', KEYS[1], me, held) else redis.call('HDEL', KEYS[1], me) end
if held > 0 or want > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, me)
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl * 2) end
else
  redis.call('ZREM', KEYS[2], me)
end
return {held, total - mine + held, share}
"""

USAGE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local idx = math.floor(now / w)
local used = {}
for i = 0, 9 do used[i + 1] = tonumber(redis.call('GET', KEYS[1] .. ':' .. (idx - i)) or '0') end
local live = redis.call('ZRANGEBYSCORE', KEYS[3], now, '+inf')
local held, want = {}, {}
for _, name in ipairs(live) do
  table.insert(held, name)
  table.insert(held, tonumber(redis.call('HGET', KEYS[2], name) or '0'))
  table.insert(want, name)
  table.insert(want, tonumber(redis.call('HGET', KEYS[4], name) or '0'))
end
return {used, held, want}
"""

# While the cluster has no units: how often a waiting caller asks Redis again, at most.
SLOT_POLL = 0.05
# Seconds between two log lines about one resource's Redis failures.
_LOG_INTERVAL = 10.0


@dataclass(slots=True)
class ResourceUse:
    """What one resource has done on this instance (for metrics, ``_mesh.info`` and tests)."""

    used: int = 0  # units spent (rate) or taken (concurrency), in all
    waited: int = 0  # calls that had to wait for units
    exhausted: int = 0  # calls refused resource_exhausted
    leases: int = 0  # Redis round trips made
    errors: int = 0  # Redis round trips that failed
    cluster_used: int = 0  # the last cluster-wide count Redis reported
    failing: bool = False  # whether the last Redis round trip failed


@dataclass(slots=True)
class _Resource:
    name: str
    limit: ResourceLimit
    rate: RateLease | None
    slots: SlotLease | None
    use: ResourceUse = field(default_factory=ResourceUse)
    refill: asyncio.Lock = field(default_factory=asyncio.Lock)  # one refill at a time; others wait and reuse it
    # One SLOTS round trip at a time: replies then apply in the order Redis saw the requests.
    lease_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    # While the cluster has no free slot: no Redis round trip before this (local clock); one poll per instance.
    slots_retry_at: float = 0.0


class ResourcePool:
    """This instance's leases of every configured resource (see the module doc).

    ``redis`` is a factory for the asyncio Redis client, called on first use
    (only instances whose methods use resources ever connect). ``metrics``
    counts units spent, waits, refusals and Redis round trips per resource.
    """

    def __init__(self, settings: Settings, instance_id: str, redis: Callable[[], Any], *,
                 clock: Clock = SYSTEM_CLOCK, metrics: Metrics | None = None) -> None:
        self.instance_id = instance_id
        self.clock = clock
        self._redis_factory = redis
        self._redis: Any = None
        self._prefix = Keys(settings.namespace).resource_prefix
        self._metrics = metrics or Metrics("", "", "")
        self._throttle = LogThrottle(log, _LOG_INTERVAL, clock=clock.now)
        self._renewer: asyncio.Task[None] | None = None
        self._returns: set[asyncio.Future[None]] = set()  # slot returns under way
        self.resources: dict[str, _Resource] = {}
        for name, limit in settings.resource_limits().items():
            rate = RateLease(limit.rate, limit.window, limit.lease_fraction) if limit.rate else None
            slots = SlotLease(limit.concurrency, limit.lease_fraction, limit.lease_ttl) if limit.concurrency else None
            self.resources[name] = _Resource(name, limit, rate, slots)

    def check_declared(self, method: str, uses: Mapping[str, int]) -> None:
        """Raise :class:`ConfigError` if ``method`` uses a resource with no limit set."""
        missing = sorted(set(uses) - set(self.resources))
        if missing:
            raise ConfigError(f"method {method!r} uses {missing}, which have no [resources.<name>] limit")

    async def acquire(self, uses: Mapping[str, int], deadline: float | None, wait: bool) -> None:
        """Take ``uses`` (name → units) from the leases; pair every return with :meth:`release`.

        Waits for units up to ``deadline`` when ``wait``; raises
        :class:`ResourceExhaustedError` when it may not wait or the deadline
        would pass. On failure nothing stays taken.
        """
        taken: list[tuple[_Resource, int]] = []
        try:
            for name, units in uses.items():
                res = self.resources[name]
                await self._take(res, units, deadline, wait)
                taken.append((res, units))
        except BaseException:
            for res, units in taken:
                self._put(res, units)
            raise

    def release(self, uses: Mapping[str, int]) -> None:
        """Give back the concurrency units :meth:`acquire` took (rate tokens are spent for good)."""
        for name, units in uses.items():
            self._put(self.resources[name], units)

    async def close(self) -> None:
        """Give every held slot back to the cluster and close the Redis client."""
        if self._renewer is not None:
            self._renewer.cancel()
        for res in self.resources.values():
            if res.slots is not None and (res.slots.leased or res.slots.waiting):
                res.slots.in_use = res.slots.waiting = 0
                await self._lease_slots(res, "close")
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # -- taking ---------------------------------------------------------------

    async def _take(self, res: _Resource, units: int, deadline: float | None, wait: bool) -> None:
        rate_done = res.rate is None
        while True:
            now = self.clock.now()
            if not rate_done and res.rate is not None:
                rate_done = res.rate.take(units, now) or await self._refill_rate(res, units)
            if rate_done and (res.slots is None or res.slots.take(units, now)
                              or await self._refill_slots(res, units)):
                res.use.used += units
                self._metrics.resource_used(res.name, units)
                return
            pause = self._pause(res, rate_done)
            if not wait or (deadline is not None and self.clock.now() + pause >= deadline):
                # Rate tokens this attempt took stay spent: a refund would cost a Redis trip per refusal.
                res.use.exhausted += 1
                self._metrics.resource_event(res.name, "exhausted")
                raise ResourceExhaustedError(self._why(res, rate_done))
            res.use.waited += 1
            self._metrics.resource_event(res.name, "waited")
            res.freed.clear()
            timer = self.clock.call_later(pause, res.freed.set)
            if res.slots is not None:
                res.slots.waiting += 1
            try:
                await res.freed.wait()
            finally:
                timer.cancel()
                if res.slots is not None:
                    res.slots.waiting -= 1

    def _pause(self, res: _Resource, rate_done: bool) -> float:
        """How long to wait before trying again: to the next rate window, or one slot poll."""
        if res.use.failing:
            return SLOT_POLL
        if not rate_done and res.rate is not None:
            return max(0.001, min(res.rate.next_window - self.clock.now(), res.limit.window))
        return max(0.001, min(SLOT_POLL, res.slots_retry_at - self.clock.now()))

    def _why(self, res: _Resource, rate_done: bool) -> str:
        if res.use.failing:
            return f"resource {res.name!r}: its limit could not be checked (Redis unreachable)"
        if not rate_done:
            return f"resource {res.name!r} is at its cluster-wide rate of {res.limit.rate:g}/s"
        return f"resource {res.name!r} is at its cluster-wide concurrency of {res.limit.concurrency}"

    def _put(self, res: _Resource, units: int) -> None:
        if res.slots is None:
            return
        res.slots.put(units)
        res.freed.set()
        if res.slots.target_to_return() is not None:
            task = asyncio.ensure_future(self._lease_slots(res, "return"))
            self._returns.add(task)
            task.add_done_callback(self._returns.discard)

    # -- Redis ------------------------------------------------------------------

    async def _refill_rate(self, res: _Resource, units: int) -> bool:
        assert res.rate is not None
        async with res.refill:
            now = self.clock.now()
            if res.rate.take(units, now):  # another waiter refilled meanwhile
                return True
            if not res.rate.should_ask(now):  # drained until the next window: Redis cannot help
                return False
            want = res.rate.want(units)
            reply = await self._script(res, RATE_SCRIPT, [self._prefix + res.name + ":rate"],
                                       [repr(res.limit.rate), round(res.limit.window * 1000), want])
            if reply is None:
                return False
            granted, index, left_ms, used = (int(x) for x in reply)
            res.use.cluster_used = used
            res.rate.grant(granted, want, index, left_ms / 1000.0, now, self.clock.now())
            return res.rate.take(units, self.clock.now())

    async def _refill_slots(self, res: _Resource, units: int) -> bool:
        assert res.slots is not None
        async with res.refill:
            now = self.clock.now()
            if res.slots.take(units, now):
                return True
            if now < res.slots_retry_at:  # the cluster was full a moment ago: wait for a put or the poll
                return False
            await self._lease_slots(res, "grow", asking=units)
            if res.slots.take(units, self.clock.now()):
                return True
            res.slots_retry_at = self.clock.now() + SLOT_POLL
            return False

    async def _lease_slots(self, res: _Resource, kind: str, asking: int = 0) -> None:
        """One SLOTS round trip: ``kind`` is ``"grow"`` (by ``asking``), ``"return"``, ``"renew"`` or ``"close"``.

        One at a time per resource, the target computed once the turn comes,
        so each answer describes the latest request. A holding that shrinks
        shrinks here first, before Redis hears of it: this instance never uses
        a slot that Redis may already have handed to another.
        """
        slots = res.slots
        assert slots is not None
        async with res.lease_lock:
            if kind == "grow":
                target: int | None = slots.target_for(asking)
            elif kind == "return":
                target = slots.target_to_return()
            else:
                target = slots.target_at_renewal() if kind == "renew" else 0
            if target is None:
                return
            slots.leased = min(slots.leased, target)
            sent = self.clock.now()
            keys = [self._prefix + res.name + suffix for suffix in (":held", ":until", ":want")]
            reply = await self._script(res, SLOTS_SCRIPT, keys, [res.limit.concurrency, self.instance_id, target,
                                                                 round(res.limit.lease_ttl * 1000),
                                                                 # what may be in use while this travels
                                                                 slots.leased, slots.demand + asking])
            if reply is None:
                return
            held, total, share = (int(x) for x in reply)
            res.use.cluster_used = total
            slots.grant(held, share, sent)
        if (slots.leased or slots.waiting) and self._renewer is None:
            self._renewer = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        """Every ``lease_ttl / 3``: renew the slots in use, give the idle ones back."""
        try:
            while any(r.slots is not None and (r.slots.leased or r.slots.waiting) for r in self.resources.values()):
                ttl = min(r.limit.lease_ttl for r in self.resources.values() if r.slots is not None)
                await self.clock.sleep(ttl / 3)
                for res in self.resources.values():
                    if res.slots is not None and (res.slots.leased or res.slots.waiting):
                        await self._lease_slots(res, "renew")
        finally:
            self._renewer = None

    async def _script(self, res: _Resource, script: str, keys: list[str], args: list[Any]) -> list[Any] | None:
        res.use.leases += 1
        self._metrics.resource_event(res.name, "lease")
        try:
            if self._redis is None:
                self._redis = self._redis_factory()
            reply = list(await self._redis.eval(script, len(keys), *keys, *args))
            res.use.failing = False
            return reply
        except Exception as exc:  # redis-py raises many unrelated types; all mean "no units now"
            res.use.errors += 1
            res.use.failing = True
            self._metrics.resource_event(res.name, "lease_error")
            self._throttle.log(f"lease:{res.name}", logging.WARNING, "cannot lease resource %s from Redis: %s",
                               res.name, clip(str(exc)))
            return None


async def cluster_usage(redis: Any, namespace: str, name: str, limit: ResourceLimit) -> dict[str, Any]:
    """What the cluster uses of resource ``name`` now, read (never written) from Redis.

    ``rate_used``: units granted in each of the last 10 windows, newest
    first; ``held`` and ``wanted``: slots held and demanded per live instance.
    """
    prefix = Keys(namespace).resource_prefix + name
    keys = [prefix + ":rate", prefix + ":held", prefix + ":until", prefix + ":want"]
    used, held, wanted = await redis.eval(USAGE_SCRIPT, len(keys), *keys, round(limit.window * 1000))

    def pairs(flat: list[Any]) -> dict[str, int]:
        names = (k.decode() if isinstance(k, bytes) else str(k) for k in flat[::2])
        return {k: int(v) for k, v in zip(names, flat[1::2], strict=True)}

    return {"resource": name, "rate": limit.rate, "window": limit.window, "concurrency": limit.concurrency,
            "rate_used": [int(u) for u in used], "held": pairs(held), "wanted": pairs(wanted)}
