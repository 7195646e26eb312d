"""An instance's own registry record: written with a TTL and kept alive by a heartbeat.

See :mod:`meshkit.registry` for the layout in Redis. A graceful stop deletes
the record at once; a killed instance's record expires after ``Settings.ttl``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from .config import Settings
from .record import InstanceRecord
from .registry import Keys, redis_client

log = logging.getLogger("meshkit.registry")


class Registration:
    """One instance's own record: written with a TTL and kept alive by a heartbeat.

    ``start`` writes the record (retrying in the background if Redis is down);
    ``set_state`` rewrites it at once; ``stop`` deletes it. Every write is
    announced on the changes channel.
    """

    def __init__(self, settings: Settings, record: InstanceRecord,
                 on_error: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.record = record
        self.keys = Keys(settings.namespace)
        self._redis = redis_client(settings)
        self._task: asyncio.Task[None] | None = None
        self._on_error = on_error
        self._stopping = False  # see Registry._closing: a cancel alone may not stop the heartbeat
        self.healthy = False  # whether the last write succeeded

    async def start(self) -> None:
        """Write the record now (if Redis answers) and start the heartbeat."""
        await self._write(announce=True)
        self._task = asyncio.create_task(self._heartbeat(), name="meshkit-heartbeat")

    async def set_state(self, state: str) -> None:
        """Change the record's state (``up``/``draining``) and announce it now."""
        self.record = self.record.with_state(state)
        await self._write(announce=True)

    async def update(self, record: InstanceRecord) -> None:
        """Replace the whole record (same key) and announce it now."""
        self.record = record
        await self._write(announce=True)

    async def stop(self) -> None:
        """Stop the heartbeat and delete the record (best effort, bounded)."""
        await self._stop_heartbeat()
        try:
            key = self.record.key
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.instance(key))
                pipe.publish(self.keys.changes, json.dumps({"op": "del", "key": key}))
                await asyncio.wait_for(pipe.execute(), 1.5)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("could not remove registry record (it will expire): %s", exc)
        await self._redis.aclose()

    async def abandon(self) -> None:
        """Stop the heartbeat without deleting the record: it expires after its TTL."""
        await self._stop_heartbeat()
        await self._redis.aclose()

    async def _stop_heartbeat(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _heartbeat(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.settings.heartbeat_interval)
            if self._stopping:
                break
            # After a failure, announce again: a restarted Redis lost the
            # record, and watchers should see it come back at once.
            await self._write(announce=not self.healthy)

    async def _write(self, announce: bool) -> None:
        rec = self.record
        data = rec.to_json()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.instance(rec.key), data, px=int(self.settings.ttl * 1000))
                if announce:
                    message = '{"op":"set","record":' + data + "}"
                    pipe.publish(self.keys.changes, message)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            if self.healthy:
                log.warning("registry heartbeat failed, retrying: %s", exc)
            self.healthy = False
            if self._on_error is not None:
                self._on_error()
            return
        if not self.healthy and announce:
            log.info("registered %s at %s", rec.key, rec.endpoint)
        self.healthy = True
