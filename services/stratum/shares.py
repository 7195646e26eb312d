"""Judging ``mining.submit``: rebuild the work, hash the header, compare with the share target.

:func:`judge` is pure: everything it needs comes in as arguments (the job
looked up by id, the connection's extranonce1 and difficulty, the clock,
the hashes already accepted) and it returns a :class:`ShareResult`; the
caller records an accepted share's hash so that a repeat is a duplicate.

A submission is ``params = [worker, job_id, extranonce2, ntime, nonce]``,
all strings; the last three are hex: ``extranonce2`` exactly
``2 * extranonce2_size`` digits (the bytes as they go into the coinbase),
``ntime`` and ``nonce`` 8 digits each, the big-endian text of the number.
Version rolling (BIP310, a sixth param) is not offered, so six params are
malformed.

The checks, in order (the first that fails decides):

1. ``NOT_SUBSCRIBED`` — the connection has not subscribed;
2. ``MALFORMED`` — not five strings, non-hex, wrong lengths;
3. ``UNAUTHORIZED`` — ``worker`` has not been authorized on the connection;
4. ``STALE`` — the job id is unknown (expired or never sent), or the job
   was superseded by a ``clean_jobs`` notify;
5. ``MALFORMED`` — ``ntime`` before the job's or more than
   :data:`NTIME_FUTURE` seconds past ``max(job ntime, now)`` (Bitcoin's own
   two-hour limit for a block's time);
6. ``LOW_DIFFICULTY`` — the header's hash is above the share target;
7. ``DUPLICATE`` — that hash was accepted before (only good shares are
   remembered, so the memory is bounded by the accepted-share rate, which
   vardiff holds to a configured value);
8. ``BLOCK_CANDIDATE`` if the hash also meets the job's ``nbits`` target,
   else ``ACCEPTED``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Container, Sequence
from dataclasses import dataclass

from meshkit.untrusted import clip

from .target import achieved_difficulty, dsha256, hash_value, nbits_to_target, share_target
from .work import Job

NTIME_FUTURE = 7200  # seconds a share's ntime may run ahead: Bitcoin's limit for a block
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
MAX_WORKER = 128  # characters of a worker name; longer is malformed


class Verdict(enum.Enum):
    """Every answer to a share, with the Stratum error code and message real pools send.

    The codes and messages are slush's reference pool's, which ckpool and the
    miners (cgminer, bfgminer, cpuminer) share: ``[code, message, null]`` is
    the ``error`` of the answer. The one table: a new verdict touches only it.
    """

    #            word               code  message
    ACCEPTED = ("accepted", None, "")
    BLOCK_CANDIDATE = ("block_candidate", None, "")
    MALFORMED = ("malformed", 20, "Other/Unknown")
    STALE = ("stale", 21, "Job not found (=stale)")
    DUPLICATE = ("duplicate", 22, "Duplicate share")
    LOW_DIFFICULTY = ("low_difficulty", 23, "Low difficulty share")
    UNAUTHORIZED = ("unauthorized", 24, "Unauthorized worker")
    NOT_SUBSCRIBED = ("not_subscribed", 25, "Not subscribed")

    def __init__(self, word: str, code: int | None, message: str) -> None:
        self.word = word
        self.code = code
        self.message = message

    @property
    def ok(self) -> bool:
        """True for a share that counts (accepted or a block candidate)."""
        return self.code is None


@dataclass(frozen=True)
class JobLookup:
    """What the caller knows of the job a share names: ``job`` is ``None`` if unknown."""

    job: Job | None
    stale: bool = False


@dataclass(frozen=True)
class ShareContext:
    """The connection's side of a share: who it is and what it was asked for."""

    extranonce1: bytes
    extranonce2_size: int
    difficulty: float
    subscribed: bool = True
    authorized: Container[str] = frozenset()


@dataclass(frozen=True)
class ShareResult:
    """A verdict; for shares that were hashed, the header, its hash and the difficulty it reached.

    ``detail`` says in a few words why (for a log line or the answer's
    message), with any remote value in it clipped.
    """

    verdict: Verdict
    detail: str = ""
    header: bytes = b""
    digest: bytes = b""
    achieved: float = 0.0

    def error(self) -> list[object] | None:
        """The ``error`` of the JSON answer: ``None`` for a good share, else ``[code, message, null]``.

        ``MALFORMED`` carries the detail as its message (there is no code per
        kind of malformation; miners log the text).
        """
        if self.verdict.ok:
            return None
        message = self.detail if self.verdict is Verdict.MALFORMED else self.verdict.message
        return [self.verdict.code, message, None]


@dataclass(frozen=True)
class Submission:
    """A ``mining.submit`` whose fields have the right shape (not yet checked against a job)."""

    worker: str
    job_id: str
    extranonce2: bytes
    ntime: int
    nonce: int


class _Malformed(Exception):
    pass


def parse_submission(params: object, extranonce2_size: int) -> Submission:
    """``params`` as a :class:`Submission`; ``ValueError`` naming the first bad field otherwise."""
    try:
        return _parse(params, extranonce2_size)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None


def _parse(params: object, extranonce2_size: int) -> Submission:
    if not isinstance(params, Sequence) or isinstance(params, (str, bytes)) or len(params) != 5:
        raise _Malformed("mining.submit takes [worker, job_id, extranonce2, ntime, nonce]")
    worker, job_id, en2, ntime, nonce = params
    for name, value in (("worker", worker), ("job_id", job_id), ("extranonce2", en2), ("ntime", ntime),
                        ("nonce", nonce)):
        if not isinstance(value, str):
            raise _Malformed(f"{name} must be a string, not {clip(value, 40)}")
    if not worker or len(worker) > MAX_WORKER:
        raise _Malformed(f"worker name must be 1..{MAX_WORKER} characters")
    if len(en2) != 2 * extranonce2_size or not _HEX.fullmatch(en2):
        raise _Malformed(f"extranonce2 must be {2 * extranonce2_size} hex digits, not {clip(en2, 40)}")
    if not _HEX8.fullmatch(ntime):
        raise _Malformed(f"ntime must be 8 hex digits, not {clip(ntime, 40)}")
    if not _HEX8.fullmatch(nonce):
        raise _Malformed(f"nonce must be 8 hex digits, not {clip(nonce, 40)}")
    return Submission(worker, job_id, bytes.fromhex(en2), int(ntime, 16), int(nonce, 16))


def judge(
    params: object,
    ctx: ShareContext,
    lookup: JobLookup | None,
    *,
    now: float,
    accepted: Container[bytes] = frozenset(),
) -> ShareResult:
    """The verdict on one ``mining.submit`` (see the module docstring for the order of checks).

    ``lookup`` is what the caller found for the submission's job id (it may
    parse the id with :func:`parse_submission` first to look it up; ``None``
    is an unknown job). ``accepted`` holds the hashes of the shares accepted
    so far for that job. ``now`` is the pool's wall clock in Unix seconds
    (it bounds ``ntime``). Never raises for any ``params``.
    """
    if not ctx.subscribed:
        return ShareResult(Verdict.NOT_SUBSCRIBED, "mining.subscribe first")
    try:
        sub = _parse(params, ctx.extranonce2_size)
    except _Malformed as exc:
        return ShareResult(Verdict.MALFORMED, str(exc))
    if sub.worker not in ctx.authorized:
        return ShareResult(Verdict.UNAUTHORIZED, f"worker {clip(sub.worker, 40)} is not authorized")
    if lookup is None or lookup.job is None:
        return ShareResult(Verdict.STALE, f"job {clip(sub.job_id, 40)} not found")
    job = lookup.job
    if lookup.stale:
        return ShareResult(Verdict.STALE, f"job {clip(sub.job_id, 40)} was replaced")
    if len(ctx.extranonce1) + ctx.extranonce2_size != job.extranonce_size:
        # The connection's extranonces do not fit this job: a pool-side
        # mismatch, not the miner's fault, but still not a share.
        return ShareResult(Verdict.MALFORMED, "extranonce sizes do not fit the job")
    if not job.ntime <= sub.ntime <= max(job.ntime, int(now)) + NTIME_FUTURE:
        return ShareResult(Verdict.MALFORMED, "ntime out of range")
    head = job.header(ctx.extranonce1, sub.extranonce2, sub.ntime, sub.nonce)
    digest = dsha256(head)
    value = hash_value(digest)
    achieved = achieved_difficulty(value)
    if value > share_target(ctx.difficulty):
        return ShareResult(Verdict.LOW_DIFFICULTY, f"share difficulty {achieved:.6g} below {ctx.difficulty:.6g}",
                           head, digest, achieved)
    if digest in accepted:
        return ShareResult(Verdict.DUPLICATE, "share already accepted", head, digest, achieved)
    try:
        block = value <= nbits_to_target(job.nbits)
    except ValueError:  # a job with invalid nbits can still carry shares
        block = False
    verdict = Verdict.BLOCK_CANDIDATE if block else Verdict.ACCEPTED
    return ShareResult(verdict, "", head, digest, achieved)
