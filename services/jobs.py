"""The restart proof's job announcer (``bench/restarts.py``), with ``services/shares.py``.

The demo's announcer is ``services/pooljobs.py`` (real Stratum jobs); this
toy one stays for the restart proof's load clients.

A *job* is a piece of work clients search: find a ``nonce`` (8 hex digits)
such that ``sha256("<job_id>:<nonce>")``, read as a number, is at most the
job's ``target``. With the default difficulty of 4, one nonce in four wins.

:class:`JobAnnouncer` posts each job on the :class:`JobBoard` in Redis (so
any ``shares`` instance can validate submissions against it) and publishes it
on ``jobs.notify``; gateways forward that topic to subscribed clients. Its
options, in ``[services.jobs]``: ``job_interval`` (seconds, default 5) and
``difficulty`` (default 4).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

import meshkit
from meshkit.gateway import pooled_redis

TOPIC = "jobs.notify"
MAX_TARGET = 2**256 - 1
SERVICE = "jobs"  # the name of the [services.<name>] table the options below live in


def job_interval(settings: meshkit.Settings) -> float:
    """Seconds between two jobs: ``job_interval`` of ``[services.jobs]`` (default 5)."""
    return float(settings.service_option(SERVICE, "job_interval", 5.0))


def job_keep(settings: meshkit.Settings) -> float:
    """Seconds a job (and the record of the nonces submitted for it) is kept after it was posted.

    Ten intervals, at least a minute: long enough that a submission for a
    job just replaced is judged ``stale`` rather than unknown. Every service
    reading the :class:`JobBoard` takes it from here, so they agree.
    """
    return max(60.0, 10 * job_interval(settings))


class JobBoard:
    """The current job and its recent predecessors, in Redis under ``<ns>:jobs:``.

    A job stays readable for ``keep`` seconds after it was posted, so a
    submission for a job that was just replaced is answered "stale", not
    "unknown job".
    """

    def __init__(self, redis: aioredis.Redis, namespace: str, keep: float = 60.0) -> None:
        self.redis = redis
        self.prefix = f"{namespace}:jobs:"
        self.keep = keep

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def shares_key(self, job_id: str) -> str:
        """Hash of the nonces submitted for ``job_id`` (see ``services.shares``)."""
        return f"{self.prefix}shares:{job_id}"

    async def post(self, job: dict[str, Any]) -> None:
        """Make ``job`` the current one."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.job_key(job["job_id"]), json.dumps(job), px=int(self.keep * 1000))
            pipe.set(f"{self.prefix}current", job["job_id"])
            await pipe.execute()

    async def lookup(self, job_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """``(job, current_id)``: the job (``None`` if unknown or expired) and the current id."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.job_key(job_id))
            pipe.get(f"{self.prefix}current")
            raw, current = await pipe.execute()
        job = json.loads(raw) if raw is not None else None
        return job, _text(current) if current is not None else None

    async def current(self) -> dict[str, Any] | None:
        """The current job, if any was posted (and has not expired)."""
        current = await self.redis.get(f"{self.prefix}current")
        if current is None:
            return None
        job, _ = await self.lookup(_text(current))
        return job


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def make_job(difficulty: int) -> dict[str, Any]:
    """A fresh job: a random id and the target for ``difficulty``."""
    return {
        "job_id": secrets.token_hex(4),
        "target": f"{MAX_TARGET // max(1, difficulty):064x}",
        "created": round(time.time(), 3),
    }


class JobAnnouncer(meshkit.Service):
    """Posts a new job every ``job_interval`` seconds and pushes it to ``jobs.notify``."""

    name = SERVICE
    version = "1"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self.interval = job_interval(self.settings)
        self.difficulty = int(self.settings.service_option(self.name, "difficulty", 4))
        self.redis = pooled_redis(self.settings)
        self.board = JobBoard(self.redis, self.settings.namespace, keep=job_keep(self.settings))
        self._loop_task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        # Our own loop rather than @periodic: the interval is configuration,
        # and the first job should go out at once, not one interval later.
        self._loop_task = asyncio.create_task(self._announce_forever(), name="jobs-announce")

    async def on_drain(self, grace: float) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def on_stop(self) -> None:
        await self.redis.aclose()

    @meshkit.rpc(idempotent=True)
    async def current(self) -> dict[str, Any] | None:
        """The current job (what the last ``jobs.notify`` carried)."""
        return await self.board.current()

    async def announce(self) -> dict[str, Any]:
        """Post a new job and push it to every subscriber; return it."""
        job = make_job(self.difficulty)
        await self.board.post(job)
        delivered = await self.publish(TOPIC, job)
        self.log.info("job %s announced to %d subscribers", job["job_id"], delivered)
        return job

    async def _announce_forever(self) -> None:
        while True:
            try:
                await self.announce()
            except Exception:
                self.log.exception("announcing a job failed")
            await asyncio.sleep(self.interval)
