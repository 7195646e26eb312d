"""The registry: instance records in Redis, and every process's cached view of them.

Layout in Redis, all under the configured namespace ``ns``:

* ``ns:inst:<service>:<instance_id>`` — the instance's :class:`InstanceRecord` as
  JSON, written with a TTL (``Settings.ttl``) and rewritten by a heartbeat
  (``Settings.heartbeat_interval``). A graceful stop deletes it.
* ``ns:changes`` — a pub/sub channel. Every write that changes a record
  publishes ``{"op": "set", "record": {...}}`` or ``{"op": "del", "key": ...}``.

A :class:`Registry` keeps a local copy that follows the channel (within
milliseconds) and rescans the keys every ``Settings.resync_interval`` as a
safety net (missed messages, expired records of killed instances). Lookups
(:meth:`Registry.instances`) read only the local copy, so **the request path
never touches Redis**; when Redis is unreachable the copy is kept as it is
and traffic between known instances goes on. When Redis comes back, the
watcher resubscribes and rescans, and every :class:`~meshkit.registration.Registration` writes its
record again at its next heartbeat; for one TTL after such a reconnection a
scan adds and updates records but removes none (a restarted Redis is empty
until those heartbeats), while deletions announced on the channel still apply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .config import Settings
from .handlers import topic_matches
from .record import InstanceRecord
from .timing import wait_event

log = logging.getLogger("meshkit.registry")

ChangeListener = Callable[[], None]


def redis_client(settings: Settings) -> aioredis.Redis:
    """An asyncio Redis client for ``settings.redis_url`` with short timeouts.

    Short timeouts matter: a Redis outage must show up as quick errors in the
    background tasks, never as a stalled heartbeat.
    """
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        decode_responses=False,
    )


class Keys:
    """Key names for one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.instance_prefix = f"{namespace}:inst:"
        self.changes = f"{namespace}:changes"

    def instance(self, key: str) -> str:
        """Redis key of the record whose :attr:`InstanceRecord.key` is ``key``."""
        return self.instance_prefix + key


class Registry:
    """A cached, self-updating view of the registry.

    ``start`` loads the records and starts following changes; after it
    returns, :meth:`instances` answers from memory. Listeners registered with
    :meth:`add_listener` run in the event loop after every change of the view.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._redis: aioredis.Redis | None = None
        self._records: dict[str, InstanceRecord] = {}
        self._by_service: dict[str, list[InstanceRecord]] = {}
        self._pushed_at: dict[str, float] = {}
        self._listeners: list[ChangeListener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._resync_now = asyncio.Event()
        self._keep_until = 0.0  # until then, a scan adds and updates records but removes none
        # redis-py may swallow a cancellation on Python < 3.12 (it wraps socket
        # writes in asyncio.wait_for), so the loops also stop on this flag.
        self._closing = False
        self.synced = False  # True once a full scan has succeeded
        self.connected = False  # whether the last Redis operation succeeded

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    async def start(self, wait: float = 2.0) -> None:
        """Start following the registry; wait up to ``wait`` s for a first full scan.

        A Redis that is down at start is not an error: the view starts empty
        and fills in as soon as Redis answers.
        """
        self._tasks = [
            asyncio.create_task(self._watch(), name="meshkit-registry-watch"),
            asyncio.create_task(self._resync_loop(), name="meshkit-registry-resync"),
        ]
        deadline = time.monotonic() + wait
        while not self.synced and time.monotonic() < deadline:
            await self.wait_changed(deadline - time.monotonic())

    async def close(self) -> None:
        """Stop the background tasks and close the Redis connection."""
        self._closing = True
        self._resync_now.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # -- the view -----------------------------------------------------------

    def instances(self, service: str | None = None) -> list[InstanceRecord]:
        """Known instances (of ``service``, or all), from memory only."""
        if service is None:
            return list(self._records.values())
        return self._by_service.get(service, [])

    def get(self, key: str) -> InstanceRecord | None:
        """The record with :attr:`InstanceRecord.key` ``key``, if known."""
        return self._records.get(key)

    def services(self) -> list[str]:
        return sorted(self._by_service)

    def subscribers(self, topic: str) -> list[InstanceRecord]:
        """Instances subscribed to ``topic`` (exactly, or by a ``prefix.*`` pattern)."""
        return [r for r in self._records.values() if topic_matches(r.topics, topic)]

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def wait_changed(self, timeout: float | None) -> bool:
        """Wait until the view changes; False if ``timeout`` passed first."""
        if timeout is not None and timeout <= 0:
            return False
        return await wait_event(self._changed, timeout)

    def apply(self, record: InstanceRecord | None, key: str | None = None) -> None:
        """Apply one change to the view (a record set, or ``key`` deleted)."""
        if record is not None:
            if self._records.get(record.key) == record:
                return
            self._records[record.key] = record
            self._pushed_at[record.key] = time.monotonic()
        elif key is not None:
            if self._records.pop(key, None) is None:
                return
            self._pushed_at[key] = time.monotonic()
        self._rebuild()

    def _replace_all(self, records: Iterable[InstanceRecord], scan_started: float) -> None:
        fresh = {r.key: r for r in records}
        if scan_started < self._keep_until:
            # Redis just came back, maybe empty (restarted): the records it
            # lacks are rewritten by their owners' next heartbeats. Dropping
            # them now would fail calls between live instances for nothing.
            for key, record in self._records.items():
                fresh.setdefault(key, record)
        # A change announced while the scan ran is newer than what the scan
        # read, so it wins (otherwise a "draining" could be undone for a cycle).
        for key, at in self._pushed_at.items():
            if at >= scan_started:
                if key in self._records:
                    fresh[key] = self._records[key]
                else:
                    fresh.pop(key, None)
        self._pushed_at = {k: v for k, v in self._pushed_at.items() if v >= scan_started}
        if fresh != self._records:
            self._records = fresh
            self._rebuild()

    def _rebuild(self) -> None:
        by_service: dict[str, list[InstanceRecord]] = {}
        for rec in self._records.values():
            by_service.setdefault(rec.service, []).append(rec)
        self._by_service = by_service
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("registry listener failed")

    # -- following Redis ----------------------------------------------------

    async def scan(self) -> list[InstanceRecord]:
        """Read every record in the namespace from Redis (raises ``RedisError``)."""
        keys = [k async for k in self.redis.scan_iter(match=self.keys.instance_prefix + "*", count=500)]
        if not keys:
            return []
        values = await self.redis.mget(keys)
        records = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue  # expired between SCAN and MGET
            try:
                records.append(InstanceRecord.from_json(value))
            except ValueError as exc:
                log.warning("ignoring malformed record %s: %s", key, exc)
        return records

    async def resync(self) -> None:
        """Replace the view with a full scan of Redis (raises ``RedisError``)."""
        started = time.monotonic()
        records = await self.scan()
        if not self.connected and self.synced:
            self._keep_until = started + self.settings.ttl
            log.info("registry reachable again; resynced %d records", len(records))
        self._replace_all(records, started)
        self.connected = True
        if not self.synced:
            self.synced = True
            self._rebuild()

    def _note_outage(self, why: str) -> None:
        # Said once per outage, by whichever task notices first.
        if self.connected:
            log.warning("registry unreachable, keeping the cached view of %d instances (%s)",
                        len(self._records), why)
        self.connected = False

    async def _resync_loop(self) -> None:
        while not self._closing:
            try:
                await self.resync()
            except (RedisError, OSError) as exc:
                self._note_outage(f"resync failed: {exc}")
            await wait_event(self._resync_now, self.settings.resync_interval)
            self._resync_now.clear()

    async def _watch(self) -> None:
        backoff = 0.05
        while not self._closing:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.changes)
                # Anything published before the subscription took effect is
                # caught by a scan made after it.
                self._resync_now.set()
                backoff = 0.05
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                # A restarted Redis may have lost every record: the next
                # successful scan must not take that emptiness at face value.
                self._note_outage(f"watch lost its connection: {exc}")
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _on_message(self, data: Any) -> None:
        try:
            message = json.loads(data)
            if message["op"] == "set":
                self.apply(InstanceRecord.from_json(json.dumps(message["record"])))
            elif message["op"] == "del":
                self.apply(None, str(message["key"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed registry change: %s", exc)


def read_records(settings: Settings, service: str | None = None) -> list[InstanceRecord]:
    """The records in Redis right now, read synchronously (for tools and tests)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        prefix = Keys(settings.namespace).instance_prefix + (f"{service}:" if service else "")
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        values = client.mget(keys) if keys else []
        records = []
        for value in values:
            if value is not None:
                try:
                    records.append(InstanceRecord.from_json(value))
                except ValueError:
                    continue
        return sorted(records, key=lambda r: (r.service, r.started_at))
    finally:
        client.close()
