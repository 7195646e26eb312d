"""An instance's own registry record: written with a TTL and kept alive by a heartbeat.

See :mod:`meshkit.registry` for the layout in Redis. A graceful stop deletes
the record at once; a killed instance's record expires after ``Settings.ttl``.

Every write checks the record first (:meth:`InstanceRecord.validate`): a
record outside the grammar raises :class:`~meshkit.errors.ConfigError` at the
writer and never reaches Redis. A heartbeat that finds its key gone while
Redis stayed reachable (``FLUSHALL``, eviction) announces the rewritten record
on the changes channel, so views see it back at once.

An instance that cannot register says so: once it has gone
:data:`REPORT_AFTER` seconds without a successful write (from its start, or
from the first failure after it was registered), it logs an error naming the
Redis URL (password masked) and the last error, and again every
:data:`REPORT_EVERY` seconds while that lasts.

The heartbeat's sleeps and the reports' times come from the ``clock`` given
to the constructor, so a unit test drives them with
:class:`meshkit.testing.FakeClock`. Where the record is stored is the job of
two methods, :meth:`Registration._store` and :meth:`Registration._remove`
(Redis here); :class:`meshkit.testing.MemoryRegistry` keeps it in memory
instead, with the same heartbeat, states and reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .record import InstanceRecord
from .storage import Keys, redacted_url, redis_client
from .tasks import Supervised, supervise
from .untrusted import LogThrottle, clip

log = logging.getLogger("meshkit.registry")

REPORT_AFTER = 3.0  # seconds without a successful write before an instance says it is not registered
REPORT_EVERY = 30.0  # seconds between two such reports while it lasts


class Registration:
    """One instance's own record: written with a TTL and kept alive by a heartbeat.

    ``start`` writes the record (retrying in the background if Redis is down);
    ``set_state`` rewrites it at once; ``stop`` deletes it. Every write is
    announced on the changes channel. The constructor, ``set_state`` and
    ``update`` raise :class:`~meshkit.errors.ConfigError` for a record outside
    the grammar. ``clock`` times the reports (see the module doc).
    """

    def __init__(self, settings: Settings, record: InstanceRecord,
                 on_error: Callable[[], None] | None = None, *,
                 clock: Clock = SYSTEM_CLOCK,
                 report_after: float = REPORT_AFTER, report_every: float = REPORT_EVERY) -> None:
        self.settings = settings
        self.record = self._validated(record)
        self.keys = Keys(settings.namespace)
        self.url = redacted_url(settings.redis_url)
        self._redis = redis_client(settings)
        self._task: Supervised | None = None
        self._on_error = on_error
        self._clock = clock
        self._report_after = report_after
        self._report_every = report_every
        self._failing_since: float | None = None  # start of the current run of failed writes
        self._reported_at: float | None = None
        self._lost_log = LogThrottle(log, 60.0, clock=clock.now)
        self._stopping = False  # see Registry._closing: a cancel alone may not stop the heartbeat
        self.healthy = False  # whether the last write succeeded
        self.registered = False  # whether any write has succeeded yet
        self.last_error = ""  # why the last write failed (clipped)

    async def start(self) -> None:
        """Write the record now (if Redis answers) and start the heartbeat."""
        self._failing_since = self._clock.now()
        await self._write(announce=True)
        self._task = supervise("meshkit-heartbeat", self._heartbeat, logger=log,
                               clock=self._clock.now, sleep=self._clock.sleep)

    async def set_state(self, state: str) -> None:
        """Change the record's state (``up``/``draining``) and announce it now."""
        self.record = self._validated(self.record.with_state(state))
        await self._write(announce=True)

    async def update(self, record: InstanceRecord) -> None:
        """Replace the whole record (same key) and announce it now."""
        self.record = self._validated(record)
        await self._write(announce=True)

    async def stop(self) -> None:
        """Stop the heartbeat and delete the record (best effort, bounded)."""
        await self._stop_heartbeat()
        try:
            await self._remove(self.record.key)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("could not remove registry record (it will expire): %s", exc)
        await self._redis.aclose()

    async def abandon(self) -> None:
        """Stop the heartbeat without deleting the record: it expires after its TTL."""
        await self._stop_heartbeat()
        await self._redis.aclose()

    async def _stop_heartbeat(self) -> None:
        self._stopping = True
        if self._task is not None and self._task.task is not None:
            self._task.cancel()
            await asyncio.gather(self._task.task, return_exceptions=True)
        self._task = None

    async def _heartbeat(self) -> None:
        while not self._stopping:
            await self._clock.sleep(self.settings.heartbeat_interval)
            if self._stopping:
                break
            # After a failure, announce again: a restarted Redis lost the
            # record, and watchers should see it come back at once.
            await self._write(announce=not self.healthy)
            self.report()

    async def _write(self, announce: bool) -> None:
        rec = self.record
        try:
            existed = await self._store(rec, announce)
            if not existed and not announce:
                self._lost_log.log("lost", logging.WARNING, "registry record %s was gone; written and announced again",
                                   rec.key)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return
        if not self.healthy and announce:
            log.info("registered %s at %s", rec.key, rec.endpoint)
        self.healthy = self.registered = True
        self._failing_since = self._reported_at = None

    def _validated(self, record: InstanceRecord) -> InstanceRecord:
        """``record`` if it is inside the registry grammar; else :class:`~meshkit.errors.ConfigError`."""
        return record.validate()

    async def _store(self, rec: InstanceRecord, announce: bool) -> bool:
        """Write ``rec`` with its TTL (announcing it if ``announce``); return whether its key existed.

        Raises ``RedisError`` or ``OSError`` when the write fails. A key that
        was gone is announced even when ``announce`` is false.
        """
        data = rec.to_json()
        key = self.keys.instance(rec.key)
        message = '{"op":"set","record":' + data + "}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.set(key, data, px=int(self.settings.ttl * 1000))
            if announce:
                pipe.publish(self.keys.changes, message)
            existed = bool((await pipe.execute())[0])
        if not existed and not announce:
            # Gone with the connection up (FLUSHALL, eviction): views may
            # be about to miss it in a scan, so tell them it is back.
            await self._redis.publish(self.keys.changes, message)
        return existed

    async def _remove(self, key: str) -> None:
        """Delete the record under ``key`` and announce it (bounded in time; raises as :meth:`_store`)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.instance(key))
            pipe.publish(self.keys.changes, json.dumps({"op": "del", "key": key}))
            await asyncio.wait_for(pipe.execute(), 1.5)

    def _failed(self, exc: Exception) -> None:
        self.last_error = clip(str(exc) or type(exc).__name__, 300)
        if self.healthy:
            log.warning("registry heartbeat failed, retrying: %s", self.last_error)
        if self._failing_since is None:
            self._failing_since = self._clock.now()
        self.healthy = False
        if self._on_error is not None:
            self._on_error()

    def report(self) -> bool:
        """Log an error if the record has not been written for too long (see the module doc); return whether it did."""
        since = self._failing_since
        if self.healthy or since is None:
            return False
        now = self._clock.now()
        if now - since < self._report_after:
            return False
        if self._reported_at is not None and now - self._reported_at < self._report_every:
            return False
        self._reported_at = now
        what = "is not registered" if not self.registered else "cannot refresh its registration"
        log.error("%s %s: registry at %s unreachable for %.0f s: %s", self.record.key, what, self.url,
                  now - since, self.last_error or "no answer yet",
                  extra={"redis_url": self.url, "error": self.last_error})
        return True
