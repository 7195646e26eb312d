"""A Stratum connection's facts as they are kept in the gateway's per-connection state.

A pool served by several ``mining`` instances keeps what it knows of each
connection in the connection's Redis state (a map of strings), so that any
instance can judge any share. This module is the pure translation between
that map and the objects :func:`.shares.judge` and :class:`.vardiff.Vardiff`
take, and between a :class:`.work.Job` and what travels over the mesh.

Fields (all strings):

===============  =================================================================
``extranonce1``  hex, set by ``mining.subscribe`` (absent: not subscribed)
``en2size``      extranonce2 size in bytes
``w:<worker>``   ``"1"`` for each authorized worker
``difficulty``   the difficulty asked (the last ``mining.set_difficulty``)
``previous``     the difficulty shares may still be worked at (see below)
``diff_job``     the newest job id when ``difficulty`` last changed
``window``       vardiff: wall time its window opened
``shares``       vardiff: shares in the window
``accepted``     count of accepted shares; ``rejected`` of rejected ones
===============  =================================================================

A new difficulty applies to the jobs announced after it: a share for job
``diff_job`` or an older one is judged at the lower of ``previous`` and
``difficulty`` (it may have been worked before the change reached the miner);
a share for a newer job at ``difficulty``. Job ids are hex counters that grow
(:func:`job_seq`), so "newer" is a comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .shares import ShareContext
from .vardiff import VardiffState
from .work import Job

MAX_WORKERS = 16  # workers one connection may authorize


def job_seq(job_id: str) -> int:
    """The order of a job id (hex); -1 for one that is not hex."""
    try:
        return int(job_id, 16)
    except ValueError:
        return -1


def judged_difficulty(fields: Mapping[str, str], job_id: str) -> float:
    """The difficulty a share for ``job_id`` is judged at (see the module doc)."""
    difficulty = _float(fields.get("difficulty"), 1.0)
    previous = _float(fields.get("previous"), difficulty)
    changed_at = fields.get("diff_job", "")
    if changed_at and job_seq(job_id) > job_seq(changed_at):
        return difficulty
    return min(previous, difficulty)


def share_context(fields: Mapping[str, str], job_id: str) -> ShareContext:
    """The :class:`ShareContext` of a connection whose state is ``fields``."""
    en1 = fields.get("extranonce1")
    try:
        extranonce1 = bytes.fromhex(en1) if en1 is not None else b""
    except ValueError:
        en1, extranonce1 = None, b""
    workers = frozenset(k[2:] for k, v in fields.items() if k.startswith("w:") and v == "1")
    return ShareContext(extranonce1=extranonce1, extranonce2_size=int(_float(fields.get("en2size"), 4)),
                        difficulty=judged_difficulty(fields, job_id), subscribed=en1 is not None,
                        authorized=workers)


def vardiff_state(fields: Mapping[str, str], now: float) -> VardiffState:
    """The connection's vardiff, as :meth:`.vardiff.Vardiff.restore` takes it."""
    difficulty = _float(fields.get("difficulty"), 1.0)
    return VardiffState(difficulty, _float(fields.get("previous"), difficulty),
                        _float(fields.get("window"), now), int(_float(fields.get("shares"), 0)))


def vardiff_fields(state: VardiffState) -> dict[str, str]:
    """``state`` as connection fields (``diff_job`` is the caller's to set on a change)."""
    return {"difficulty": repr(state.difficulty), "previous": repr(state.previous),
            "window": repr(state.window_start), "shares": str(state.shares)}


def job_to_wire(job: Job) -> dict[str, Any]:
    """``job`` as a MessagePack-able map (for the announcer's ``pool.job`` push)."""
    return {"job_id": job.job_id, "prevhash": job.prevhash, "coinb1": job.coinb1, "coinb2": job.coinb2,
            "merkle_branch": list(job.merkle_branch), "version": job.version, "nbits": job.nbits,
            "ntime": job.ntime, "clean_jobs": job.clean_jobs, "extranonce_size": job.extranonce_size,
            "height": job.height}


def job_from_wire(data: Any) -> Job:
    """The :class:`Job` :func:`job_to_wire` made; ``ValueError`` if ``data`` is not one."""
    try:
        return Job(job_id=str(data["job_id"]), prevhash=bytes(data["prevhash"]), coinb1=bytes(data["coinb1"]),
                   coinb2=bytes(data["coinb2"]), merkle_branch=tuple(bytes(b) for b in data["merkle_branch"]),
                   version=int(data["version"]), nbits=int(data["nbits"]), ntime=int(data["ntime"]),
                   clean_jobs=bool(data["clean_jobs"]), extranonce_size=int(data["extranonce_size"]),
                   height=int(data.get("height", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a job: {type(exc).__name__}") from None


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default
