"""The demo's backend: checks clients' submissions against the current job and counts them.

Clients reach it through a gateway as ``shares.login``, ``shares.submit`` and
``shares.stats``. Everything it knows about a client lives in that
connection's state in Redis (:class:`meshkit.gateway.ConnectionState`), so any
instance can serve any request and instances can be restarted, killed or
scaled at will.

Verdicts of :meth:`ShareLogger.submit` (a result, not an error):

==================  ====================================================
``accepted``        the nonce meets the current job's target
``low_difficulty``  it does not
``stale``           the job was replaced by a newer one
``duplicate``       another connection already submitted this nonce
==================  ====================================================

Malformed submissions (a nonce that is not 8 hex digits, a job that never
existed) and submissions before ``login`` raise :class:`InvalidShare`, which
the client sees as a JSON-RPC ``handler_error`` naming the problem.

``submit`` is idempotent: the same connection submitting the same nonce again
gets the first verdict back and nothing is counted twice. That is what lets
the gateway retry it safely when a backend dies with it in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

import meshkit
from meshkit.gateway import ConnectionStore

from .jobs import JobBoard

_NONCE = re.compile(r"[0-9a-f]{8}")
_WORKER = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class InvalidShare(Exception):
    """The submission cannot be judged: malformed, unknown job, or not logged in."""


def share_hash(job_id: str, nonce: str) -> str:
    """The hex digest a submission is judged by."""
    return hashlib.sha256(f"{job_id}:{nonce}".encode()).hexdigest()


def judge(job: dict[str, Any], current_id: str | None, nonce: str) -> tuple[str, str]:
    """``(verdict, hash)`` of ``nonce`` for ``job`` (see the module doc), duplicates aside."""
    digest = share_hash(job["job_id"], nonce)
    if job["job_id"] != current_id:
        return "stale", digest
    return ("accepted" if int(digest, 16) <= int(job["target"], 16) else "low_difficulty"), digest


class ShareLogger(meshkit.Service):
    """Validates and records submissions; counts them per connection."""

    name = "shares"
    version = "1"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self.connections = ConnectionStore(self.settings)
        self.redis = self.connections.redis  # one pool for everything this instance asks Redis
        self.board = JobBoard(self.redis, self.settings.namespace)

    async def on_stop(self) -> None:
        await self.connections.aclose()

    @meshkit.rpc(idempotent=True)
    async def login(self, worker: str) -> dict[str, Any]:
        """Name this connection's worker; returns the connection id and the current job."""
        if not isinstance(worker, str) or not _WORKER.fullmatch(worker):
            raise InvalidShare("worker must be 1-64 letters, digits or _.@-")
        state = self.connections.current()
        await state.set("worker", worker)
        return {"connection": state.conn_id, "worker": worker, "job": await self.board.current()}

    @meshkit.rpc(idempotent=True)
    async def submit(self, job_id: str, nonce: str) -> dict[str, Any]:
        """Judge one nonce for ``job_id``, record it, and count the verdict for this connection."""
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise InvalidShare(f"nonce must be 8 lower-case hex digits, got {nonce!r}")
        if not isinstance(job_id, str):
            raise InvalidShare("job_id must be a string")
        state = self.connections.current()
        worker, (job, current_id) = await asyncio.gather(state.get("worker"),
                                                         self.board.lookup(job_id))
        if worker is None:
            raise InvalidShare("call shares.login first")
        if job is None:
            raise InvalidShare(f"unknown job {job_id!r}")
        verdict, digest = judge(job, current_id, nonce)
        # One HSETNX both records the nonce and tells a first submission
        # from a repeat; a repeat by the same connection is a retry.
        key = self.board.shares_key(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(key, nonce, f"{state.conn_id} {verdict}")
            pipe.hget(key, nonce)
            pipe.pexpire(key, int(self.board.keep * 1000))
            first, recorded, _ = await pipe.execute()
        if not first:
            owner, _, earlier = recorded.decode().partition(" ")
            verdict = earlier if owner == state.conn_id else "duplicate"
        if first or verdict == "duplicate":
            await state.incr("accepted" if verdict == "accepted" else "rejected")
        return {"job_id": job_id, "nonce": nonce, "accepted": verdict == "accepted",
                "verdict": verdict, "hash": digest, "served_by": self.instance_id}

    @meshkit.rpc(idempotent=True)
    async def stats(self) -> dict[str, Any]:
        """This connection's worker and its accepted and rejected counts."""
        fields = await self.connections.current().all()
        return {"worker": fields.get("worker"), "accepted": int(fields.get("accepted", 0)),
                "rejected": int(fields.get("rejected", 0))}
