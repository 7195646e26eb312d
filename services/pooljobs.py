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
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import meshkit
from meshkit.tasks import Supervised, supervise
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

    async def on_start(self) -> None:
        # Its own loop, not @periodic: the first job goes out at once.
        self._announcer = supervise("jobs-announce", self._announce_forever, logger=self.log)

    async def on_drain(self, grace: float) -> None:
        if self._announcer is not None:
            self._announcer.cancel()

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
        backends = await self.publish(JOB_TOPIC, session.job_to_wire(job))
        gateways = await self.publish(NOTIFY_TOPIC, job.notify_params())
        self.log.info("job %s (height %d%s) to %d mining instances and %d gateways", job.job_id,
                      job.height, ", clean" if job.clean_jobs else "", backends, gateways)
        return job

    async def _announce_forever(self) -> None:
        while True:
            await self.announce()
            await asyncio.sleep(self.job_interval)


def _retimed(template: BlockTemplate, ntime: int) -> BlockTemplate:
    return BlockTemplate(template.height, template.prevhash, template.version, template.nbits,
                         max(ntime, template.ntime), template.coinbase_value, template.payout_script,
                         template.txids)
