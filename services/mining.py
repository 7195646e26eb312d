"""The demo pool's ``mining`` service: Stratum v1's client methods, behind a Stratum gateway.

A miner's ``mining.subscribe`` reaches :meth:`Mining.subscribe` through
HAProxy and a gateway whose listener speaks the ``stratum`` dialect
(``docs/stratum.md``). Any instance serves any connection: what the pool
knows of a connection is in the connection's Redis state
(:mod:`services.stratum.session`), the jobs are pushed to every instance by
the announcer (``pool.job``), and accepted-share hashes are kept pool-wide
in Redis for the duplicate check.

* ``subscribe`` hands out an extranonce1 unique among live connections of
  the whole pool: a pool-wide 32-bit counter in Redis (``INCR``), so a value
  comes back only after 2**32 subscriptions. (The instance-prefix scheme of
  :mod:`services.stratum.extranonce` needs to hear of every close, which a
  backend does not.) extranonce2 is 4 bytes.
* ``authorize`` accepts any worker name of 1..128 characters (a demo pool
  pays nobody); once the connection is subscribed too, the connection gets
  its ``mining.set_difficulty`` and the current ``mining.notify`` pushed to
  it alone, and is subscribed to the announcer's ``mining.notify`` topic.
  They are pushed before ``authorize`` answers, so they may reach the miner
  before that answer, as with ckpool; cgminer, cpuminer and the bundled
  miner handle notifications while they wait for an answer.
* ``submit`` judges the share for real (:func:`services.stratum.shares.judge`)
  and answers ``true`` or the Stratum error (``[21, "Job not found
  (=stale)", ...]`` and the rest), raised as a
  :class:`~meshkit.RefusedError` with that ``client_code``; accepted shares
  drive the connection's vardiff, and a new difficulty is pushed to that
  connection alone.
* ``stats`` answers the connection's counts, its difficulty and the
  instance that answered (``served_by``: the restart proof sees with it
  when a new instance takes traffic).
* ``extranonce.subscribe`` answers ``true`` (the extranonce never changes
  during a connection, so no ``mining.set_extranonce`` is ever sent).
* ``reconnect(conn, host, port, wait)`` sends ``client.reconnect`` to one
  connection: for operators (``meshkit call mining reconnect ...``), refused
  when called from a client connection.

Options in ``[services.mining]``: ``share_interval`` (seconds, default 10),
``min_difficulty`` (default 2**-16, so a CPU miner finds shares),
``max_difficulty``, ``start_difficulty`` (default: the minimum),
``retarget_interval``, ``burst_shares``. With ``min_difficulty`` equal to
``max_difficulty`` the difficulty is fixed and no vardiff window is kept.

A starting instance asks the announcer for its recent jobs before it
registers (waiting up to 3 s for one), so no share reaches it for a job it
has not heard of.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import meshkit
from meshkit.gateway import ConnectionState, ConnectionStore, pooled_redis, push_to_connection
from meshkit.untrusted import clip
from services.stratum import messages, session
from services.stratum.jobbook import JobBook
from services.stratum.messages import Method
from services.stratum.shares import MAX_WORKER, JobLookup, ShareResult, Verdict, judge
from services.stratum.vardiff import Vardiff, VardiffConfig

NOTIFY_TOPIC = "mining.notify"  # the announcer's jobs, forwarded by gateways to subscribed miners
JOB_TOPIC = "pool.job"  # the announcer's jobs, for mining instances
EXTRANONCE2_SIZE = 4
START_LOAD_WAIT = 3.0  # seconds a starting instance waits for the announcer's recent jobs
# A share for a job newer than any this instance knows (pushed while it was starting, before the
# announcer's view had it) waits up to CATCH_UP_WAIT s for the announcer's recent jobs; one such
# call at a time and at most one per CATCH_UP_EVERY s, so a miner naming made-up jobs cannot make
# one per share.
CATCH_UP_WAIT = 1.0
CATCH_UP_EVERY = 0.5
ACCEPTED_KEEP = 600  # seconds the pool remembers a job's accepted hashes (jobs live far shorter)


def vardiff_config(settings: meshkit.Settings, service: str = "mining") -> VardiffConfig:
    """The ``[services.mining]`` vardiff options."""
    def opt(name: str, default: float) -> float:
        return float(settings.service_option(service, name, default))
    return VardiffConfig(share_interval=opt("share_interval", 10.0),
                         min_difficulty=opt("min_difficulty", 2.0**-16),
                         max_difficulty=opt("max_difficulty", float(2**32)),
                         retarget_interval=opt("retarget_interval", 60.0),
                         burst_shares=int(opt("burst_shares", 24)))


class Mining(meshkit.Service):
    """``mining.*`` for Stratum v1 miners (see the module doc)."""

    name = "mining"
    version = "1"

    def __init__(self, settings: meshkit.Settings | None = None, **parts: Any) -> None:
        super().__init__(settings, **parts)  # parts: meshkit.Service's keyword arguments
        self.connections = ConnectionStore(self.settings)
        self.redis = pooled_redis(self.settings)
        self.vardiff = vardiff_config(self.settings, self.name)
        self.start_difficulty = float(self.settings.service_option(
            self.name, "start_difficulty", self.vardiff.min_difficulty))
        self.book = JobBook(keep=16)
        self._prefix = f"{self.settings.namespace}:stratum"
        self._loading: asyncio.Task[None] | None = None
        self._catch_up: asyncio.Future[None] | None = None
        self._caught_up_at = -CATCH_UP_EVERY
        self._sends: set[asyncio.Task[None]] = set()

    async def on_start(self) -> None:
        # Before registering (the runner registers once on_start returns), so that no
        # share reaches this instance before it knows the jobs miners work on; bounded,
        # so a pool without an announcer yet still starts (its first push will do).
        try:
            await asyncio.wait_for(self._load_once(), START_LOAD_WAIT)
        except Exception as exc:  # no announcer yet: load in the background
            self.log.info("no recent jobs from the announcer at start: %s", clip(str(exc)))
        if not self.book.current:
            self._loading = asyncio.create_task(self._load_jobs(), name="mining-load-jobs")

    async def on_stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        await self.connections.aclose()
        await self.redis.aclose()

    async def _load_jobs(self) -> None:
        """The announcer's recent jobs, for an instance that starts after they were pushed."""
        while not self.book.current:
            try:
                await self._load_once()
            except Exception as exc:  # no announcer yet: its first push will do as well
                self.log.info("no recent jobs from the announcer yet: %s", clip(str(exc)))
                await asyncio.sleep(1.0)

    async def _load_once(self) -> None:
        for data in await self.call("jobs", "recent", timeout=5.0, wait=True):
            if self.book.lookup(str(data.get("job_id"))).job is None:
                self.book.add(session.job_from_wire(data))

    async def lookup_job(self, job_id: str) -> JobLookup:
        """The job a share names, fetched from the announcer first if it is newer than any known.

        Only a hex id above the current job's asks (see ``CATCH_UP_*``); every
        share waiting meanwhile shares the one call. Never raises: an announcer
        that does not answer leaves the job unknown (the share is stale).
        """
        found = self.book.lookup(job_id)
        current = self.book.current
        if found.job is not None or (current is not None and
                                     session.job_seq(job_id) <= session.job_seq(current.job_id)):
            return found
        if self._catch_up is None:
            now = time.monotonic()
            if now - self._caught_up_at < CATCH_UP_EVERY:
                return found
            self._caught_up_at = now
            self._catch_up = asyncio.ensure_future(self._load_once())
            self._catch_up.add_done_callback(self._caught_up)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._catch_up), CATCH_UP_WAIT)
        return self.book.lookup(job_id)

    def _caught_up(self, done: asyncio.Future[None]) -> None:
        self._catch_up = None
        if not done.cancelled() and done.exception() is not None:
            self.log.info("no recent jobs from the announcer for a newer job: %s", clip(str(done.exception())))

    @meshkit.subscribe(JOB_TOPIC)
    async def on_job(self, payload: Any) -> None:
        """A new job from the announcer (before miners get it)."""
        self.book.add(session.job_from_wire(payload))

    # -- the client methods -----------------------------------------------------------

    @meshkit.rpc
    async def subscribe(self, *params: Any) -> list[Any]:
        """``mining.subscribe [user_agent?, session?]``: subscriptions, extranonce1, extranonce2 size."""
        state, conn_id = self._caller()
        number = await self.redis.incr(f"{self._prefix}:en1") % 2**32
        extranonce1 = number.to_bytes(4, "big")
        now = time.time()
        await state.set({"extranonce1": extranonce1.hex(), "en2size": str(EXTRANONCE2_SIZE),
                         "difficulty": repr(self.start_difficulty), "previous": repr(self.start_difficulty),
                         "window": repr(now), "shares": "0", "diff_job": ""})
        if any(k.startswith("w:") for k in await state.all()):
            # Authorized first, subscribed now: the work goes out once this handler
            # has returned (not ordered with the answer; miners subscribe first anyway).
            self._later(self._send_work(conn_id, self.start_difficulty))
        return messages.subscribe_result(conn_id, extranonce1, EXTRANONCE2_SIZE)

    @meshkit.rpc
    async def authorize(self, worker: Any = None, password: Any = None, *rest: Any) -> bool:
        """``mining.authorize [worker, password]``: ``true``, or error 24."""
        state, conn_id = self._caller()
        if not isinstance(worker, str) or not 0 < len(worker) <= MAX_WORKER:
            raise meshkit.RefusedError(Verdict.UNAUTHORIZED.message, client_code=Verdict.UNAUTHORIZED.code)
        fields = await state.all()
        if sum(1 for k in fields if k.startswith("w:")) >= session.MAX_WORKERS and f"w:{worker}" not in fields:
            raise meshkit.RefusedError(f"at most {session.MAX_WORKERS} workers per connection",
                                       client_code=Verdict.UNAUTHORIZED.code)
        await state.set(f"w:{worker}", "1")
        if "extranonce1" in fields and not any(k.startswith("w:") for k in fields):
            await self._send_work(conn_id, session.judged_difficulty(fields, ""))
        return True

    @meshkit.rpc(name="extranonce.subscribe")
    async def extranonce_subscribe(self, *params: Any) -> bool:
        """``mining.extranonce.subscribe``: accepted (the extranonce never changes mid-connection)."""
        return True

    @meshkit.rpc
    async def submit(self, *params: Any) -> bool:
        """``mining.submit [worker, job_id, extranonce2, ntime, nonce]``: ``true`` or the verdict's error."""
        state, conn_id = self._caller()
        fields = await state.all()
        job_id = params[1] if len(params) == 5 and isinstance(params[1], str) else ""
        result = judge(list(params), session.share_context(fields, job_id), await self.lookup_job(job_id),
                       now=time.time())
        if result.verdict.ok:
            result = await self._remember(job_id, result)
        if not result.verdict.ok:
            await state.incr("rejected")
            error = result.error() or [20, "rejected", None]
            raise meshkit.RefusedError(str(error[1]), client_code=int(str(error[0])))
        await state.incr("accepted")
        await self._retarget(state, conn_id, fields, job_id)
        return True

    @meshkit.rpc
    async def stats(self) -> dict[str, Any]:
        """The calling connection's counts and difficulty, and the instance that answered."""
        state, _ = self._caller()
        fields = await state.all()
        return {"accepted": int(fields.get("accepted", 0)), "rejected": int(fields.get("rejected", 0)),
                "difficulty": float(fields.get("difficulty", self.start_difficulty)),
                "workers": sorted(k[2:] for k in fields if k.startswith("w:")),
                "served_by": self.instance_id}

    @meshkit.rpc
    async def reconnect(self, conn: str, host: str, port: int, wait: int = 0) -> bool:
        """Send ``client.reconnect`` to connection ``conn``; whether it got there. Operators only."""
        ctx = meshkit.current_call()
        if ctx is not None and ctx.connection_id is not None:
            raise meshkit.RefusedError("mining.reconnect is not for clients")
        message = messages.reconnect(str(host), int(port), int(wait))
        return await push_to_connection(self, conn, message["method"], message["params"])

    # -- helpers ------------------------------------------------------------------------

    def _caller(self) -> tuple[ConnectionState, str]:
        ctx = meshkit.current_call()
        conn_id = ctx.connection_id if ctx is not None else None
        if not conn_id:
            raise meshkit.RefusedError("mining methods are called by a miner's connection")
        return self.connections.current(), conn_id

    async def _remember(self, job_id: str, result: ShareResult) -> ShareResult:
        """Pool-wide duplicate check: the first instance to add a hash owns the share."""
        key = f"{self._prefix}:accepted:{job_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, result.digest)
            pipe.expire(key, ACCEPTED_KEEP)
            added, _ = await pipe.execute()
        if not added:
            return ShareResult(Verdict.DUPLICATE, "share already accepted", result.header, result.digest,
                               result.achieved)
        return result

    async def _retarget(self, state: ConnectionState, conn_id: str, fields: Mapping[str, str],
                        job_id: str) -> None:
        if self.vardiff.min_difficulty == self.vardiff.max_difficulty:
            return  # a fixed difficulty: nothing to retarget, no window to keep in Redis
        now = time.time()
        vd = Vardiff.restore(self.vardiff, session.vardiff_state(fields, now))
        changed_at = fields.get("diff_job", "")
        if not changed_at or session.job_seq(job_id) > session.job_seq(changed_at):
            vd.job_sent()  # a share for a job sent after the last change: the change has landed
        new = vd.record_share(now)
        update = session.vardiff_fields(vd.state())
        if new is not None:
            current = self.book.current
            update["diff_job"] = current.job_id if current is not None else ""
        await state.set(update)
        if new is not None:
            sent = messages.set_difficulty(new)
            await push_to_connection(self, conn_id, sent["method"], sent["params"])

    async def _send_work(self, conn_id: str, difficulty: float) -> None:
        """The first difficulty and job for a connection that is now subscribed and authorized."""
        sent = messages.set_difficulty(difficulty)
        await push_to_connection(self, conn_id, sent["method"], sent["params"])
        job = self.book.current
        if job is None:  # no job yet: the announcer's first one reaches it through the topic
            await push_to_connection(self, conn_id, None, subscribe=[NOTIFY_TOPIC])
            return
        # One delivery: subscribed and given the current job at once, so a
        # newer job from the topic cannot arrive before it.
        params = job.notify_params()
        params[-1] = True  # whatever it had before, drop it
        await push_to_connection(self, conn_id, Method.NOTIFY.value, params, subscribe=[NOTIFY_TOPIC])

    def _later(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
