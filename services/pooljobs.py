"""The demo pool's job announcer (service ``jobs``): block templates of its own, no coin daemon.

Every ``job_interval`` seconds (default 5) it cuts a new job from the
current template with a fresh ``ntime``; every ``block_interval`` seconds
(default 60) it moves the fake chain on (:func:`services.stratum.work.next_template`)
and the new job says ``clean_jobs``, so miners drop the old work and shares
for it are stale. Each job goes out twice, in this order:

1. on ``pool.job`` to every ``mining`` instance (which judge shares against
   it), waiting for their acknowledgements;
2. on ``mining.notify`` as the notify's params, which gateways forward to
   every connection subscribed to it (``services.mining`` subscribes each
   miner once it is subscribed and authorized).

So a miner never gets a job the ``mining`` instances do not know yet. Job
ids are hex counters seeded from the clock, so they keep growing across
restarts (``services.stratum.session`` compares them). ``recent`` answers the
last 16 jobs, for a ``mining`` instance that starts later.

The last 16 jobs are also kept in Redis (``<ns>:stratum:jobs``, a list of
MessagePack maps, newest first, written before each job goes out), so a
restarted announcer carries on where the last one stopped: it answers
``recent`` with the jobs miners are still working on, and its first job
says ``clean_jobs`` only if the chain moved (its template's ``prevhash``
differs from the last job's). Without that, every restart of the announcer
would throw away every miner's work in flight, as a new block does. Redis
being unreachable at start only costs that: the announcer starts afresh.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import msgpack

import meshkit
from meshkit.gateway import pooled_redis
from meshkit.tasks import Supervised, supervise
from meshkit.untrusted import clip
from services.mining import JOB_TOPIC, NOTIFY_TOPIC
from services.stratum import session
from services.stratum.target import dsha256
from services.stratum.work import BlockTemplate, Job, make_job, next_template

EXTRANONCE_SIZE = 8  # extranonce1 (4, from services.mining) + extranonce2 (4)
PAYOUT_SCRIPT = b"\x51"  # OP_TRUE: the demo pays nobody in particular
GENESIS = BlockTemplate(height=0, prevhash=dsha256(b"meshkit demo chain"), version=0x20000000,
                        nbits=0x1D00FFFF, ntime=0, coinbase_value=50 * 10**8,
                        payout_script=PAYOUT_SCRIPT)


class PoolJobs(meshkit.Service):
    """Announces jobs from its own templates (see the module doc)."""

    name = "jobs"
    version = "2"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self.job_interval = float(self.settings.service_option(self.name, "job_interval", 5.0))
        self.block_interval = float(self.settings.service_option(self.name, "block_interval", 60.0))
        self.template = next_template(GENESIS, int(time.time()))
        self._block_at = time.monotonic()
        self._seq = int(time.time() * 10)
        self.recent_jobs: collections.deque[Job] = collections.deque(maxlen=16)
        self._announcer: Supervised | None = None
        self._new_block = True
        self.redis = pooled_redis(self.settings, max_connections=4)
        self._key = f"{self.settings.namespace}:stratum:jobs"

    async def on_start(self) -> None:
        await self._resume()
        # Its own loop, not @periodic: the first job goes out at once.
        self._announcer = supervise("jobs-announce", self._announce_forever, logger=self.log)

    async def on_drain(self, grace: float) -> None:
        if self._announcer is not None:
            self._announcer.cancel()

    async def on_stop(self) -> None:
        await self.redis.aclose()

    async def _resume(self) -> None:
        """The jobs a previous announcer left in Redis (see the module doc)."""
        try:
            stored = await self.redis.lrange(self._key, 0, self.recent_jobs.maxlen or 16)
        except Exception as exc:  # no Redis now: start afresh, as before there was one
            self.log.warning("cannot read the last jobs, starting afresh: %s", clip(str(exc)))
            return
        jobs = []
        for raw in reversed(stored):  # oldest first
            try:
                jobs.append(session.job_from_wire(msgpack.unpackb(raw, raw=False)))
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                self.log.warning("skipped a stored job: %s", clip(str(exc)))
        if not jobs:
            return
        self.recent_jobs.extend(jobs)
        last = jobs[-1]
        self._seq = max(self._seq, session.job_seq(last.job_id))
        self._new_block = last.prevhash != self.template.prevhash
        self.log.info("resumed after job %s (%s)", last.job_id,
                      "chain moved: next job is clean" if self._new_block else "same block")

    @meshkit.rpc(idempotent=True)
    async def recent(self) -> list[dict[str, Any]]:
        """The last jobs announced, oldest first."""
        return [session.job_to_wire(job) for job in self.recent_jobs]

    def next_job(self, now: float) -> Job:
        """The next job: a new block every ``block_interval`` seconds, else the same one re-timed."""
        if time.monotonic() - self._block_at >= self.block_interval:
            self.template = next_template(self.template, int(now))
            self._block_at, self._new_block = time.monotonic(), True
        else:
            self.template = _retimed(self.template, int(now))
        self._seq += 1
        job = make_job(self.template, f"{self._seq:x}", extranonce_size=EXTRANONCE_SIZE,
                       clean_jobs=self._new_block)
        self._new_block = False
        return job

    async def announce(self) -> Job:
        """Cut the next job and push it to the mining instances, then to the miners."""
        job = self.next_job(time.time())
        self.recent_jobs.append(job)
        await self._store(job)
        backends = await self.publish(JOB_TOPIC, session.job_to_wire(job))
        gateways = await self.publish(NOTIFY_TOPIC, job.notify_params())
        self.log.info("job %s (height %d%s) to %d mining instances and %d gateways", job.job_id,
                      job.height, ", clean" if job.clean_jobs else "", backends, gateways)
        return job

    async def _store(self, job: Job) -> None:
        """Keep ``job`` among the last ones in Redis (a failure is logged: the pool works on)."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(self._key, msgpack.packb(session.job_to_wire(job), use_bin_type=True))
                pipe.ltrim(self._key, 0, (self.recent_jobs.maxlen or 16) - 1)
                await pipe.execute()
        except Exception as exc:
            self.log.warning("cannot store job %s: %s", job.job_id, clip(str(exc)))

    async def _announce_forever(self) -> None:
        while True:
            await self.announce()
            await asyncio.sleep(self.job_interval)


def _retimed(template: BlockTemplate, ntime: int) -> BlockTemplate:
    return BlockTemplate(template.height, template.prevhash, template.version, template.nbits,
                         max(ntime, template.ntime), template.coinbase_value, template.payout_script,
                         template.txids)
