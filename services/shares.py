"""The restart proof's load backend (``bench/restarts.py``): a toy share checker over JSON-RPC 2.0.

This was the demo before the demo became a real Stratum v1 pool
(``services/mining.py``); it stays as the backend the restart proof loads,
whose clients (``bench/loadclients.py``) speak this toy dialect.

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
the gateway retry it safely when a backend dies with it in flight: recording
the nonce and counting the verdict are one atomic step in Redis, so there is
no moment at which a submission is recorded but not counted.
Submitted nonces are remembered as long as their job
(:func:`services.jobs.job_keep`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

import meshkit
from meshkit.gateway import ConnectionGoneError, ConnectionStore

from .jobs import JobBoard, job_keep

_NONCE = re.compile(r"[0-9a-f]{8}")
_WORKER = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

# Records a submission and counts its verdict for the connection, atomically:
# a backend dying mid-submit leaves both done or neither, and the gateway's
# retry then gets the first verdict back.
# KEYS[1]: the job's shares hash (nonce -> "<conn> <verdict>", plus
#          "<nonce>/<conn>" for a connection's duplicate of another's nonce)
# KEYS[2]: the connection's state hash
# ARGV: nonce, connection id, verdict as judged now, keep (ms)
# Returns the verdict, or nil if the connection's state is gone.
_SUBMIT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return false end
local nonce, conn, verdict = ARGV[1], ARGV[2], ARGV[3]
local recorded = redis.call('HGET', KEYS[1], nonce)
if recorded then
  local owner, earlier = string.match(recorded, '^(%S+) (%S+)$')
  if owner == conn then return earlier end
  verdict = 'duplicate'
  if redis.call('HSETNX', KEYS[1], nonce .. '/' .. conn, verdict) == 0 then return verdict end
else
  redis.call('HSET', KEYS[1], nonce, conn .. ' ' .. verdict)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[2], verdict == 'accepted' and 'accepted' or 'rejected', 1)
return verdict
"""


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
        self.board = JobBoard(self.redis, self.settings.namespace, keep=job_keep(self.settings))
        self._submit = self.redis.register_script(_SUBMIT)

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
        recorded = await self._submit(
            keys=[self.board.shares_key(job_id), self.connections.key(state.conn_id)],
            args=[nonce, state.conn_id, verdict, int(self.board.keep * 1000)])
        if recorded is None:
            raise ConnectionGoneError(f"connection {state.conn_id} is closed")
        # A repeat by the same connection (a retry) gets its first verdict back.
        verdict = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
        return {"job_id": job_id, "nonce": nonce, "accepted": verdict == "accepted",
                "verdict": verdict, "hash": digest, "served_by": self.instance_id}

    @meshkit.rpc(idempotent=True)
    async def stats(self) -> dict[str, Any]:
        """This connection's worker and its accepted and rejected counts."""
        fields = await self.connections.current().all()
        return {"worker": fields.get("worker"), "accepted": int(fields.get("accepted", 0)),
                "rejected": int(fields.get("rejected", 0))}
