"""The recent jobs of one pool instance and the shares accepted for each, bounded.

:class:`JobBook` is the in-memory keeper a single process (the test pool, a
one-process demo) judges shares with; a mesh deployment keeps the same
facts in Redis, and the verdicts come from the same :func:`shares.judge`.
"""

from __future__ import annotations

from collections import OrderedDict

from .shares import JobLookup, ShareContext, ShareResult, Verdict, judge
from .work import Job


class JobBook:
    """The last ``keep`` jobs, oldest first, and the hashes of the shares accepted for each.

    A job added with ``clean_jobs`` makes every earlier one stale, as it
    tells miners to drop them; without it, earlier jobs stay valid until
    they fall out of the book. At most ``max_shares`` accepted hashes are
    kept per job: past that, further shares for the job are refused
    (``MALFORMED``, "too many shares for this job") rather than remembered
    without bound or accepted without a duplicate check. With vardiff
    holding each connection to a few shares a minute, a job that long-lived
    means its connections should have had new work long ago.
    """

    def __init__(self, keep: int = 16, max_shares: int = 1 << 16) -> None:
        if keep < 1 or max_shares < 1:
            raise ValueError("keep and max_shares are at least 1")
        self.keep = keep
        self.max_shares = max_shares
        self._jobs: OrderedDict[str, tuple[Job, set[bytes]]] = OrderedDict()
        self._stale: set[str] = set()

    def add(self, job: Job) -> None:
        """Make ``job`` the newest (replacing any job with the same id)."""
        if job.clean_jobs:
            self._stale.update(self._jobs)
        self._jobs.pop(job.job_id, None)
        self._stale.discard(job.job_id)
        self._jobs[job.job_id] = (job, set())
        while len(self._jobs) > self.keep:
            old, _ = self._jobs.popitem(last=False)
            self._stale.discard(old)

    @property
    def current(self) -> Job | None:
        """The newest job, or ``None`` before the first."""
        return next(reversed(self._jobs.values()))[0] if self._jobs else None

    def lookup(self, job_id: str) -> JobLookup:
        """The job and whether it is stale; an unknown id gives ``JobLookup(None)``."""
        entry = self._jobs.get(job_id)
        return JobLookup(entry[0] if entry else None, job_id in self._stale)

    def judge(self, params: object, ctx: ShareContext, *, now: float) -> ShareResult:
        """Judge a ``mining.submit`` and remember it if it counts; never raises."""
        job_id = params[1] if isinstance(params, (list, tuple)) and len(params) == 5 else None
        entry = self._jobs.get(job_id) if isinstance(job_id, str) else None
        lookup = self.lookup(job_id) if isinstance(job_id, str) else None
        result = judge(params, ctx, lookup, now=now, accepted=entry[1] if entry else frozenset())
        if result.verdict.ok and entry is not None:
            if len(entry[1]) >= self.max_shares:
                return ShareResult(Verdict.MALFORMED, "too many shares for this job; wait for the next one")
            entry[1].add(result.digest)
        return result
