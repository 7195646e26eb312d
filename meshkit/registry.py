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

Keys can also vanish while every connection stays up (``FLUSHALL``, eviction
under ``maxmemory``). A heartbeat that finds its record gone writes it again
*and announces it*, and a view drops a record only once scans have missed it
for :data:`MISS_GRACE_BEATS` heartbeat intervals: one scan that ran before the
rewrite never removes a live instance. An announced deletion applies at once.

Records and change messages are input like any other. Whatever is read is
bounded in bytes (see :mod:`meshkit.storage`; change messages over
:data:`MAX_CHANGE_BYTES` are not parsed) and must pass
:meth:`InstanceRecord.from_json` and be stored under its own key; what
fails is skipped, counted in :attr:`Registry.rejected` (and the
``registry.rejected`` metric) and logged once per key. No message, however
malformed or deep, can stop the watch: both background loops run under
:func:`meshkit.tasks.supervise`.

Every wait, back-off and timestamp of a view is read from the ``clock``
given to the constructor (the system clock unless told). The Redis part is
four methods — :meth:`Registry.start`, :meth:`Registry.close`,
:meth:`Registry.scan` and :meth:`Registry.registration` — and
:class:`meshkit.testing.MemoryRegistry` replaces them to keep the whole
registry in memory for in-process tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .access import record_filter
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .record import MAX_RECORD_BYTES, InstanceRecord
from .registration import Registration
from .storage import (
    SCAN_BATCH,
    Keys,
    load_records,
    parse_stored,
    read_records,
    redacted_url,
    redis_client,
    validate_key,
)
from .tasks import Supervised, supervise
from .timing import wait_event
from .topics import topic_matches
from .untrusted import LogThrottle, clip

__all__ = ["Keys", "Registry", "load_records", "read_records", "redacted_url", "redis_client"]

log = logging.getLogger("meshkit.registry")

ChangeListener = Callable[[], None]

MISS_GRACE_BEATS = 2  # heartbeat intervals a record may be missing from scans before a view drops it
MAX_CHANGE_BYTES = MAX_RECORD_BYTES + 1024  # a change message: one record and its envelope
REJECT_LOG_INTERVAL = 600.0  # seconds between two log lines about the same rejected key
OUTAGE_LOG_INTERVAL = 30.0  # seconds between two "unreachable, nothing known yet" lines


class Registry:
    """A cached, self-updating view of the registry.

    ``start`` loads the records and starts following changes; after it
    returns, :meth:`instances` answers from memory. Listeners registered with
    :meth:`add_listener` run in the event loop after every change of the view.
    ``on_rejected`` is called once per record or change message refused (the
    service counts it in the ``registry.rejected`` metric).
    """

    def __init__(self, settings: Settings, *, on_rejected: Callable[[], None] | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.clock = clock
        self.keys = Keys(settings.namespace)
        self.url = redacted_url(settings.redis_url)
        self._redis: aioredis.Redis | None = None
        self._records: dict[str, InstanceRecord] = {}
        self._by_service: dict[str, list[InstanceRecord]] = {}
        self._pushed_at: dict[str, float] = {}
        self._missing_since: dict[str, float] = {}  # key -> start of the first scan that missed it
        self._listeners: list[ChangeListener] = []
        self._tasks: list[Supervised] = []
        self._changed = asyncio.Event()
        self._resync_now = asyncio.Event()
        self._keep_until = 0.0  # until then, a scan adds and updates records but removes none
        self._on_rejected = on_rejected
        self._reject_log = LogThrottle(log, REJECT_LOG_INTERVAL, clock=clock.now)
        self._outage_log = LogThrottle(log, OUTAGE_LOG_INTERVAL, clock=clock.now)
        # redis-py may swallow a cancellation on Python < 3.12 (it wraps socket
        # writes in asyncio.wait_for), so the loops also stop on this flag.
        self._closing = False
        self.synced = False  # True once a full scan has succeeded
        self.connected = False  # whether the last Redis operation succeeded
        self.rejected = 0  # records and change messages refused so far
        # CurveZMQ (meshkit.access): why a record is not believed; None when CURVE is off. Set by start().
        self._refusal: Callable[[InstanceRecord], str | None] | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    @property
    def restarts(self) -> int:
        """How often a background loop crashed and was restarted by its supervisor."""
        return sum(task.restarts for task in self._tasks)

    async def start(self, wait: float = 2.0) -> None:
        """Start following the registry; wait up to ``wait`` s for a first full scan.

        A Redis that is down at start is not an error: the view starts empty
        and fills in as soon as Redis answers (a warning names the URL and
        the error meanwhile, every :data:`OUTAGE_LOG_INTERVAL` seconds).
        """
        clock = self.clock
        self._refusal = record_filter(self.settings)
        self._tasks = [
            supervise("meshkit-registry-watch", self._watch, logger=log, clock=clock.now, sleep=clock.sleep),
            supervise("meshkit-registry-resync", self._resync_loop, logger=log, clock=clock.now, sleep=clock.sleep),
        ]
        deadline = clock.now() + wait
        while not self.synced and clock.now() < deadline:
            await self.wait_changed(deadline - clock.now())

    async def close(self) -> None:
        """Stop the background tasks and close the Redis connection."""
        self._closing = True
        self._resync_now.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(t.task for t in self._tasks if t.task is not None), return_exceptions=True)
        self._tasks = []
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def registration(self, record: InstanceRecord, on_error: Callable[[], None] | None = None) -> Registration:
        """The :class:`Registration` that writes ``record`` where this registry reads (Redis here).

        It shares this registry's settings and clock; raises
        :class:`~meshkit.errors.ConfigError` for a record outside the grammar.
        """
        return Registration(self.settings, record, on_error, clock=self.clock)

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
        return await wait_event(self._changed, timeout, self.clock)

    def apply(self, record: InstanceRecord | None, key: str | None = None) -> None:
        """Apply one change to the view (a record set, or ``key`` deleted)."""
        if record is not None:
            if not self._trusted(record):
                return
            self._missing_since.pop(record.key, None)  # its owner just wrote it: alive
            if self._records.get(record.key) == record:
                return
            self._records[record.key] = record
            self._pushed_at[record.key] = self.clock.now()
        elif key is not None:
            self._missing_since.pop(key, None)
            if self._records.pop(key, None) is None:
                return
            self._pushed_at[key] = self.clock.now()
        self._rebuild()

    def _replace_all(self, records: Iterable[InstanceRecord], scan_started: float) -> None:
        fresh = {r.key: r for r in records}
        grace = MISS_GRACE_BEATS * self.settings.heartbeat_interval
        for key, record in self._records.items():
            if key in fresh:
                self._missing_since.pop(key, None)
            elif scan_started < self._keep_until:
                # Redis just came back, maybe empty (restarted): the records it
                # lacks are rewritten by their owners' next heartbeats. Dropping
                # them now would fail calls between live instances for nothing.
                fresh[key] = record
            elif scan_started - self._missing_since.setdefault(key, scan_started) < grace:
                # Keys can vanish with every connection up (FLUSHALL, eviction):
                # a live owner rewrites its record within a heartbeat, so one
                # scan that ran before the rewrite is no proof of death.
                fresh[key] = record
        # A change announced while the scan ran is newer than what the scan
        # read, so it wins (otherwise a "draining" could be undone for a cycle).
        for key, at in self._pushed_at.items():
            if at >= scan_started:
                if key in self._records:
                    fresh[key] = self._records[key]
                else:
                    fresh.pop(key, None)
        self._pushed_at = {k: v for k, v in self._pushed_at.items() if v >= scan_started}
        self._missing_since = {k: v for k, v in self._missing_since.items() if k in fresh}
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

    def _reject(self, cause: str, what: str, why: str) -> None:
        """Count one refused record or message, and log it (once per ``cause`` per interval)."""
        self.rejected += 1
        if self._on_rejected is not None:
            try:
                self._on_rejected()
            except Exception:  # a failing metric must not stop the watch
                log.exception("rejected-record callback failed")
        self._reject_log.log(cause, logging.WARNING, "rejected %s: %s", what, why,
                             extra={"rejected": self.rejected})

    # -- following Redis ----------------------------------------------------

    async def scan(self) -> list[InstanceRecord]:
        """Read every valid record in the namespace from Redis (raises ``RedisError``); reject the rest."""
        keys = [k async for k in self.redis.scan_iter(match=self.keys.match(), count=SCAN_BATCH)]
        records = []
        for start in range(0, len(keys), SCAN_BATCH):
            batch = keys[start:start + SCAN_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in batch:
                    # GETRANGE, not GET: never more than one byte past the bound is read.
                    pipe.getrange(key, 0, MAX_RECORD_BYTES)
                values = await pipe.execute(raise_on_error=False)
            records.extend(self._parse_batch(batch, values))
        return records

    def _parse_batch(self, keys: Sequence[bytes], values: Sequence[object]) -> list[InstanceRecord]:
        records = []
        for key, value in zip(keys, values, strict=True):
            try:
                record = parse_stored(self.keys, key, value)
            except ValueError as exc:
                name = clip(key.decode(errors="replace"))
                self._reject(name, f"registry record {name}", str(exc))
                continue
            if record is not None and self._trusted(record):
                records.append(record)
        return records

    def _trusted(self, record: InstanceRecord) -> bool:
        """False (the record counted as rejected) if CurveZMQ is on and the record's key is not trusted."""
        why = self._refusal(record) if self._refusal is not None else None
        if why is not None:
            name = clip(record.key)
            self._reject(f"untrusted:{name}", f"registry record {name}", why)
        return why is None

    async def resync(self) -> None:
        """Replace the view with a full scan of Redis (raises ``RedisError``)."""
        started = self.clock.now()
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
        # Said once per outage, by whichever task notices first; before the
        # first successful scan, every OUTAGE_LOG_INTERVAL (nothing else would
        # tell that this process has never seen the registry).
        if self.connected:
            log.warning("registry unreachable, keeping the cached view of %d instances (%s)",
                        len(self._records), why)
        elif not self.synced:
            self._outage_log.log("never-synced", logging.WARNING,
                                 "registry at %s unreachable, no instances known yet: %s",
                                 self.url, clip(why, 300))
        self.connected = False

    async def _resync_loop(self) -> None:
        while not self._closing:
            try:
                await self.resync()
            except (RedisError, OSError) as exc:
                self._note_outage(f"resync failed: {exc}")
            await wait_event(self._resync_now, self.settings.resync_interval, self.clock)
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
            await self.clock.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _on_message(self, data: Any) -> None:
        """Apply one change message; a malformed one is rejected (counted, logged), never raised."""
        try:
            self._apply_message(data)
        except Exception as exc:  # RecursionError included: no message may end the watch
            self._reject("change-message", "registry change", f"{type(exc).__name__}: {clip(str(exc), 300)}")

    def _apply_message(self, data: Any) -> None:
        if not isinstance(data, (bytes, str)):
            raise ValueError(f"not text: {clip(data)}")
        if len(data) > MAX_CHANGE_BYTES:
            raise ValueError(f"{len(data)} bytes, more than {MAX_CHANGE_BYTES}")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError(f"not an object: {clip(message)}")
        op = message.get("op")
        if op == "set":
            self.apply(InstanceRecord.from_dict(message.get("record")))
        elif op == "del":
            self.apply(None, validate_key(message.get("key")))
        else:
            raise ValueError(f"unknown op {clip(op)!r}")
