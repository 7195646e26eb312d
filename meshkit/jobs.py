"""The ``@periodic`` jobs of one service instance: run on schedule, a failure logged and survived.

:class:`PeriodicJobs` starts one supervised task per job (see
:func:`meshkit.tasks.supervise`). Each runs its job every ``job.interval``
seconds on the service's clock until cancelled; a run that is late by more
than an interval does not stack up missed runs. A run that raises is counted
in :attr:`PeriodicJobs.failures`, reported to the observer, and logged once
per job, cause and :data:`PERIODIC_LOG_INTERVAL`; it never ends the task.
A plain (non-async) job runs in the service's handler thread pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from concurrent.futures import Executor

from .clock import Clock
from .handlers import Periodic
from .observe.observer import Observer
from .tasks import Supervised, supervise
from .untrusted import LogThrottle, clip

PERIODIC_LOG_INTERVAL = 60.0  # seconds between two log lines about the same periodic failure


class PeriodicJobs:
    """Runs a service's periodic jobs; :attr:`failures` counts the runs that raised."""

    def __init__(self, log: logging.Logger, clock: Clock, executor: Executor, observer: Observer) -> None:
        self._log = log
        self._throttle = LogThrottle(log, PERIODIC_LOG_INTERVAL)
        self._clock = clock
        self._executor = executor
        self._observer = observer
        self.failures = 0

    def start(self, jobs: Iterable[Periodic]) -> list[Supervised]:
        """One supervised task per job, started now (on the running loop); cancel them to stop."""
        return [supervise(f"periodic-{p.name}", functools.partial(self.run, p),
                          logger=self._log, clock=self._clock.now, sleep=self._clock.sleep)
                for p in jobs]

    async def run(self, job: Periodic) -> None:
        """Run ``job`` every ``job.interval`` seconds until cancelled."""
        clock = self._clock
        next_run = clock.now() + job.interval
        while True:
            await clock.sleep(max(0.0, next_run - clock.now()))
            next_run += job.interval
            await self.run_once(job)
            if clock.now() > next_run:
                next_run = clock.now() + job.interval  # do not stack up missed runs

    async def run_once(self, job: Periodic) -> bool:
        """Run ``job`` once; a failure is logged once per cause and interval, counted, and not raised."""
        try:
            if job.is_async:
                await job.fn()
            else:
                await asyncio.get_running_loop().run_in_executor(self._executor, job.fn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next run comes anyway: one bad tick must not end the task
            self.failures += 1
            self._observer.periodic_failed(job.name, exc)
            self._throttle.log(f"{job.name}:{type(exc).__name__}", logging.ERROR,
                               "periodic task %s failed (it keeps running): %s: %s", job.name,
                               type(exc).__name__, clip(str(exc)), exc_info=exc,
                               extra={"task": job.name})
            return False
        return True
