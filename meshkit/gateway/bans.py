"""Bans of client addresses: decided per address, shared through Redis, checked from memory.

The policy (:class:`BanPolicy`, pure) has NOMP's shape: per address it counts
requests and bad ones (invalid requests, and errors a backend marks as the
client's fault: see :class:`ClientFaultError`); once ``min_requests`` are
counted, the address is banned if at least ``ratio`` of them were bad, and
the counts start again either way. It remembers at most ``max_addresses``
addresses (the least recently seen is forgotten first).

A ban is shared by every gateway of the namespace on every host::

    <ns>:bans            hash: address -> {"until": unix time, "reason": text} (JSON)
    <ns>:bans:changes    channel: {"op": "add", "address", "until", "reason"} or
                         {"op": "rm", "address"} (JSON), published on every change

Each gateway keeps a :class:`BanList` in memory, filled by a full read on
start and every ``ban_sync`` seconds, and kept current between them by the
channel (:class:`BanSync`). Connects are checked against memory only, so a
Redis outage leaves the bans known at that moment in force and adds no wait
to a connect. An expired ban is ignored at once and removed from Redis by
the next full read. ``meshkit ban ls|add|rm`` works on the same hash.

Backends take part in two ways, with no call into the gateway:

* raise :class:`ClientFaultError` (wire code ``client_fault``; or an error
  whose code, or for a plain exception its class name, the gateway's
  ``client_faults`` option lists): the client gets the error, and it counts
  as bad for the policy;
* raise :class:`BanClientError` (code ``ban_client``): the client gets the
  error and its address is banned at once for ``ban_time`` (the reason is
  the error's message).

The gateway tells them apart by their wire codes, never by class names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from ..codes import GatewayCode
from ..errors import RefusedError, register_error_code
from ..untrusted import LogThrottle, clip

log = logging.getLogger("meshkit.gateway.bans")

#: The longest ban reason kept (a backend's message may quote the client).
MAX_REASON = 200
# A change message is a few hundred bytes; anything longer is not ours.
_MAX_MESSAGE = 1024


@register_error_code
class ClientFaultError(RefusedError):
    """Raised by a backend handler: the request failed through the client's fault (counts towards a ban).

    It travels as code ``client_fault``: the client gets the message (and
    ``client_code``, if given, as the JSON-RPC code), the gateway counts it.
    """

    code = GatewayCode.CLIENT_FAULT


@register_error_code
class BanClientError(ClientFaultError):
    """Raised by a backend handler: ban the client's address now (the message is the reason; code ``ban_client``)."""

    code = GatewayCode.BAN_CLIENT


def normalize_address(text: str) -> str:
    """``text`` as one canonical IP address (``::ffff:1.2.3.4`` becomes ``1.2.3.4``); raises ValueError."""
    ip = ipaddress.ip_address(text.strip())
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True, slots=True)
class Ban:
    """``address`` is banned until the unix time ``until``, for ``reason``."""

    address: str
    until: float
    reason: str = ""

    def encode(self) -> str:
        return json.dumps({"until": self.until, "reason": self.reason})

    @classmethod
    def decode(cls, address: Any, raw: Any) -> Ban | None:
        """The ban stored under ``address``, or None if anything about it is malformed."""
        try:
            text = address.decode() if isinstance(address, bytes) else str(address)
            data = json.loads(raw)
            until = float(data["until"])
            return cls(normalize_address(text), until, clip(str(data.get("reason", "")), MAX_REASON))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None


class BanPolicy:
    """NOMP's rule per address (see the module doc). Pure: no clock is needed."""

    def __init__(self, ratio: float, min_requests: int, max_addresses: int) -> None:
        self.ratio = ratio
        self.min_requests = max(1, min_requests)
        self.max_addresses = max(1, max_addresses)
        self._counts: OrderedDict[str, list[int]] = OrderedDict()  # address -> [requests, bad]

    def record(self, address: str, bad: bool) -> bool:
        """Count one request from ``address``; True when this one makes it banned."""
        counts = self._counts.get(address)
        if counts is None:
            counts = self._counts[address] = [0, 0]
            if len(self._counts) > self.max_addresses:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(address)
        counts[0] += 1
        counts[1] += bad
        if counts[0] < self.min_requests:
            return False
        banned = counts[1] >= self.ratio * counts[0]
        del self._counts[address]
        return banned

    def forget(self, address: str) -> None:
        """Drop the counts of ``address`` (it was banned by other means)."""
        self._counts.pop(address, None)

    @property
    def tracked(self) -> int:
        return len(self._counts)


class BanList:
    """The bans in force, in memory; at most ``max_entries`` (those ending soonest are dropped first)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, max_entries)
        self._bans: dict[str, Ban] = {}

    def get(self, address: str, now: float) -> Ban | None:
        """The ban on ``address`` at unix time ``now``, if one is in force."""
        ban = self._bans.get(address)
        return ban if ban is not None and ban.until > now else None

    def add(self, ban: Ban) -> None:
        self._bans[ban.address] = ban
        if len(self._bans) > self.max_entries:
            soonest = min(self._bans.values(), key=lambda b: b.until)
            del self._bans[soonest.address]

    def remove(self, address: str) -> None:
        self._bans.pop(address, None)

    def replace(self, bans: list[Ban], now: float) -> None:
        """Make the list exactly the bans of ``bans`` still in force at ``now``."""
        self._bans.clear()
        for ban in sorted(bans, key=lambda b: b.until):
            if ban.until > now:
                self.add(ban)

    def __len__(self) -> int:
        return len(self._bans)


class BanStore:
    """The bans of one namespace in Redis (see the module doc). Making one does no I/O."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.key = f"{namespace}:bans"
        self.channel = f"{namespace}:bans:changes"

    async def add(self, address: str, seconds: float, reason: str = "", now: float | None = None) -> Ban:
        """Ban ``address`` for ``seconds`` from ``now`` (unix time) and tell every gateway."""
        now = time.time() if now is None else now
        ban = Ban(normalize_address(address), now + seconds, clip(reason, MAX_REASON))
        await self.redis.hset(self.key, ban.address, ban.encode())
        await self.redis.publish(self.channel, json.dumps(
            {"op": "add", "address": ban.address, "until": ban.until, "reason": ban.reason}))
        return ban

    async def remove(self, address: str) -> bool:
        """Lift the ban on ``address`` everywhere; False if there was none."""
        address = normalize_address(address)
        removed = await self.redis.hdel(self.key, address)
        await self.redis.publish(self.channel, json.dumps({"op": "rm", "address": address}))
        return bool(removed)

    async def bans(self, now: float | None = None) -> list[Ban]:
        """The bans in force, by address; expired and malformed entries are deleted on the way."""
        now = time.time() if now is None else now
        raw: dict[Any, Any] = await self.redis.hgetall(self.key)
        live: list[Ban] = []
        stale: list[Any] = []
        for field, value in raw.items():
            ban = Ban.decode(field, value)
            if ban is None or ban.until <= now:
                stale.append(field)
            else:
                live.append(ban)
        if stale:
            await self.redis.hdel(self.key, *stale)
        return sorted(live, key=lambda b: b.address)


def change(raw: Any) -> tuple[str, Ban | str] | None:
    """A change message read as ``("add", Ban)`` or ``("rm", address)``; None if malformed."""
    if not isinstance(raw, (bytes, str)) or len(raw) > _MAX_MESSAGE:
        return None
    try:
        data = json.loads(raw)
        if data["op"] == "add":
            ban = Ban.decode(data["address"], json.dumps(data))
            return ("add", ban) if ban is not None else None
        if data["op"] == "rm":
            return "rm", normalize_address(str(data["address"]))
    except (ValueError, TypeError, KeyError):
        pass
    return None


class BanSync:
    """Keeps a :class:`BanList` in step with the store: full reads plus the change channel.

    :meth:`run` runs forever (supervise it: a Redis outage raises out of it,
    and the list keeps what it had). ``on_ban(ban)`` hears of each ban added
    by a change message, so the gateway can close that address's connections.
    """

    def __init__(self, store: BanStore, bans: BanList, interval: float,
                 on_ban: Callable[[Ban], None], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.bans = bans
        self.interval = interval
        self._on_ban = on_ban
        self._clock = clock
        self._throttle = LogThrottle(log)

    async def resync(self) -> None:
        """One full read of the store into the list."""
        self.bans.replace(await self.store.bans(self._clock()), self._clock())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pubsub = self.store.redis.pubsub()
        try:
            await pubsub.subscribe(self.store.channel)
            await self.resync()  # after subscribing: no change falls between the two
            next_sync = loop.time() + self.interval
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self.apply(message.get("data"))
                if loop.time() >= next_sync:
                    await self.resync()
                    next_sync = loop.time() + self.interval
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    def apply(self, raw: Any) -> None:
        """Apply one change message (malformed ones are logged, throttled, and ignored)."""
        parsed = change(raw)
        if parsed is None:
            self._throttle.log("bad_ban_change", logging.WARNING,
                               "ignoring a malformed ban change: %s", clip(raw))
            return
        _, value = parsed
        if isinstance(value, Ban):
            self.bans.add(value)
            if value.until > self._clock():
                self._on_ban(value)
        else:
            self.bans.remove(value)
